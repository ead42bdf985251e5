"""Matmul kernels for the IQ4 weight types (iq4_nl, iq4_xs; layouts in ``mpillm.formats.quant``),
in every path: vnni, avx2, portable (aarch64's neon-dot / neon too) and float64 (``--buffer-type
f64``, kernels.exact). ``iq4_xs_32`` (per-32 super-block scales) runs the iq4_xs kernels: the
super-block index is b >> dshift, dshift read from the shape of ``d`` (as kquant's K-quants).

Both types are 4-bit codes q (qs in the q4_0 nibble order) indexing the 16-entry signed table
kv = quant.IQ4_KVALUES (-127..113), one float scale D per 32-element sub-block b:

    iq4_nl  D = d_b                 iq4_xs  D = d_s * (ls_b - 32)   (sc = ls - 32 stored, int8)
    out += xd_b * D_b * isum_b,     isum_b = sum_i kv[q_i] * xq_i   (exact integer dot)

with the q8_0 activations (xq int8 with |xq| <= 127, xd, xsum) of every quantized kernel.

x86 (``vnni``, ``avx2``): built as x86.py's q4_0 kernels, with a table lookup between the nibbles
and the dot product. The activations are prepared once per call into a scratch buffer
(``_prep_codegen``): per token and group (one register of weight bytes: W = 64 bytes, 4
sub-blocks, on VNNI; 32 bytes, 2 sub-blocks, on AVX2) the first and the last 16 activation bytes
of each sub-block gathered (XL, XH: the low nibbles hold elements 0..15 of a sub-block, the high
nibbles 16..31), the i32 accumulator start and the activation scale of each lane (4 lanes per
sub-block). A tile then does per group and row: lo = w & 15, hi = w >> 4, a byte-table lookup
(``vpshufb``) of each, two dot products per token into <L x i32>, one conversion and one FMA
with the lanes' D * xd into a <L x float> accumulator per (row, token); a tree sum at the end.

The dot products multiply unsigned by signed bytes, and the table is signed:

- VNNI (``vpdpbusd``, u8 x s8, 4 products summed into an i32 lane, no saturation): the looked-up
  bytes are kv + 128 (1..241, unsigned), and the accumulator starts at -32 * xsum_b in each of
  the sub-block's 4 lanes, so the lanes of a sub-block sum to sum (kv + 128) x - 128 xsum =
  isum exactly. (A lane takes 8 products, 4 per dot: it is at most 8 * 241 * 127 + 32 * 32 * 127
  < 2^19 in magnitude, so its conversion to float is exact.)
- AVX2 (``vpmaddubsw``, u8 x s8, pairs of products summed with SATURATION to i16): kv + 128
  would overflow (241 * 127 * 2 > 32767). The sign trick instead: the unsigned operand is
  |kv| (<= 127) and the activations get kv's sign (``vpsignb``): |kv| * sign(kv) * x = kv * x,
  and a pair is at most 2 * 127 * 127 = 32258 <= 32767 in magnitude, so nothing saturates
  (kv is never 0, so vpsignb never zeroes an activation; |x| <= 127, so it never meets the
  unnegatable -128). ``vpmaddwd`` by ones widens each i16 result to i32 before anything is
  added (two pair sums added in i16 could overflow). tests/test_iquant.py runs the extremes
  (every code -127 or 113, every activation +-127) against the exact integers.

iq4_xs with d per 256 columns computes d * sc for a super-block's 8 sub-blocks at once, then
each group takes its lanes of them (the same float values as per group: the _32 form and the
tails go group by group).

T = 1 (decode) runs tiles of R_D = 4 rows (the prepared activations' loads are shared by the
rows; the decode kernels are bound by instructions more than by memory here), each row's streams
prefetched PF bytes ahead in qs (and proportionally ahead in the scales). The runners are
compiled without fastmath (as kquant's): every row is the same sequence of float operations in
any tile, so a row's result does not depend on its batch.

Portable: one sub-block at a time, 16 bytes of codes at once: the table lookup is AArch64's
``tbl`` (``llvm.aarch64.neon.tbl1``) where the host is aarch64, else a 4-level tree of vector
selects on the code's bits (target-neutral IR); then ``irgen.Emit.sdot`` (AArch64 ``sdot``:
the looked-up bytes are signed, so LLVM keeps the sext x sext shape). ``f64`` tiles: the same
with float64 accumulation.

Shape checks, the portable / f64 runner and entry-point templates and the emitter are kquant's.
"""
from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit
from numba.core import cgutils
from numba.np.ufunc.parallel import _iget_num_threads  # the thread count, cacheable (as x86.py)

from mpillm.formats import quant
from mpillm.kernels import jitcache, kquant, runners
from mpillm.kernels.irgen import F16, F32, F64, I1, I8, I16, I32, int_intrinsic
from mpillm.kernels.irgen import vec as _vec
from mpillm.kernels.kquant import _E, _args, _check, _chk, _dshift

KINDS = quant.IQ4_TYPES  # ("iq4_nl", "iq4_xs")
KV = [int(v) for v in quant.IQ4_KVALUES]
_S8 = lambda v: v - 256 if v > 127 else v  # noqa: E731  (a byte's value as LLVM's i8 constant)
KV_U = [_S8(v + 128) for v in KV]  # VNNI's unsigned operand: kv + 128, 1..241
_JIT = dict(cache=True, fastmath=True, nogil=True)
_JIT_RUN = dict(cache=True, fastmath=False, nogil=True, parallel=True)


class _IE(_E):
    """kquant's emitter plus AVX2's vpsignb and a 16-entry byte table lookup for the portable IR."""

    def psign(self, x, s):
        f = self.decl("llvm.x86.avx2.psign.b", _vec(I8, 32), [_vec(I8, 32), _vec(I8, 32)])
        return self.b.call(f, [x, s])

    def iabs(self, v):
        f = self.decl(f"llvm.abs.v{v.type.count}i8", v.type, [v.type, I1])
        return self.b.call(f, [v, I1(0)])

    def half4_masked(self, base, off, n, mask):
        """n fp16 values -> <n x float>; masked lanes read nothing and give 0."""
        h = self.load(base, off, _vec(I16, n), mask)
        return self.b.fpext(self.b.bitcast(h, _vec(F16, n)), _vec(F32, n))

    def lut16(self, table, idx, target):
        """<16 x i8> of table[idx] (idx bytes 0..15): AArch64 ``tbl`` (target "aarch64"), or
        (target "generic") a tree of selects, one level per bit of the index."""
        b = self.b
        if target == "aarch64":
            v16 = _vec(I8, 16)
            f = self.decl("llvm.aarch64.neon.tbl1.v16i8", v16, [v16, v16])
            return b.call(f, [self.const(I8, 16, table), idx])
        n = idx.type.count
        level = [self.splat_const(I8, n, v) for v in table]
        for bit in range(4):
            m = b.icmp_unsigned("!=", b.and_(idx, self.splat_const(I8, n, 1 << bit)), ir.Constant(_vec(I8, n), None))
            level = [b.select(m, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
        return level[0]


LUT_TARGET = "aarch64" if platform.machine().lower() in ("aarch64", "arm64") else "generic"


# ----------------------------------------------------------------------------------------------
# x86: prepared activations and tiles
# ----------------------------------------------------------------------------------------------
class _Geom:
    def __init__(self, isa: str):
        self.W = 64 if isa == "vnni" else 32  # weight bytes per group and row
        self.G = self.W // 16  # sub-blocks per group
        self.L = self.W // 4  # i32 / f32 lanes, 4 per sub-block
        self.nx = 3 if isa == "vnni" else 2  # XL, XH (, init on VNNI)
        self.GB = (self.nx + 1) * self.W  # prepared bytes per group and token: XL | XH | (init |) xdl
        self.lanes = [i // 4 for i in range(self.L)]


def _prep_codegen(isa: str):
    g_ = _Geom(isa)
    W, G, L = g_.W, g_.G, g_.L
    lo_idx = [32 * k + j for k in range(G) for j in range(16)]
    hi_idx = [32 * k + 16 + j for k in range(G) for j in range(16)]

    def codegen(context, builder, signature, args):
        xp, xstride, xdp, xsp, sstride, nb, T, bp, bstride = args
        b = builder
        e = _IE(b, isa)
        i64 = e.i64

        def group(xrow, srow, brow, g, rem):
            mx0 = mx1 = mblk = None
            if rem is not None:  # a partial last group: the missing sub-blocks read as zeros
                mx0 = e.lanes_below(W, b.mul(rem, I32(32)))
                mx1 = e.lanes_below(W, b.sub(b.mul(rem, I32(32)), I32(W)))
                mblk = e.lanes_below(G, rem)
            xo = b.add(xrow, b.mul(g, i64(32 * G)))
            so = b.add(srow, b.mul(g, i64(4 * G)))
            bo = b.add(brow, b.mul(g, i64(g_.GB)))
            xa = e.load(xp, xo, _vec(I8, W), mx0)
            xb = e.load(xp, b.add(xo, i64(W)), _vec(I8, W), mx1)
            out = [e.shuffle(xa, xb, lo_idx), e.shuffle(xa, xb, hi_idx)]
            if isa == "vnni":  # -128 xsum per sub-block, a quarter in each of its 4 lanes
                xs = e.load(xsp, so, _vec(I32, G), mblk)
                out.append(e.shuffle(b.mul(xs, e.splat_const(I32, G, -32)), None, g_.lanes))
            out.append(e.shuffle(e.load(xdp, so, _vec(F32, G), mblk), None, g_.lanes))
            for i, v in enumerate(out):
                b.store(v, e.addr(bp, b.add(bo, i64(i * W))), align=1)

        ngroups = b.udiv(nb, i64(G))
        rem = b.trunc(b.urem(nb, i64(G)), I32)
        with cgutils.for_range(b, T) as tl:
            t = tl.index
            xrow, srow, brow = b.mul(t, xstride), b.mul(t, sstride), b.mul(t, bstride)
            with cgutils.for_range(b, ngroups) as gl:
                group(xrow, srow, brow, gl.index, None)
            with b.if_then(b.icmp_unsigned("!=", rem, I32(0)), likely=False):
                group(xrow, srow, brow, ngroups, rem)
        return context.get_dummy_value()

    return codegen


def _x86_codegen(kind: str, isa: str, R: int, U: int, pf: int):
    """An R-row x U-token tile over prepared activations; pf > 0: prefetch the weights' streams
    (qs pf bytes ahead, the scales as far ahead in rows)."""
    g_ = _Geom(isa)
    W, G, L = g_.W, g_.G, g_.L
    xs_ = kind == "iq4_xs"

    def codegen(context, builder, signature, args):
        a0, s0, a1, s1, a2, s2, dshift, bp, bstride, op, ostride, nb, n0, t0 = args
        b = builder
        e = _IE(b, isa)
        i64 = e.i64
        qs, qst = b.add(a0, b.mul(n0, s0)), s0
        if xs_:  # qs, sc, d
            scp, sst, dp, dst = b.add(a1, b.mul(n0, s1)), s1, b.add(a2, b.mul(n0, s2)), s2
        else:  # qs, d
            dp, dst = b.add(a1, b.mul(n0, s1)), s1
        bp = b.add(bp, b.mul(t0, bstride))
        op = b.add(b.add(op, b.mul(t0, ostride)), b.mul(n0, i64(4)))
        fz = ir.Constant(_vec(F32, L), None)
        acc = [[cgutils.alloca_once_value(b, fz) for _ in range(U)] for _ in range(R)]
        sup = b.icmp_unsigned("==", dshift, i64(3))  # iq4_xs: d per 256 columns (else per 32)
        m15, m4 = e.splat_const(I8, W, 15), e.splat_const(I8, W, 4)
        table = KV_U if isa == "vnni" else KV

        def scales(r, g, rem):
            """<G x float> D of row r's sub-blocks in group g (0 past a partial group's end)."""
            blk = b.mul(g, i64(G))
            mblk = None if rem is None else e.lanes_below(G, rem)
            if not xs_:
                return e.half4_masked(dp, b.add(b.mul(i64(r), dst), b.mul(blk, i64(2))), G, mblk)
            sc = e.load(scp, b.add(b.mul(i64(r), sst), blk), _vec(I8, G), mblk)
            # the group lies in one super-block (G divides 8): one d (dshift 3) or G of them
            nd = b.select(sup, I32(1), I32(G) if rem is None else rem)
            h = e.load(dp, b.add(b.mul(i64(r), dst), b.mul(b.lshr(blk, dshift), i64(2))), _vec(I16, G),
                       e.lanes_below(G, nd))
            d = b.fpext(b.bitcast(h, _vec(F16, G)), _vec(F32, G))
            d = b.select(sup, e.shuffle(d, None, [0] * G), d)
            return b.fmul(d, b.sitofp(sc, _vec(F32, G)))

        def group(g, rem, D=None):
            """Group g (i64) of G sub-blocks (rem: the valid ones of a partial group, i32); D: the
            rows' <8 x float> scales of the group's super-block (iq4_xs with d per 256 columns)."""
            mw = None if rem is None else e.lanes_below(W, b.mul(rem, I32(16)))
            X = []
            for u in range(U):
                bo = b.add(b.mul(i64(u), bstride), b.mul(g, i64(g_.GB)))
                X.append([e.load(bp, b.add(bo, i64(i * W)), _vec(I8, W)) for i in range(g_.nx)]
                         + [e.load(bp, b.add(bo, i64(g_.nx * W)), _vec(F32, L))])
            for r in range(R if pf > 0 else 0):  # each row's streams, pf bytes of qs ahead
                e.prefetch(qs, b.add(b.add(b.mul(i64(r), qst), b.mul(g, i64(W))), i64(pf)))
                if xs_:
                    e.prefetch(scp, b.add(b.add(b.mul(i64(r), sst), b.mul(g, i64(G))), i64(pf // 16)))
                    e.prefetch(dp, b.add(b.add(b.mul(i64(r), dst), b.mul(b.lshr(b.mul(g, i64(G)), dshift), i64(2))),
                                         i64(pf // 128)))
                else:
                    e.prefetch(dp, b.add(b.add(b.mul(i64(r), dst), b.mul(g, i64(2 * G))), i64(pf // 8)))
            for r in range(R):
                w = e.load(qs, b.add(b.mul(i64(r), qst), b.mul(g, i64(W))), _vec(I8, W), mw)
                lo = e.pshufb(table, b.and_(w, m15))
                hi = e.pshufb(table, b.lshr(w, m4))
                dl = e.shuffle(scales(r, g, rem), None, g_.lanes) if D is None else D[r]
                if isa == "avx2":
                    alo, ahi = e.iabs(lo), e.iabs(hi)
                for u in range(U):
                    if isa == "vnni":
                        a = e.dot(e.dot(b.bitcast(X[u][2], _vec(I32, L)), lo, X[u][0]), hi, X[u][1])
                    else:
                        z = ir.Constant(_vec(I32, L), None)
                        a = e.dot(e.dot(z, alo, e.psign(X[u][0], lo)), ahi, e.psign(X[u][1], hi))
                    f = b.sitofp(a, _vec(F32, L))
                    b.store(e.fma(f, b.fmul(dl, X[u][-1]), b.load(acc[r][u])), acc[r][u])

        def super_block(sb):
            """iq4_xs with d per 256 columns: the rows' 8 scales d * sc once per super-block sb,
            then its 8 / G groups (the same float operations as group() alone)."""
            D = []
            for r in range(R):
                d = e.half(dp, b.add(b.mul(i64(r), dst), b.mul(sb, i64(2))))
                sc = e.load(scp, b.add(b.mul(i64(r), sst), b.mul(sb, i64(8))), _vec(I8, 8))
                D.append(b.fmul(e.splat(d, 8), b.sitofp(sc, _vec(F32, 8))))
            for j in range(8 // G):
                group(b.add(b.mul(sb, i64(8 // G)), i64(j)), None, [e.shuffle(v, None, [G * j + i // 4 for i in range(L)])
                                                                   for v in D])

        if xs_:
            with b.if_else(sup) as (per256, per32):
                with per256:
                    with cgutils.for_range(b, b.udiv(nb, i64(8))) as loop:
                        super_block(loop.index)
                with per32:
                    e.chunked(nb, G, group)
        else:
            e.chunked(nb, G, group)
        for r in range(R):
            for u in range(U):
                b.store(e.hsum(b.load(acc[r][u])), e.addr(op, b.add(b.mul(i64(u), ostride), i64(4 * r))))
        return context.get_dummy_value()

    return codegen


# ----------------------------------------------------------------------------------------------
# portable and float64: one sub-block at a time (kquant's tile arguments and runners)
# ----------------------------------------------------------------------------------------------
def _portable_codegen(kind: str, R: int, U: int, f64: bool):
    FT, esz = (F64, 8) if f64 else (F32, 4)
    xs_ = kind == "iq4_xs"

    def codegen(context, builder, signature, args):
        b = builder
        e = _IE(b, "portable")
        i64 = e.i64
        slots = args[:2 * kquant.NSLOT]
        dshift, xp, xstride, xdp, xsp, sstride, op, ostride, nb, n0, t0 = args[2 * kquant.NSLOT:]
        A = {name: (b.add(slots[2 * i], b.mul(n0, slots[2 * i + 1])), slots[2 * i + 1])
             for i, name in enumerate(kquant_arrays(kind))}
        xp = b.add(xp, b.mul(t0, xstride))
        xdp = b.add(xdp, b.mul(t0, sstride))
        op = b.add(b.add(op, b.mul(t0, ostride)), b.mul(n0, i64(esz)))
        acc = [[cgutils.alloca_once_value(b, ir.Constant(FT, 0.0)) for _ in range(U)] for _ in range(R)]
        m15, m4 = e.splat_const(I8, 16, 15), e.splat_const(I8, 16, 4)

        def block(blk):
            xv, xdv = [], []
            for u in range(U):
                xo = b.add(b.mul(i64(u), xstride), b.mul(blk, i64(32)))
                xv.append((e.load(xp, xo, _vec(I8, 16)), e.load(xp, b.add(xo, i64(16)), _vec(I8, 16))))
                xdv.append(e.load(xdp, b.add(b.mul(i64(u), sstride), b.mul(blk, i64(4))), F32))
            for r in range(R):
                base, st = A["qs"]
                w = e.load(base, b.add(b.mul(i64(r), st), b.mul(blk, i64(16))), _vec(I8, 16))
                q0 = e.lut16(KV, b.and_(w, m15), LUT_TARGET)
                q1 = e.lut16(KV, b.lshr(w, m4), LUT_TARGET)
                if xs_:
                    d = e.half(A["d"][0], b.add(b.mul(i64(r), A["d"][1]), b.mul(b.lshr(blk, dshift), i64(2))))
                    sc = e.s8f(A["sc"][0], b.add(b.mul(i64(r), A["sc"][1]), blk))
                    D = b.fmul(d, sc)  # exact: 11-bit d times a 6-bit integer
                else:
                    D = e.half(A["d"][0], b.add(b.mul(i64(r), A["d"][1]), b.mul(blk, i64(2))))
                if f64:
                    D = b.fpext(D, F64)
                for u in range(U):
                    s = e.sdot([(q0, xv[u][0]), (q1, xv[u][1])])
                    xd = b.fpext(xdv[u], F64) if f64 else xdv[u]
                    t = b.fmul(D, b.sitofp(s, FT))
                    b.store(b.fadd(b.load(acc[r][u]), b.fmul(t, xd)), acc[r][u])

        with cgutils.for_range(b, nb) as loop:
            block(loop.index)
        for r in range(R):
            for u in range(U):
                b.store(b.load(acc[r][u]), e.addr(op, b.add(b.mul(i64(u), ostride), i64(esz * r))))
        return context.get_dummy_value()

    return codegen


def kquant_arrays(kind: str) -> tuple[str, ...]:
    return tuple(n for n, _ in quant.ARRAYS[kind])


# ----------------------------------------------------------------------------------------------
# shape checks (kquant's) -> the tile arguments (kquant's six array slots)
# ----------------------------------------------------------------------------------------------
@njit(**_JIT)
def iq4_nl(qs, d, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out)
    _chk(d, N, nb)
    return _args(qs.ctypes.data, qs.strides[0], d.ctypes.data, d.strides[0], 0, 0, 0, 0, 0, 0, 0, 0, 0,
                 xq, xd, xsum, out, nb), N, T


@njit(**_JIT)
def iq4_xs(qs, sc, d, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out)
    _chk(sc, N, nb)
    ds = _dshift(d, N, nb)
    return _args(qs.ctypes.data, qs.strides[0], sc.ctypes.data, sc.strides[0], d.ctypes.data, d.strides[0],
                 0, 0, 0, 0, 0, 0, ds, xq, xd, xsum, out, nb), N, T


# ----------------------------------------------------------------------------------------------
# tiles, runners, entry points
# ----------------------------------------------------------------------------------------------
R_X, U_X = 4, 2  # x86 prefill tiles
PF = 16384  # decode prefetch distance in bytes of qs
R_D = 4  # decode tile rows: the activations' loads shared by 4 rows (measured: 1.05-1.3x of 1 row)
X86_SHAPES = {"RU": (R_X, U_X, 0), "R1": (R_X, 1, 0), "OU": (1, U_X, 0), "O1": (1, 1, 0), "D": (R_D, 1, PF),
              "D1": (1, 1, PF)}
SHAPES = {"vnni": X86_SHAPES, "avx2": X86_SHAPES,
          "portable": {k: v + (0,) for k, v in kquant.SHAPES["portable"].items()},
          "f64": {k: v + (0,) for k, v in kquant.SHAPES["f64"].items()}}


def _make_tile(path: str, kind: str, shape: str):
    R, U, pf = SHAPES[path][shape]
    name = f"iq_{path}_{kind}_tile_{shape}_{R}x{U}"
    if path in ("vnni", "avx2"):
        return int_intrinsic(name, "a0, s0, a1, s1, a2, s2, dshift, bp, bstride, op, ostride, nb, n0, t0",
                             _x86_codegen(kind, path, R, U, pf))
    return int_intrinsic(name, "a0, s0, a1, s1, a2, s2, a3, s3, a4, s4, a5, s5, dshift, xp, xstride, xdp, xsp, "
                         "sstride, op, ostride, nb, n0, t0", _portable_codegen(kind, R, U, path == "f64"))


def _make_prep(isa: str):
    return int_intrinsic(f"iq_{isa}_prep", "xp, xstride, xdp, xsp, sstride, nb, T, bp, bstride", _prep_codegen(isa))


# x86: the activations prepared once per call into ``buf`` (``args``: the tile arguments of kquant's
# checks). The entry point allocates buf and holds it for the call: allocated in the parallel runner
# (as x86.py does), the prepared activations were at times overwritten before the tiles read them
# here (results changed from call to call, single-threaded too; never since buf moved out).
_RUN_X86 = """

@njit({flags})
def run_{P}_{K}(args, N, T, buf):
    a0, s0, a1, s1, a2, s2, a3, s3, a4, s4, a5, s5, dshift, xp, xstride, xdp, xsp, sstride, op, ostride, nb = args
    R, U = {R}, {U}
    bstride = (nb + {G} - 1) // {G} * {GB}
    {P}_prep(xp, xstride, xdp, xsp, sstride, nb, T, buf.ctypes.data, bstride)
    a = (a0, s0, a1, s1, a2, s2, dshift, buf.ctypes.data, bstride, op, ostride, nb)
    if T == 1:
        # one contiguous range of row tiles per thread, which first prefetches the head of its
        # streams (the tiles prefetch PF bytes ahead of themselves, not their own first bytes)
        ntiles = (N + {RD} - 1) // {RD}
        nch = max(1, min(_iget_num_threads(), ntiles))
        for c in prange(nch):
            i0, i1 = c * ntiles // nch, (c + 1) * ntiles // nch
            n0, n1 = i0 * {RD}, min(N, i1 * {RD})
            _prefetch_range(a0 + n0 * s0, min(PF, (n1 - n0) * s0))
            _prefetch_range(a1 + n0 * s1, min(PF // 8, (n1 - n0) * s1))
            _prefetch_range(a2 + n0 * s2, min(PF // 8, (n1 - n0) * s2))
            for i in range(i0, i1):
                n = i * {RD}
                if n + {RD} <= N:
                    {P}_{K}_D(*a, n, 0)
                else:
                    for m in range(n, N):
                        {P}_{K}_D1(*a, m, 0)
        return
{loop}"""


def _runners_source() -> str:
    src = runners.HEADER.format(by=__name__) + "import numpy as np\n"
    for P, sh in SHAPES.items():
        for K in KINDS:
            tiles = [f"{P}_{K}_{s}" for s in ("RU", "R1", "OU", "O1")]
            if P in ("vnni", "avx2"):
                g = _Geom(P)
                src += _RUN_X86.format(flags=runners.flags(_JIT_RUN), P=P, K=K, R=sh["RU"][0], U=sh["RU"][1],
                                       G=g.G, GB=g.GB, RD=sh["D"][0], loop=runners.row_tiles(4, *tiles))
                src += kquant.ENTRY_BUF.format(flags=runners.flags(_JIT), name=kquant.entry_name(P, K),
                                               arrays=", ".join(kquant_arrays(K)), P=P, K=K,
                                               size=f"max(1, T * ((xd.shape[1] + {g.G} - 1) // {g.G} * {g.GB}))")
            else:
                src += kquant._RUN.format(P=P, K=K, RD=sh["D"][0], R=sh["RU"][0], U=sh["RU"][1],
                                          loop=runners.row_tiles(4, *tiles))
                src += kquant._ENTRY.format(flags=runners.flags(_JIT), name=kquant.entry_name(P, K),
                                            arrays=", ".join(kquant_arrays(K)), P=P, K=K)
    return src


def _prefetch_range_codegen(context, builder, signature, args):
    base, n = args
    e = _IE(builder, "")
    with cgutils.for_range(builder, builder.udiv(n, e.i64(64))) as loop:
        e.prefetch(base, builder.mul(loop.index, e.i64(64)))
    return context.get_dummy_value()


_prefetch_range = int_intrinsic("iq_prefetch_range", "base, n", _prefetch_range_codegen)


def _runner_names() -> dict:
    names = {f"check_{K}": globals()[K] for K in KINDS}
    names.update(_prefetch_range=_prefetch_range, _iget_num_threads=_iget_num_threads, PF=PF)
    for P in SHAPES:
        if P in ("vnni", "avx2"):
            names[f"{P}_prep"] = _make_prep(P)
        names.update({f"{P}_{K}_{s}": _make_tile(P, K, s) for K in KINDS for s in SHAPES[P]})
    return names


_R = jitcache.load_generated("iq", "iq_run", _runners_source(), _runner_names())
for _P in SHAPES:  # vnni_matmul_iq4_nl_q8_0, ..., portable_matmul_iq4_xs_q8_0, matmul_iq4_nl_q8_0_f64, ...
    for _K in KINDS:
        globals()[kquant.entry_name(_P, _K)] = getattr(_R, kquant.entry_name(_P, _K))
