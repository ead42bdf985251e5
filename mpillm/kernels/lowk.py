"""Matmul kernels for the 2-bit K-quants Q2_K and Q3_K, in every path (vnni, avx2, portable, f64).

Layouts: ``mpillm.formats.quant`` ("Q2_K and Q3_K"): per 32-weight sub-block 8 bytes of 2-bit codes,
byte 4h + m holding weight 16h + 4k + m at bits 2k (h the half, k, m = 0..3); q3_K (shard format
3) the 3-bit codes c of the same positions j = 4h + m and fields k as qs byte j = c_0 | c_1 << 3 |
(c_2 & 3) << 6 and qh nibble j = c_3 | (c_2 >> 2) << 3 (``_q3_fields``); per 16 weights one
scale byte (q2_K: GGML's scale | min << 4; q3_K: the signed 6-bit scale); d (and dmin) per 256 weights, or per 32 for the ``_32`` variants (the
super-block index is b >> dshift, as in ``kquant``). Activations are q8_0 (xq, xd, xsum), as for
every quantized kernel. Per sub-block b of a row and a token, with halves g = 0, 1 of 16 weights:

    q2_K   out += xd_b * sum_g ( d sc_g * sum_g q x  -  dmin mn_g * sum_g x )
    q3_K   out += xd_b * sum_g   d sc_g * sum_g (c - 4) x            c = q | high << 2, 0..7

Decoding (x86), the main loop (``group8``, 8 sub-blocks = one super-block): field k (bits 2k) of
the 64 qs bytes holds, in byte 8s + 4h + m, weight 16h + 4k + m of sub-block s; the activations are
regrouped to match once per token, so each field costs a shift, a mask and one dot (q3_K: its 4
fields from qs and the qh nibbles in 11 operations per row, loads included: ``_q3_fields``; format 2's
bit masks cost 19 with 8 mask registers), and the 4 dots accumulate in 16 i32 lanes, lane j the 16-weight
group j (|lane| < 2^15). The scales stay integers: ``vpmaddwd`` of the lanes with each group's scale
as a word gives sc_j x dot_j exactly; q2_K on VNNI first packs (vpackssdw) the group lanes with the
groups' activation sums, so one vpmaddwd with <sc, .., 16 mn, ..> words leaves per 128-bit lane the
two sub-blocks' scaled dots and their 16 x min terms, one conversion and two float operations per
row and token (times xd, xd / -16, then times d, d, dmin, dmin). AVX2's vpmaddubsw pairs of the 4
fields are summed in i16 words before one vpmaddwd (a word is 8 products, at most 8 x 7 x 127 from
q3_K's -4 x sum start: no overflow; a vpmaddubsw pair is at most 2 x 7 x 128 = 1792, it cannot
saturate). d (and dmin) per super-block run in a loop of their own: each row's are converted to float
16 super-blocks at a time into a buffer on the stack (``DBuf``), and the loop broadcasts one from
it (before: an fp16 broadcast, a blend and a conversion per row and super-block; in cache, one thread,
alternated: q2_K and q3_K about 5% faster); the ``_32`` variants' per-sub-block d in another loop. Tails of the ``_32``
variants (``group_x86``): one sub-block or parts of 4, the dwords of each expanded by a
``shufflevector`` and a per-lane shift (float scales per 16 weights, as before).

Portable: one sub-block at a time, the codes expanded in element order by a byte shuffle and a
per-byte ``lshr`` by a constant vector, signed (q3_K: c - 4; q2_K: q - 2, the 2 added back as
2 x sum of the half's activations, since AArch64's ``sdot`` needs sext x sext; see kquant's
_CENTRE), two ``sdot`` per sub-block (``irgen.Emit.sdot``). ``f64``: the portable tiles with
float64 accumulation (``--buffer-type f64``, kernels.exact).

Tiles, runners and entry points as kquant's (its ``_E`` emitter, shape checks and runner
templates), generated into their own module (group ``lowk``).
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit
from numba.core import cgutils

from mpillm.formats import quant
from mpillm.kernels import jitcache, kquant, runners
from mpillm.kernels.irgen import F16, F32, F64, I1, I8, I16, I32, int_intrinsic
from mpillm.kernels.irgen import vec as _vec
from mpillm.kernels.kquant import _E, _args, _check, _chk, _dshift

KINDS = quant.LOWK_TYPES  # ("q2_K", "q3_K")
ARR = {k: tuple(n for n, _ in quant.ARRAYS[k]) for k in KINDS}
_JIT = dict(cache=True, fastmath=True, nogil=True)
OFFSET = {"q2_K": 0, "q3_K": 4}  # the code offset inside the integer dot
CENTRE = {"q2_K": 2, "q3_K": 4}  # portable: signed codes = code - CENTRE (q2_K adds 2 x sum back)


def _qdwords(e: _E, A: dict, r, b0, ns: int):
    """The qs of sub-blocks [b0, b0 + ns) of row r as <2 ns x i32> (per sub-block: half 0, half 1)."""
    b = e.b
    base, stride = A["qs"]
    return e.load(base, b.add(b.mul(r, stride), b.mul(b0, e.i64(8))), _vec(I32, 2 * ns))


def _expand(e: _E, dw, sel):
    """Dwords ``sel`` of dw, each to 4 lanes shifted right by 0, 2, 4, 6, masked to 2 bits: the 4 x len(sel)
    bytes of codes, lane 4i + k byte m = element 4k + m of the half dword sel[i] holds."""
    b = e.b
    n = 4 * len(sel)
    v = e.shuffle(dw, None, [s for s in sel for _ in range(4)])
    v = b.lshr(v, e.const(I32, n, [2 * k for _ in sel for k in range(4)]))
    v = b.and_(v, e.splat_const(I32, n, 0x03030303))
    return b.bitcast(v, _vec(I8, 4 * n))


def _q3_fields(e: _E, A: dict, r, b0, ns: int):
    """q3_K's codes of sub-blocks [b0, b0 + ns) of row r as 4 fields (<8 ns x i8> each, byte 8s + j:
    field k of position j = 4h + m, i.e. weight 16h + 4k + m of sub-block s; formats/quant.py):
    qs byte j = c_0 | c_1 << 3 | (c_2 & 3) << 6, qh nibble j = c_3 | (c_2 >> 2) << 3. The qh bytes
    widened to words Z (byte i -> word i: positions 2i, 2i + 1), Z | Z << 4 puts nibble j in bits
    0-3 of byte j; then c_0 = qs & 7, c_1 = (qs >> 3) & 7 (a dword shift), c_2 = qs >> 6 | (that
    >> 1) & 4 (one vpternlog), c_3 = that & 7: no mask registers, no byte shuffles."""
    b = e.b
    qb, qst = A["qs"]
    hb, hst = A["qh"]
    v = e.load(qb, b.add(b.mul(r, qst), b.mul(b0, e.i64(8))), _vec(I8, 8 * ns))
    z = b.zext(e.load(hb, b.add(b.mul(r, hst), b.mul(b0, e.i64(4))), _vec(I8, 4 * ns)), _vec(I16, 4 * ns))
    ew = b.or_(z, b.shl(z, e.splat_const(I16, 4 * ns, 4)))
    n = 8 * ns
    seven = e.splat_const(I8, n, 7)
    f0 = b.and_(v, seven)
    f1 = b.bitcast(b.and_(b.lshr(b.bitcast(v, _vec(I32, 2 * ns)), e.splat_const(I32, 2 * ns, 3)),
                          e.splat_const(I32, 2 * ns, 0x07070707)), _vec(I8, n))
    hi2 = b.and_(b.bitcast(b.lshr(ew, e.splat_const(I16, 4 * ns, 1)), _vec(I8, n)), e.splat_const(I8, n, 4))
    f2 = b.or_(b.lshr(v, e.splat_const(I8, n, 6)), hi2)
    f3 = b.and_(b.bitcast(ew, _vec(I8, n)), seven)
    return [f0, f1, f2, f3]


def _q3_order(e: _E, f, idx):
    """Bytes idx of the 4 fields (f0 | f1 | f2 | f3 concatenated: field k byte p at 8 ns k + p)."""
    return e.shuffle(e.shuffle(f[0], f[1], range(2 * f[0].type.count)),
                     e.shuffle(f[2], f[3], range(2 * f[0].type.count)), idx)


def _codes_x86(e: _E, kind: str, A: dict, r, b0, ns: int):
    """x86: unsigned codes of sub-blocks [b0, b0 + ns): (lo, hi) <16 ns x i8> (elements 0..15 / 16..31
    of each sub-block in order) for ns > 1; for ns = 1 one <32 x i8> in element order."""
    if kind == "q3_K":  # field k byte 8s + 4h + m = weight 16h + 4k + m of sub-block s
        f = _q3_fields(e, A, r, b0, ns)
        at = lambda s, h, i: 8 * ns * (i // 4) + 8 * s + 4 * h + i % 4  # noqa: E731
        if ns == 1:
            return (_q3_order(e, f, [at(0, h, i) for h in range(2) for i in range(16)]),)
        return tuple(_q3_order(e, f, [at(s, h, i) for s in range(ns) for i in range(16)]) for h in range(2))
    dw = _qdwords(e, A, r, b0, ns)
    if ns == 1:
        return (_expand(e, dw, [0, 1]),)
    return _expand(e, dw, [2 * s for s in range(ns)]), _expand(e, dw, [2 * s + 1 for s in range(ns)])


def _codes_portable(e: _E, kind: str, A: dict, r, blk):
    """Portable: the signed codes (code - CENTRE) of sub-block blk of row r, <32 x i8> in element order."""
    b = e.b
    if kind == "q3_K":
        q = _q3_order(e, _q3_fields(e, A, r, blk, 1), [8 * k + 4 * h + m for h in range(2) for k in range(4)
                                                          for m in range(4)])
        return b.sub(q, e.splat_const(I8, 32, CENTRE[kind]))
    base, stride = A["qs"]
    w = e.load(base, b.add(b.mul(r, stride), b.mul(blk, e.i64(8))), _vec(I8, 8))
    q = e.shuffle(w, None, [4 * h + m for h in range(2) for k in range(4) for m in range(4)])
    q = b.and_(b.lshr(q, e.const(I8, 32, [2 * k for h in range(2) for k in range(4) for m in range(4)])),
               e.splat_const(I8, 32, 3))
    return b.sub(q, e.splat_const(I8, 32, CENTRE[kind]))

GB = 384  # prepared bytes per super-block and token: X_0 .. X_3 (4 x 64) | 16 floats | 16 i32 (or 32 i16)


def _maddubs(e: _E, a, x):
    """AVX2: <64 x i8> u8 a times s8 x, adjacent pairs summed into <32 x i16> (two vpmaddubsw)."""
    b = e.b
    f = e.decl("llvm.x86.avx2.pmadd.ub.sw", _vec(I16, 16), [_vec(I8, 32), _vec(I8, 32)])
    parts = [b.call(f, [e.shuffle(a, None, range(32 * c, 32 * c + 32)),
                        e.shuffle(x, None, range(32 * c, 32 * c + 32))]) for c in range(2)]
    return e.shuffle(parts[0], parts[1], range(32))


def _token_parts(e: _E, kind: str, x, xd):
    """One token's operands for a super-block (the x86 main loop), from its 256 activation bytes x
    (<64 x i32>) and its 8 xd: X_k (<64 x i8>: dword i = activation dword 4i + k, the order of the
    codes' field k), F <16 x float> (lane j: xd of sub-block j // 2; q2_K on VNNI: per 128-bit lane L
    xd of sub-blocks 2L, 2L + 1, then -1/16 of them) and Z <16 x i32> (q3_K: -4 x the sum of each
    lane's activations, the codes' offset; on AVX2 the same per i16 word; q2_K: each group's sum)."""
    b = e.b
    avx2 = e.isa == "avx2"
    z16 = ir.Constant(_vec(I32, 16), None)
    Xk = [b.bitcast(e.shuffle(x, None, [4 * i + k for i in range(16)]), _vec(I8, 64)) for k in range(4)]
    if kind == "q2_K" and not avx2:
        F = b.fmul(e.shuffle(xd, None, [2 * (j // 4) + j % 2 for j in range(16)]),
                   e.const(F32, 16, [1.0, 1.0, -0.0625, -0.0625] * 4))
    else:
        F = e.shuffle(xd, None, [j // 2 for j in range(16)])
    if kind == "q3_K":
        c = e.splat_const(I8, 64, 4)
        if avx2:
            tot = _maddubs(e, c, Xk[0])
            for k in range(1, 4):
                tot = b.add(tot, _maddubs(e, c, Xk[k]))
            Z = b.bitcast(b.sub(ir.Constant(_vec(I16, 32), None), tot), _vec(I32, 16))
        else:
            tot = z16
            for k in range(4):
                tot = e.dot(tot, c, Xk[k])
            Z = b.sub(z16, tot)
    else:
        Z = z16
        for k in range(4):
            Z = e.dot(Z, e.splat_const(I8, 64, 1), Xk[k])
    return Xk, F, Z


def _prep_codegen(kind: str, isa: str):
    """The x86 tiles' prepared activations: per token and whole super-block, _token_parts stored (GB
    bytes) at bp + t bstride + s GB; once per call, shared by every row tile."""

    def codegen(context, builder, signature, args):
        xp, xstride, xdp, sstride, nb, T, bp, bstride = args
        b = builder
        e = _E(b, isa)
        i64 = e.i64
        with cgutils.for_range(b, T) as tl:
            t = tl.index
            with cgutils.for_range(b, b.udiv(nb, i64(8))) as sl:
                s_ = sl.index
                x = b.bitcast(e.load(xp, b.add(b.mul(t, xstride), b.mul(s_, i64(256))), _vec(I8, 256)), _vec(I32, 64))
                xd = e.load(xdp, b.add(b.mul(t, sstride), b.mul(s_, i64(32))), _vec(F32, 8))
                Xk, F, Z = _token_parts(e, kind, x, xd)
                bo = b.add(b.mul(t, bstride), b.mul(s_, i64(GB)))
                for i, v in enumerate(Xk + [F, Z]):
                    b.store(v, e.addr(bp, b.add(bo, i64(64 * i))), align=1)
        return context.get_dummy_value()

    return codegen


class DBuf:
    """A tile's rows' super-block scales (fp16, one per 256 columns: d, and dmin) as floats on the
    stack, DCHUNK super-blocks at a time: the x86 main loops broadcast one float from it instead of
    loading, shuffling and converting an fp16 value per row and super-block (one vcvtph2ps per row,
    array and chunk instead)."""

    def __init__(self, e: _E, A: dict, rows: list, names: tuple):
        self.e, self.A, self.rows, self.names = e, A, rows, names
        self.mem = cgutils.alloca_once(e.b, ir.ArrayType(_vec(F32, DCHUNK), len(rows) * len(names)))

    def loop(self, nsb, body) -> None:
        """body(b0, bi) for each of the nsb super-blocks (b0: its first sub-block, bi: its index in
        the chunk whose scales the buffer holds)."""
        e, b = self.e, self.e.b
        i64 = e.i64
        with cgutils.for_range(b, b.udiv(b.add(nsb, i64(DCHUNK - 1)), i64(DCHUNK))) as cl:
            s0 = b.mul(cl.index, i64(DCHUNK))
            cnt = b.sub(nsb, s0)
            cnt = b.select(b.icmp_unsigned("<", cnt, i64(DCHUNK)), cnt, i64(DCHUNK))
            m = e.lanes_below(DCHUNK, b.trunc(cnt, I32))
            for r, row in enumerate(self.rows):
                for j, name in enumerate(self.names):
                    base, st = self.A[name]
                    h = e.load(base, b.add(b.mul(row, st), b.mul(s0, i64(2))), _vec(I16, DCHUNK), m)
                    b.store(b.fpext(b.bitcast(h, _vec(F16, DCHUNK)), _vec(F32, DCHUNK)),
                            b.bitcast(b.gep(self.mem, [I32(0), I32(r * len(self.names) + j)]),
                                      _vec(F32, DCHUNK).as_pointer()))
            with cgutils.for_range(b, cnt) as loop:
                body(b.mul(b.add(s0, loop.index), i64(8)), loop.index)

    def get(self, r: int, name: str, bi):
        """<16 x float>: array ``name`` of row r's super-block bi of the chunk, broadcast."""
        e, b = self.e, self.e.b
        k = r * len(self.names) + self.names.index(name)
        p = b.gep(b.bitcast(self.mem, F32.as_pointer()), [b.add(e.i64(k * DCHUNK), bi)])
        return e.splat(b.load(p), 16)


def _tile_codegen(kind: str, isa: str, R: int, U: int, f64: bool = False):
    FT, esz = (F64, 8) if f64 else (F32, 4)
    q2 = kind == "q2_K"

    def codegen(context, builder, signature, args):
        b = builder
        e = _E(b, isa)
        i64 = e.i64
        slots = args[:2 * kquant.NSLOT]
        if isa == "portable":
            dshift, xp, xstride, xdp, xsp, sstride, op, ostride, nb, n0, t0 = args[2 * kquant.NSLOT:]
        else:  # x86: the prepared activations (bp, bstride) too
            dshift, xp, xstride, xdp, xsp, sstride, op, ostride, nb, bp, bstride, n0, t0 = args[2 * kquant.NSLOT:]
            bp = b.add(bp, b.mul(t0, bstride))
        A = {}
        for i, name in enumerate(ARR[kind]):
            p, s = slots[2 * i], slots[2 * i + 1]
            A[name] = (b.add(p, b.mul(n0, s)), s)
        xp = b.add(xp, b.mul(t0, xstride))
        xdp = b.add(xdp, b.mul(t0, sstride))
        xsp = b.add(xsp, b.mul(t0, sstride))
        op = b.add(b.add(op, b.mul(t0, ostride)), b.mul(n0, i64(esz)))
        rows = [i64(r) for r in range(R)]
        zero = ir.Constant(FT, 0.0) if isa == "portable" else ir.Constant(_vec(F32, 16), None)
        acc = [[cgutils.alloca_once_value(b, zero) for _ in range(U)] for _ in range(R)]
        D = (lambda v: b.fpext(v, FT)) if f64 else (lambda v: v)  # noqa: E731
        # x86: each row's d (and dmin) as floats, DCHUNK super-blocks at a time (DBuf)
        dbuf = DBuf(e, A, rows, ("d", "dmin") if q2 else ("d",)) if isa != "portable" else None
        row = lambda r, name: b.mul(r, A[name][1])  # noqa: E731

        # d / dmin: one fp16 value per 256 columns (dshift 3) or per 32 (0); chosen once per tile by a
        # masked load and a select (no branch in the loop), as kquant does
        sup = b.icmp_unsigned("==", dshift, i64(3))
        dmask = {n: e.lanes_below(n, b.select(sup, I32(1), I32(n))) for n in (8, 4, 2, 1)}

        def dvec(name, r, b0, n):
            """<n x float> d (or dmin) of row r's sub-blocks [b0, b0 + n)."""
            base, st = A[name]
            h = e.load(base, b.add(row(r, name), b.mul(b.lshr(b0, dshift), i64(2))), _vec(I16, n), dmask[n])
            v = b.fpext(b.bitcast(h, _vec(F16, n)), _vec(F32, n))
            return b.select(sup, e.shuffle(v, None, [0] * n), v)

        def scales_vec(r, b0, n):
            """(D, M) <2n x float> per 16 weights of row r's sub-blocks [b0, b0 + n) (index 2s + half):
            D = d * sc, M = -(dmin * mn) (q2_K; None for q3_K)."""
            two = [i // 2 for i in range(2 * n)]
            s8 = e.load(A["sc"][0], b.add(row(r, "sc"), b.mul(b0, i64(2))), _vec(I8, 2 * n))
            d = e.shuffle(dvec("d", r, b0, n), None, two)
            if not q2:
                return b.fmul(d, b.sitofp(s8, _vec(F32, 2 * n))), None
            sc = b.uitofp(b.and_(s8, e.splat_const(I8, 2 * n, 15)), _vec(F32, 2 * n))
            mn = b.uitofp(b.lshr(s8, e.splat_const(I8, 2 * n, 4)), _vec(F32, 2 * n))
            dm = e.shuffle(dvec("dmin", r, b0, n), None, two)
            return b.fmul(d, sc), b.fmul(b.fmul(dm, mn), e.splat(ir.Constant(F32, -1.0), 2 * n))

        def scalar_scales(r, blk):
            """Portable: ([D0, D1], [M0, M1] or None) of sub-block blk of row r."""
            s = b.lshr(blk, dshift)
            d = e.half(A["d"][0], b.add(row(r, "d"), b.mul(s, i64(2))))
            so = b.add(row(r, "sc"), b.mul(blk, i64(2)))
            raw = [e.load(A["sc"][0], b.add(so, i64(g)), I8) for g in range(2)]
            if not q2:
                return [b.fmul(d, b.sitofp(v, F32)) for v in raw], None
            dm = e.half(A["dmin"][0], b.add(row(r, "dmin"), b.mul(s, i64(2))))
            Ds = [b.fmul(d, b.uitofp(b.and_(v, ir.Constant(I8, 15)), F32)) for v in raw]
            Ms = [b.fmul(b.fmul(dm, b.uitofp(b.lshr(v, ir.Constant(I8, 4)), F32)), ir.Constant(F32, -1.0))
                  for v in raw]
            return Ds, Ms

        def group_portable(blk):
            xv, xdv, sums = [], [], []
            ones = e.splat_const(I8, 16, 1)
            for u in range(U):
                xo = b.add(b.mul(i64(u), xstride), b.mul(blk, i64(32)))
                x = (e.load(xp, xo, _vec(I8, 16)), e.load(xp, b.add(xo, i64(16)), _vec(I8, 16)))
                xv.append(x)
                xdv.append(e.load(xdp, b.add(b.mul(i64(u), sstride), b.mul(blk, i64(4))), F32))
                sums.append([e.sdot([(ones, h)]) for h in x] if q2 else None)  # sum of each half's activations
            for r in range(R):
                q = _codes_portable(e, kind, A, rows[r], blk)
                qh = (e.shuffle(q, None, range(16)), e.shuffle(q, None, range(16, 32)))
                Ds, Ms = scalar_scales(rows[r], blk)
                for u in range(U):
                    t = None
                    for g in range(2):
                        s = e.sdot([(qh[g], xv[u][g])])
                        if q2:  # sum q x = sum (q - 2) x + 2 sum x, exact in i32
                            s = b.add(s, b.mul(sums[u][g], ir.Constant(I32, CENTRE[kind])))
                        tg = b.fmul(D(Ds[g]), b.sitofp(s, FT))
                        t = tg if t is None else b.fadd(t, tg)
                    if q2:
                        for g in range(2):
                            t = b.fadd(t, b.fmul(D(Ms[g]), b.sitofp(sums[u][g], FT)))
                    b.store(b.fadd(b.load(acc[r][u]), b.fmul(t, D(xdv[u]))), acc[r][u])

        def prefetch(b0):
            """Decode: each row's streams (the codes and the scale bytes) pf_off bytes ahead (kquant's
            scheme: the same place kR rows on, in a row tile this thread runs later; pf_off >= PF)."""
            for r in range(R):
                for name, bpb in PF_STREAMS[kind]:
                    base, st = A[name]
                    off = b.add(b.add(b.mul(rows[r], st), b.mul(b0, i64(bpb))), pf_off[name])
                    for line in range(0, 8 * bpb, 64):
                        e.prefetch(base, b.add(off, i64(line)))

        avx2 = isa == "avx2"

        def group8(b0, per256, bi=None):
            """Sub-blocks [b0, b0 + 8) (the main loop): by bit fields. Field k (bits 2k) of the 64 qs bytes
            holds, in byte 8s + 4h + m, weight 16h + 4k + m of sub-block s; the activations are
            regrouped to match once per token (X_k: dword i = activation dword 4i + k), so each field
            costs a shift and a mask and one dot, and the 4 dots accumulate in 16 i32 lanes (lane j:
            the 16-weight group j of the super-block, sub-block j // 2, half j % 2), |lane| < 2^15
            (q2_K 16 x 3 x 127, q3_K 16 x 4 x 127 from its -4 x sum start). AVX2 sums the fields'
            vpmaddubsw pairs in i16 words (each word 8 products, |word| <= 8 x 7 x 127) instead
            of widening each. The integer scales then multiply the lanes (vpmaddwd with each
            group's scale as a word: VNNI <sc, 0> against the lane's <low word, sign word>, AVX2
            <sc, sc> against the two words of the lane): S_j = sc_j x dot_j, exact (< 2^24); q2_K
            likewise M_j = mn_j x (sum of group j's activations). Then per row and token one
            conversion and two float operations: (d S - dmin M) xd. per256: d (dmin) one fp16
            value per super-block (dshift 3), else per sub-block (the _32 variants)."""
            X, XDL, INI, XS, XP = [], [], [], [], []
            z16 = ir.Constant(_vec(I32, 16), None)
            pack = q2 and not avx2
            for u in range(U):  # the prepared operands of token u (_token_parts)
                bo = b.add(b.mul(i64(u), bstride), b.mul(b.lshr(b0, i64(3)), i64(GB)))
                X.append([e.load(bp, b.add(bo, i64(64 * k)), _vec(I8, 64)) for k in range(4)])
                F = e.load(bp, b.add(bo, i64(256)), _vec(F32, 16))
                Z = e.load(bp, b.add(bo, i64(320)), _vec(I32, 16))
                (XP if pack else XDL).append(F)
                if kind == "q3_K":
                    INI.append(b.bitcast(Z, _vec(I16, 32)) if avx2 else Z)
                else:
                    XS.append(Z if pack else b.bitcast(Z, _vec(I16, 32)))
            if U == 1:
                prefetch(b0)
            for r in range(R):
                s8 = e.load(A["sc"][0], b.add(row(rows[r], "sc"), b.mul(b0, i64(2))), _vec(I8, 16))
                if pack:  # per 128-bit lane L: the words sc of groups 4L .. 4L + 3, then 16 mn of them
                    # widened first (vpmovzxbw from memory), then one word permute (vpermw): LLVM otherwise
                    # shuffled the bytes first (vpermq + vpshufd)
                    sw = e.shuffle(e.opaque(b.zext(s8, _vec(I16, 16))), None, [4 * (w // 8) + w % 4 for w in range(32)])
                    scw = b.and_(sw, e.const(I16, 32, [15] * 4 + [240] * 4 + [15] * 4 + [240] * 4
                                             + [15] * 4 + [240] * 4 + [15] * 4 + [240] * 4))
                elif q2:
                    sc16 = b.zext(b.and_(s8, e.splat_const(I8, 16, 15)), _vec(I16, 16))
                    mnw = b.bitcast(b.zext(b.lshr(s8, e.splat_const(I8, 16, 4)), _vec(I32, 16)), _vec(I16, 32))
                else:
                    sc16 = b.sext(s8, _vec(I16, 16))
                if pack:
                    pass
                elif avx2:
                    scw = e.shuffle(sc16, None, [m // 2 for m in range(32)])
                else:
                    scw = b.bitcast(b.zext(sc16, _vec(I32, 16)), _vec(I16, 32))
                if pack:  # per 128-bit lane L: d, d, dmin, dmin of sub-blocks 2L, 2L + 1
                    if per256:  # d and dmin as floats from the tile's buffer (dbuf): two broadcasts, a blend
                        DM = b.select(e.const(I1, 16, [1, 1, 0, 0] * 4), e.opaque(dbuf.get(r, "d", bi)),
                                      e.opaque(dbuf.get(r, "dmin", bi)))
                    else:
                        DM = e.shuffle(dvec("d", rows[r], b0, 8), dvec("dmin", rows[r], b0, 8),
                                       [2 * (j // 4) + j % 2 + (8 if j % 4 > 1 else 0) for j in range(16)])
                elif per256:  # the float from the tile's buffer, broadcast (one load)
                    dv = dbuf.get(r, "d", bi)
                    if q2:
                        mv = dbuf.get(r, "dmin", bi)
                else:
                    dv = e.shuffle(dvec("d", rows[r], b0, 8), None, [j // 2 for j in range(16)])
                    if q2:
                        mv = e.shuffle(dvec("dmin", rows[r], b0, 8), None, [j // 2 for j in range(16)])
                if kind == "q3_K":  # the 4 fields' 64 codes each (_q3_fields), the order of X_k
                    codes = _q3_fields(e, A, rows[r], b0, 8)
                else:
                    w = _qdwords(e, A, rows[r], b0, 8)  # <16 x i32>
                    codes = []
                    for k in range(4):
                        if k == 3:  # the top field: a byte shift, no mask (one vgf2p8affineqb where LLVM has GFNI)
                            c = b.lshr(b.bitcast(w, _vec(I8, 64)), e.splat_const(I8, 64, 6))
                        else:
                            c = b.and_(b.lshr(w, e.splat_const(I32, 16, 2 * k)) if k else w,
                                       e.splat_const(I32, 16, 0x03030303))
                            c = b.bitcast(c, _vec(I8, 64))
                        codes.append(c)
                for u in range(U):
                    if avx2:
                        P = INI[u] if kind == "q3_K" else None
                        for k in range(4):
                            p_ = _maddubs(e, codes[k], X[u][k])
                            P = p_ if P is None else b.add(P, p_)
                        S = e.pmaddwd(P, scw)
                    else:
                        acc_i = INI[u] if kind == "q3_K" else z16
                        for k in range(4):
                            acc_i = e.dot(acc_i, codes[k], X[u][k])
                        if pack:  # lanes 4L + i: S of sub-block 2L + i, then 16 M of them; |.| < 2^20
                            SM = e.pmaddwd(e.packssdw(acc_i, XS[u]), scw)
                            t = b.fmul(b.sitofp(SM, _vec(F32, 16)), XP[u])
                            b.store(e.fma(t, DM, b.load(acc[r][u])), acc[r][u])
                            continue
                        S = e.pmaddwd(b.bitcast(acc_i, _vec(I16, 32)), scw)
                    t = b.fmul(b.sitofp(S, _vec(F32, 16)), dv)
                    if q2:
                        M = e.pmaddwd(mnw, XS[u])
                        t = e.fma(b.fneg(b.sitofp(M, _vec(F32, 16))), mv, t)
                    b.store(e.fma(t, XDL[u], b.load(acc[r][u])), acc[r][u])

        def group_x86(b0, n):
            """Sub-blocks [b0, b0 + n), n = 8 (the main loop), 4, 2 or 1 (the ``_32`` variants' tails):
            parts of 4 (or n < 4) sub-blocks, each half of each part one dot into 4 ns lanes (lane l:
            sub-block l // 4) for ns > 1; one sub-block in element order (8 lanes: lanes 0-3 half 0)."""
            subs = [(4 * j, 4) for j in range(n // 4)] if n >= 4 else [(0, n)]
            xv, xdl, init, xsum = [], [], [], []
            for u in range(U):
                xrow = b.add(b.mul(i64(u), xstride), b.mul(b0, i64(32)))
                xd = e.load(xdp, b.add(b.mul(i64(u), sstride), b.mul(b0, i64(4))), _vec(F32, n))
                xs_, xl_, ini, xsm = [], [], [], []
                for j0, ns in subs:
                    L = 4 * ns if ns > 1 else 8
                    x = e.load(xp, b.add(xrow, i64(32 * j0)), _vec(I8, 32 * ns))
                    if ns > 1:
                        ops = (e.shuffle(x, None, [32 * s + i for s in range(ns) for i in range(16)]),
                               e.shuffle(x, None, [32 * s + 16 + i for s in range(ns) for i in range(16)]))
                        xl_.append(e.shuffle(xd, None, [j0 + i // 4 for i in range(L)]))
                    else:
                        ops = (x,)
                        xl_.append(e.splat(b.extract_element(xd, I32(j0)), L))
                    xs_.append(ops)
                    z = ir.Constant(_vec(I32, L), None)
                    # the sums of each lane's 4 activations (u8 1 x s8 x, or u8 4 x s8 x: no saturation)
                    if kind == "q3_K":  # -4 x those sums: the codes' offset, the dots' start
                        ini.append(tuple(b.sub(z, e.dot(z, e.splat_const(I8, o.type.count, 4), o)) for o in ops))
                    else:
                        ini.append(None)
                        xsm.append(tuple(b.sitofp(e.dot(z, e.splat_const(I8, o.type.count, 1), o), _vec(F32, L))
                                         for o in ops))
                xv.append(xs_)
                xdl.append(xl_)
                init.append(ini)
                xsum.append(xsm)
            pad16 = lambda v, L: v if L == 16 else e.shuffle(  # noqa: E731
                v, ir.Constant(v.type, None), list(range(L)) + [L] * (16 - L))
            for r in range(R):
                Dv, Mv = scales_vec(rows[r], b0, n)
                qs_ = [_codes_x86(e, kind, A, rows[r], b.add(b0, i64(j0)), ns) for j0, ns in subs]

                def lanes(v, j0, ns):  # a per-16 vector -> per lane: (half 0, half 1), or one for ns = 1
                    if ns > 1:
                        return tuple(e.shuffle(v, None, [2 * (j0 + i // 4) + h for i in range(4 * ns)]) for h in (0, 1))
                    return (e.shuffle(v, None, [2 * j0 + i // 4 for i in range(8)]),)

                Dl = [lanes(Dv, j0, ns) for j0, ns in subs]
                Ml = [lanes(Mv, j0, ns) for j0, ns in subs] if q2 else None
                for u in range(U):
                    a = b.load(acc[r][u])
                    for p_, ((j0, ns), q) in enumerate(zip(subs, qs_)):
                        L = 4 * ns if ns > 1 else 8
                        z = ir.Constant(_vec(I32, L), None)
                        ini = init[u][p_]
                        t = None
                        for h in range(len(q)):
                            ci = b.sitofp(e.dot(ini[h] if ini else z, q[h], xv[u][p_][h]), _vec(F32, L))
                            t = b.fmul(ci, Dl[p_][h]) if t is None else e.fma(ci, Dl[p_][h], t)
                        if q2:
                            for h in range(len(q)):
                                t = e.fma(Ml[p_][h], xsum[u][p_][h], t)
                        a = e.fma(pad16(t, L), pad16(xdl[u][p_], L), a)
                    b.store(a, acc[r][u])

        pf_off = e.pf_offsets(A, PF_STREAMS[kind], R, PF) if isa != "portable" and U == 1 else {}
        if isa == "portable":
            with cgutils.for_range(b, nb) as loop:
                group_portable(loop.index)
        else:
            with b.if_else(sup) as (per256, per32):  # d per super-block or per sub-block: two loops
                with per256:  # d (and dmin) per super-block, as floats from the stack (DBuf)
                    dbuf.loop(b.udiv(nb, i64(8)), lambda b0, bi: group8(b0, True, bi))
                with per32:
                    with cgutils.for_range(b, b.udiv(nb, i64(8))) as loop:
                        group8(b.mul(loop.index, i64(8)), False)
            rest = b.urem(nb, i64(8))  # the _32 variants: tails of 4, 2 and 1 sub-blocks, each at most once
            for n in (4, 2, 1):
                with b.if_then(b.icmp_unsigned("!=", b.and_(rest, i64(n)), i64(0)), likely=False):
                    group_x86(b.sub(nb, b.and_(rest, i64(2 * n - 1))), n)
        for r in range(R):
            for u in range(U):
                a = b.load(acc[r][u])
                if isa != "portable":
                    a = e.hsum(a)
                b.store(a, e.addr(op, b.add(b.mul(i64(u), ostride), i64(esz * r))))
        return context.get_dummy_value()

    return codegen


def _make_tile(kind, isa, R, U, f64=False):
    return int_intrinsic(f"lk_{isa}_{kind}_tile_{R}x{U}{'_f64' if f64 else ''}",
                         "a0, s0, a1, s1, a2, s2, a3, s3, a4, s4, a5, s5, dshift, xp, xstride, xdp, xsp, sstride, op, "
                         "ostride, nb, " + ("" if isa == "portable" else "bp, bstride, ") + "n0, t0",
                         _tile_codegen(kind, isa, R, U, f64))


def _make_prep(kind, isa):
    return int_intrinsic(f"lk_{isa}_{kind}_prep", "xp, xstride, xdp, sstride, nb, T, bp, bstride",
                         _prep_codegen(kind, isa))


# super-blocks whose d (and dmin) DBuf holds as floats at a time. Measured (one thread, 3 alternated
# rounds, load 0.8-1.0): in cache (512 x 2048) q2_K and q3_K about 5% faster than the fp16 broadcast,
# blend and conversion per row and super-block it replaces; from DRAM (scripts/decode_interleave.py,
# alternated with the old tree) q2_K / q4_0 0.755 -> 0.815 and q3_K / q4_0 0.965 -> 1.07 on a quiet
# sitting (medians of 8), within the noise on a busier one (0.75 -> 0.72, 0.99 -> 1.05). The same buffer in kquant's q4_K/q5_K/q6_K
# tiles was 4-6% faster in cache but the 1B Q4_K_M shape generated ~6% slower end to end in 7 of 8
# alternated pairs, so kquant keeps its masked loads.
DCHUNK = 16
PF = 4096  # decode prefetch distance in bytes of each stream
# the streams decode prefetches, with their bytes per 32-weight sub-block. The scale bytes too: without
# them the 1b-down shape (2048 x 8192) ran q2_K at 15 GB/s (cpu time) against 19 with them, loaded
# machine, alternated; prefetching d and dmin as well (a line a super-block) measured slower (16 / 18).
PF_STREAMS = {"q2_K": (("qs", 8), ("sc", 2)), "q3_K": (("qs", 8), ("qh", 4), ("sc", 2))}
R_X, U_X, R1_X, R_P, U_P = 4, 2, 4, 4, 2
SHAPES = {"vnni": dict(RU=(R_X, U_X), R1=(R_X, 1), OU=(1, U_X), O1=(1, 1), D=(R1_X, 1)),
          "avx2": dict(RU=(R_X, U_X), R1=(R_X, 1), OU=(1, U_X), O1=(1, 1), D=(R1_X, 1)),
          "portable": dict(RU=(R_P, U_P), R1=(R_P, 1), OU=(1, U_P), O1=(1, 1), D=(R_P, 1)),
          "f64": dict(RU=(R_P, 1), R1=(R_P, 1), OU=(1, 1), O1=(1, 1), D=(R_P, 1))}


def tile(path: str, kind: str, shape: str):
    R, U = SHAPES[path][shape]
    return _make_tile(kind, "portable" if path == "f64" else path, R, U, path == "f64")


# shape checks of the entry points: kquant's, with 8 bytes of qs per 32-block
@njit(**_JIT)
def q2_K(qs, sc, d, dmin, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out, 8)
    _chk(sc, N, nb * 2)
    ds = _dshift(d, N, nb)
    _chk(dmin, N, d.shape[1])
    return _args(qs.ctypes.data, qs.strides[0], sc.ctypes.data, sc.strides[0], d.ctypes.data, d.strides[0],
                 dmin.ctypes.data, dmin.strides[0], 0, 0, 0, 0, ds, xq, xd, xsum, out, nb), N, T


@njit(**_JIT)
def q3_K(qs, qh, sc, d, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out, 8)
    _chk(qh, N, nb * 4)
    _chk(sc, N, nb * 2)
    ds = _dshift(d, N, nb)
    return _args(qs.ctypes.data, qs.strides[0], qh.ctypes.data, qh.strides[0], sc.ctypes.data, sc.strides[0],
                 d.ctypes.data, d.strides[0], 0, 0, 0, 0, ds, xq, xd, xsum, out, nb), N, T


# x86: the activations prepared once per call (_prep_codegen) into ``buf``, which the entry point
# allocates and holds for the call (as iquant's); ``args``: the tile arguments of kquant's checks
_RUN_X86 = """

@njit(cache=True, fastmath=False, nogil=True, parallel=True)
def run_{P}_{K}(args, N, T, buf):
    RD, R, U = {RD}, {R}, {U}
    nb = args[20]
    bstride = nb // 8 * {GB}
    {P}_{K}_prep(args[13], args[14], args[15], args[17], nb, T, buf.ctypes.data, bstride)
    a = args + (np.int64(buf.ctypes.data), np.int64(bstride))
""" + kquant.T1_ROWS + "{loop}"


def _runners_source() -> str:
    src = runners.HEADER.format(by=__name__) + "import numpy as np\n"
    for P, sh in SHAPES.items():
        for K in KINDS:
            if P in ("vnni", "avx2"):
                src += _RUN_X86.format(P=P, K=K, RD=sh["D"][0], R=sh["RU"][0], U=sh["RU"][1], GB=GB,
                                       loop=runners.row_tiles(4, *(f"{P}_{K}_{s}" for s in ("RU", "R1", "OU", "O1"))))
                src += kquant.ENTRY_BUF.format(flags=runners.flags(_JIT), name=kquant.entry_name(P, K),
                                               arrays=", ".join(ARR[K]), P=P, K=K,
                                               size=f"max(1, T * (xd.shape[1] // 8) * {GB})")
                continue
            src += kquant._RUN.format(P=P, K=K, RD=sh["D"][0], R=sh["RU"][0], U=sh["RU"][1],
                                      loop=runners.row_tiles(4, *(f"{P}_{K}_{s}" for s in ("RU", "R1", "OU", "O1"))))
            src += kquant._ENTRY.format(flags=runners.flags(_JIT), name=kquant.entry_name(P, K),
                                        arrays=", ".join(ARR[K]), P=P, K=K)
    return src


def _runner_names() -> dict:
    names = {f"check_{K}": globals()[K] for K in KINDS}
    names.update({f"{P}_{K}_{sh}": tile(P, K, sh) for P in SHAPES for K in KINDS for sh in SHAPES[P]})
    names.update({f"{P}_{K}_prep": _make_prep(K, P) for P in ("vnni", "avx2") for K in KINDS})
    return names


_R = jitcache.load_generated("lowk", "lowk_run", _runners_source(), _runner_names())
for _P in SHAPES:  # vnni_matmul_q2_K_q8_0, ..., portable_matmul_q3_K_q8_0, matmul_q2_K_q8_0_f64, ...
    for _K in KINDS:
        globals()[kquant.entry_name(_P, _K)] = getattr(_R, kquant.entry_name(_P, _K))
