"""Row-parallel matmuls with float64 outputs, for results that do not depend on the rank count.

A row-parallel layer (wo, w_down) sums over its input columns, which tensor parallelism
splits across ranks: each rank sums its own blocks, then Allreduce adds the partial sums.
In float32 that changes the order of additions with the rank count, the q8_0 rounding of
the next activation can flip, and greedy decoding can take another branch.

Here every block's term d_w * d_x * isum is exact in float64 (11 + 24 + 15 bits < 53), the
terms are summed in float64 and the partial sums are added by Allreduce in float64, so the
only differences left between rank counts are float64 rounding (~1e-16), which survives the
final cast to float32 with probability ~1e-9 per value. ``--buffer-type f64`` selects this.

Arguments as the kernels in ``portable``: fp16 arrays as uint16 views; ``out`` float64 (T, N).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from mpillm.kernels.portable import _make_qtile, check_q
from mpillm.kernels.vmath import half_to_float as h2f

QK = 32
_JIT = dict(cache=True, fastmath=True, parallel=True)


# the quantized kinds: the portable kernels' block tiles with float64 accumulation (each block's
# integer dot exact, then acc += d * xd * isum in float64), R rows x 1 token per tile
R = 4
_T40, _O40 = _make_qtile("q4_0", R, 1, f64=True), _make_qtile("q4_0", 1, 1, f64=True)
_T41, _O41 = _make_qtile("q4_1", R, 1, f64=True), _make_qtile("q4_1", 1, 1, f64=True)
_T80, _O80 = _make_qtile("q8_0", R, 1, f64=True), _make_qtile("q8_0", 1, 1, f64=True)
Q40, Q41, Q80 = 0, 1, 2


@njit(**_JIT)
def _q_run(kind, wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, N, T):
    a = (wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb)
    for i in prange((N + R - 1) // R):
        n0 = i * R
        for t in range(T):
            if n0 + R <= N:
                if kind == Q40:
                    _T40(*a, n0, t)
                elif kind == Q41:
                    _T41(*a, n0, t)
                else:
                    _T80(*a, n0, t)
            else:
                for n in range(n0, N):
                    if kind == Q40:
                        _O40(*a, n, t)
                    elif kind == Q41:
                        _O41(*a, n, t)
                    else:
                        _O80(*a, n, t)


@njit(cache=True)
def _q(kind, qs, d, m, xq, xd, xsum, out, qs_per_block):
    check_q(qs, d, m, xq, xd, xsum, out, qs_per_block)
    if out.itemsize != 8:
        raise ValueError("matmul: out must be float64")
    _q_run(kind, qs.ctypes.data, qs.strides[0], d.ctypes.data, m.ctypes.data, d.strides[0], xq.ctypes.data,
           xq.strides[0], xd.ctypes.data, xsum.ctypes.data, xd.strides[0], out.ctypes.data, out.strides[0],
           xd.shape[1], qs.shape[0], xq.shape[0])


@njit(cache=True)
def matmul_q4_0_q8_0_f64(qs, d, xq, xd, xsum, out):
    _q(Q40, qs, d, d, xq, xd, xsum, out, 16)


@njit(cache=True)
def matmul_q4_1_q8_0_f64(qs, d, m, xq, xd, xsum, out):
    _q(Q41, qs, d, m, xq, xd, xsum, out, 16)


@njit(cache=True)
def matmul_q8_0_q8_0_f64(qs, d, xq, xd, xsum, out):
    _q(Q80, qs, d, d, xq, xd, xsum, out, 32)


@njit(**_JIT)
def matmul_f16_f32_f64(w, x, out):
    N, T, K = w.shape[0], x.shape[0], x.shape[1]
    for n in prange(N):
        for t in range(T):
            acc = 0.0
            for k in range(K):
                acc += np.float64(h2f(w[n, k])) * np.float64(x[t, k])
            out[t, n] = acc


@njit(**_JIT)
def matmul_f32_f32_f64(w, x, out):
    N, T, K = w.shape[0], x.shape[0], x.shape[1]
    for n in prange(N):
        for t in range(T):
            acc = 0.0
            for k in range(K):
                acc += np.float64(w[n, k]) * np.float64(x[t, k])
            out[t, n] = acc


from mpillm.kernels.kquant import (matmul_mxfp4_q8_0_f64, matmul_q4_K_q8_0_f64, matmul_q5_0_q8_0_f64, matmul_q5_1_q8_0_f64, matmul_q5_K_q8_0_f64, matmul_q6_K_q8_0_f64)

KERNELS = {"q4_0": matmul_q4_0_q8_0_f64, "q4_1": matmul_q4_1_q8_0_f64, "q8_0": matmul_q8_0_q8_0_f64,
           "f16": matmul_f16_f32_f64, "f32": matmul_f32_f32_f64,
           "q5_0": matmul_q5_0_q8_0_f64, "q5_1": matmul_q5_1_q8_0_f64, "q4_K": matmul_q4_K_q8_0_f64,
           "q5_K": matmul_q5_K_q8_0_f64, "q6_K": matmul_q6_K_q8_0_f64, "mxfp4": matmul_mxfp4_q8_0_f64}
for _t in ("q4_K", "q5_K", "q6_K"):
    KERNELS[_t + "_32"] = KERNELS[_t]
