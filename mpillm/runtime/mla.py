"""Multi-head latent attention (deepseek2: DeepSeek-V2/V3/R1, Kimi-K2): the RoPE tables and softmax
scale, and the numba ops that move the MLA's parts between buffers. The layer itself (its matmuls
and its sync) is ``Transformer._mla`` in mpillm.runtime.model.

The cache holds, per token and layer, the compressed latent: kv_lora_rank RMS-normed values and
the qk_rope_dim RoPE key shared by every head. Attention runs in the absorbed form (llama.cpp's
MLA): each head's query is folded through its key half of kv_b, q_lat = W_UK[h]^T q_nope
(kv_lora_rank values), so scores are q_lat . latent + q_rope . k_rope, and the attention output
over the latent goes through the value half after attention, o = W_UV[h] (sum_s p_s latent_s).
``ops.attention_latent`` does this with one "KV head" of width kv_lora_rank + qk_rope_dim whose
keys and values are the same cache rows (the values' last qk_rope_dim columns are computed and
ignored), every head of every row of a sequence reading each latent block once per step; the
query is pre-scaled so the kernel's 1/sqrt(width) becomes MLA's softmax scale.

Every function writes into buffers the caller allocated once; none allocates.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from mpillm.formats.config import ModelConfig
from mpillm.kernels.vmath import f2h
from mpillm.runtime.ops import yarn_inv_freq


def _yarn_mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rope_tables(cfg: ModelConfig, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_seq, qk_rope_dim / 2) float32 (computed in float64). With YaRN: transformers'
    frequencies over the rope dimension and its attention factor on cos and sin,
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1 for DeepSeek-V3, whose two are equal)."""
    d = cfg.qk_rope_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    att = 1.0
    if cfg.rope_scaling == "yarn":
        inv, _ = yarn_inv_freq(d, cfg.rope_theta, cfg.rope_factor, cfg.rope_orig_context, cfg.yarn_beta_fast,
                               cfg.yarn_beta_slow, cfg.yarn_truncate)
        if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
            att = _yarn_mscale(cfg.rope_factor, cfg.yarn_mscale) / _yarn_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim)
        else:
            att = _yarn_mscale(cfg.rope_factor, 1.0)
    ang = np.outer(np.arange(max_seq, dtype=np.float64), inv)
    return (np.cos(ang) * att).astype(np.float32), (np.sin(ang) * att).astype(np.float32)


def softmax_scale(cfg: ModelConfig) -> float:
    """(qk_nope_dim + qk_rope_dim)^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    s = 1.0 / math.sqrt(cfg.head_dim)
    if cfg.rope_scaling == "yarn" and cfg.yarn_mscale_all_dim:
        s *= _yarn_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim) ** 2
    return s


@njit(cache=True, fastmath=True)
def rope_parts(x, positions, stride, offset, rd, cos, sin):
    """In-place NeoX RoPE (pairs i, i + rd/2) on the rd columns at ``offset`` of every ``stride``-wide
    head of x (T, n_heads * stride), row t at positions[t]. (The converter de-interleaved the
    checkpoint's RoPE rows, so this rotates DeepSeek's pairs.)"""
    T, n = x.shape
    half = rd // 2
    for t in range(T):
        p = positions[t]
        for h0 in range(offset, n, stride):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                a = x[t, h0 + i]
                b = x[t, h0 + half + i]
                x[t, h0 + i] = a * c - b * s
                x[t, h0 + half + i] = b * c + a * s


@njit(cache=True)
def rmsnorm_cols(x, n, w, eps):
    """In-place RMSNorm of the first n columns of each row of x (the latent part of wkv_a's output)."""
    for t in range(x.shape[0]):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        for i in range(n):
            x[t, i] = x[t, i] * inv * w[i]


@njit(cache=True)
def store_latent(kv, cache, slots, positions):
    """Row t of kv (T, width) into cache (n_slots, 1, S, width) at slots[t], positions[t]; a uint16
    cache holds fp16 bits (rounded to nearest even)."""
    T, W = kv.shape
    for t in range(T):
        s, p = slots[t], positions[t]
        for i in range(W):
            if cache.itemsize == 2:
                cache[s, 0, p, i] = f2h(np.float32(kv[t, i]))
            else:
                cache[s, 0, p, i] = kv[t, i]


@njit(cache=True)
def take_cols(src, c0, dst):
    """dst (T, w) = src[:, c0:c0 + w] (one head's block of a wider buffer)."""
    T, w = dst.shape
    for t in range(T):
        for i in range(w):
            dst[t, i] = src[t, c0 + i]


@njit(cache=True)
def put_cols(src, dst, c0, scale):
    """dst[:, c0:c0 + w] = scale * src (T, w)."""
    T, w = src.shape
    sc = np.float32(scale)
    for t in range(T):
        for i in range(w):
            dst[t, c0 + i] = sc * src[t, i]
