"""Attention over a KV cache in blocks of 16 cached positions, in target-neutral vector IR.

The drivers (runtime.ops.attention_ext, attention_latent) take the rows of a step that share a KV
slot (the decode row of a sequence, speculative verification rows, the rows of a prompt chunk)
and, per KV head, walk the cached positions once, in blocks of ``B`` = 16 aligned to multiples of
16; every query that reads a block -- each of the G query heads sharing that KV head, for each of
those rows -- takes it in while it sits in L1. So a cached key and value is brought in once per
(sequence, KV head) and step, not once per row and per query head.

Each kernel call is one step of an online softmax (flash attention's recurrence) for its queries
over one block, lanes j in [lo, hi) of the block being the queries' own positions (causal limit,
sliding window):

  scores   s_j = dot(q, K_j) * scale; lanes outside [lo, hi) are -inf;
  state    m' = max(m, max_j s_j); w_j = exp(s_j - m') (the vector exp of kernels.vmath; 0
           outside [lo, hi)); l' = l exp(m - m') + sum_j w_j, with (m, l) two floats per query;
  output   o' = o exp(m - m') + sum_{j} w_j V_j, o being the query's output row.

The driver starts (m, l) at (sink, 1) for a sink logit (gpt-oss) or (-inf, 0), o at 0, and ends
with o / l.

``attend_tile`` (standard attention) reads keys from the tiled key cache: per block one tile of
hd rows of 16 positions, so the scores of a block are sum_d q[d] K^T[d], 16 positions in the lanes
of 4 FMA chains (d mod 4), no horizontal sums. It takes 1, 2 or 4 queries with the same range at
once, which share the loads and fp16 widening of every K and V vector. Values stay in rows.

``attend_rows`` (MLA, whose one latent cache is both keys and values, in rows) scores 4 rows at a
time, each a 16-lane FMA chain over hd, the 4 reduced together by the halving tree (lane j bit
for bit what Emit.hsum gives); an fp16 block is widened into scratch once (``kv_rows_f16``).

Every number a query computes depends only on its own q, its own range and the cache, never on
the other rows of the step: the blocks are fixed by absolute position, and a query's operations
run in the same order whatever else shares the block or the call, so a row's output is bit for
bit the same alone or in any batch.

The cache holds float32 or IEEE half (uint16 bits; numba has no float16). hd 64 and 128 have
bodies with everything unrolled; any other hd takes the generic body (a masked last chunk).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mpillm.kernels.irgen import F16, F32, I1, I16, I32, I64, PTR
from mpillm.kernels.vmath import N, _E, _vec

B = N  # positions per block: one vector of scores
P = 4  # positions whose dot products are reduced together
CG = 4  # output chunks kept in registers at once (hd 128: two passes over the block)


def _tree4(e, accs):
    """Four <16 x float> -> <4 x float> of their sums; lane j bit for bit Emit.hsum(accs[j])
    (the same halving tree: lanes i and i + n/2 added, n = 16, 8, 4, 2)."""
    b = e.b
    h = [b.fadd(e.shuffle(a, None, range(8)), e.shuffle(a, None, range(8, 16))) for a in accs]
    x01 = b.fadd(e.shuffle(h[0], h[1], [0, 1, 2, 3, 8, 9, 10, 11]), e.shuffle(h[0], h[1], [4, 5, 6, 7, 12, 13, 14, 15]))
    x23 = b.fadd(e.shuffle(h[2], h[3], [0, 1, 2, 3, 8, 9, 10, 11]), e.shuffle(h[2], h[3], [4, 5, 6, 7, 12, 13, 14, 15]))
    y = b.fadd(e.shuffle(x01, x23, [0, 1, 4, 5, 8, 9, 12, 13]), e.shuffle(x01, x23, [2, 3, 6, 7, 10, 11, 14, 15]))
    return b.fadd(e.shuffle(y, None, [0, 2, 4, 6]), e.shuffle(y, None, [1, 3, 5, 7]))


def _hmax(e, v):
    """The largest lane of a float vector (maxnum: exact, any order)."""
    b, n = e.b, v.type.count
    while n > 1:
        n //= 2
        lo, hi = e.shuffle(v, None, range(n)), e.shuffle(v, None, range(n, 2 * n))
        f = e.decl(f"llvm.maxnum.v{n}f32", _vec(F32, n), [_vec(F32, n)] * 2)
        v = b.call(f, [lo, hi])
    return b.extract_element(v, I32(0))


def _rows_codegen(context, b, sig, args):
    """The row-key body: one query, any hd, positions [0, hi) of a block of rows that are both its
    keys and its values (MLA's latent)."""
    qp, kp, rstride, hi, hd, scale, stp, op = args
    e = _E(b)
    i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero = e.fconst(0.0)
    full = b.udiv(hd, i64(N))
    tail_mask = e.lanes_below(N, b.trunc(b.urem(hd, i64(N)), I32))
    all_on = ir.Constant(_vec(I1), [ir.Constant(I1, 1)] * N)
    nch = b.udiv(b.add(hd, i64(N - 1)), i64(N))

    def chunk_mask(c):
        return b.select(b.icmp_unsigned(">=", c, full), tail_mask, all_on)

    def load(row, c, m):
        return e.loadf(kp, b.add(b.mul(row, rstride), b.mul(c, i64(N * 4))), m)

    # ---- scores: every lane of the block, 4 rows at a time (rows past hi - 1 read row hi - 1, masked)
    hi1 = b.sub(hi, i64(1))
    rows = [b.select(b.icmp_signed(">", i64(j), hi1), hi1, i64(j)) for j in range(B)]
    parts = []
    for g in range(B // P):
        accs = [cgutils.alloca_once(b, _vec(F32)) for _ in range(P)]
        for x in accs:
            b.store(zero, x)
        with cgutils.for_range(b, nch) as cl:
            m = chunk_mask(cl.index)
            qv = e.loadf(qp, b.mul(cl.index, i64(N * 4)), m)
            for j in range(P):
                b.store(e.fma(qv, load(rows[g * P + j], cl.index, m), b.load(accs[j])), accs[j])
        parts.append(_tree4(e, [b.load(x) for x in accs]))
    sc = e.shuffle(e.shuffle(parts[0], parts[1], range(8)), e.shuffle(parts[2], parts[3], range(8)), range(16))

    # ---- the online softmax step
    valid = b.icmp_signed("<", e.const(I32, B, range(B)), e.splat(b.trunc(hi, I32), B))
    s = b.select(valid, b.fmul(sc, e.splat(scale, B)), e.fconst(float("-inf")))
    m_old = b.load(e.addr(stp, None), typ=F32, align=4)
    l_old = b.load(e.addr(stp, i64(4)), typ=F32, align=4)
    m_new = b.call(e.decl("llvm.maxnum.f32", F32, [F32, F32]), [m_old, _hmax(e, s)])
    w = b.select(valid, e.exp(b.fsub(s, e.splat(m_new, B))), zero)
    # exp(m - m'): 1 when the max stays, ~0 from m = -inf (o and l are 0 then); in a vector, as a
    # libm call would spill the vector registers around it
    fv = e.exp(e.splat(b.fsub(m_old, m_new), N))
    b.store(m_new, e.addr(stp, None), align=4)
    b.store(b.fadd(b.fmul(l_old, b.extract_element(fv, I32(0))), e.hsum(w)), e.addr(stp, i64(4)), align=4)

    # ---- output: o = o f + sum_j w_j V_j, the weights broadcast from their lanes
    with cgutils.for_range(b, nch) as cl:
        m = chunk_mask(cl.index)
        off = b.mul(cl.index, i64(N * 4))
        acc = b.fmul(e.loadf(op, off, m), fv)
        for j in range(B):
            acc = e.fma(e.shuffle(w, None, [j] * N), load(rows[j], cl.index, m), acc)
        e.store(acc, op, off, m)
    return context.get_dummy_value()


@intrinsic
def attend_rows(typingctx, qp, kp, rstride, hi, hd, scale, stp, op):
    """attend_rows(q, KV, row_stride, hi, hd, scale, state, out): one online-softmax step of one query
    over positions [0, hi) of a block of float32 rows (row j at KV + j * row_stride) that are both
    keys and values (MLA's latent; 0 < hi <= B); addresses and strides in bytes as int64, q and
    out hd floats, state (m, l) 2 floats. Any hd."""
    ints = (qp, kp, rstride, hi, hd, stp, op)
    if not (all(isinstance(t, types.Integer) for t in ints) and scale == types.float32):
        return None
    i = types.int64
    return types.void(i, i, i, i, i, types.float32, i, i), _rows_codegen


def _emit_tile(HD: int | None, Q: int, f16: bool):
    """The tiled-key body for head size HD (None: any), Q queries sharing the range [lo, hi) of the
    block, and an fp16 (f16) or float32 cache. The block's keys are one tile of hd rows of B
    positions, so a score vector is sum_d q[d] K^T[d] (4 chains over d mod 4, summed
    (c0 + c1) + (c2 + c3)): B scores in lanes, no horizontal sums. Every query's own operations are
    the same whatever Q, so Q only decides which queries share the loads (and widening) of K and V."""
    esz = 2 if f16 else 4

    def codegen(context, b, sig, args):
        (_, kt, vp, vrs, lo, hi, hd, scale, wp), qs, sts, ops = args[:9], args[9:13], args[13:17], args[17:21]
        e = _E(b)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        zero = e.fconst(0.0)

        def widen(base, off, m=None):
            """16 cache values at base + off (bytes), as floats (masked lanes 0)."""
            if not f16:
                return e.loadf(base, off, m) if m is not None else b.load(e.addr(base, off), typ=_vec(F32), align=4)
            h = e.load(base, off, _vec(I16), m, align=2)
            return b.fpext(b.bitcast(h, _vec(F16)), _vec(F32))

        def qd(i, d):  # q_i[d] in every lane
            return e.splat(b.load(e.addr(qs[i], b.mul(d, i64(4)) if not isinstance(d, int) else i64(4 * d)),
                                  typ=F32, align=4), N)

        # ---- scores: a loop over d, 4 at a time, one per chain (any other hd finishes with a tail)
        chs = [[cgutils.alloca_once(b, _vec(F32)) for _ in range(4)] for _ in range(Q)]
        for row in chs:
            for x in row:
                b.store(zero, x)

        def step(d, r):
            k = widen(kt, b.mul(d, i64(B * esz)))
            for i in range(Q):
                b.store(e.fma(qd(i, d), k, b.load(chs[i][r])), chs[i][r])

        quads = i64(HD // 4) if HD else b.udiv(hd, i64(4))
        with cgutils.for_range(b, quads) as dl:
            for r in range(4):
                step(b.add(b.mul(dl.index, i64(4)), i64(r)), r)
        if not HD:
            rem = b.urem(hd, i64(4))
            for r in range(3):
                with b.if_then(b.icmp_unsigned(">", rem, i64(r))):
                    step(b.add(b.mul(quads, i64(4)), i64(r)), r)
        ch = [[b.load(x) for x in row] for row in chs]

        # ---- the online softmax step, per query
        lanes = e.const(I32, B, range(B))
        valid = b.and_(b.icmp_signed(">=", lanes, e.splat(b.trunc(lo, I32), B)),
                       b.icmp_signed("<", lanes, e.splat(b.trunc(hi, I32), B)))
        ninf = e.fconst(float("-inf"))
        fvs = []
        for i in range(Q):
            c = ch[i]
            sc = b.fadd(b.fadd(c[0], c[1]), b.fadd(c[2], c[3]))
            s = b.select(valid, b.fmul(sc, e.splat(scale, B)), ninf)
            m_old = b.load(e.addr(sts[i], None), typ=F32, align=4)
            l_old = b.load(e.addr(sts[i], i64(4)), typ=F32, align=4)
            m_new = b.call(e.decl("llvm.maxnum.f32", F32, [F32, F32]), [m_old, _hmax(e, s)])
            w = b.select(valid, e.exp(b.fsub(s, e.splat(m_new, B))), zero)
            b.store(w, e.addr(wp, i64(4 * B * i)), align=4)
            # exp(m - m'): 1 when the max stays, ~0 from m = -inf (o and l are 0 then); in a vector,
            # as a libm call would spill the vector registers around it
            fv = e.exp(e.splat(b.fsub(m_old, m_new), N))
            b.store(m_new, e.addr(sts[i], None), align=4)
            b.store(b.fadd(b.fmul(l_old, b.extract_element(fv, I32(0))), e.hsum(w)), e.addr(sts[i], i64(4)), align=4)
            fvs.append(fv)

        # ---- output: o = o f + sum_j w_j V_j, the B rows unrolled; rows outside [lo, hi) read a row of
        # the range instead, with weight 0 (so stale cache rows never enter)
        hi1 = b.sub(hi, i64(1))

        def row_of(j):
            r = b.select(b.icmp_signed("<", j, lo), lo, j)
            return b.select(b.icmp_signed(">", r, hi1), hi1, r)

        def coff(c, size):
            return i64(c * N * size) if isinstance(c, int) else b.mul(c, i64(N * size))

        def out_chunks(cs, m=None):
            """The queries' output chunks cs (Python ints, or one i64 value with its mask m): a loop
            over the block's rows, the accumulators in registers."""
            accs = [[cgutils.alloca_once(b, _vec(F32)) for _ in cs] for _ in range(Q)]
            for i in range(Q):
                for c, a in zip(cs, accs[i]):
                    o = e.loadf(ops[i], coff(c, 4), m) if m is not None else \
                        b.load(e.addr(ops[i], coff(c, 4)), typ=_vec(F32), align=4)
                    b.store(b.fmul(o, fvs[i]), a)
            with cgutils.for_range(b, i64(B)) as jl:
                j = jl.index
                vrow = b.mul(row_of(j), vrs)
                for k, c in enumerate(cs):
                    v = widen(vp, b.add(vrow, coff(c, esz)), m)
                    for i in range(Q):
                        wj = e.splat(b.load(e.addr(wp, b.add(b.mul(j, i64(4)), i64(4 * B * i))), typ=F32, align=4), N)
                        b.store(e.fma(wj, v, b.load(accs[i][k])), accs[i][k])
            for i in range(Q):
                for c, a in zip(cs, accs[i]):
                    if m is None:
                        b.store(b.load(a), e.addr(ops[i], coff(c, 4)), align=4)
                    else:
                        e.store(b.load(a), ops[i], coff(c, 4), m)

        if HD:
            nc = HD // N
            cg = max(1, CG // Q)  # chunks per pass: Q * cg accumulators
            for c0 in range(0, nc, cg):
                out_chunks(list(range(c0, min(nc, c0 + cg))))
        else:
            nch = b.udiv(b.add(hd, i64(N - 1)), i64(N))
            full = b.udiv(hd, i64(N))
            tail = e.lanes_below(N, b.trunc(b.urem(hd, i64(N)), I32))
            on = ir.Constant(_vec(I1), [ir.Constant(I1, 1)] * N)
            with cgutils.for_range(b, nch) as cl:
                out_chunks([cl.index], b.select(b.icmp_unsigned(">=", cl.index, full), tail, on))
        return context.get_dummy_value()

    return codegen


QS = (1, 2, 4)  # queries per call the tiled kernel has bodies for


def _tile_gen(f16: bool):
    """hd 64 and 128 branch on nq to their 1-, 2- and 4-query bodies; any other hd has one generic
    body, for one query per call (the driver sends them so)."""
    by_q = {(hd, q): _emit_tile(hd, q, f16) for hd in (64, 128) for q in QS}
    generic = _emit_tile(None, 1, f16)

    def gen(context, b, sig, args):
        hd, nq = args[6], args[21]

        def on_nq(hd_):
            with b.if_else(b.icmp_unsigned("==", nq, ir.Constant(I64, 4))) as (four, fewer):
                with four:
                    by_q[hd_, 4](context, b, sig, args)
                with fewer:
                    with b.if_else(b.icmp_unsigned("==", nq, ir.Constant(I64, 2))) as (two, one):
                        with two:
                            by_q[hd_, 2](context, b, sig, args)
                        with one:
                            by_q[hd_, 1](context, b, sig, args)

        with b.if_else(b.icmp_unsigned("==", hd, ir.Constant(I64, 64))) as (h64, other):
            with h64:
                on_nq(64)
            with other:
                with b.if_else(b.icmp_unsigned("==", hd, ir.Constant(I64, 128))) as (h128, rest):
                    with h128:
                        on_nq(128)
                    with rest:
                        generic(context, b, sig, args)
        return context.get_dummy_value()
    return gen


_tile_gens = {True: _tile_gen(True), False: _tile_gen(False)}


@intrinsic
def attend_tile(typingctx, cache, kt, vp, vrs, lo, hi, hd, scale, wp, qa, qb, qc, qd, sa, sb, sc, sd, oa, ob, oc,
                od, nq):
    """attend_tile(cache, K_tile, V, V_row_stride, lo, hi, hd, scale, w, q_0..q_3, state_0..state_3,
    out_0..out_3, nq): one online-softmax step of nq (1, 2 or 4; 1 unless hd is 64 or 128) queries over one block, lanes
    [lo, hi) theirs (0 <= lo < hi <= B). ``cache`` (the key cache array) only tells the element
    type: float32, or uint16 holding fp16 bits. K_tile: hd rows of B keys' values; V: B rows of hd
    values, row j at V + j * V_row_stride; q_i / out_i hd floats, state_i (m, l) 2 floats, w 4 B
    floats of scratch; addresses and strides in bytes as int64 (unused query slots: any address)."""
    ints = (kt, vp, vrs, lo, hi, hd, wp, qa, qb, qc, qd, sa, sb, sc, sd, oa, ob, oc, od, nq)
    if not (isinstance(cache, types.Array) and cache.dtype in (types.uint16, types.float32)
            and all(isinstance(t, types.Integer) for t in ints) and scale == types.float32):
        return None
    i = types.int64
    return types.void(cache, *([i] * 6), types.float32, *([i] * 14)), _tile_gens[cache.dtype == types.uint16]


def _rows_f16(context, b, sig, args):
    src, srs, dst, drs, r0, r1, hd = args
    e = _E(b)
    i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    full = b.udiv(hd, i64(N))
    rem = b.trunc(b.urem(hd, i64(N)), I32)
    m = e.lanes_below(N, rem)
    fn = e.decl(f"llvm.masked.store.v{N}f32.p0", ir.VoidType(), [_vec(F32), PTR, I32, _vec(I1)])
    with cgutils.for_range_slice(b, r0, r1, i64(1), inc=True) as (r, _):
        s, d = b.add(src, b.mul(r, srs)), b.add(dst, b.mul(r, drs))
        with cgutils.for_range(b, full) as cl:
            h = b.load(e.addr(s, b.mul(cl.index, i64(N * 2))), typ=_vec(I16), align=2)
            b.store(b.fpext(b.bitcast(h, _vec(F16)), _vec(F32)), e.addr(d, b.mul(cl.index, i64(N * 4))), align=4)
        with b.if_then(b.icmp_unsigned("!=", rem, I32(0)), likely=False):
            h = e.load(s, b.mul(full, i64(N * 2)), _vec(I16), m, align=2)
            b.call(fn, [b.fpext(b.bitcast(h, _vec(F16)), _vec(F32)), e.addr(d, b.mul(full, i64(N * 4))), I32(4), m])
    return context.get_dummy_value()


@intrinsic
def kv_rows_f16(typingctx, src, srs, dst, drs, r0, r1, hd):
    """kv_rows_f16(src, src_row_stride, dst, dst_row_stride, r0, r1, hd): rows r0..r1-1 of hd fp16
    values (uint16 bits) at src widened to float32 rows at dst; addresses and strides in bytes."""
    if not all(isinstance(t, types.Integer) for t in (src, srs, dst, drs, r0, r1, hd)):
        return None
    return types.void(*([types.int64] * 7)), _rows_f16
