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


@njit(**_JIT)
def dense3(a):
    """A 3-D array is C-contiguous (the stride of a dimension of size 1 does not matter: numpy leaves
    it as it was when a transpose moved such a dimension)."""
    n2 = a.itemsize
    n1 = a.shape[2] * n2
    return ((a.shape[2] <= 1 or a.strides[2] == n2) and (a.shape[1] <= 1 or a.strides[1] == n1)
            and (a.shape[0] <= 1 or a.strides[0] == a.shape[1] * n1))


@njit(**_JIT)
def _r16_shapes(qs, xq, xd, xsum, out, gbytes):
    """The interleaved codes qs (G, nb, gbytes) against the activations and out (T, N), N in the last group."""
    G, nb = qs.shape[0], qs.shape[1]
    T, K = xq.shape
    N = out.shape[1]
    if K % 32 or nb != K // 32 or qs.shape[2] != gbytes:
        raise ValueError("matmul: interleaved codes do not match K")
    if N > G * 16 or N <= (G - 1) * 16:
        raise ValueError("matmul: out's rows do not match the interleaved groups")
    if out.shape[0] != T or xd.shape[0] != T or xd.shape[1] != nb or xsum.shape[0] != T or xsum.shape[1] != nb:
        raise ValueError("matmul: xd, xsum and out must have T rows")
    if T > 1 and xsum.strides[0] != xd.strides[0]:
        raise ValueError("matmul: xd and xsum must have the same row stride")
    if not dense3(qs):
        raise ValueError("matmul: interleaved arrays must be contiguous")
    if not (rows_ok(xq) and rows_ok(xd) and rows_ok(xsum) and rows_ok(out)):
        raise ValueError("matmul: every array's rows must be contiguous")


@njit(**_JIT)
def _scales3(a, G, n):
    """A per-row scale array of the interleaved layout: (G, n, 16), contiguous."""
    if a.shape[0] != G or a.shape[1] != n or a.shape[2] != 16:
        raise ValueError("matmul: interleaved scales do not match the codes")
    if not dense3(a):
        raise ValueError("matmul: interleaved arrays must be contiguous")


@njit(**_JIT)
def _super_shift(d, nb):
    """3 when d holds one value per super-block of 8 blocks, 0 when one per block (the _32 variants)."""
    if d.shape[1] * 8 == nb:
        return 3
    if d.shape[1] == nb:
        return 0
    raise ValueError("matmul: interleaved super-block scales do not match the codes")


@njit(**_JIT)
def check_r16(qs, d, m, xq, xd, xsum, out, gbytes):
    """The interleaved layout (mpillm.kernels.interleaved): qs (G, nb, gbytes), d and m (G, nb, 16),
    out (T, N) with N in the last group."""
    _r16_shapes(qs, xq, xd, xsum, out, gbytes)
    G, nb = qs.shape[0], qs.shape[1]
    _scales3(d, G, nb)
    _scales3(m, G, nb)


@njit(**_JIT)
def check_r16k(qs, sc, mn, d, dmin, xq, xd, xsum, out):
    """The interleaved q4_K: qs (G, nb, 256), sc and mn (G, nb, 16) bytes, d and dmin (G, nb / 8, 16)
    (q4_K: one per super-block) or (G, nb, 16) (q4_K_32). Returns the shift from a block to its d."""
    check_r16(qs, sc, mn, xq, xd, xsum, out, 256)
    G, nb = qs.shape[0], qs.shape[1]
    dsh = _super_shift(d, nb)
    _scales3(d, G, nb >> dsh)
    _scales3(dmin, G, nb >> dsh)
    return dsh


@njit(**_JIT)
def _r16_halves(qs, sc, d, xq, xd, xsum, out, gbytes):
    """The interleaved K-quants with a scale per half block (q6_K, q2_K, q3_K): qs (G, nb, gbytes),
    sc (G, 2 nb, 16), d (G, nb / 8, 16) or (G, nb, 16) (the _32 slices). Returns the shift from a
    block to its d."""
    _r16_shapes(qs, xq, xd, xsum, out, gbytes)
    G, nb = qs.shape[0], qs.shape[1]
    _scales3(sc, G, 2 * nb)
    dsh = _super_shift(d, nb)
    _scales3(d, G, nb >> dsh)
    return dsh


@njit(**_JIT)
def _r16_high(qh, qs, hbytes):
    """The high bits of an interleaved q6_K / q3_K: (G, nb, hbytes) beside the codes, contiguous."""
    if qh.shape[0] != qs.shape[0] or qh.shape[1] != qs.shape[1] or qh.shape[2] != hbytes or not dense3(qh):
        raise ValueError("matmul: interleaved high bits do not match the codes")


@njit(**_JIT)
def check_r16q6(qs, qh, sc, d, xq, xd, xsum, out):
    """The interleaved q6_K: qs (G, nb, 256), qh (G, nb, 128), sc (G, 2 nb, 16), d (G, nb / 8, 16) or
    (G, nb, 16) (q6_K_32). Returns the shift from a block to its d."""
    dsh = _r16_halves(qs, sc, d, xq, xd, xsum, out, 256)
    _r16_high(qh, qs, 128)
    return dsh


@njit(**_JIT)
def check_r16q2(qs, sc, d, dmin, xq, xd, xsum, out):
    """The interleaved q2_K: qs (G, nb, 128), sc (G, 2 nb, 16) bytes, d and dmin (G, nb / 8, 16) or
    (G, nb, 16) (q2_K_32). Returns the shift from a block to its d."""
    dsh = _r16_halves(qs, sc, d, xq, xd, xsum, out, 128)
    _scales3(dmin, qs.shape[0], qs.shape[1] >> dsh)
    return dsh


@njit(**_JIT)
def check_r16q3(qs, qh, sc, d, xq, xd, xsum, out):
    """The interleaved q3_K: qs (G, nb, 128), qh (G, nb, 64), sc (G, 2 nb, 16) int8, d (G, nb / 8, 16)
    or (G, nb, 16) (q3_K_32). Returns the shift from a block to its d."""
    dsh = _r16_halves(qs, sc, d, xq, xd, xsum, out, 128)
    _r16_high(qh, qs, 64)
    return dsh
