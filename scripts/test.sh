#!/usr/bin/env bash
# Set everything up (once) and run the whole test suite (MPI tests run under mpirun -np 1..4).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
MPILLM_SKIP_WARMUP=1 "$here/setup.sh"   # the tests compile into their own cache
source "$here/env.sh"
cd "$MPILLM_ROOT"
exec python -m pytest -q -p no:cacheprovider "$@"
