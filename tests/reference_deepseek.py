"""A slow float64 numpy forward of a DeepseekV3 checkpoint (Hugging Face names and layout),
written independently of mpillm. Two forms of multi-head latent attention (MLA):

- ``forward(..., absorbed=False)``: the whole prompt at once, keys and values expanded per head
  from the latent by kv_b (what transformers computes);
- ``forward(..., absorbed=True)``: token by token over a cache of the compressed latent
  (kv_lora_rank normed values + the shared RoPE key, per token and layer), kv_b's key half folded
  into the query and its value half applied after attention (llama.cpp's MLA).

The two are the same function of the weights; tests/test_deepseek.py checks that they agree to
float64 rounding. ``drop`` switches a feature off (negative controls): "bias" (the router's
correction bias), "group" (the group limit), "shared" (the shared experts), "mscale" (YaRN's
mscale in the softmax scale). tests/fixtures/make_fixtures.py checks this file against
transformers when it writes the fixture.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

_DT = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def load(d: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, {name: float64 array}) of a one-file safetensors checkpoint."""
    d = Path(d)
    cfg = json.loads((d / "config.json").read_text())
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        out[k] = np.frombuffer(raw[8 + n + b:8 + n + e], _DT[v["dtype"]]).reshape(v["shape"]).astype(np.float64)
    return cfg, out


def _rope_params(c: dict) -> dict:
    rp = dict(c.get("rope_parameters") or {})
    if not rp.get("rope_type") or rp.get("rope_type") == "default":
        rp = {**rp, **(c.get("rope_scaling") or {})}
    rp.setdefault("rope_theta", c.get("rope_theta", 10000.0))
    return rp


def _mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rope_tables(c: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n, rope_dim / 2): YaRN frequencies and its attention factor when configured."""
    rp, d = _rope_params(c), c["qk_rope_head_dim"]
    theta = rp["rope_theta"]
    pos = theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    inv, att = 1.0 / pos, 1.0
    if rp.get("rope_type", rp.get("type")) == "yarn":
        f, orig = rp["factor"], rp["original_max_position_embeddings"]
        m, mall = rp.get("mscale"), rp.get("mscale_all_dim")
        att = _mscale(f, m) / _mscale(f, mall) if m and mall else _mscale(f, 1.0)

        def corr(rot):
            return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = corr(rp.get("beta_fast") or 32), corr(rp.get("beta_slow") or 1)
        if rp.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        ramp = np.clip((np.arange(d // 2) - lo) / ((hi - lo) or 0.001), 0, 1)
        inv = 1.0 / (f * pos) * ramp + 1.0 / pos * (1 - ramp)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang) * att, np.sin(ang) * att


def softmax_scale(c: dict, drop=()) -> float:
    rp = _rope_params(c)
    s = (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]) ** -0.5
    if rp.get("rope_type", rp.get("type", "default")) != "default" and rp.get("mscale_all_dim") and "mscale" not in drop:
        s *= _mscale(rp["factor"], rp["mscale_all_dim"]) ** 2
    return s


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleave: bool) -> np.ndarray:
    """x (..., T, d) at positions 0..T-1 (cos, sin rows); interleaved pairs (2i, 2i+1) or halves."""
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    out = np.empty_like(x)
    if interleave:
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    else:
        h = x.shape[-1] // 2
        out[..., :h], out[..., h:] = a * cos - b * sin, b * cos + a * sin
    return out


def norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def route(c: dict, W: dict, p: str, h: np.ndarray, drop=()) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's router for rows h (T, dim) -> (top-k ids (T, k), weights (T, k))."""
    E, k = c["n_routed_experts"], c["num_experts_per_tok"]
    G, TG = c["n_group"], c["topk_group"]
    s = 1.0 / (1.0 + np.exp(-(h @ W[p + "mlp.gate.weight"].T)))
    choice = s + (0.0 if "bias" in drop else W[p + "mlp.gate.e_score_correction_bias"])
    if "group" not in drop:
        gs = np.sort(choice.reshape(len(h), G, E // G), -1)[..., -2:].sum(-1)    # sum of each group's top two
        keep = np.argsort(-gs, -1, kind="stable")[:, :TG]
        mask = np.zeros((len(h), G), bool)
        np.put_along_axis(mask, keep, True, -1)
        choice = np.where(np.repeat(mask, E // G, -1), choice, -np.inf)
    idx = np.argsort(-choice, -1, kind="stable")[:, :k]
    w = np.take_along_axis(s, idx, -1)
    if c.get("norm_topk_prob", True):
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * c["routed_scaling_factor"]


def mlp(W: dict, p: str, h: np.ndarray) -> np.ndarray:
    return (silu(h @ W[p + "gate_proj.weight"].T) * (h @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def moe(c: dict, W: dict, p: str, h: np.ndarray, drop=()) -> tuple[np.ndarray, np.ndarray]:
    idx, w = route(c, W, p, h, drop)
    gu, dn = W.get(p + "mlp.experts.gate_up_proj"), W.get(p + "mlp.experts.down_proj")
    y = np.zeros_like(h)
    I = c["moe_intermediate_size"]
    for t in range(len(h)):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            if gu is not None:       # transformers 5: experts stacked, gate and up fused (E, 2I, dim)
                g, u, down = gu[e, :I], gu[e, I:], dn[e]
            else:
                q = f"{p}mlp.experts.{e}."
                g, u, down = W[q + "gate_proj.weight"], W[q + "up_proj.weight"], W[q + "down_proj.weight"]
            y[t] += w[t, j] * (down @ (silu(g @ h[t]) * (u @ h[t])))
    if "shared" not in drop:
        y = y + mlp(W, p + "mlp.shared_experts.", h)
    return y, idx


def _queries(c, W, p, h, cos, sin, eps):
    H, dn, dr = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"]
    if c.get("q_lora_rank"):
        q = norm(h @ W[p + "q_a_proj.weight"].T, W[p + "q_a_layernorm.weight"], 1e-6) @ W[p + "q_b_proj.weight"].T
    else:
        q = h @ W[p + "q_proj.weight"].T
    q = q.reshape(len(h), H, dn + dr).transpose(1, 0, 2)                     # (H, T, dn + dr)
    return q[..., :dn], rope(q[..., dn:], cos, sin, c.get("rope_interleave", True))


def _latent(c, W, p, h, cos, sin):
    """(normed latent (T, kv_lora), RoPE key (T, rope)): what the latent cache holds."""
    r = c["kv_lora_rank"]
    kv = h @ W[p + "kv_a_proj_with_mqa.weight"].T
    return norm(kv[:, :r], W[p + "kv_a_layernorm.weight"], 1e-6), rope(kv[:, r:], cos, sin, c.get("rope_interleave", True))


def attention(c: dict, W: dict, p: str, h: np.ndarray, cos, sin, scale: float, absorbed: bool,
              cache: list | None = None, pos0: int = 0) -> np.ndarray:
    """MLA for rows h at positions pos0.. (absorbed: appends the rows' latents to ``cache``)."""
    H, dn, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"]
    T = len(h)
    qn, qr = _queries(c, W, p, h, cos[pos0:pos0 + T], sin[pos0:pos0 + T], c["rms_norm_eps"])
    lat, kr = _latent(c, W, p, h, cos[pos0:pos0 + T], sin[pos0:pos0 + T])
    kvb = W[p + "kv_b_proj.weight"].reshape(H, dn + dv, -1)                 # per head: [k_nope rows; v rows]
    wk, wv = kvb[:, :dn], kvb[:, dn:]                                         # (H, dn, r), (H, dv, r)
    if not absorbed:
        k = np.concatenate([np.einsum("hdr,tr->htd", wk, lat), np.broadcast_to(kr, (H,) + kr.shape)], -1)
        v = np.einsum("hdr,tr->htd", wv, lat)
        s = np.einsum("htd,hsd->hts", np.concatenate([qn, qr], -1), k) * scale
        s = s + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,hsd->thd", a, v)
    else:
        cache.append(np.concatenate([lat, kr], -1))
        C = np.concatenate(cache)                                             # (S, r + rope) every position
        r = lat.shape[1]
        ql = np.einsum("htd,hdr->htr", qn, wk)                                # key half folded into the query
        s = (np.einsum("htr,sr->hts", ql, C[:, :r]) + np.einsum("htd,sd->hts", qr, C[:, r:])) * scale
        S = len(C)
        s = s + np.where(np.arange(S)[None, :] <= pos0 + np.arange(T)[:, None], 0.0, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ol = np.einsum("hts,sr->htr", a, C[:, :r])                            # attention over the latent
        o = np.einsum("hdr,htr->thd", wv, ol)                                 # value half after attention
    return o.reshape(T, H * dv) @ W[p + "o_proj.weight"].T


def forward(c: dict, W: dict, tokens, absorbed: bool = False, drop=()) -> tuple[np.ndarray, list]:
    """Float64 logits (T, vocab) and the routed experts [(T, k) per MoE layer]."""
    tokens = np.asarray(tokens)
    T, eps = len(tokens), c["rms_norm_eps"]
    cos, sin = rope_tables(c, T)
    scale = softmax_scale(c, drop)
    L = c["num_hidden_layers"]
    if not absorbed:
        x = W["model.embed_tokens.weight"][tokens]
        routes = []
        for i in range(L):
            p = f"model.layers.{i}."
            x = x + attention(c, W, p + "self_attn.", norm(x, W[p + "input_layernorm.weight"], eps), cos, sin,
                              scale, False)
            h = norm(x, W[p + "post_attention_layernorm.weight"], eps)
            if i < c["first_k_dense_replace"]:
                x = x + mlp(W, p + "mlp.", h)
            else:
                y, idx = moe(c, W, p, h, drop)
                x = x + y
                routes.append(idx)
        return norm(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T, routes
    caches = [[] for _ in range(L)]
    rows, routes = [], [[] for _ in range(L)]
    for t in range(T):                       # decoding: one token at a time over the latent cache
        x = W["model.embed_tokens.weight"][tokens[t:t + 1]]
        for i in range(L):
            p = f"model.layers.{i}."
            x = x + attention(c, W, p + "self_attn.", norm(x, W[p + "input_layernorm.weight"], eps), cos, sin,
                              scale, True, caches[i], t)
            h = norm(x, W[p + "post_attention_layernorm.weight"], eps)
            if i < c["first_k_dense_replace"]:
                x = x + mlp(W, p + "mlp.", h)
            else:
                y, idx = moe(c, W, p, h, drop)
                x = x + y
                routes[i].append(idx)
        rows.append(norm(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T)
    return np.concatenate(rows), [np.concatenate(r) for r in routes if r]
