#!/usr/bin/env bash
# Set everything up (once) and generate with the bundled model on 4 ranks of this machine.
# Extra arguments go to mpillm.generate, e.g.: scripts/run.sh --prompt "Hello" --max-tokens 64
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/setup.sh"      # quick when nothing changed: compares two stamps
source "$here/env.sh"
cd "$MPILLM_ROOT"
if [ $# -eq 0 ]; then
  set -- --chat --prompt "What are three good reasons to build a small computer cluster?"
fi
exec mpirun -np 4 --hostfile hostfile --bind-to none python -m mpillm.generate "$@"
