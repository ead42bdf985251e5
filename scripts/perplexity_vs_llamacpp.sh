#!/usr/bin/env bash
# Perplexity of the bundled model through mpillm and through llama.cpp on the same token chunks
# (llama-perplexity's method: ctx 512, second half of each chunk scored). The text: Debian's
# license texts (~20k tokens of English), present on any Debian machine.
# Usage: scripts/perplexity_vs_llamacpp.sh [NP] [--buffer-type f16 ...]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$MPILLM_ROOT"
np_="${1:-2}"; shift || true
out="$MPILLM_ROOT/cache/perplexity"; mkdir -p "$out"
cat /usr/share/common-licenses/{GPL-3,Apache-2.0,GPL-2,MPL-2.0} > "$out/text.txt"
mpirun -np "$np_" --bind-to none python -m mpillm.perplexity --file "$out/text.txt" --ctx 512 \
  --json "$out/mpillm.json" --dump-tokens "$out/chunks.json" "$@" | tail -2
gguf="$(python -c 'from mpillm.startup import bundled_gguf; print(bundled_gguf())')"
"$MPILLM_ROOT/.bench-venv/bin/python" benchmarks/_llamacpp_worker.py perplexity "$gguf" "$out/chunks.json" \
  --threads 2 2>/dev/null | tail -1 | tee "$out/llamacpp.json"
python - "$out" <<'PY'
import json, sys
d = sys.argv[1]
a, b = json.load(open(f"{d}/mpillm.json")), json.load(open(f"{d}/llamacpp.json"))
print(f"mpillm {a['perplexity']:.4f} (np={a['ranks']}, buffer {a['buffer_type']}) vs llama.cpp {b['perplexity']:.4f}: "
      f"ratio {a['perplexity'] / b['perplexity']:.4f}")
PY
