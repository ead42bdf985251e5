#!/usr/bin/env bash
# One GGUF as the weights of both sides of the cluster baseline (scripts/netns_bench.py --baseline dllama):
#
#   scripts/make_dllama_weights.sh MODEL.gguf NAME
#
#   cache/hf/NAME/                         Hugging Face checkpoint (scripts/gguf_to_hf.py, f32)
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
# distributed-llama's converters need torch, safetensors, transformers and sentencepiece: they run
# in their own venv, cache/dllama/venv (made here with pip if it is missing), never in mpillm's.
# The converters are read from cache/dllama/src (the source tree scripts/build_dllama.sh built).
set -euo pipefail
gguf="${1:?usage: scripts/make_dllama_weights.sh MODEL.gguf NAME}"
name="${2:?usage: scripts/make_dllama_weights.sh MODEL.gguf NAME}"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
root="$MPILLM_ROOT"
src="${DLLAMA_SRC:-$root/cache/dllama/src}"
venv="$root/cache/dllama/venv"
models="$root/cache/dllama/models"
[ -f "$src/converter/convert-hf.py" ] || { echo "make_dllama_weights: no converter in $src (see scripts/build_dllama.sh)" >&2; exit 2; }
if [ ! -x "$venv/bin/python" ]; then
  echo "make_dllama_weights: making $venv (torch, safetensors, transformers, sentencepiece) ..." >&2
  timeout 300 python3 -m venv "$venv"
  timeout 1800 "$venv/bin/pip" install -q torch==2.13.0 safetensors numpy transformers sentencepiece tokenizers
fi
mkdir -p "$models" "$root/cache/hf" "$root/cache/mp"
timeout 3600 python "$root/scripts/gguf_to_hf.py" "$gguf" "$root/cache/hf/$name" --check
(
  cd "$models"
  timeout 7200 "$venv/bin/python" "$src/converter/convert-hf.py" "$root/cache/hf/$name" q40 "$name" > "convert-$name.log"
  timeout 1800 "$venv/bin/python" "$src/converter/convert-tokenizer-hf.py" "$root/cache/hf/$name" "$name" > "tokenizer-$name.log"
)
timeout 3600 python -m convert "$gguf" "$root/cache/mp/$name" --world-size 1 2 4 --no-progress
echo "make_dllama_weights: mpillm --model $root/cache/mp/$name"
echo "  --dllama-model $models/dllama_model_${name}_q40.m --dllama-tokenizer $models/dllama_tokenizer_${name}.t"
