#!/usr/bin/env bash
# Set everything up (once) and run the whole test suite (MPI tests run under mpirun -np 1..4).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/setup.sh"
source "$here/env.sh"
cd "$MPILLM_ROOT"
exec python -m pytest -q -p no:cacheprovider "$@"
