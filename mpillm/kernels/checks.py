"""Shape checks of the matmul entry points (jitted), shared by the paths: the tiles read raw
pointers, so the arrays must match (N, K), (T, K), (T, N) and have contiguous rows."""
from __future__ import annotations

from numba import njit

_JIT = dict(cache=True, fastmath=True, nogil=True)


@njit(**_JIT)
def rows_ok(a):
    """The elements of each row are contiguous (rows themselves may be strided)."""
    return a.shape[1] <= 1 or a.strides[1] == a.itemsize


@njit(**_JIT)
def check_q(qs, d, m, xq, xd, xsum, out, qs_per_block):
    N = qs.shape[0]
    T, K = xq.shape
    nb = K // 32
    if K % 32:
        raise ValueError("matmul: K must be a multiple of 32")
    if qs.shape[1] != nb * qs_per_block or d.shape[0] != N or d.shape[1] != nb:
        raise ValueError("matmul: weight arrays do not match (N, K)")
    if m.shape[0] != N or m.shape[1] != nb:
        raise ValueError("matmul: m must have the shape of d")
    if xd.shape[0] != T or xd.shape[1] != nb or xsum.shape[0] != T or xsum.shape[1] != nb:
        raise ValueError("matmul: xd and xsum must be (T, K // 32)")
    if out.shape[0] != T or out.shape[1] != N:
        raise ValueError("matmul: out must be (T, N)")
    # the kernels use one row stride for d and m, and one for xd and xsum; rows must be contiguous
    if (N > 1 and m.strides[0] != d.strides[0]) or (T > 1 and xsum.strides[0] != xd.strides[0]):
        raise ValueError("matmul: d and m (xd and xsum) must have the same row stride")
    if not (rows_ok(qs) and rows_ok(d) and rows_ok(m) and rows_ok(xq) and rows_ok(xd) and rows_ok(xsum)
            and rows_ok(out)):
        raise ValueError("matmul: every array's rows must be contiguous")


@njit(**_JIT)
def check_f(w, x, out):
    if w.shape[1] != x.shape[1] or out.shape[0] != x.shape[0] or out.shape[1] != w.shape[0]:
        raise ValueError("matmul: shapes must be w (N, K), x (T, K), out (T, N)")
    if not (rows_ok(w) and rows_ok(x) and rows_ok(out)):
        raise ValueError("matmul: every array's rows must be contiguous")
