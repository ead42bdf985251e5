"""The non-matmul layer operations, numba-jitted: RMSNorm, RoPE, attention, SiLU gate, embedding rows.

Every function writes into buffers the caller allocated once; none allocates.
Shapes: T tokens in the batch, hd head size, S the KV cache length.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from mpillm.kernels.attention import B as _BLOCK
from mpillm.kernels.attention import attend_rows, attend_tile, kv_rows_f16
from mpillm.kernels.vmath import f2h, half_to_float, silu_mul_row


@njit(cache=True, fastmath=True)
def rmsnorm(x, w, eps, out):
    """x (T, n) -> out (T, n) = x / rms(x) * w."""
    T, n = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        for i in range(n):
            out[t, i] = x[t, i] * inv * w[i]


@njit(cache=True, fastmath=True)
def rmsnorm_heads(x, w, eps, hd):
    """In-place per-head RMSNorm (Qwen3 q_norm/k_norm): x (T, n_heads * hd), w (hd,)."""
    T, n = x.shape
    for t in range(T):
        for h0 in range(0, n, hd):
            ss = np.float32(0.0)
            for i in range(hd):
                ss += x[t, h0 + i] * x[t, h0 + i]
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(hd) + np.float32(eps))
            for i in range(hd):
                x[t, h0 + i] = x[t, h0 + i] * inv * w[i]


def rope_tables(max_seq: int, hd: int, theta: float, freq_factors=None, yarn=None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_seq, hd // 2) in float32, computed in float64 (frequencies theta^(-2j/hd),
    divided by per-frequency factors when the model has them: Llama 3.x's rope_freqs).
    ``yarn``: (factor, original context, beta_fast, beta_slow, truncate) for YaRN scaling."""
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    mscale = 1.0
    if yarn is not None:
        inv_freq, mscale = yarn_inv_freq(hd, theta, *yarn)
    ang = np.outer(np.arange(max_seq, dtype=np.float64), inv_freq)
    return (np.cos(ang) * mscale).astype(np.float32), (np.sin(ang) * mscale).astype(np.float32)


def yarn_inv_freq(hd: int, theta: float, factor: float, orig_ctx: int, beta_fast: float, beta_slow: float,
                  truncate: bool) -> tuple[np.ndarray, float]:
    """YaRN as transformers computes it (modeling_rope_utils._compute_yarn_parameters): the
    frequencies above beta_fast rotations over the original context are kept, those below
    beta_slow divided by ``factor``, a linear ramp between; and the attention factor
    0.1 ln(factor) + 1 that multiplies cos and sin (so q.k by its square)."""
    def corr_dim(rot: float) -> float:
        return hd * math.log(orig_ctx / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    pos = theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ramp = np.clip((np.arange(hd // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0.0, 1.0)
    keep = 1.0 - ramp  # share of the original (extrapolated) frequency
    inv = 1.0 / (factor * pos) * (1.0 - keep) + 1.0 / pos * keep
    return inv, (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


@njit(cache=True, fastmath=True)
def rope_neox(x, positions, hd, cos, sin):
    """In-place NeoX-style RoPE (pairs i, i + hd/2) on x (T, n_heads * hd), row t at positions[t]."""
    T, n = x.shape
    half = hd // 2
    for t in range(T):
        p = positions[t]
        for h0 in range(0, n, hd):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                a = x[t, h0 + i]
                b = x[t, h0 + half + i]
                x[t, h0 + i] = a * c - b * s
                x[t, h0 + half + i] = b * c + a * s


def key_cache_shape(n_slots: int, n_kv: int, max_seq_len: int, hd: int) -> tuple[int, ...]:
    """The shape of a layer's key cache: per slot and KV head, tiles of B = 16 positions, each hd
    rows of 16 (position-major within a row: a key's values run down a column), so attention scores
    16 positions with vector FMAs and no horizontal sums (kernels.attention). The value cache keeps
    one row per position: (n_slots, n_kv, S, hd) with S = max_seq_len rounded up to whole tiles."""
    return (n_slots, n_kv, kv_positions(max_seq_len) // _BLOCK, hd, _BLOCK)


def kv_positions(max_seq_len: int) -> int:
    """Positions a cache holds for max_seq_len: whole tiles of B = 16."""
    return -(-max_seq_len // _BLOCK) * _BLOCK


def tile_keys(keys: np.ndarray) -> np.ndarray:
    """Keys in rows (n_slots, n_kv, S, hd), S a multiple of 16, in the key cache's tiled layout."""
    ns, nkv, S, hd = keys.shape
    return np.ascontiguousarray(keys.reshape(ns, nkv, S // _BLOCK, _BLOCK, hd).transpose(0, 1, 2, 4, 3))


def untile_keys(tiles: np.ndarray) -> np.ndarray:
    """The inverse of tile_keys."""
    ns, nkv, nt, hd, _ = tiles.shape
    return np.ascontiguousarray(tiles.transpose(0, 1, 2, 4, 3).reshape(ns, nkv, nt * _BLOCK, hd))


@njit(cache=True)
def store_kv(k, v, kc, vc, slots, positions, hd):
    """Copy row t of k, v (T, n_kv * hd) into the layer's caches at slot slots[t], position
    positions[t]: kc tiled (key_cache_shape), vc (n_slots, n_kv, S, hd); a uint16 cache holds fp16
    bits (rounded to nearest even)."""
    T, n = k.shape
    for t in range(T):
        s, p = slots[t], positions[t]
        pt, pl = p // _BLOCK, p % _BLOCK
        for h in range(n // hd):
            for i in range(hd):
                if kc.itemsize == 2:
                    kc[s, h, pt, i, pl] = f2h(np.float32(k[t, h * hd + i]))
                    vc[s, h, p, i] = f2h(np.float32(v[t, h * hd + i]))
                else:
                    kc[s, h, pt, i, pl] = k[t, h * hd + i]
                    vc[s, h, p, i] = v[t, h * hd + i]


_NO_SINKS = np.zeros(0, np.float32)
_PAD = 16  # floats between the widened K and V blocks of attention_latent


@njit(cache=True)
def attention_scratch_floats(nh, hd, max_rows):
    """float32 scratch the attention functions need for steps of up to ``max_rows`` rows of nh
    local query heads of hd values: the weights of the 4 queries of one kernel call, the softmax
    state (m, l) of each query, and (attention_latent) an fp16 latent block widened."""
    return 4 * _BLOCK + 2 * max(max_rows, 1) * max(nh, 1) + _BLOCK * hd + _PAD


def attention_scratch(nh: int, hd: int, max_rows: int) -> np.ndarray:
    """The scratch array (``scores``) the attention functions take, allocated once."""
    return np.zeros(attention_scratch_floats(nh, hd, max_rows), np.float32)


@njit(cache=True)
def attention(q, kc, vc, slots, positions, hd, kv_of_head, scores, out):
    """Causal attention for a batch of rows, each of its own sequence slot and position: row t
    attends over positions 0..positions[t] of slot slots[t] (store_kv has put the batch's own
    keys and values there first, so rows of one sequence in one batch see each other causally).
    No sinks, no window: ``attention_ext``."""
    attention_ext(q, kc, vc, slots, positions, hd, kv_of_head, scores, out, _NO_SINKS, 0)


@njit(cache=True)
def _check(q, slots, positions, hd, kv_of_head, scores, out, n_slots, n_kv, S):
    T = q.shape[0]
    nh = q.shape[1] // hd
    if q.strides[1] != 4 or out.strides[1] != 4 or out.shape[0] < T or out.shape[1] != q.shape[1]:
        raise ValueError("attention: q and out must be (T, n_heads * hd) with contiguous rows")
    if scores.size < 4 * _BLOCK + 2 * T * nh or scores.itemsize != 4 or not scores.flags.c_contiguous:
        raise ValueError("attention: scores must be contiguous float32 scratch of attention_scratch_floats(nh, hd, T)")
    if kv_of_head.shape[0] < nh:
        raise ValueError("attention: kv_of_head needs one KV head per query head")
    for h in range(nh):
        if kv_of_head[h] < 0 or kv_of_head[h] >= n_kv:
            raise ValueError("attention: kv_of_head names a KV head the cache does not have")
    for t in range(T):
        if positions[t] < 0 or positions[t] >= S or slots[t] < 0 or slots[t] >= n_slots:
            raise ValueError("attention: a row's slot or position is outside the cache")


@njit(cache=True)
def _first_of_slot(slots, t0):
    """Whether row t0 is the first row of its slot (the one that leads the slot's group)."""
    for t in range(t0):
        if slots[t] == slots[t0]:
            return False
    return True


@njit(cache=True)
def _start(n, window):
    return max(0, n - window) if window > 0 else 0


@njit(cache=True)
def _begin(flat, out, slots, t0, nh, hd, kv, kv_of_head, sinks, st0):
    """Softmax state (m, l) = (sink, 1) or (-inf, 0) and output 0 for the group's queries of KV head kv."""
    for t in range(t0, slots.shape[0]):
        if slots[t] != slots[t0]:
            continue
        for h in range(nh):
            if kv_of_head[h] == kv:
                sink = np.float32(sinks[h]) if sinks.shape[0] else np.float32(-np.inf)
                flat[st0 + 2 * (t * nh + h)] = sink
                flat[st0 + 2 * (t * nh + h) + 1] = np.float32(1.0) if sink > -np.inf else np.float32(0.0)
                out[t, h * hd:(h + 1) * hd] = 0.0


@njit(cache=True)
def _finish(flat, out, slots, t0, nh, hd, kv, kv_of_head, st0):
    """o / l for the group's queries of KV head kv."""
    for t in range(t0, slots.shape[0]):
        if slots[t] != slots[t0]:
            continue
        for h in range(nh):
            if kv_of_head[h] == kv:
                inv = np.float32(1.0) / flat[st0 + 2 * (t * nh + h) + 1]
                for i in range(h * hd, (h + 1) * hd):
                    out[t, i] *= inv


@njit(cache=True)
def attention_ext(q, kc, vc, slots, positions, hd, kv_of_head, scores, out, sinks, window):
    """``attention`` with a sink logit per local query head (sinks (nh,), or empty for none)
    and a sliding window: with window > 0 row t sees only its last ``window`` positions,
    max(0, positions[t] + 1 - window)..positions[t] (window 0: all).

    q (T, nh * hd); kc the tiled key cache (key_cache_shape), vc (n_slots, n_kv, S, hd), both float32
    or uint16 holding fp16 bits; kv_of_head (nh,) local KV index of each local query head; scores
    contiguous float32 scratch of attention_scratch_floats(nh, hd, T) or more; out (T, nh * hd).

    The rows of one slot form a group (a decode row, verification rows, a prompt chunk). Per group
    and KV head the positions the group reads are walked once, in tiles of 16 (kernels.attention),
    and each tile serves every query head of that KV head for every row of the group, each query
    with its own causal range and softmax state; queries with the same range in a tile go through
    the kernel 4 (or 2) at a time, sharing the loads and widening of K and V.
    """
    T = q.shape[0]
    nh = q.shape[1] // hd
    if kc.ndim != 5 or kc.shape[4] != _BLOCK or kc.shape[3] != hd or kc.strides[4] != kc.itemsize \
            or kc.strides[3] != _BLOCK * kc.itemsize or vc.strides[3] != vc.itemsize or vc.shape[3] != hd \
            or vc.strides[2] != hd * vc.itemsize or vc.itemsize != kc.itemsize \
            or vc.shape[0] != kc.shape[0] or vc.shape[1] != kc.shape[1] or vc.shape[2] != kc.shape[2] * _BLOCK:
        raise ValueError("attention: K, V alike: kc tiled (key_cache_shape), vc rows, contiguous")
    if sinks.shape[0] != 0 and sinks.shape[0] != nh:
        raise ValueError("attention: one sink per query head")
    _check(q, slots, positions, hd, kv_of_head, scores, out, kc.shape[0], kc.shape[1], vc.shape[2])
    scale = np.float32(1.0 / math.sqrt(hd))
    vrs = vc.strides[2]
    sc = np.int64(scores.ctypes.data)
    kc0, vc0 = np.int64(kc.ctypes.data), np.int64(vc.ctypes.data)
    q0, o0 = np.int64(q.ctypes.data), np.int64(out.ctypes.data)
    wp = sc                 # the weights of the (up to 4) queries of one call
    st0 = 4 * _BLOCK        # (m, l) of query (t, h) at st0 + 2 (t nh + h)
    flat = scores.reshape(scores.size)
    maxq = 4 if hd == 64 or hd == 128 else 1  # queries per kernel call (other head sizes: one)
    nkv = 0
    for h in range(nh):
        nkv = max(nkv, kv_of_head[h] + 1)
    for t0 in range(T):
        if not _first_of_slot(slots, t0):
            continue
        s = slots[t0]
        glo, ghi = vc.shape[2], 0  # the positions some row of the group reads
        for t in range(t0, T):
            if slots[t] == s:
                glo = min(glo, _start(positions[t] + 1, window))
                ghi = max(ghi, positions[t] + 1)
        for kv in range(nkv):
            _begin(flat, out, slots, t0, nh, hd, kv, kv_of_head, sinks, st0)
            for blk in range(glo // _BLOCK, (ghi - 1) // _BLOCK + 1):
                p0 = blk * _BLOCK
                kt = kc0 + s * kc.strides[0] + kv * kc.strides[1] + blk * kc.strides[2]
                vp = vc0 + s * vc.strides[0] + kv * vc.strides[1] + p0 * vrs
                # the queries reading this tile, in (row, head) order, up to 4 per call while their ranges agree
                nq = lo = hi = 0
                qa = qb = qc = qd = sa = sb = sc_ = sd = oa = ob = oc = od = 0
                clo = chi = 0
                for t in range(t0, T + 1):
                    last = t == T
                    if not last:
                        if slots[t] != s:
                            continue
                        n = positions[t] + 1
                        lo = max(p0, _start(n, window)) - p0
                        hi = min(p0 + _BLOCK, n) - p0
                        if hi <= lo:
                            continue
                    for h in range(nh if not last else 1):
                        if not last and kv_of_head[h] != kv:
                            continue
                        if nq > 0 and (last or nq == maxq or lo != clo or hi != chi):
                            while nq > 0:  # flush: 4, or 2 then 1
                                k = 4 if nq == 4 else (2 if nq >= 2 else 1)
                                attend_tile(kc, kt, vp, vrs, clo, chi, hd, scale, wp, qa, qb, qc, qd, sa, sb, sc_, sd,
                                            oa, ob, oc, od, k)
                                nq -= k
                                qa, qb, sa, sb, oa, ob = qc, qd, sc_, sd, oc, od
                        if last:
                            break
                        qp, op = q0 + t * q.strides[0] + h * hd * 4, o0 + t * out.strides[0] + h * hd * 4
                        stp = sc + 4 * (st0 + 2 * (t * nh + h))
                        clo, chi = lo, hi
                        if nq == 0:
                            qa, sa, oa = qp, stp, op
                        elif nq == 1:
                            qb, sb, ob = qp, stp, op
                        elif nq == 2:
                            qc, sc_, oc = qp, stp, op
                        else:
                            qd, sd, od = qp, stp, op
                        nq += 1
            _finish(flat, out, slots, t0, nh, hd, kv, kv_of_head, st0)


@njit(cache=True)
def attention_latent(q, cache, slots, positions, hd, kv_of_head, scores, out):
    """Causal attention whose keys and values are one cache of rows, (n_slots, n_kv, S, hd) float32 or
    fp16 bits (MLA's latent: kv_lora_rank + rope values, read as both). As ``attention`` otherwise:
    per group of rows of one slot and KV head, the positions are walked once in blocks of 16, an
    fp16 block widened once into scratch and read by every query of the group from there."""
    T = q.shape[0]
    nh = q.shape[1] // hd
    if cache.strides[3] != cache.itemsize or cache.shape[3] != hd:
        raise ValueError("attention: latent rows must be contiguous, hd values each")
    _check(q, slots, positions, hd, kv_of_head, scores, out, cache.shape[0], cache.shape[1], cache.shape[2])
    if scores.size < attention_scratch_floats(nh, hd, T):
        raise ValueError("attention: scores must be contiguous float32 scratch of attention_scratch_floats(nh, hd, T)")
    scale = np.float32(1.0 / math.sqrt(hd))
    rs = cache.strides[2]
    f16 = cache.itemsize == 2
    sc = np.int64(scores.ctypes.data)
    c0_ = np.int64(cache.ctypes.data)
    q0, o0 = np.int64(q.ctypes.data), np.int64(out.ctypes.data)
    st0 = 4 * _BLOCK
    kf = sc + 4 * (st0 + 2 * T * nh + _PAD)   # the widened block
    flat = scores.reshape(scores.size)
    nkv = 0
    for h in range(nh):
        nkv = max(nkv, kv_of_head[h] + 1)
    for t0 in range(T):
        if not _first_of_slot(slots, t0):
            continue
        s = slots[t0]
        ghi = 0
        for t in range(t0, T):
            if slots[t] == s:
                ghi = max(ghi, positions[t] + 1)
        for kv in range(nkv):
            _begin(flat, out, slots, t0, nh, hd, kv, kv_of_head, _NO_SINKS, st0)
            base = s * cache.strides[0] + kv * cache.strides[1]
            for blk in range((ghi - 1) // _BLOCK + 1):
                p0 = blk * _BLOCK
                if f16:
                    kv_rows_f16(c0_ + base + p0 * rs, rs, kf, hd * 4, 0, min(p0 + _BLOCK, ghi) - p0, hd)
                    kp, bs = kf, hd * 4
                else:
                    kp, bs = c0_ + base + p0 * rs, rs
                for t in range(t0, T):
                    if slots[t] != s:
                        continue
                    hi = min(p0 + _BLOCK, positions[t] + 1) - p0
                    if hi <= 0:
                        continue
                    for h in range(nh):
                        if kv_of_head[h] == kv:
                            attend_rows(q0 + t * q.strides[0] + h * hd * 4, kp, bs, hi, hd, scale,
                                        sc + 4 * (st0 + 2 * (t * nh + h)), o0 + t * out.strides[0] + h * hd * 4)
            _finish(flat, out, slots, t0, nh, hd, kv, kv_of_head, st0)


@njit(cache=True, fastmath=True)
def silu_mul(g, u, out):
    """out = silu(g) * u, all (T, n) float32 with contiguous rows (vector exp: kernels.vmath)."""
    T, n = g.shape
    if n > 1 and (g.strides[1] != 4 or u.strides[1] != 4 or out.strides[1] != 4):
        raise ValueError("silu_mul: rows must be contiguous")
    for t in range(T):
        silu_mul_row(g.ctypes.data + t * g.strides[0], u.ctypes.data + t * u.strides[0],
                     out.ctypes.data + t * out.strides[0], n)


@njit(cache=True, fastmath=True)
def swiglu_oai(g, u, alpha, limit, out):
    """gpt-oss's clamped SwiGLU, out = (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')
    with g' = min(g, limit); all (T, n) float32."""
    T, n = g.shape
    a, lim = np.float32(alpha), np.float32(limit)
    for t in range(T):
        for i in range(n):
            x = min(g[t, i], lim)
            y = min(max(u[t, i], -lim), lim)
            out[t, i] = (y + np.float32(1.0)) * x / (np.float32(1.0) + np.exp(-a * x))


@njit(cache=True)
def add_bias(y, b):
    """y (T, n) += b (n,) on every row: a column-parallel layer's bias slice (float32 or float64 y)."""
    T, n = y.shape
    for t in range(T):
        for i in range(n):
            y[t, i] += b[i]


@njit(cache=True)
def add_expert_rows(x, idx, w, table):
    """x (T, n) += sum_j w[t, j] * table[idx[t, j]]: the routed experts' output biases."""
    T, n = x.shape
    for t in range(T):
        for j in range(idx.shape[1]):
            e, wt = idx[t, j], w[t, j]
            for i in range(n):
                x[t, i] += wt * table[e, i]


@njit(cache=True)
def add_inplace(x, y):
    """x += y (y float32, or float64 rounded once to float32 first)."""
    T, n = x.shape
    for t in range(T):
        for i in range(n):
            x[t, i] += np.float32(y[t, i])


@njit(cache=True)
def sum_f16_parts(parts, out):
    """out (T, n) = sum over ranks, in rank order, of parts (P, T, n) given as fp16 bits."""
    P, T, n = parts.shape
    for t in range(T):
        for i in range(n):
            s = np.float32(0.0)
            for r in range(P):
                s += half_to_float(parts[r, t, i])
            out[t, i] = s


@njit(cache=True)
def sum_q8_parts(q, d, out):
    """out (T, n) = sum over ranks, in rank order, of q8_0 parts q (P, T, n) int8, d (P, T, n/32)."""
    P, T, n = q.shape
    for t in range(T):
        for i in range(n):
            s = np.float32(0.0)
            for r in range(P):
                s += d[r, t, i // 32] * np.float32(q[r, t, i])
            out[t, i] = s


# --- embedding rows of the vocabulary-parallel table (rows outside this rank's slice stay zero) ---
@njit(cache=True)
def embed_q8_0(tokens, v0, qs, d, out):
    T, n = out.shape
    for t in range(T):
        r = tokens[t] - v0
        for i in range(n):
            out[t, i] = 0.0
        if 0 <= r < qs.shape[0]:
            for i in range(n):
                out[t, i] = half_to_float(d[r, i // 32]) * np.float32(qs[r, i])


@njit(cache=True)
def _embed_q4(tokens, v0, qs, d, m, has_min, out):
    T, n = out.shape
    for t in range(T):
        r = tokens[t] - v0
        for i in range(n):
            out[t, i] = 0.0
        if 0 <= r < qs.shape[0]:
            for b in range(n // 32):
                sc = half_to_float(d[r, b])
                mn = half_to_float(m[r, b]) if has_min else np.float32(-8.0) * sc
                for j in range(16):
                    byte = qs[r, b * 16 + j]
                    out[t, b * 32 + j] = sc * np.float32(byte & 15) + mn
                    out[t, b * 32 + j + 16] = sc * np.float32(byte >> 4) + mn


@njit(cache=True)
def embed_f32(tokens, v0, w, out):
    T, n = out.shape
    for t in range(T):
        r = tokens[t] - v0
        for i in range(n):
            out[t, i] = w[r, i] if 0 <= r < w.shape[0] else np.float32(0.0)


@njit(cache=True)
def embed_f16(tokens, v0, w, out):
    T, n = out.shape
    for t in range(T):
        r = tokens[t] - v0
        for i in range(n):
            out[t, i] = half_to_float(w[r, i]) if 0 <= r < w.shape[0] else np.float32(0.0)


def embed(wtype: str, a: dict, tokens: np.ndarray, v0: int, out: np.ndarray) -> None:
    """Rows ``tokens`` of an embedding table holding vocabulary rows [v0, v0 + rows) into out (T, dim).
    ``a``: the table's split-layout arrays with fp16 arrays viewed as uint16."""
    if wtype == "q8_0":
        embed_q8_0(tokens, v0, a["qs"], a["d"], out)
    elif wtype == "q4_0":
        _embed_q4(tokens, v0, a["qs"], a["d"], a["d"], False, out)
    elif wtype == "q4_1":
        _embed_q4(tokens, v0, a["qs"], a["d"], a["m"], True, out)
    elif wtype == "f16":
        embed_f16(tokens, v0, a["w"], out)
    elif wtype == "f32":
        embed_f32(tokens, v0, a["w"], out)
    else:  # the 5-bit, K-quant and MXFP4 types: dequantize this rank's rows (numpy, GGML-exact)
        from mpillm.formats import quant

        rows = np.asarray(tokens, np.int64) - v0
        hit = (rows >= 0) & (rows < next(iter(a.values())).shape[0])
        out[:len(rows)] = 0.0
        if hit.any():
            sel = {k: np.asarray(a[k])[rows[hit]].view(np.dtype(dt)) for k, dt in quant.ARRAYS[wtype]}
            out[:len(rows)][hit] = quant.dequantize(sel, wtype)


# --- mixture of experts ---
@njit(cache=True)
def route_topk(logits, renormalize, idx, w):
    """Softmax over experts, keep the top k (ties: lower index first), optionally renormalized.
    logits (T, E); idx (T, k) expert ids by descending probability; w (T, k) their weights."""
    T, E = logits.shape
    k = idx.shape[1]
    for t in range(T):
        mx = logits[t, 0]
        for e in range(1, E):
            mx = max(mx, logits[t, e])
        tot = 0.0
        for e in range(E):
            tot += math.exp(logits[t, e] - mx)
        for j in range(k):
            best = -1
            for e in range(E):
                taken = False
                for jj in range(j):
                    if idx[t, jj] == e:
                        taken = True
                if not taken and (best < 0 or logits[t, e] > logits[t, best]):
                    best = e
            idx[t, j] = best
            w[t, j] = math.exp(logits[t, best] - mx) / tot
        if renormalize:
            s = 0.0
            for j in range(k):
                s += w[t, j]
            for j in range(k):
                w[t, j] /= s


@njit(cache=True)
def route_sigmoid_groups(logits, corr, use_corr, n_groups, groups_used, renormalize, scale, idx, w, sc, grp):
    """DeepSeek-V3's router: scores sigmoid(logits); the selection adds the correction bias
    ``corr`` (E,) when use_corr; with n_groups > 1 the experts form n_groups equal groups, each
    scored by the sum of its two best selection scores, and only the groups_used best compete;
    the top k (idx.shape[1]) by selection score win (ties: lower index first). Their weights are
    the unbiased scores, divided by their sum when ``renormalize``, times ``scale``
    (routed_scaling_factor). logits (T, E); idx, w (T, k) out; sc (2, E), grp (2, n_groups) scratch."""
    T, E = logits.shape
    k = idx.shape[1]
    per = E // n_groups
    for t in range(T):
        for e in range(E):
            sc[0, e] = 1.0 / (1.0 + math.exp(-np.float64(logits[t, e])))
            sc[1, e] = sc[0, e] + (np.float64(corr[e]) if use_corr else 0.0)
        if n_groups > 1:
            for g in range(n_groups):
                m1, m2 = -np.inf, -np.inf
                for e in range(g * per, (g + 1) * per):
                    v = sc[1, e]
                    if v > m1:
                        m2, m1 = m1, v
                    elif v > m2:
                        m2 = v
                grp[0, g] = m1 + m2
                grp[1, g] = 0.0
            for j in range(groups_used):
                best = -1
                for g in range(n_groups):
                    if grp[1, g] == 0.0 and (best < 0 or grp[0, g] > grp[0, best]):
                        best = g
                grp[1, best] = 1.0
            for g in range(n_groups):
                if grp[1, g] == 0.0:
                    for e in range(g * per, (g + 1) * per):
                        sc[1, e] = -np.inf
        tot = 0.0
        for j in range(k):
            best = -1
            for e in range(E):
                taken = False
                for jj in range(j):
                    if idx[t, jj] == e:
                        taken = True
                if not taken and (best < 0 or sc[1, e] > sc[1, best]):
                    best = e
            idx[t, j] = best
            w[t, j] = sc[0, best]
            tot += sc[0, best]
        for j in range(k):
            if renormalize:
                w[t, j] = np.float32(w[t, j] / (tot + 1e-20) * scale)
            else:
                w[t, j] = np.float32(w[t, j] * scale)


@njit(cache=True)
def group_by_expert(idx, w, counts, starts, rows, wts, active):
    """Group a batch's (token, expert) pairs by expert, in preallocated buffers (a counting sort).

    idx, w (T, k) from route_topk; counts, starts (E + 1,) scratch; rows, wts (T * k,) receive,
    expert by expert in ascending expert order, the token rows routed to it (ascending) and that
    token's weight for it; active (E,) receives the experts used. Expert active[a] owns
    rows[starts[a]:starts[a + 1]]. Returns the number of active experts."""
    T, k = idx.shape
    E = counts.shape[0] - 1
    for e in range(E + 1):
        counts[e] = 0
    for t in range(T):
        for j in range(k):
            counts[idx[t, j]] += 1
    n_active = 0
    off = 0
    for e in range(E):
        if counts[e] > 0:
            active[n_active] = e
            starts[n_active] = off
            n_active += 1
            off += counts[e]
        counts[e] = off - counts[e]  # now: the next free slot of expert e
    starts[n_active] = off
    for t in range(T):
        for j in range(k):
            e = idx[t, j]
            rows[counts[e]] = t
            wts[counts[e]] = w[t, j]
            counts[e] += 1
    return n_active


@njit(cache=True)
def gather_rows(src, rows, dst):
    """dst[r] = src[rows[r]]."""
    for r in range(rows.shape[0]):
        dst[r, :] = src[rows[r], :]


@njit(cache=True)
def scatter_add_rows(y, rows, wts, out):
    """out[rows[r]] += wts[r] * y[r] (the rows are distinct)."""
    for r in range(rows.shape[0]):
        t = rows[r]
        wt = wts[r]
        for i in range(out.shape[1]):
            out[t, i] += wt * y[r, i]


@njit(cache=True)
def argmax_rows(logits, v0, out):
    """out[t] = (max, v0 + argmax) of each row of logits (T, V_pp); ties: the lowest id."""
    T, V = logits.shape
    for t in range(T):
        b = 0
        for v in range(1, V):
            if logits[t, v] > logits[t, b]:
                b = v
        out[t, 0] = logits[t, b]
        out[t, 1] = v0 + b


@njit(cache=True)
def nll_parts(logits, targets, v0, out):
    """This rank's share of -log softmax(logits)[target], per row of its vocabulary slice
    logits (T, V_pp) (columns are global ids v0..): out[t] = (max, log sum exp(l - max),
    l[target] if this slice holds the target else -inf), in float64 (exp in float64 too)."""
    T, V = logits.shape
    for t in range(T):
        m = -np.inf
        for v in range(V):
            m = max(m, np.float64(logits[t, v]))
        s = 0.0
        for v in range(V):
            s += np.exp(np.float64(logits[t, v]) - m)
        g = targets[t] - v0
        out[t, 0] = m
        out[t, 1] = np.log(s)
        out[t, 2] = np.float64(logits[t, g]) if 0 <= g < V else -np.inf
