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

from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from mpillm.kernels import jitcache, runners
from mpillm.kernels.checks import check_f, check_q
from mpillm.kernels.irgen import F16, F32, I8, I16, I32, I64, Emit, int_intrinsic
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
# target-neutral vector IR (irgen.Emit: the fp16 scalar load and the signed dot product ``sdot``)
# ----------------------------------------------------------------------------
def _qtile_codegen(kind: str, R: int, U: int, f64: bool = False):
    """R rows x U tokens of a quantized matmul, one 32-block at a time: an exact int32 dot per
    block (sdot shape), then one float FMA with d * xd per block and (row, token).

    f64: float64 output (kernels.exact): per block acc += d * xd * isum in float64, every term
    exact (fp16 x float32 x int32 < 53 bits); q4_1 adds m * xd * xsum likewise."""
    FT, esz = (ir.DoubleType(), 8) if f64 else (F32, 4)

    def codegen(context, builder, signature, args):
        (wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, n0, t0) = args
        b = builder
        e = Emit(b)
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
        e = Emit(b)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        wp = b.add(wp, b.mul(n0, wstride))
        xp = b.add(xp, b.mul(t0, xstride))
        op = b.add(b.add(op, b.mul(t0, ostride)), b.mul(n0, i64(4)))
        vz = ir.Constant(_vec(F32, V), None)
        acc = [[cgutils.alloca_once_value(b, vz) for _ in range(U)] for _ in range(R)]

        def step(k, rem):
            mask = None if rem is None else e.lanes_below(V, rem)
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

        e.chunked(K, V, step)  # the last, partial chunk masked
        for r in range(R):
            for u in range(U):
                b.store(e.hsum(b.load(acc[r][u])), e.addr(op, b.add(b.mul(i64(u), ostride), i64(4 * r))))
        return context.get_dummy_value()

    return codegen


def _make_qtile(kind, R, U, f64=False):
    return int_intrinsic(f"generic_{kind}_tile_{R}x{U}{'_f64' if f64 else ''}", runners.QPARAMS + ", n0, t0",
                         _qtile_codegen(kind, R, U, f64))


def _make_ftile(half, R, U):
    return int_intrinsic(f"generic_{'f16' if half else 'f32'}_tile_{R}x{U}", runners.FPARAMS + ", n0, t0",
                         _ftile_codegen(half, R, U))


RQ, UQ = 4, 2  # quantized tiles: R rows x U tokens (T = 1: R x 1)
RF, UF = 4, 3  # float tiles
QKINDS = ("q4_0", "q4_1", "q8_0")


def tiles(prefix: str, make, R: int, U: int) -> dict:
    """The four tiles a runner (runners.row_tiles) uses, by name: ``<prefix>_RU`` (R x U), ``_R1``
    (R x 1), ``_OU`` (1 x U), ``_O1`` (1 x 1); make(R, U) builds one."""
    return {f"{prefix}_RU": make(R, U), f"{prefix}_R1": make(R, 1), f"{prefix}_OU": make(1, U),
            f"{prefix}_O1": make(1, 1)}


# ----------------------------------------------------------------------------
# kernels, generated per type from mpillm.kernels.runners (numba caches only functions in
# files): prange over R-row tiles; each tile loops over U-token tiles. The array-typed entry
# points (one compilation per array type, e.g. read-only memmaps) only check shapes and call
# the pointer-typed parallel runner (compiled once). d and m are uint16 views of fp16:
#   matmul_q4_0_q8_0  out[t, n] = sum_b d[n, b] * xd[t, b] * sum_i (nib - 8) * xq
#   matmul_q4_1_q8_0  value = d * nib + m
#   matmul_q8_0_q8_0  qs int8 (N, K)
#   matmul_f16_f32    w uint16 view of fp16 (N, K), x f32 (T, K), out f32 (T, N)
#   matmul_f32_f32    w f32 (N, K)
# ----------------------------------------------------------------------------
def _source() -> str:
    par, entry = runners.flags(_JIT_PAR), runners.flags(_JIT)
    src = runners.HEADER.format(by=__name__)
    for k in QKINDS:
        src += runners.plain_run(f"run_{k}", par, runners.QPARAMS, "RQ", "UQ", k)
        src += runners.q_entry(f"matmul_{k}_q8_0", entry, k, f"run_{k}")
    for f in ("f16", "f32"):
        src += runners.plain_run(f"run_{f}", par, runners.FPARAMS, "RF", "UF", f)
        src += runners.f_entry(f"matmul_{f}_f32", entry, f"run_{f}")
    return src


_names = dict(check_q=check_q, check_f=check_f, RQ=RQ, UQ=UQ, RF=RF, UF=UF)
for _k in QKINDS:
    _names.update(tiles(_k, lambda R, U, k=_k: _make_qtile(k, R, U), RQ, UQ))
_names.update(tiles("f16", lambda R, U: _make_ftile(True, R, U), RF, UF))
_names.update(tiles("f32", lambda R, U: _make_ftile(False, R, U), RF, UF))
_gen = jitcache.load_generated("portable", "portable_run", _source(), _names)
matmul_q4_0_q8_0, matmul_q4_1_q8_0, matmul_q8_0_q8_0 = (_gen.matmul_q4_0_q8_0, _gen.matmul_q4_1_q8_0,
                                                         _gen.matmul_q8_0_q8_0)
matmul_f16_f32, matmul_f32_f32 = _gen.matmul_f16_f32, _gen.matmul_f32_f32


# the 5-bit, K-quant and MXFP4 types (kquant.py: the same IR for every path, portable flavour here)
from mpillm.kernels.kquant import portable_matmul_q4_K_q8_0 as matmul_q4_K_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_q5_0_q8_0 as matmul_q5_0_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_q5_1_q8_0 as matmul_q5_1_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_q5_K_q8_0 as matmul_q5_K_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_q6_K_q8_0 as matmul_q6_K_q8_0  # noqa: E402
from mpillm.kernels.kquant import portable_matmul_mxfp4_q8_0 as matmul_mxfp4_q8_0  # noqa: E402
# Q2_K and Q3_K: lowk.py
from mpillm.kernels.lowk import portable_matmul_q2_K_q8_0 as matmul_q2_K_q8_0  # noqa: E402,F401
from mpillm.kernels.lowk import portable_matmul_q3_K_q8_0 as matmul_q3_K_q8_0  # noqa: E402,F401
from mpillm.kernels.iquant import portable_matmul_iq4_nl_q8_0 as matmul_iq4_nl_q8_0  # noqa: E402,F401
from mpillm.kernels.iquant import portable_matmul_iq4_xs_q8_0 as matmul_iq4_xs_q8_0  # noqa: E402,F401
