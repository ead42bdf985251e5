#!/bin/bash
# One Slurm task of mpillm_stage's "copy" mode: stage_task.sh SRC DEST WORLD_SIZE
# Task r copies ws<N>/rank<r>.h5 and verifies the copy's checksums; the first task on each node copies the manifest and tokenizer.
set -euo pipefail
src="$1" dest="$2" ws="$3"
rank="${SLURM_PROCID:?run under srun}"
same() { [ -e "$2" ] && [ "$(stat -c %s.%Y "$1")" = "$(stat -c %s.%Y "$2")" ]; }
put() {   # atomic, so concurrent tasks and later readers never see a half-written file
  local from="$1" to="$2"
  same "$from" "$to" && return 0
  mkdir -p "$(dirname "$to")"
  cp -p "$from" "$to.part.$$"
  mv -f "$to.part.$$" "$to"
  echo "staged $(basename "$to") on $(hostname)" >&2
}
shard="$src/ws$ws/rank$rank.h5"
[ -e "$shard" ] || { echo "stage: $shard is missing (was the model converted with --world-size $ws?)" >&2; exit 1; }
put "$shard" "$dest/ws$ws/rank$rank.h5"
# every tensor of the copy against the checksums the converter wrote: a flaky link or disk
# fails the job here, naming the file and the tensor, not later with wrong tokens
python -m mpillm.verify "$dest/ws$ws/rank$rank.h5" >&2
if [ "${SLURM_LOCALID:-0}" = 0 ]; then
  for f in "$src"/manifest.json "$src"/tokenizer*; do
    if [ -e "$f" ]; then put "$f" "$dest/$(basename "$f")"; fi
  done
fi
