"""Portable kernels: target-neutral LLVM vector IR, no target-specific intrinsics.

Compiles for any LLVM target numba supports (x86_64, aarch64). The inner loops
are numba ``intrinsic``s written with llvmlite's IR builder in generic vector
IR (numba's own integer code widens int8 to int64 and never vectorizes):
quantized blocks use ``reduce.add(sext(a) * sext(x))`` over <16 x i8>, the
shape LLVM selects ``sdot`` for on AArch64 with +dotprod (Raspberry Pi 5) and
``pmaddwd`` on x86; fp16 is ``fpext <16 x half>`` (fcvtl / vcvtph2ps).
numba's CPU target has no float16 type, so fp16 arrays arrive as uint16 views.

Array conventions (shared by every path; see ``mpillm.kernels`` for the API):
  xq int8 (T, K), xd float32 (T, nb), xsum int32 (T, nb)   q8_0 activations
  out float32 (T, N), overwritten
Work is split over weight rows N (``prange`` over tiles of R rows; numba hands
each thread a contiguous range of tiles); a tile of R rows is used for all T
tokens (U at a time) while it is in L1, so each weight row is read once per call.
"""
from __future__ import annotations

from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from mpillm.kernels.irgen import F16, F32, I8, I16, I32, I64, Emit
from mpillm.kernels.irgen import vec as _vec
from mpillm.kernels.vmath import quantize_rows_q8_0

QK = 32
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
def _check_q8(x, xq, xd, xsum):
    T, K = x.shape
    if K % QK:
        raise ValueError("quantize_q8_0: K must be a multiple of 32")
    nb = K // QK
    if xq.shape[0] != T or xq.shape[1] != K:
        raise ValueError("quantize_q8_0: xq must have the shape of x")
    if xd.shape[0] != T or xd.shape[1] != nb or xsum.shape[0] != T or xsum.shape[1] != nb:
        raise ValueError("quantize_q8_0: xd and xsum must be (T, K // 32)")
    if x.itemsize != 4 or xq.itemsize != 1 or xd.itemsize != 4 or xsum.itemsize != 4:
        raise ValueError("quantize_q8_0: x, xd float32; xq int8; xsum int32")
    if (K > 1 and (x.strides[1] != 4 or xq.strides[1] != 1)) or (nb > 1 and (xd.strides[1] != 4 or xsum.strides[1] != 4)):
        raise ValueError("quantize_q8_0: every array's rows must be contiguous")
    if T > 1 and xsum.strides[0] != xd.strides[0]:
        raise ValueError("quantize_q8_0: xd and xsum must have the same row stride")


@njit(**dict(_JIT_EXACT, parallel=True))
def _quantize_par(x, xq, xd, xsum):
    for t in prange(x.shape[0]):
        quantize_rows_q8_0(x.ctypes.data + t * x.strides[0], 0, xq.ctypes.data + t * xq.strides[0], 0,
                           xd.ctypes.data + t * xd.strides[0], xsum.ctypes.data + t * xsum.strides[0], 0,
                           1, x.shape[1] // QK)


@njit(**_JIT_EXACT)
def quantize_q8_0(x, xq, xd, xsum):
    """x f32 (T, K) -> xq int8 (T, K), xd f32 (T, nb) = amax/127, xsum int32 (T, nb) = sum of xq."""
    _check_q8(x, xq, xd, xsum)
    T = x.shape[0]
    if T > 1 and T * x.shape[1] >= 65536:
        _quantize_par(x, xq, xd, xsum)
    elif T > 0:
        quantize_rows_q8_0(x.ctypes.data, x.strides[0], xq.ctypes.data, xq.strides[0], xd.ctypes.data,
                           xsum.ctypes.data, xd.strides[0], T, x.shape[1] // QK)


# ----------------------------------------------------------------------------
# target-neutral vector IR
# ----------------------------------------------------------------------------
_PARTIAL_REDUCE = _llvm.llvm_version_info >= (22,)


class _Emit(Emit):
    """The shared emitter plus the portable kernels' fp16 scalar load and signed dot product."""

    def half(self, base, off):
        return self.b.fpext(self.b.bitcast(self.load(base, off, I16), F16), F32)

    def sdot(self, pairs):
        """sum over (a, x) pairs of sum(sext(a) * sext(x)), a and x <16 x i8>, as i32.

        Written as ``partial.reduce.add`` into <4 x i32> (LLVM >= 22), which AArch64 with
        +dotprod selects as one ``sdot`` per pair (plain NEON: smull/saddw), then one
        horizontal add. Older LLVM: ``reduce.add`` of the products."""
        v16, v4 = _vec(I32, 16), _vec(I32, 4)
        prods = [self.b.mul(self.b.sext(a, v16), self.b.sext(x, v16)) for a, x in pairs]
        if _PARTIAL_REDUCE:
            f = self.decl("llvm.vector.partial.reduce.add.v4i32.v16i32", v4, [v4, v16])
            acc = ir.Constant(v4, None)
            for p in prods:
                acc = self.b.call(f, [acc, p])
            return self.b.call(self.decl("llvm.vector.reduce.add.v4i32", I32, [v4]), [acc])
        tot = prods[0]
        for p in prods[1:]:
            tot = self.b.add(tot, p)
        return self.b.call(self.decl("llvm.vector.reduce.add.v16i32", I32, [v16]), [tot])



def _qtile_codegen(kind: str, R: int, U: int, f64: bool = False):
    """R rows x U tokens of a quantized matmul, one 32-block at a time: an exact int32 dot per
    block (sdot shape), then one float FMA with d * xd per block and (row, token).

    f64: float64 output (kernels.exact): per block acc += d * xd * isum in float64, every term
    exact (fp16 x float32 x int32 < 53 bits); q4_1 adds m * xd * xsum likewise."""
    FT, esz = (ir.DoubleType(), 8) if f64 else (F32, 4)

    def codegen(context, builder, signature, args):
        (wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, n0, t0) = args
        b = builder
        e = _Emit(b)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        wq = b.add(wq, b.mul(n0, wstride))
        dp = b.add(dp, b.mul(n0, dstride))
        mp = b.add(mp, b.mul(n0, dstride))
        xp = b.add(xp, b.mul(t0, xstride))
        xdp = b.add(xdp, b.mul(t0, sstride))
        xsp = b.add(xsp, b.mul(t0, sstride))
        op = b.add(b.add(op, b.mul(t0, ostride)), b.mul(n0, i64(esz)))
        acc = [[cgutils.alloca_once_value(b, ir.Constant(FT, 0.0)) for _ in range(U)] for _ in range(R)]
        wpb = 32 if kind == "q8_0" else 16  # weight bytes per block
        D = lambda v: b.fpext(v, FT)  # noqa: E731
        with cgutils.for_range(b, nb) as loop:
            blk = loop.index
            xs_, xd_, xds, xsum_ = [], [], [], []
            for u in range(U):
                xo = b.add(b.mul(i64(u), xstride), b.mul(blk, i64(32)))
                so = b.add(b.mul(i64(u), sstride), b.mul(blk, i64(4)))
                xs_.append((e.load(xp, xo, _vec(I8, 16)), e.load(xp, b.add(xo, i64(16)), _vec(I8, 16))))
                xd = e.load(xdp, so, F32)
                xd_.append(xd)
                if kind == "q4_1":
                    xsum_.append(e.load(xsp, so, I32))
                    xds.append(b.fmul(xd, b.sitofp(xsum_[-1], F32)))
            for r in range(R):
                wo = b.add(b.mul(i64(r), wstride), b.mul(blk, i64(wpb)))
                ho = b.add(b.mul(i64(r), dstride), b.mul(blk, i64(2)))
                d = e.half(dp, ho)
                if kind == "q8_0":
                    w1, w2 = e.load(wq, wo, _vec(I8, 16)), e.load(wq, b.add(wo, i64(16)), _vec(I8, 16))
                else:
                    w = e.load(wq, wo, _vec(I8, 16))
                    # signed nibbles (nib - 8) for both q4 types: sdot is signed x signed
                    w1 = b.sub(b.and_(w, e.const(I8, 16, [15] * 16)), e.const(I8, 16, [8] * 16))
                    w2 = b.sub(b.lshr(w, e.const(I8, 16, [4] * 16)), e.const(I8, 16, [8] * 16))
                    if kind == "q4_1":
                        m = e.half(mp, ho)
                for u in range(U):
                    s = e.sdot([(w1, xs_[u][0]), (w2, xs_[u][1])])
                    if kind == "q4_1":  # sum nib x = sum (nib - 8) x + 8 xsum
                        s = b.add(s, b.shl(xsum_[u], I32(3)))
                    if f64:
                        a = b.fadd(b.load(acc[r][u]), b.fmul(b.fmul(D(d), D(xd_[u])), b.sitofp(s, FT)))
                        if kind == "q4_1":
                            a = b.fadd(a, b.fmul(b.fmul(D(m), D(xd_[u])), b.sitofp(xsum_[u], FT)))
                    else:
                        a = e.fma(b.sitofp(s, F32), b.fmul(d, xd_[u]), b.load(acc[r][u]))
                        if kind == "q4_1":
                            a = e.fma(m, xds[u], a)
                    b.store(a, acc[r][u])
        for r in range(R):
            for u in range(U):
                b.store(b.load(acc[r][u]), e.addr(op, b.add(b.mul(i64(u), ostride), i64(esz * r))))
        return context.get_dummy_value()

    return codegen


def _ftile_codegen(half: bool, R: int, U: int, V: int = 16):
    """R rows x U tokens of a float matmul: <V x float> FMAs over K, masked tail, tree reduction."""
    esz = 2 if half else 4

    def codegen(context, builder, signature, args):
        (wp, wstride, xp, xstride, op, ostride, K, n0, t0) = args
        b = builder
        e = _Emit(b)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        wp = b.add(wp, b.mul(n0, wstride))
        xp = b.add(xp, b.mul(t0, xstride))
        op = b.add(b.add(op, b.mul(t0, ostride)), b.mul(n0, i64(4)))
        vz = ir.Constant(_vec(F32, V), None)
        acc = [[cgutils.alloca_once_value(b, vz) for _ in range(U)] for _ in range(R)]

        def step(k, mask):
            xv = [e.load(xp, b.add(b.mul(i64(u), xstride), b.mul(k, i64(4 * V))), _vec(F32, V), mask)
                  for u in range(U)]
            for r in range(R):
                wo = b.add(b.mul(i64(r), wstride), b.mul(k, i64(esz * V)))
                if half:
                    w = b.fpext(b.bitcast(e.load(wp, wo, _vec(I16, V), mask), _vec(F16, V)), _vec(F32, V))
                else:
                    w = e.load(wp, wo, _vec(F32, V), mask)
                for u in range(U):
                    b.store(e.fma(w, xv[u], b.load(acc[r][u])), acc[r][u])

        nk = b.udiv(K, i64(V))
        rem = b.trunc(b.urem(K, i64(V)), I32)
        with cgutils.for_range(b, nk) as loop:
            step(loop.index, None)
        with b.if_then(b.icmp_unsigned("!=", rem, I32(0)), likely=False):
            mask = b.icmp_signed("<", e.const(I32, V, range(V)), e.splat(rem, V))
            step(nk, mask)
        for r in range(R):
            for u in range(U):
                b.store(e.hsum(b.load(acc[r][u])), e.addr(op, b.add(b.mul(i64(u), ostride), i64(4 * r))))
        return context.get_dummy_value()

    return codegen


def _make_qtile(kind, R, U, f64=False):
    gen = _qtile_codegen(kind, R, U, f64)

    def tile(typingctx, wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, n0, t0):
        argtys = (wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, n0, t0)
        if not all(isinstance(t, types.Integer) for t in argtys):
            return None
        return types.void(*argtys), gen

    tile.__name__ = tile.__qualname__ = f"generic_{kind}_tile_{R}x{U}{'_f64' if f64 else ''}"
    return intrinsic(tile)


def _make_ftile(half, R, U):
    gen = _ftile_codegen(half, R, U)

    def tile(typingctx, wp, wstride, xp, xstride, op, ostride, K, n0, t0):
        argtys = (wp, wstride, xp, xstride, op, ostride, K, n0, t0)
        if not all(isinstance(t, types.Integer) for t in argtys):
            return None
        return types.void(*argtys), gen

    tile.__name__ = tile.__qualname__ = f"generic_{'f16' if half else 'f32'}_tile_{R}x{U}"
    return intrinsic(tile)


RQ, UQ = 4, 2  # quantized tiles: R rows x U tokens (T = 1: R x 1)
RF, UF = 4, 3  # float tiles
_q40_RU = _make_qtile("q4_0", RQ, UQ)
_q40_R1 = _make_qtile("q4_0", RQ, 1)
_q40_OU = _make_qtile("q4_0", 1, UQ)
_q40_O1 = _make_qtile("q4_0", 1, 1)
_q41_RU = _make_qtile("q4_1", RQ, UQ)
_q41_R1 = _make_qtile("q4_1", RQ, 1)
_q41_OU = _make_qtile("q4_1", 1, UQ)
_q41_O1 = _make_qtile("q4_1", 1, 1)
_q80_RU = _make_qtile("q8_0", RQ, UQ)
_q80_R1 = _make_qtile("q8_0", RQ, 1)
_q80_OU = _make_qtile("q8_0", 1, UQ)
_q80_O1 = _make_qtile("q8_0", 1, 1)
_f16_RU = _make_ftile(True, RF, UF)
_f16_R1 = _make_ftile(True, RF, 1)
_f16_OU = _make_ftile(True, 1, UF)
_f16_O1 = _make_ftile(True, 1, 1)
_f32_RU = _make_ftile(False, RF, UF)
_f32_R1 = _make_ftile(False, RF, 1)
_f32_OU = _make_ftile(False, 1, UF)
_f32_O1 = _make_ftile(False, 1, 1)


# ----------------------------------------------------------------------------
# shape checks
# ----------------------------------------------------------------------------
@njit(**_JIT)
def _rows_ok(a):
    """The elements of each row are contiguous (rows themselves may be strided)."""
    return a.shape[1] <= 1 or a.strides[1] == a.itemsize


@njit(**_JIT)
def check_q(qs, d, m, xq, xd, xsum, out, qs_per_block):
    N = qs.shape[0]
    T, K = xq.shape
    nb = K // QK
    if K % QK:
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
    if not (_rows_ok(qs) and _rows_ok(d) and _rows_ok(m) and _rows_ok(xq) and _rows_ok(xd) and _rows_ok(xsum)
            and _rows_ok(out)):
        raise ValueError("matmul: every array's rows must be contiguous")


@njit(**_JIT)
def check_f(w, x, out):
    if w.shape[1] != x.shape[1] or out.shape[0] != x.shape[0] or out.shape[1] != w.shape[0]:
        raise ValueError("matmul: shapes must be w (N, K), x (T, K), out (T, N)")
    if not (_rows_ok(w) and _rows_ok(x) and _rows_ok(out)):
        raise ValueError("matmul: every array's rows must be contiguous")


# ----------------------------------------------------------------------------
# kernels: prange over R-row tiles; each tile loops over U-token tiles. The array-typed
# entry points (one compilation per array type, e.g. read-only memmaps) only check shapes
# and call the pointer-typed parallel body (compiled once).
# ----------------------------------------------------------------------------
@njit(**_JIT_PAR)
def _q40_run(wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, N, T):
    a = (wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb)
    for i in prange((N + RQ - 1) // RQ):
        n0 = i * RQ
        if n0 + RQ <= N:
            t0 = 0
            while t0 + UQ <= T:
                _q40_RU(*a, n0, t0)
                t0 += UQ
            for t in range(t0, T):
                _q40_R1(*a, n0, t)
        else:
            for n in range(n0, N):
                t0 = 0
                while t0 + UQ <= T:
                    _q40_OU(*a, n, t0)
                    t0 += UQ
                for t in range(t0, T):
                    _q40_O1(*a, n, t)


@njit(**_JIT_PAR)
def _q41_run(wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, N, T):
    a = (wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb)
    for i in prange((N + RQ - 1) // RQ):
        n0 = i * RQ
        if n0 + RQ <= N:
            t0 = 0
            while t0 + UQ <= T:
                _q41_RU(*a, n0, t0)
                t0 += UQ
            for t in range(t0, T):
                _q41_R1(*a, n0, t)
        else:
            for n in range(n0, N):
                t0 = 0
                while t0 + UQ <= T:
                    _q41_OU(*a, n, t0)
                    t0 += UQ
                for t in range(t0, T):
                    _q41_O1(*a, n, t)


@njit(**_JIT_PAR)
def _q80_run(wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, N, T):
    a = (wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb)
    for i in prange((N + RQ - 1) // RQ):
        n0 = i * RQ
        if n0 + RQ <= N:
            t0 = 0
            while t0 + UQ <= T:
                _q80_RU(*a, n0, t0)
                t0 += UQ
            for t in range(t0, T):
                _q80_R1(*a, n0, t)
        else:
            for n in range(n0, N):
                t0 = 0
                while t0 + UQ <= T:
                    _q80_OU(*a, n, t0)
                    t0 += UQ
                for t in range(t0, T):
                    _q80_O1(*a, n, t)


@njit(**_JIT_PAR)
def _f16_run(wp, wstride, xp, xstride, op, ostride, K, N, T):
    a = (wp, wstride, xp, xstride, op, ostride, K)
    for i in prange((N + RF - 1) // RF):
        n0 = i * RF
        if n0 + RF <= N:
            t0 = 0
            while t0 + UF <= T:
                _f16_RU(*a, n0, t0)
                t0 += UF
            for t in range(t0, T):
                _f16_R1(*a, n0, t)
        else:
            for n in range(n0, N):
                t0 = 0
                while t0 + UF <= T:
                    _f16_OU(*a, n, t0)
                    t0 += UF
                for t in range(t0, T):
                    _f16_O1(*a, n, t)


@njit(**_JIT_PAR)
def _f32_run(wp, wstride, xp, xstride, op, ostride, K, N, T):
    a = (wp, wstride, xp, xstride, op, ostride, K)
    for i in prange((N + RF - 1) // RF):
        n0 = i * RF
        if n0 + RF <= N:
            t0 = 0
            while t0 + UF <= T:
                _f32_RU(*a, n0, t0)
                t0 += UF
            for t in range(t0, T):
                _f32_R1(*a, n0, t)
        else:
            for n in range(n0, N):
                t0 = 0
                while t0 + UF <= T:
                    _f32_OU(*a, n, t0)
                    t0 += UF
                for t in range(t0, T):
                    _f32_O1(*a, n, t)


@njit(**_JIT)
def matmul_q4_0_q8_0(qs, d, xq, xd, xsum, out):
    """out[t, n] = sum_b d[n, b] * xd[t, b] * sum_i (nib - 8) * xq. d is a uint16 view of fp16."""
    check_q(qs, d, d, xq, xd, xsum, out, 16)
    _q40_run(qs.ctypes.data, qs.strides[0], d.ctypes.data, 0, d.strides[0], xq.ctypes.data, xq.strides[0],
             xd.ctypes.data, xsum.ctypes.data, xd.strides[0], out.ctypes.data, out.strides[0], xd.shape[1],
             qs.shape[0], xq.shape[0])


@njit(**_JIT)
def matmul_q4_1_q8_0(qs, d, m, xq, xd, xsum, out):
    """value = d * nib + m; d, m uint16 views of fp16."""
    check_q(qs, d, m, xq, xd, xsum, out, 16)
    _q41_run(qs.ctypes.data, qs.strides[0], d.ctypes.data, m.ctypes.data, d.strides[0], xq.ctypes.data,
             xq.strides[0], xd.ctypes.data, xsum.ctypes.data, xd.strides[0], out.ctypes.data, out.strides[0],
             xd.shape[1], qs.shape[0], xq.shape[0])


@njit(**_JIT)
def matmul_q8_0_q8_0(qs, d, xq, xd, xsum, out):
    """qs int8 (N, K); d uint16 view of fp16."""
    check_q(qs, d, d, xq, xd, xsum, out, 32)
    _q80_run(qs.ctypes.data, qs.strides[0], d.ctypes.data, 0, d.strides[0], xq.ctypes.data, xq.strides[0],
             xd.ctypes.data, xsum.ctypes.data, xd.strides[0], out.ctypes.data, out.strides[0], xd.shape[1],
             qs.shape[0], xq.shape[0])


@njit(**_JIT)
def matmul_f16_f32(w, x, out):
    """w uint16 view of fp16 (N, K), x f32 (T, K), out f32 (T, N)."""
    check_f(w, x, out)
    _f16_run(w.ctypes.data, w.strides[0], x.ctypes.data, x.strides[0], out.ctypes.data, out.strides[0],
             w.shape[1], w.shape[0], x.shape[0])


@njit(**_JIT)
def matmul_f32_f32(w, x, out):
    check_f(w, x, out)
    _f32_run(w.ctypes.data, w.strides[0], x.ctypes.data, x.strides[0], out.ctypes.data, out.strides[0],
             w.shape[1], w.shape[0], x.shape[0])


# the 5-bit, K-quant and MXFP4 types (kquant.py: the same IR for every path, portable flavour here)
from mpillm.kernels.kquant import portable_matmul_q4_K_q8_0 as matmul_q4_K_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_q5_0_q8_0 as matmul_q5_0_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_q5_1_q8_0 as matmul_q5_1_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_q5_K_q8_0 as matmul_q5_K_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_q6_K_q8_0 as matmul_q6_K_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_mxfp4_q8_0 as matmul_mxfp4_q8_0  # noqa: E402
