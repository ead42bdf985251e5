"""Matmul kernels for the 2-bit K-quants Q2_K and Q3_K, in every path (vnni, avx2, portable, f64).

Layouts: ``mpillm.formats.quant`` ("Q2_K and Q3_K"): per 32-weight sub-block 8 bytes of 2-bit codes,
byte 4h + m holding weight 16h + 4k + m at bits 2k (h the half, k, m = 0..3); per 16 weights one
scale byte (q2_K: GGML's scale | min << 4; q3_K: the signed 6-bit scale); q3_K's high bits as a
32-bit mask per sub-block; d (and dmin) per 256 weights, or per 32 for the ``_32`` variants (the
super-block index is b >> dshift, as in ``kquant``). Activations are q8_0 (xq, xd, xsum), as for
every quantized kernel. Per sub-block b of a row and a token, with halves g = 0, 1 of 16 weights:

    q2_K   out += xd_b * sum_g ( d sc_g * sum_g q x  -  dmin mn_g * sum_g x )
    q3_K   out += xd_b * sum_g   d sc_g * sum_g (c - 4) x            c = q | high << 2, 0..7

Decoding (x86): the 8 bytes of 4 sub-blocks are 8 dwords; one ``shufflevector`` broadcasts dword h
of each sub-block to 4 lanes (vpermd), ``lshr`` by <0, 2, 4, 6> per lane (vpsrlvd) and ``and 3``
give the 16 codes of half h of each of the 4 sub-blocks in element order (q3_K: the high bits
or'ed in as 4 from the mask, as kquant does for q5/q6). They dot (vpdpbusd, or vpmaddubsw +
vpmaddwd on AVX2) with the activations' first or last 16 bytes of each sub-block -- the same
per-token operands and the same 16-lane i32 layout (lane l: sub-block l // 4) as kquant's q6_K,
whose per-16 scales these types share: one conversion and one FMA per half and 4 sub-blocks. q3_K
starts each dot at -4 x (the lane's 4 activations summed), computed once per token; q2_K's min
term uses the same per-lane activation sums (times -dmin mn of the lane's half), also once per
token and shared by the tile's rows. AVX2's vpmaddubsw adds two u8 x s8 products into a
saturating i16: codes are at most 7 (q3_K; 3 for q2_K) and the multipliers of the sums at most 4,
so a pair is at most 2 x 7 x 128 = 1792, far from 32767 -- it cannot saturate.

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
from mpillm.kernels.irgen import F16, F32, F64, I1, I8, I16, I32, I64, int_intrinsic
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


def _high(e: _E, A: dict, r, b0, ns: int, halves):
    """q3_K's high bits of sub-blocks [b0, b0 + ns) of row r as bytes 4 / 0: per entry of ``halves``
    (0: weights 0..15 of each sub-block, 1: 16..31, None: all 32) a <16 ns> (or <32 ns>) x i8."""
    b = e.b
    hb, hs = A["qh"]
    m = e.load(hb, b.add(b.mul(r, hs), b.mul(b0, e.i64(4))), _vec(I32, ns))
    out = []
    for h in halves:
        if h is None:
            bits, n = b.bitcast(m, _vec(I1, 32 * ns)), 32 * ns
        else:
            t = b.trunc(b.lshr(m, e.splat(I32(16 * h), ns)) if h else m, _vec(I16, ns))
            bits, n = b.bitcast(t, _vec(I1, 16 * ns)), 16 * ns
        out.append(b.select(bits, e.splat_const(I8, n, 4), ir.Constant(_vec(I8, n), None)))
    return out


def _codes_x86(e: _E, kind: str, A: dict, r, b0, ns: int):
    """x86: unsigned codes of sub-blocks [b0, b0 + ns): (lo, hi) <16 ns x i8> (elements 0..15 / 16..31
    of each sub-block in order) for ns > 1; for ns = 1 one <32 x i8> in element order."""
    dw = _qdwords(e, A, r, b0, ns)
    if ns == 1:
        q = _expand(e, dw, [0, 1])
        if kind == "q3_K":
            q = e.b.or_(q, _high(e, A, r, b0, 1, [None])[0])
        return (q,)
    lo = _expand(e, dw, [2 * s for s in range(ns)])
    hi = _expand(e, dw, [2 * s + 1 for s in range(ns)])
    if kind == "q3_K":
        h0, h1 = _high(e, A, r, b0, ns, [0, 1])
        lo, hi = e.b.or_(lo, h0), e.b.or_(hi, h1)
    return lo, hi


def _codes_portable(e: _E, kind: str, A: dict, r, blk):
    """Portable: the signed codes (code - CENTRE) of sub-block blk of row r, <32 x i8> in element order."""
    b = e.b
    base, stride = A["qs"]
    w = e.load(base, b.add(b.mul(r, stride), b.mul(blk, e.i64(8))), _vec(I8, 8))
    q = e.shuffle(w, None, [4 * h + m for h in range(2) for k in range(4) for m in range(4)])
    q = b.and_(b.lshr(q, e.const(I8, 32, [2 * k for h in range(2) for k in range(4) for m in range(4)])),
               e.splat_const(I8, 32, 3))
    if kind == "q3_K":
        hb, hs = A["qh"]
        m = e.load(hb, b.add(b.mul(r, hs), b.mul(blk, e.i64(4))), _vec(I32, 1))
        q = b.or_(q, b.shl(e.bits_to_bytes(m, 1), e.splat_const(I8, 32, 2)))
    return b.sub(q, e.splat_const(I8, 32, CENTRE[kind]))


def _tile_codegen(kind: str, isa: str, R: int, U: int, f64: bool = False):
    FT, esz = (F64, 8) if f64 else (F32, 4)
    q2 = kind == "q2_K"

    def codegen(context, builder, signature, args):
        b = builder
        e = _E(b, isa)
        i64 = e.i64
        slots = args[:2 * kquant.NSLOT]
        dshift, xp, xstride, xdp, xsp, sstride, op, ostride, nb, n0, t0 = args[2 * kquant.NSLOT:]
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
            """Decode: prefetch each row's streams PF bytes ahead (kquant's scheme: the stream of row r
            goes on at row r + R, this thread's next tile)."""
            for r in range(R):
                for name, bpb in PF_STREAMS[kind]:
                    base, st = A[name]
                    k0, rem0, rb = pf_split[name]
                    p = b.add(rem0, b.mul(b0, i64(bpb)))
                    over = b.icmp_unsigned(">=", p, rb)
                    k = b.add(k0, b.zext(over, I64))
                    p = b.select(over, b.sub(p, rb), p)
                    off = b.add(b.mul(b.add(rows[r], b.mul(k, i64(R))), st), p)
                    for line in range(0, 8 * bpb, 64):
                        e.prefetch(base, b.add(off, i64(line)))

        def group8(b0):
            """Sub-blocks [b0, b0 + 8) (the main loop): by bit fields. Field k (bits 2k) of the 64 qs bytes
            holds, in byte 8s + 4h + m, weight 16h + 4k + m of sub-block s; the activations are
            regrouped to match once per token (X_k: dword i = activation dword 4i + k), so each field
            costs a shift and a mask and one dot, and the 4 dots accumulate in one <16 x i32> whose
            lane j is the 16-weight group j of the super-block (sub-block j // 2, half j % 2): one
            conversion and one FMA with the group scales d * sc per 256 weights and row."""
            X, XDL, INI, SX = [], [], [], []
            for u in range(U):
                x = b.bitcast(e.load(xp, b.add(b.mul(i64(u), xstride), b.mul(b0, i64(32))), _vec(I8, 256)),
                              _vec(I32, 64))
                Xk = [b.bitcast(e.shuffle(x, None, [4 * i + k for i in range(16)]), _vec(I8, 64)) for k in range(4)]
                X.append(Xk)
                xd = e.load(xdp, b.add(b.mul(i64(u), sstride), b.mul(b0, i64(4))), _vec(F32, 8))
                XDL.append(e.shuffle(xd, None, [j // 2 for j in range(16)]))
                z = ir.Constant(_vec(I32, 16), None)
                c = e.splat_const(I8, 64, 4 if kind == "q3_K" else 1)
                tot = z
                for k in range(4):  # per group: 4 (q3_K) or 1 (q2_K) x the sum of its activations
                    tot = e.dot(tot, c, Xk[k])
                if kind == "q3_K":
                    INI.append(b.sub(z, tot))
                else:
                    SX.append(b.sitofp(tot, _vec(F32, 16)))
            if U == 1:
                prefetch(b0)
            for r in range(R):
                Dv, Mv = scales_vec(rows[r], b0, 8)  # <16 x float> per group
                w = _qdwords(e, A, rows[r], b0, 8)  # <16 x i32>
                if kind == "q3_K":
                    hb, hs = A["qh"]
                    mb = e.load(hb, b.add(b.mul(rows[r], hs), b.mul(b0, i64(4))), _vec(I8, 32))
                    # byte 8s + 4h + m of field k: bit 16h + 4k + m of sub-block s's mask, i.e. bit
                    # 4 (k % 2) + m of its byte 2h + k // 2
                    hbytes = [e.shuffle(mb, None, [4 * s + 2 * h + kk for s in range(8) for h in range(2)
                                                   for m in range(4)]) for kk in range(2)]
                for u in range(U):
                    acc_i = INI[u] if kind == "q3_K" else ir.Constant(_vec(I32, 16), None)
                    for k in range(4):
                        c = b.and_(b.lshr(w, e.splat_const(I32, 16, 2 * k)) if k else w,
                                   e.splat_const(I32, 16, 0x03030303))
                        c = b.bitcast(c, _vec(I8, 64))
                        if kind == "q3_K":
                            bit = e.const(I8, 64, [1 << (4 * (k % 2) + m) for s in range(8) for h in range(2)
                                                   for m in range(4)])
                            on = b.icmp_unsigned("!=", b.and_(hbytes[k // 2], bit), ir.Constant(_vec(I8, 64), None))
                            c = b.or_(c, b.select(on, e.splat_const(I8, 64, 4), ir.Constant(_vec(I8, 64), None)))
                        acc_i = e.dot(acc_i, c, X[u][k])
                    t = b.fmul(b.sitofp(acc_i, _vec(F32, 16)), Dv)
                    if kind == "q2_K":
                        t = e.fma(Mv, SX[u], t)
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

        pf_split = {}  # decode prefetch: per stream (PF // row bytes, PF % row bytes, row bytes)
        if isa != "portable" and U == 1:
            for name, bpb in PF_STREAMS[kind]:
                rb = b.mul(nb, i64(bpb))
                rb = b.select(b.icmp_unsigned("==", rb, i64(0)), i64(1), rb)
                k0 = b.udiv(i64(PF), rb)
                pf_split[name] = (k0, b.sub(i64(PF), b.mul(k0, rb)), rb)
        if isa == "portable":
            with cgutils.for_range(b, nb) as loop:
                group_portable(loop.index)
        else:
            with cgutils.for_range(b, b.udiv(nb, i64(8))) as loop:
                group8(b.mul(loop.index, i64(8)))
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
                         "ostride, nb, n0, t0", _tile_codegen(kind, isa, R, U, f64))


PF = 4096  # decode prefetch distance in bytes of each stream
PF_STREAMS = {"q2_K": (("qs", 8),), "q3_K": (("qs", 8), ("qh", 4))}  # bytes per 32-weight sub-block
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


def _runners_source() -> str:
    src = runners.HEADER.format(by=__name__)
    for P, sh in SHAPES.items():
        for K in KINDS:
            src += kquant._RUN.format(P=P, K=K, RD=sh["D"][0], R=sh["RU"][0], U=sh["RU"][1],
                                      loop=runners.row_tiles(4, *(f"{P}_{K}_{s}" for s in ("RU", "R1", "OU", "O1"))))
            src += kquant._ENTRY.format(flags=runners.flags(_JIT), name=kquant.entry_name(P, K),
                                        arrays=", ".join(ARR[K]), P=P, K=K)
    return src


def _runner_names() -> dict:
    names = {f"check_{K}": globals()[K] for K in KINDS}
    names.update({f"{P}_{K}_{sh}": tile(P, K, sh) for P in SHAPES for K in KINDS for sh in SHAPES[P]})
    return names


_R = jitcache.load_generated("lowk", "lowk_run", _runners_source(), _runner_names())
for _P in SHAPES:  # vnni_matmul_q2_K_q8_0, ..., portable_matmul_q3_K_q8_0, matmul_q2_K_q8_0_f64, ...
    for _K in KINDS:
        globals()[kquant.entry_name(_P, _K)] = getattr(_R, kquant.entry_name(_P, _K))
