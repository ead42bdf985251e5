"""Portable kernels: plain numba, no target-specific intrinsics.

Compiles for any LLVM target numba supports (x86_64, aarch64). The only
extension is ``h2f``, a target-neutral ``fpext half -> float`` (numba's CPU
target has no float16 type, so fp16 arrays arrive here as uint16 views).

Array conventions (shared by every path; see ``mpillm.kernels`` for the API):
  xq int8 (T, K), xd float32 (T, nb), xsum int32 (T, nb)   q8_0 activations
  out float32 (T, N), overwritten
Work is split over weight rows N (``prange`` over tiles of ROWS rows; numba
hands each thread a contiguous range of tiles). Each weight row is read once per call and used for all T tokens.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

QK = 32
ROWS = 8  # rows per parallel tile (numba's get_num_threads() in a kernel defeats cache=True)
_JIT = dict(cache=True, fastmath=True, nogil=True)
_JIT_PAR = dict(_JIT, parallel=True)
# quantization must round exactly like the numpy reference: no fast-math there
_JIT_EXACT = dict(cache=True, nogil=True)


@intrinsic
def h2f(typingctx, u):
    """uint16 bit pattern of an IEEE half -> float32 (exact)."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        (v,) = args
        if v.type.width > 16:
            v = builder.trunc(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(u), codegen


# ----------------------------------------------------------------------------
# activation quantization
# ----------------------------------------------------------------------------
@njit(**_JIT_EXACT)
def _quantize_row(x, xq, xd, xsum, t):
    nb = x.shape[1] // QK
    for b in range(nb):
        o = b * QK
        amax = np.float32(0.0)
        for i in range(QK):
            a = abs(x[t, o + i])
            if a > amax:
                amax = a
        dd = amax / np.float32(127.0)
        idn = np.float32(1.0) / dd if dd > 0 else np.float32(0.0)
        s = 0
        for i in range(QK):
            v = np.float64(x[t, o + i] * idn)  # float32 product, then exact +-0.5
            q = int(v + 0.5) if v >= 0 else -int(0.5 - v)  # C roundf: halves away from zero
            xq[t, o + i] = q
            s += q
        xd[t, b] = dd
        xsum[t, b] = s


@njit(**_JIT_EXACT)
def _check_q8(x, xq, xd, xsum):
    T, K = x.shape
    if K % QK:
        raise ValueError("quantize_q8_0: K must be a multiple of 32")
    nb = K // QK
    if xq.shape[0] != T or xq.shape[1] != K:
        raise ValueError("quantize_q8_0: xq must have the shape of x")
    if xd.shape[0] != T or xd.shape[1] != nb or xsum.shape[0] != T or xsum.shape[1] != nb:
        raise ValueError("quantize_q8_0: xd and xsum must be (T, K // 32)")


@njit(**dict(_JIT_EXACT, parallel=True))
def _quantize_par(x, xq, xd, xsum):
    for t in prange(x.shape[0]):
        _quantize_row(x, xq, xd, xsum, t)


@njit(**_JIT_EXACT)
def quantize_q8_0(x, xq, xd, xsum):
    """x f32 (T, K) -> xq int8 (T, K), xd f32 (T, nb) = amax/127, xsum int32 (T, nb) = sum of xq."""
    _check_q8(x, xq, xd, xsum)
    T = x.shape[0]
    if T > 1 and T * x.shape[1] >= 65536:
        _quantize_par(x, xq, xd, xsum)
    else:
        for t in range(T):
            _quantize_row(x, xq, xd, xsum, t)


# ----------------------------------------------------------------------------
# shape checks and work split
# ----------------------------------------------------------------------------
@njit(**_JIT)
def check_q(qs, d, xq, xd, xsum, out, qs_per_block):
    N = qs.shape[0]
    T, K = xq.shape
    nb = K // QK
    if K % QK:
        raise ValueError("matmul: K must be a multiple of 32")
    if qs.shape[1] != nb * qs_per_block or d.shape[0] != N or d.shape[1] != nb:
        raise ValueError("matmul: weight arrays do not match (N, K)")
    if xd.shape[0] != T or xd.shape[1] != nb or xsum.shape[0] != T or xsum.shape[1] != nb:
        raise ValueError("matmul: xd and xsum must be (T, K // 32)")
    if out.shape[0] != T or out.shape[1] != N:
        raise ValueError("matmul: out must be (T, N)")


@njit(**_JIT)
def check_f(w, x, out):
    if w.shape[1] != x.shape[1] or out.shape[0] != x.shape[0] or out.shape[1] != w.shape[0]:
        raise ValueError("matmul: shapes must be w (N, K), x (T, K), out (T, N)")


@njit(**_JIT)
def tile_bounds(i, N, rows):
    """Rows of tile i (tiles of ``rows`` rows; the last one may be short)."""
    return i * rows, min(N, (i + 1) * rows)


# ----------------------------------------------------------------------------
# quantized matmuls
# ----------------------------------------------------------------------------
@njit(**_JIT)
def _dot32(w, xq, t, o):
    s = np.float32(0.0)
    for i in range(QK):
        s += w[i] * np.float32(xq[t, o + i])
    return s


@njit(**_JIT_PAR)
def matmul_q4_0_q8_0(qs, d, xq, xd, xsum, out):
    """out[t, n] = sum_b d[n, b] * xd[t, b] * sum_i (nib - 8) * xq. d is a uint16 view of fp16."""
    check_q(qs, d, xq, xd, xsum, out, 16)
    N = qs.shape[0]
    T, K = xq.shape
    nb = K // QK
    for c in prange((N + ROWS - 1) // ROWS):
        n0, n1 = tile_bounds(c, N, ROWS)
        w = np.empty(QK, np.float32)
        acc = np.empty(T, np.float32)
        for n in range(n0, n1):
            acc[:] = 0.0
            for b in range(nb):
                for j in range(16):
                    byte = np.int32(qs[n, b * 16 + j])
                    w[j] = np.float32((byte & 15) - 8)
                    w[j + 16] = np.float32((byte >> 4) - 8)
                dd = h2f(d[n, b])
                for t in range(T):
                    acc[t] += dd * xd[t, b] * _dot32(w, xq, t, b * QK)
            for t in range(T):
                out[t, n] = acc[t]


@njit(**_JIT_PAR)
def matmul_q4_1_q8_0(qs, d, m, xq, xd, xsum, out):
    """value = d * nib + m; d, m uint16 views of fp16."""
    check_q(qs, d, xq, xd, xsum, out, 16)
    N = qs.shape[0]
    if m.shape[0] != N or m.shape[1] != d.shape[1]:
        raise ValueError("matmul: m must have the shape of d")
    T, K = xq.shape
    nb = K // QK
    for c in prange((N + ROWS - 1) // ROWS):
        n0, n1 = tile_bounds(c, N, ROWS)
        w = np.empty(QK, np.float32)
        acc = np.empty(T, np.float32)
        for n in range(n0, n1):
            acc[:] = 0.0
            for b in range(nb):
                for j in range(16):
                    byte = np.int32(qs[n, b * 16 + j])
                    w[j] = np.float32(byte & 15)
                    w[j + 16] = np.float32(byte >> 4)
                dd = h2f(d[n, b])
                mm = h2f(m[n, b])
                for t in range(T):
                    acc[t] += xd[t, b] * (dd * _dot32(w, xq, t, b * QK) + mm * np.float32(xsum[t, b]))
            for t in range(T):
                out[t, n] = acc[t]


@njit(**_JIT_PAR)
def matmul_q8_0_q8_0(qs, d, xq, xd, xsum, out):
    """qs int8 (N, K); d uint16 view of fp16."""
    check_q(qs, d, xq, xd, xsum, out, 32)
    N = qs.shape[0]
    T, K = xq.shape
    nb = K // QK
    for c in prange((N + ROWS - 1) // ROWS):
        n0, n1 = tile_bounds(c, N, ROWS)
        w = np.empty(QK, np.float32)
        acc = np.empty(T, np.float32)
        for n in range(n0, n1):
            acc[:] = 0.0
            for b in range(nb):
                for i in range(QK):
                    w[i] = np.float32(qs[n, b * QK + i])
                dd = h2f(d[n, b])
                for t in range(T):
                    acc[t] += dd * xd[t, b] * _dot32(w, xq, t, b * QK)
            for t in range(T):
                out[t, n] = acc[t]


# ----------------------------------------------------------------------------
# float matmuls
# ----------------------------------------------------------------------------
@njit(**_JIT_PAR)
def matmul_f16_f32(w, x, out):
    """w uint16 view of fp16 (N, K), x f32 (T, K), out f32 (T, N)."""
    check_f(w, x, out)
    N, K = w.shape
    T = x.shape[0]
    for c in prange((N + ROWS - 1) // ROWS):
        n0, n1 = tile_bounds(c, N, ROWS)
        for n in range(n0, n1):
            for t in range(T):
                s = np.float32(0.0)
                for k in range(K):
                    s += h2f(w[n, k]) * x[t, k]
                out[t, n] = s


@njit(**_JIT_PAR)
def matmul_f32_f32(w, x, out):
    check_f(w, x, out)
    N, K = w.shape
    T = x.shape[0]
    for c in prange((N + ROWS - 1) // ROWS):
        n0, n1 = tile_bounds(c, N, ROWS)
        for n in range(n0, n1):
            for t in range(T):
                s = np.float32(0.0)
                for k in range(K):
                    s += w[n, k] * x[t, k]
                out[t, n] = s
