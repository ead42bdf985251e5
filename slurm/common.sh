# Sourced by the batch scripts in slurm/: finds the project, sets up Open MPI, launches
# ranks and stages shards to node-local storage. Settings (environment variables):
#   MPILLM_ROOT       checkout of mpillm (default: the directory sbatch was run from)
#   MPILLM_VENV       its venv (default: $MPILLM_ROOT/.venv, as scripts/env.sh)
#   MPILLM_LAUNCHER   srun (default: srun --mpi=pmix) | mpirun (mpirun inside the allocation)
#   MPILLM_STAGE      copy (default: each task copies its own shard) | sbcast | none
#   MPILLM_STAGE_DIR  node-local directory for staged models (default: ${TMPDIR:-/tmp}/mpillm-stage-$USER)

MPILLM_ROOT="${MPILLM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [ ! -f "$MPILLM_ROOT/scripts/env.sh" ]; then
  echo "mpillm slurm: $MPILLM_ROOT is not an mpillm checkout; submit from it or set MPILLM_ROOT" >&2
  exit 2
fi
# shellcheck source=../scripts/env.sh
source "$MPILLM_ROOT/scripts/env.sh"
export PYTHONPATH="$MPILLM_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The pip Open MPI lives in the venv: PMIx inside the ranks must find its components there,
# and Slurm's PMIx server and the wheel's PMIx client agree on the native security plugin.
export OPAL_PREFIX="${OPAL_PREFIX:-$MPILLM_VENV}"
export PMIX_MCA_psec="${PMIX_MCA_psec:-native}"
MPILLM_LAUNCHER="${MPILLM_LAUNCHER:-srun}"
MPILLM_STAGE="${MPILLM_STAGE:-copy}"
MPILLM_STAGE_DIR="${MPILLM_STAGE_DIR:-${TMPDIR:-/tmp}/mpillm-stage-${USER:-$(id -un)}}"

mpillm_log() { echo "[$(date +%H:%M:%S) mpillm job ${SLURM_JOB_ID:-?}] $*" >&2; }

# mpillm_launch CMD...: one rank per Slurm task. Any rank's failure ends the step on every node.
mpillm_launch() {
  case "$MPILLM_LAUNCHER" in
    srun)   srun --mpi=pmix --kill-on-bad-exit=1 "$@" ;;
    mpirun) mpirun --bind-to none -np "${SLURM_NTASKS:?}" "$@" ;;
    *) echo "mpillm slurm: MPILLM_LAUNCHER must be srun or mpirun, not $MPILLM_LAUNCHER" >&2; return 2 ;;
  esac
}

# mpillm_stage MODEL_DIR WORLD_SIZE: copy what the job's ranks read to node-local storage and
# set MPILLM_MODEL_LOCAL to the copy. A copy left by an earlier job is reused when size and
# time match, so a model crosses the shared filesystem once per node, not at every start.
mpillm_stage() {
  local src="$1" ws="$2" name dest
  name="$(basename "$src")"
  dest="$MPILLM_STAGE_DIR/$name"
  case "$MPILLM_STAGE" in
    none)
      MPILLM_MODEL_LOCAL="$src" ;;
    copy)
      # same task layout as the run itself, so each node gets exactly its ranks' shards
      srun --kill-on-bad-exit=1 --ntasks="$ws" bash "$MPILLM_ROOT/slurm/stage_task.sh" "$src" "$dest" "$ws"
      MPILLM_MODEL_LOCAL="$dest" ;;
    sbcast)
      # every node receives every shard of this world size (simple; more bytes than copy)
      srun --ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" mkdir -p "$dest/ws$ws"
      local f
      for f in "$src"/manifest.json "$src"/tokenizer* "$src/ws$ws"/rank*.h5; do
        [ -e "$f" ] || continue
        sbcast --force --preserve "$f" "$dest/${f#"$src"/}"
      done
      # every node checks the shards it received against their checksums (exits non-zero on damage)
      srun --kill-on-bad-exit=1 --ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" \
        python -m mpillm.verify "$dest/ws$ws"/rank*.h5 >&2
      MPILLM_MODEL_LOCAL="$dest" ;;
    *) echo "mpillm slurm: MPILLM_STAGE must be copy, sbcast or none" >&2; return 2 ;;
  esac
  export MPILLM_MODEL_LOCAL
  mpillm_log "model staged ($MPILLM_STAGE) at $MPILLM_MODEL_LOCAL"
}
