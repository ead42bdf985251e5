#!/usr/bin/env bash
# Our HPL (python -m hpl) against the reference HPL inside Debian's hpcc, same N/NB/P/Q, same machine.
#
#   scripts/hpl_vs_hpcc.sh [N] [NB] [P] [Q]        (defaults: 15000 192 1 2)
#
# Environment knobs:
#   HOSTFILE=path    hostfile for both runs (default: none, i.e. this machine)
#   BIND=core|none   process binding for both runs (default: core)
#   RUNS=k           run each side k times and keep the best (default: 1)
#   SKIP_HPCC=1      run only ours
#
# hpcc runs all of the HPC Challenge tests and HPL comes last; with N=15000 on two
# cores the whole hpcc run takes several minutes.  It is linked against the system
# BLAS, so libopenblas0-serial is installed beside it (or it would use the slow
# reference BLAS); both sides run with one BLAS thread per rank when ranks fill the cores.
set -euo pipefail

N=${1:-15000}
NB=${2:-192}
P=${3:-1}
Q=${4:-2}
NP=$((P * Q))
BIND=${BIND:-core}
RUNS=${RUNS:-1}

# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
PY="$MPILLM_VENV/bin/python"
OUR_MPIRUN="$MPILLM_VENV/bin/mpirun"
[ -x "$OUR_MPIRUN" ] || OUR_MPIRUN=mpirun

# Some machines set OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for old OpenBLAS builds; they slow a
# current one down. This is a benchmark: unset both, for both sides, in this script only.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE

CORES=$(nproc)
RANKS_PER_NODE=$NP
if [ -n "${HOSTFILE:-}" ]; then
  RANKS_PER_NODE=$(( (NP + $(grep -cv '^\s*\(#\|$\)' "$HOSTFILE") - 1) / $(grep -cv '^\s*\(#\|$\)' "$HOSTFILE") ))
fi
THREADS=$(( CORES / RANKS_PER_NODE )); [ "$THREADS" -ge 1 ] || THREADS=1

work=$(mktemp -d /tmp/hpl_vs_hpcc.XXXXXX)
trap 'rm -rf "$work"' EXIT
hf_args=()
[ -n "${HOSTFILE:-}" ] && hf_args=(--hostfile "$HOSTFILE")

best() { sort -g | tail -1; }

# ------------------------------------------------------------------ reference: Debian hpcc
HPCC_GF=""
if [ "${SKIP_HPCC:-0}" != 1 ]; then
  if ! command -v hpcc >/dev/null || ! dpkg -s libopenblas0-serial >/dev/null 2>&1; then
    echo "installing hpcc and libopenblas0-serial with apt-get ..."
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq hpcc libopenblas0-serial >/dev/null
  fi
  SYS_MPIRUN=$(command -v mpirun.openmpi || echo /usr/bin/mpirun)
  root_args=(); [ "$(id -u)" = 0 ] && root_args=(--allow-run-as-root)
  echo "hpcc BLAS: $(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo '?')"
  "$PY" - "$N" "$NB" "$P" "$Q" > "$work/hpccinf.txt" <<'EOF'
import sys
from hpl.dat import format_dat
n, nb, p, q = map(int, sys.argv[1:5])
sys.stdout.write(format_dat([n], [nb], [(p, q)], depth=1, bcast=1))
# hpcc reads PTRANS sizes after the HPL part
sys.stdout.write("##### This line (no. 32) is ignored (it serves as a separator). ######\n"
                 "0            Number of additional problem sizes for PTRANS\n"
                 "1200         values of N\n"
                 "0            number of additional blocking sizes for PTRANS\n"
                 "40           values of NB\n")
EOF
  for i in $(seq "$RUNS"); do
    echo "== hpcc run $i: N=$N NB=$NB P=$P Q=$Q ($NP ranks, $THREADS BLAS thread(s) each; HPL comes last) =="
    ( cd "$work" && rm -f hpccoutf.txt &&
      OMPI_MCA_rmaps_base_oversubscribe=1 OPENBLAS_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS \
      "$SYS_MPIRUN" "${root_args[@]}" -np "$NP" --bind-to "$BIND" "${hf_args[@]}" hpcc > hpcc.log 2>&1 ) || {
        echo "hpcc failed:"; tail -20 "$work/hpcc.log"; exit 1; }
    line=$(grep -E '^W[RC][0-9]' "$work/hpccoutf.txt" | tail -1)
    echo "$line"
    grep -E '\.\.\.\.\.\. (PASSED|FAILED)' "$work/hpccoutf.txt" | tail -1
    echo "$line" | awk '{print $7}' >> "$work/hpcc_gf"
  done
  HPCC_GF=$(best < "$work/hpcc_gf")
fi

# ------------------------------------------------------------------ ours
for i in $(seq "$RUNS"); do
  echo "== ours run $i: python -m hpl --n $N --nb $NB --p $P --q $Q =="
  "$OUR_MPIRUN" -np "$NP" --bind-to "$BIND" "${hf_args[@]}" "$PY" -m hpl --n "$N" --nb "$NB" --p "$P" --q "$Q" \
      --blas-threads "$THREADS" --json "$work/ours.json" | grep -E '^(W[RC][0-9]|\|\||  per-rank|BLAS)'
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1]))['runs'][0]; print(r['gflops'])" "$work/ours.json" \
      >> "$work/ours_gf"
done
OURS_GF=$(best < "$work/ours_gf")

echo
echo "N=$N NB=$NB P=$P Q=$Q, $NP ranks x $THREADS BLAS thread(s)"
printf 'ours (python -m hpl):   %10.2f Gflops\n' "$OURS_GF"
if [ -n "$HPCC_GF" ]; then
  printf 'hpcc (netlib HPL):      %10.2f Gflops\n' "$HPCC_GF"
  "$PY" -c "import sys; o,h=map(float,sys.argv[1:]); r=o/h; print(f'ratio ours/hpcc:        {r:10.3f}  ({\"meets\" if r >= 0.9 else \"below\"} the 0.9 bar)')" "$OURS_GF" "$HPCC_GF"
fi
