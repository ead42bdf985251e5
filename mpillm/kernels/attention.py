"""One query row of causal attention over a KV cache, in target-neutral vector IR.

``attend_row`` computes, for one head and one token, out = softmax(K q * scale) V over the
n cached positions starting at K, V (a sliding window starts later in the cache). ``sink``
is a logit that joins the softmax without a value (gpt-oss's attention sinks): it takes
probability mass, out = sum_p exp(s_p - m) V_p / (sum_p exp(s_p - m) + exp(sink - m)) with m
the max over the scores and the sink; -inf is no sink. The cache holds float32 or IEEE half (as uint16 bits; numba has
no float16), one row of hd values per position. Written out in IR because numba's version
kept the output row in memory (a store-to-load chain per position) and reduced each score
one product at a time; here:

  scores   4 positions at a time, each a dot product over hd in 16-lane chunks (fp16 rows
           widened with ``fpext``), reduced to a scalar, scaled, and the running max kept;
  softmax  the vector exp of kernels.vmath, summed;
  output   per 16-lane chunk of the output, 4 accumulators over the positions (weights
           broadcast), combined and scaled by 1 / sum once.

Any hd works (the last chunk is masked); the KV rows must be contiguous.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mpillm.kernels.irgen import F16, F32, I1, I16, I32, I64, PTR
from mpillm.kernels.vmath import N, _E, _vec

P = 4  # positions per step


def _emit(kv_f16: bool, HD: int | None):
    def codegen(context, b, sig, args):
        qp, kp, vp, rstride, n, hd, scale, sink, sp, op = args
        e = _E(b)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        esize = 2 if kv_f16 else 4
        nch = b.udiv(b.add(hd, i64(N - 1)), i64(N))  # 16-lane chunks per row
        full = b.udiv(hd, i64(N))
        rem = b.trunc(b.urem(hd, i64(N)), I32)
        tail_mask = e.lanes_below(N, rem)

        def chunk_mask(c):
            """None for a full chunk, else the tail mask (selected at run time)."""
            is_tail = b.icmp_unsigned(">=", c, full)
            all_on = ir.Constant(_vec(I1), [ir.Constant(I1, 1)] * N)
            return b.select(is_tail, tail_mask, all_on)

        def load_kv(base, row, c, m):
            off = b.add(b.mul(row, rstride), b.mul(c, i64(N * esize)))
            if not kv_f16:
                return e.loadf(base, off, m)
            h = e.load(base, off, _vec(I16), m, align=2)
            return b.fpext(b.bitcast(h, _vec(F16)), _vec(F32))

        def load_kv_full(base, row, c):
            """Chunk c (a Python int) of a row, unmasked (hd a multiple of 16)."""
            p = e.addr(base, b.add(b.mul(row, rstride), i64(c * N * esize)))
            if not kv_f16:
                return b.load(p, typ=_vec(F32), align=4)
            return b.fpext(b.bitcast(b.load(p, typ=_vec(I16), align=2), _vec(F16)), _vec(F32))

        def load_q(c, m):
            return e.loadf(qp, b.mul(c, i64(N * 4)), m)

        # ---- scores: sp[p] = dot(q, K[p]) * scale, and their max
        mx = cgutils.alloca_once_value(b, sink)  # the sink joins the max (-inf: no sink)
        zero = e.fconst(0.0)
        if HD:  # q held in registers; chunks unrolled, no masks
            qv = [b.load(e.addr(qp, i64(4 * N * c)), typ=_vec(F32), align=4) for c in range(HD // N)]

        def scores_step_hd(p0, npos):
            for j in range(npos):
                row = b.add(p0, i64(j))
                acc = None
                for c in range(HD // N):
                    kv = load_kv_full(kp, row, c)
                    acc = b.fmul(qv[c], kv) if acc is None else e.fma(qv[c], kv, acc)
                s = b.fmul(e.hsum(acc), scale)
                b.store(s, e.addr(sp, b.mul(row, i64(4))))
                b.store(b.call(e.decl("llvm.maxnum.f32", F32, [F32, F32]), [b.load(mx), s]), mx)

        def scores_step(p0, npos):
            if HD:
                scores_step_hd(p0, npos)
                return
            accs = [cgutils.alloca_once_value(b, zero) for _ in range(npos)]
            for a in accs:
                b.store(zero, a)
            with cgutils.for_range(b, nch) as cl:
                c = cl.index
                m = chunk_mask(c)
                qv = load_q(c, m)
                for j in range(npos):
                    kv = load_kv(kp, b.add(p0, i64(j)), c, m)
                    b.store(e.fma(qv, kv, b.load(accs[j])), accs[j])
            for j in range(npos):
                s = b.fmul(e.hsum(b.load(accs[j])), scale)
                b.store(s, e.addr(sp, b.mul(b.add(p0, i64(j)), i64(4))))
                b.store(b.call(e.decl("llvm.maxnum.f32", F32, [F32, F32]), [b.load(mx), s]), mx)

        steps = b.udiv(n, i64(P))
        with cgutils.for_range(b, steps) as pl:
            scores_step(b.mul(pl.index, i64(P)), P)
        with cgutils.for_range_slice(b, b.mul(steps, i64(P)), n, i64(1), inc=True) as (p, _):
            scores_step(p, 1)

        # ---- softmax numerators and their sum
        tot = cgutils.alloca_once_value(b, zero)
        mxv = e.splat(b.load(mx), N)
        nfull = b.udiv(n, i64(N))
        with cgutils.for_range(b, nfull) as sl:
            off = b.mul(sl.index, i64(4 * N))
            v = e.exp(b.fsub(e.loadf(sp, off), mxv))
            e.store(v, sp, off)
            b.store(b.fadd(b.load(tot), v), tot)
        srem = b.trunc(b.urem(n, i64(N)), I32)
        with b.if_then(b.icmp_unsigned("!=", srem, I32(0)), likely=True):
            sm = e.lanes_below(N, srem)
            off = b.mul(nfull, i64(4 * N))
            v = b.select(sm, e.exp(b.fsub(e.loadf(sp, off, sm), mxv)), zero)
            e.store(v, sp, off, sm)
            b.store(b.fadd(b.load(tot), v), tot)
        # the sink's share of the denominator (exp(-inf) = 0 without a sink)
        sink_w = b.call(e.decl("llvm.exp.f32", F32, [F32]), [b.fsub(sink, b.load(mx))])
        inv = b.fdiv(ir.Constant(F32, 1.0), b.fadd(e.hsum(b.load(tot)), sink_w))
        invv = e.splat(inv, N)

        # ---- output: per chunk, sum_p w[p] V[p] in P accumulators
        def splat_w(p):
            return e.splat(b.load(e.addr(sp, b.mul(p, i64(4))), typ=F32), N)

        if HD:  # every chunk's accumulators in registers, two positions per step
            nc = HD // N
            accs = [[cgutils.alloca_once_value(b, zero) for _ in range(nc)] for _ in range(2)]
            for a in accs[0] + accs[1]:
                b.store(zero, a)
            pairs = b.udiv(n, i64(2))

            def out_pos(p, acc_set):
                w = splat_w(p)
                for c in range(nc):
                    b.store(e.fma(w, load_kv_full(vp, p, c), b.load(acc_set[c])), acc_set[c])

            with cgutils.for_range(b, pairs) as pl:
                out_pos(b.mul(pl.index, i64(2)), accs[0])
                out_pos(b.add(b.mul(pl.index, i64(2)), i64(1)), accs[1])
            with b.if_then(b.icmp_unsigned("!=", b.urem(n, i64(2)), i64(0))):
                out_pos(b.sub(n, i64(1)), accs[0])
            for c in range(nc):
                o = b.fmul(b.fadd(b.load(accs[0][c]), b.load(accs[1][c])), invv)
                b.store(o, e.addr(op, i64(4 * N * c)), align=4)
            return context.get_dummy_value()

        with cgutils.for_range(b, nch) as cl:
            c = cl.index
            m = chunk_mask(c)
            accs = [cgutils.alloca_once_value(b, zero) for _ in range(P)]
            for a in accs:
                b.store(zero, a)
            with cgutils.for_range(b, steps) as pl:
                p0 = b.mul(pl.index, i64(P))
                for j in range(P):
                    p = b.add(p0, i64(j))
                    b.store(e.fma(splat_w(p), load_kv(vp, p, c, m), b.load(accs[j])), accs[j])
            with cgutils.for_range_slice(b, b.mul(steps, i64(P)), n, i64(1), inc=True) as (p, _):
                b.store(e.fma(splat_w(p), load_kv(vp, p, c, m), b.load(accs[0])), accs[0])
            o = b.fadd(b.fadd(b.load(accs[0]), b.load(accs[1])), b.fadd(b.load(accs[2]), b.load(accs[3])))
            f = e.decl(f"llvm.masked.store.v{N}f32.p0", ir.VoidType(), [_vec(F32), PTR, I32, _vec(I1)])
            b.call(f, [b.fmul(o, invv), e.addr(op, b.mul(c, i64(N * 4))), I32(4), m])
        return context.get_dummy_value()

    return codegen


def _make(kv_f16: bool):
    """One intrinsic per cache type; it branches on hd to the bodies specialised for 64 and
    128 (the common head sizes: q and the output row stay in registers) or the generic one."""
    bodies = {64: _emit(kv_f16, 64), 128: _emit(kv_f16, 128), None: _emit(kv_f16, None)}

    def gen(context, b, sig, args):
        hd = args[5]

        def pick(sizes):
            if not sizes:
                bodies[None](context, b, sig, args)
                return
            with b.if_else(b.icmp_unsigned("==", hd, ir.Constant(I64, sizes[0]))) as (this, rest):
                with this:
                    bodies[sizes[0]](context, b, sig, args)
                with rest:
                    pick(sizes[1:])

        pick([64, 128])
        return context.get_dummy_value()

    def attend(typingctx, qp, kp, vp, rstride, n, hd, scale, sink, sp, op):
        ints = (qp, kp, vp, rstride, n, hd, sp, op)
        if not (all(isinstance(t, types.Integer) for t in ints) and scale == types.float32 and sink == types.float32):
            return None
        sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
                         types.float32, types.float32, types.int64, types.int64)
        return sig, gen

    attend.__name__ = attend.__qualname__ = f"attend_row_{'f16' if kv_f16 else 'f32'}"
    return intrinsic(attend)


# attend_row_<kv type>(q, K, V, row_stride_bytes, n, hd, scale, sink, scores, out): addresses as
# int64; q, scores and out float32; K and V rows float32 or fp16 bits; scale and sink float32
attend_row_f32, attend_row_f16 = _make(False), _make(True)
