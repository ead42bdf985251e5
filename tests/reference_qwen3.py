"""A slow float64 numpy forward of a Qwen3 / Qwen3-MoE (and Llama / Mistral / Qwen2: no q/k norm;
Qwen2: q/k/v biases) Hugging Face directory, written independently of mpillm (safetensors read
with the safetensors package, config.json read directly).

With ``fake_quant`` every weight matrix mpillm would quantize (embedding, attention, dense FFN,
experts, untied output) is first rounded to that weight type; the router stays float, as the
converter keeps it. What remains between this and the engine is the engine's q8_0 activation
quantization and float32 arithmetic.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def qwen3_forward(model_dir, tokens, fake_quant: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Float64 logits (T, vocab) and, for MoE, the experts chosen per layer (n_layers, T, top_k)."""
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    st = {}
    for fp in sorted(model_dir.glob("*.safetensors")):
        st.update(load_file(fp))

    cache = {}

    def W(name, quantize=True):
        if (name, quantize) in cache:
            return cache[name, quantize]
        w = np.asarray(st[name], np.float32)
        if fake_quant and quantize and w.ndim == 2:
            from mpillm.formats import quant

            w = quant.dequantize(quant.quantize(w, fake_quant), fake_quant)
        cache[name, quantize] = w = w.astype(np.float64)
        return w

    moe = hf["architectures"][0] == "Qwen3MoeForCausalLM"
    qk_norm = hf["architectures"][0] in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    dim, nl, nh = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    nkv = hf.get("num_key_value_heads") or nh
    hd = hf.get("head_dim") or dim // nh
    eps = hf["rms_norm_eps"]
    theta = hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]
    tokens = np.asarray(tokens)
    n = len(tokens)
    emb = W("model.embed_tokens.weight")
    out_w = W("lm_head.weight") if "lm_head.weight" in st else emb
    x = emb[tokens]

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    ang = np.arange(n)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(v):  # v (n, heads, hd), rotate-half pairs (i, i + hd/2)
        a, b = v[..., : hd // 2], v[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    mask = np.triu(np.full((n, n), -np.inf), 1)
    picked = []
    for i in range(nl):
        p = f"model.layers.{i}."
        h = norm(x, W(p + "input_layernorm.weight"))
        def proj(w):  # with the bias when the model has one (Qwen2)
            b = p + f"self_attn.{w}_proj.bias"
            return h @ W(p + f"self_attn.{w}_proj.weight").T + (W(b) if b in st else 0.0)

        q, k = proj("q").reshape(n, nh, hd), proj("k").reshape(n, nkv, hd)
        if qk_norm:
            q, k = norm(q, W(p + "self_attn.q_norm.weight")), norm(k, W(p + "self_attn.k_norm.weight"))
        v = proj("v").reshape(n, nkv, hd)
        q, k = rope(q), rope(k)
        o = np.zeros((n, nh, hd))
        for j in range(nh):
            kv = j // (nh // nkv)
            s = q[:, j] @ k[:, kv].T / np.sqrt(hd) + mask
            pr = np.exp(s - s.max(-1, keepdims=True))
            o[:, j] = (pr / pr.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + o.reshape(n, -1) @ W(p + "self_attn.o_proj.weight").T
        h = norm(x, W(p + "post_attention_layernorm.weight"))
        if not moe:
            g, u = h @ W(p + "mlp.gate_proj.weight").T, h @ W(p + "mlp.up_proj.weight").T
            x = x + (g / (1 + np.exp(-g)) * u) @ W(p + "mlp.down_proj.weight").T
            continue
        k_used = hf["num_experts_per_tok"]
        logits = h @ W(p + "mlp.gate.weight", quantize=False).T          # (n, E)
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        top = np.argsort(-prob, axis=-1, kind="stable")[:, :k_used]      # (n, k), descending
        wt = np.take_along_axis(prob, top, -1)
        if hf.get("norm_topk_prob", True):
            wt /= wt.sum(-1, keepdims=True)
        picked.append(top)
        y = np.zeros_like(x)
        for t in range(n):
            for e, w in zip(top[t], wt[t]):
                pe = p + f"mlp.experts.{e}."
                g, u = h[t] @ W(pe + "gate_proj.weight").T, h[t] @ W(pe + "up_proj.weight").T
                y[t] += w * ((g / (1 + np.exp(-g)) * u) @ W(pe + "down_proj.weight").T)
        x = x + y
    logits = norm(x, W("model.norm.weight")) @ out_w.T
    return logits, (np.stack(picked) if moe else None)
