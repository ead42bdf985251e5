#!/usr/bin/env python3
"""Does distributed-llama's model file hold the GGUF's weights? (the Qwen3-MoE baseline, docs/cluster.md)

    source scripts/env.sh && python scripts/dllama_same_weights.py dllama_model_NAME_q40.m MODEL.gguf

Walks the .m in the order its converter (converter/convert-hf.py, QWEN3_MOE) writes it -- embedding
f32; per layer q, k, v, o (q40), router f32, per expert gate, down, up (q40), q_norm, k_norm,
input_layernorm, post_attention_layernorm (f32); norm f32; lm_head q40 -- and compares every q40
tensor with the GGUF's Q4_0 blocks byte for byte and every f32 one with the GGUF's values (dequantized
where the GGUF quantizes them: the embedding). Prints one JSON line; exit 1 on any difference.
"""
from __future__ import annotations

import json
import struct
import sys

import gguf
import numpy as np

QWEN3_MOE = 0xABCD02


def main(argv=None) -> int:
    m_path, g_path = (argv or sys.argv[1:])[:2]
    tensors = {t.name: t for t in gguf.GGUFReader(g_path).tensors}
    with open(m_path, "rb") as f:
        magic, header_bytes = struct.unpack("<ii", f.read(8))
        kv = struct.unpack(f"<{(header_bytes - 8) // 4}i", f.read(header_bytes - 8))
        header = dict(zip(kv[0::2], kv[1::2]))       # its writer.py's keys: 1 arch, 4 layers, 7 experts
        if magic != 0xA00ABCD or header.get(1) != QWEN3_MOE or header.get(13) != 2:
            raise SystemExit(f"{m_path}: not a q40 QWEN3_MOE model file (header {header})")

        def q40(name: str, expert: int | None = None) -> bool:
            t = tensors[name]
            if t.tensor_type != gguf.GGMLQuantizationType.Q4_0:
                raise SystemExit(f"{name} is {t.tensor_type.name} in the GGUF, not Q4_0")
            raw = np.asarray(t.data if expert is None else t.data[expert]).reshape(-1)
            return np.array_equal(np.frombuffer(f.read(raw.nbytes), np.uint8), raw)

        def f32(name: str) -> bool:
            t = tensors[name]
            v = (np.asarray(t.data, np.float32) if t.tensor_type.name == "F32"
                 else gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1)
            return np.array_equal(np.frombuffer(f.read(v.size * 4), np.float32), v)

        checks = [("token_embd.weight", f32("token_embd.weight"))]
        for i in range(header[4]):
            p = f"blk.{i}."
            checks += [(p + n, q40(p + n + ".weight")) for n in ("attn_q", "attn_k", "attn_v", "attn_output")]
            checks.append((p + "ffn_gate_inp", f32(p + "ffn_gate_inp.weight")))
            for e in range(header[7]):
                checks += [(f"{p}{n}[{e}]", q40(p + n + ".weight", e))
                           for n in ("ffn_gate_exps", "ffn_down_exps", "ffn_up_exps")]
            checks += [(p + n, f32(p + n + ".weight")) for n in ("attn_q_norm", "attn_k_norm", "attn_norm", "ffn_norm")]
        checks += [("output_norm", f32("output_norm.weight")), ("output", q40("output.weight"))]
        trailing = len(f.read())
    bad = [n for n, ok in checks if not ok]
    print(json.dumps({"tensors": len(checks), "differing": bad[:20], "n_differing": len(bad), "trailing_bytes": trailing}))
    return 1 if bad or trailing else 0


if __name__ == "__main__":
    sys.exit(main())
