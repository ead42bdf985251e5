"""A slow float64 numpy forward of a llama-architecture GGUF, written independently of mpillm:
weights dequantized by the gguf package, RoPE in GGML's interleaved-pair form on the file's
permuted Q/K rows (mpillm instead un-permutes at conversion and uses the NeoX form)."""
from __future__ import annotations

import numpy as np


def gguf_llama_logits(path, tokens, fake_quant: str | None = None) -> np.ndarray:
    """Float64 logits; with ``fake_quant`` every matrix is first rounded to that weight type."""
    import gguf

    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents()  # noqa: E731
    T = {t.name: t for t in r.tensors}

    def W(name):
        t = T[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape)))
        if fake_quant and w.ndim == 2:
            from mpillm.formats import quant

            w = quant.dequantize(quant.quantize(w, fake_quant), fake_quant)
        return w.astype(np.float64)

    dim, nl = f("llama.embedding_length"), f("llama.block_count")
    nh, nkv = f("llama.attention.head_count"), f("llama.attention.head_count_kv")
    eps, theta = f("llama.attention.layer_norm_rms_epsilon"), f("llama.rope.freq_base")
    hd = dim // nh
    emb = W("token_embd.weight")
    out_w = W("output.weight") if "output.weight" in T else emb
    x = emb[np.asarray(tokens)]
    n = len(tokens)

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v, heads):  # interleaved pairs (2i, 2i+1), GGML "normal" mode
        v = v.reshape(n, heads, hd // 2, 2)
        ang = np.arange(n)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = v[..., 0], v[..., 1]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(n, heads * hd)

    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(nl):
        h = norm(x, W(f"blk.{i}.attn_norm.weight"))
        q = rope(h @ W(f"blk.{i}.attn_q.weight").T, nh).reshape(n, nh, hd)
        k = rope(h @ W(f"blk.{i}.attn_k.weight").T, nkv).reshape(n, nkv, hd)
        v = (h @ W(f"blk.{i}.attn_v.weight").T).reshape(n, nkv, hd)
        o = np.zeros((n, nh, hd))
        for j in range(nh):
            kv = j // (nh // nkv)
            s = q[:, j] @ k[:, kv].T / np.sqrt(hd) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o[:, j] = p @ v[:, kv]
        x = x + o.reshape(n, -1) @ W(f"blk.{i}.attn_output.weight").T
        h = norm(x, W(f"blk.{i}.ffn_norm.weight"))
        g, u = h @ W(f"blk.{i}.ffn_gate.weight").T, h @ W(f"blk.{i}.ffn_up.weight").T
        x = x + (g / (1 + np.exp(-g)) * u) @ W(f"blk.{i}.ffn_down.weight").T
    return norm(x, W("output_norm.weight")) @ out_w.T
