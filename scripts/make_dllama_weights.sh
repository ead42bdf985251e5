#!/usr/bin/env bash
# One GGUF as the weights of both sides of the cluster baseline (scripts/netns_bench.py --baseline dllama):
#
#   scripts/make_dllama_weights.sh MODEL.gguf NAME
#
#   cache/hf/NAME/                         Hugging Face checkpoint (scripts/gguf_to_hf.py, f32 or $HF_DTYPE)
#   cache/dllama/models/dllama_model_NAME_q40.m, dllama_tokenizer_NAME.t
#                                          distributed-llama's own converters (convert-hf.py q40,
#                                          convert-tokenizer-hf.py) run on that checkpoint
#   cache/mp/NAME/                         mpillm's conversion of the GGUF itself (world sizes 1 2 4)
#
# distributed-llama's q40 is Q4_0's block (32 values, fp16 scale = the value of largest magnitude
# / -8, codes q - 8): a dequantized Q4_0 block whose largest magnitude is a code-0 value (-8 d; 87%
# of uniformly random blocks) comes back with the same scale and codes; the others get the scale
# of their own largest value (7 d / -8) and round to the nearest code. Same shapes, same bytes per
# token, nearly the same values: enough for speed, not for comparing texts.
#
# Environment: MPILLM_CACHE (default: the checkout's cache/, e.g. /work/main/cache from a worktree),
# HF_DTYPE (gguf_to_hf.py --dtype of the checkpoint, default f32; f16 halves it and is exact for the
# qwen3moe Q4_0 baseline, whose scales leave (q - 8) * d exact in float16), KEEP_HF=0 (delete the
# checkpoint once distributed-llama's converter has read it), MP_WORLD_SIZES (default "1 2 4").
#
# distributed-llama's converters need torch, safetensors, transformers and sentencepiece: they run
# in their own venv, cache/dllama/venv (made here with pip if it is missing), never in mpillm's.
# The converters are read from cache/dllama/src (the source tree scripts/build_dllama.sh built).
set -euo pipefail
gguf="${1:?usage: scripts/make_dllama_weights.sh MODEL.gguf NAME}"
name="${2:?usage: scripts/make_dllama_weights.sh MODEL.gguf NAME}"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
root="$MPILLM_ROOT"
cache="$(realpath -m "${MPILLM_CACHE:-$root/cache}")"
src="${DLLAMA_SRC:-$cache/dllama/src}"
venv="$cache/dllama/venv"
models="$cache/dllama/models"
hf="$cache/hf/$name"
[ -f "$src/converter/convert-hf.py" ] || { echo "make_dllama_weights: no converter in $src (see scripts/build_dllama.sh)" >&2; exit 2; }
if [ ! -x "$venv/bin/python" ]; then
  echo "make_dllama_weights: making $venv (torch, safetensors, transformers, sentencepiece) ..." >&2
  timeout 300 python3 -m venv "$venv"
  timeout 1800 "$venv/bin/pip" install -q torch==2.13.0 safetensors numpy transformers sentencepiece tokenizers
fi
gguf="$(realpath "$gguf")"
mkdir -p "$models" "$cache/hf" "$cache/mp"
timeout 3600 python "$root/scripts/gguf_to_hf.py" "$gguf" "$hf" --dtype "${HF_DTYPE:-f32}" --check
(
  cd "$models"
  timeout 7200 "$venv/bin/python" "$src/converter/convert-hf.py" "$hf" q40 "$name" > "convert-$name.log"
  timeout 1800 "$venv/bin/python" "$src/converter/convert-tokenizer-hf.py" "$hf" "$name" > "tokenizer-$name.log"
)
[ "${KEEP_HF:-1}" = 1 ] || rm -rf "$hf"
# shellcheck disable=SC2086  # the world sizes are words
(cd "$root" && timeout 3600 python -m convert "$gguf" "$cache/mp/$name" --world-size ${MP_WORLD_SIZES:-1 2 4} --no-progress)
echo "make_dllama_weights: mpillm --model $cache/mp/$name"
echo "  --dllama-model $models/dllama_model_${name}_q40.m --dllama-tokenizer $models/dllama_tokenizer_${name}.t"
