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

from ..ops import half_to_float as h2f

QK = 32
_JIT = dict(cache=True, fastmath=True, parallel=True)


@njit(**_JIT)
def matmul_q4_0_q8_0_f64(qs, d, xq, xd, xsum, out):
    N, T, nb = qs.shape[0], xq.shape[0], xq.shape[1] // QK
    for n in prange(N):
        for t in range(T):
            acc = 0.0
            for b in range(nb):
                isum = np.int32(0)
                for j in range(16):
                    byte = np.int32(qs[n, b * 16 + j])
                    isum += (byte & 15) * np.int32(xq[t, b * QK + j]) + (byte >> 4) * np.int32(xq[t, b * QK + j + 16])
                isum -= 8 * xsum[t, b]
                acc += np.float64(h2f(d[n, b])) * np.float64(xd[t, b]) * np.float64(isum)
            out[t, n] = acc


@njit(**_JIT)
def matmul_q4_1_q8_0_f64(qs, d, m, xq, xd, xsum, out):
    N, T, nb = qs.shape[0], xq.shape[0], xq.shape[1] // QK
    for n in prange(N):
        for t in range(T):
            acc = 0.0
            for b in range(nb):
                isum = np.int32(0)
                for j in range(16):
                    byte = np.int32(qs[n, b * 16 + j])
                    isum += (byte & 15) * np.int32(xq[t, b * QK + j]) + (byte >> 4) * np.int32(xq[t, b * QK + j + 16])
                dx = np.float64(xd[t, b])
                acc += np.float64(h2f(d[n, b])) * dx * np.float64(isum)
                acc += np.float64(h2f(m[n, b])) * dx * np.float64(xsum[t, b])
            out[t, n] = acc


@njit(**_JIT)
def matmul_q8_0_q8_0_f64(qs, d, xq, xd, xsum, out):
    N, T, nb = qs.shape[0], xq.shape[0], xq.shape[1] // QK
    for n in prange(N):
        for t in range(T):
            acc = 0.0
            for b in range(nb):
                isum = np.int32(0)
                for i in range(QK):
                    isum += np.int32(qs[n, b * QK + i]) * np.int32(xq[t, b * QK + i])
                acc += np.float64(h2f(d[n, b])) * np.float64(xd[t, b]) * np.float64(isum)
            out[t, n] = acc


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


KERNELS = {"q4_0": matmul_q4_0_q8_0_f64, "q4_1": matmul_q4_1_q8_0_f64, "q8_0": matmul_q8_0_q8_0_f64,
           "f16": matmul_f16_f32_f64, "f32": matmul_f32_f32_f64}
