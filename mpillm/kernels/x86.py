"""x86-64 SIMD kernels: AVX-512 VNNI (``vpdpbusd``) and AVX2 (``vpmaddubsw`` + ``vpmaddwd``).

The inner loop of every quantized matmul is a numba ``intrinsic`` whose body is
written with llvmlite's IR builder and calls the x86 dot-product instruction
explicitly (numba's own integer code widens int8 to int64 and never reaches
these instructions). Each tile intrinsic computes an R x U tile of ``out`` (R
weight rows x U tokens) over the whole K, keeping one ``<L x float>``
accumulator per (row, token) in registers; the kernel loops over tiles
(``prange`` over row tiles, so threads split N; a row tile is used for all T
tokens while it sits in L1, so each weight byte is read from memory once per call).

One *group* is one SIMD register of weight bytes: W = 64 bytes (VNNI) or 32
(AVX2), i.e. W/16 blocks of q4 (nibbles) or W/32 blocks of q8_0.

Activations are prepared once per call (``_prep_codegen``) into a scratch
buffer the kernel allocates (np.empty, ~2 x T x K bytes): per token and group
the dot-product operand(s), the accumulator start and the per-lane scales, so
the tiles do no shuffling. Then per group and (row, token):

q4_0 / q4_1 (weights in GGML nibble order: byte j of a block holds elements
  j and j+16). lo = w & 15, hi = w >> 4 (unsigned bytes); the prepared XL/XH
  hold the first/last 16 activation bytes of each of the group's blocks (a
  128-bit-lane shuffle of the natural order). ``acc_i32 = dot(init, lo, XL) +
  dot(hi, XH)``: each i32 lane sums 4 byte products, 4 lanes per block. q4_0
  folds its -8 offset into ``init`` as -2 * xsum per lane (-8 * xsum per
  block); q4_1 adds ``m * xd * xsum`` per block in a ``<blocks x float>`` accumulator.
q8_0 signed x signed: VNNI uses (w ^ 0x80) = w + 128 as the unsigned operand
  and folds -128 * xsum into ``init`` (-16 per lane, 8 lanes per block); AVX2
  uses |w| and sign(w) * x (vpsignb) so vpmaddubsw cannot saturate.
Then ``acc_f32 = fma(sitofp(acc_i32), d_lanes * xd_lanes, acc_f32)`` with the
fp16 weight scales loaded as ``<blocks x half>``, extended and shuffled to
lanes; a tree reduction at the end. Trailing blocks (nb not a multiple of the
group) use masked loads.

T = 1 (decode) is bound by memory, not by these instructions: one row at a
time, so the matrix is read as one sequential stream, with ``prefetcht1`` 16 KiB
ahead. Without it the core and the memory took turns (~12-15 GB/s on one
thread with the data in DRAM against ~28 GB/s for a plain read); with it
~20-22 GB/s. Short rows (SmolLM2: K = 576) run 4-row tiles that prefetch the same
stream at a fixed distance, and each thread prefetches the head of its rows first (see R1S).

Each lane's float product rounds separately (the lanes of a block are not
summed in integers first), so the error is ~1e-7 relative to the sum of
|lane terms|, like a float32 dot product, not exact per block like GGML's.

q4_0, q4_1 and q8_0 on VNNI are the exception where K allows (``_tr_codegen``; rows of whole
16-block groups, plus a tail of at most one register of weight bytes, or nb >= NB_TR): a group is 16 blocks (4 registers of a q4 row, 8 of q8_0), whose
dwords are transposed in registers (4 x 4 dword transposes within 128-bit lanes, 8 unpacks per
row; q8_0 16 plus 8 128-bit-lane selections) so that each i32 lane holds a whole block's exact
integer dot product, and one sitofp, fmul(d, xd) and fma per (row, token) cover 16 blocks
instead of 4 (q8_0: 2); the activations are prepared in the matching block order
(``_tr_prep_codegen``). The transpose is per row and shared by the tile's tokens. What bounds the
batched tiles is then vpdpbusd itself (8 per 16 q4 blocks, row and token, as before) and the
per-row transpose and nibble work competing with it for the vector pipes: on the 1B shapes (Zen 4,
one thread, cpu time) q4_0 T = 8 takes ~0.8-0.95x main's time, ~3.8x its T = 1, where vpdpbusd at
its measured peak (~3.6e9/s here) alone would be ~1.8x.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.ufunc.parallel import _iget_num_threads  # the thread count, cacheable (no ctypes global)

from mpillm.kernels import jitcache, portable, runners
from mpillm.kernels.checks import check_q
from mpillm.kernels.irgen import F16, F32, I1, I8, I16, I32, I64, VNNI_BYTE_OPERANDS, Emit, int_intrinsic
from mpillm.kernels.irgen import vec as _vec

_JIT_PAR = dict(cache=True, fastmath=True, nogil=True, parallel=True)
# q4_1 (VNNI and AVX2) without fastmath: with it LLVM reassociated the inlined tiles' float operations
# differently per tile shape (the last bit of a row depended on its tile, i.e. on N and the row
# offset); without it each row is the same sequence of operations in any tile (and it is
# no slower here). q4_0 / q8_0 keep fastmath, so their prefill code is unchanged; their rows
# were checked bit-identical across tiles, thread counts and row offsets.
_JIT_PAR_STRICT = dict(_JIT_PAR, fastmath=False)
_JIT = dict(cache=True, fastmath=True, nogil=True)

_PF_LOCALITY = 2  # software prefetch into L2 (prefetcht1; see _Emit.prefetch)


class _Emit(Emit):
    """The shared emitter plus x86's instructions (bound to one ISA)."""

    def __init__(self, builder: ir.IRBuilder, isa: str):
        super().__init__(builder)
        self.isa = isa

    def half4(self, base, off, n, mask):
        """n fp16 values -> <n x float>."""
        h = self.load(base, off, _vec(I16, n), mask)
        return self.b.fpext(self.b.bitcast(h, _vec(F16, n)), _vec(F32, n))

    # -- dot products: i32 lanes += sum of 4 (u8 * s8) products ------------------------
    def _vpdpbusd(self, acc, a, b):
        n = acc.type.count
        opty = _vec(I8, 4 * n) if VNNI_BYTE_OPERANDS else acc.type
        f = self.decl(f"llvm.x86.avx512.vpdpbusd.{32 * n}", acc.type, [acc.type, opty, opty])
        a = a if a.type == opty else self.b.bitcast(a, opty)
        b = b if b.type == opty else self.b.bitcast(b, opty)
        return self.b.call(f, [acc, a, b])

    def _maddubs(self, a, b):
        f = self.decl("llvm.x86.avx2.pmadd.ub.sw", _vec(I16, 16), [_vec(I8, 32), _vec(I8, 32)])
        return self.b.call(f, [a, b])

    def _maddwd_ones(self, p):
        f = self.decl("llvm.x86.avx2.pmadd.wd", _vec(I32, 8), [_vec(I16, 16), _vec(I16, 16)])
        return self.b.call(f, [p, self.const(I16, 16, [1] * 16)])

    def dot2(self, acc, a1, b1, a2, b2):
        """acc + dot(a1, b1) + dot(a2, b2); a unsigned bytes, b signed; |sum of pair| < 2^15 (AVX2)."""
        if self.isa == "vnni":
            return self._vpdpbusd(self._vpdpbusd(acc, a1, b1), a2, b2)
        p = self.b.add(self._maddubs(a1, b1), self._maddubs(a2, b2))
        return self.b.add(acc, self._maddwd_ones(p))

    def dot1(self, acc, a, b):
        if self.isa == "vnni":
            return self._vpdpbusd(acc, a, b)
        return self.b.add(acc, self._maddwd_ones(self._maddubs(a, b)))

    def psign(self, x, w):
        f = self.decl("llvm.x86.avx2.psign.b", _vec(I8, 32), [_vec(I8, 32), _vec(I8, 32)])
        return self.b.call(f, [x, w])

    def iabs(self, w):
        f = self.decl(f"llvm.abs.v{w.type.count}i8", w.type, [w.type, I1])
        return self.b.call(f, [w, I1(0)])


class _Geom:
    """Sizes of one group for a weight kind and ISA (see the module docstring)."""

    def __init__(self, kind: str, isa: str):
        self.kind, self.isa = kind, isa
        self.W = W = 64 if isa == "vnni" else 32  # weight bytes per group and row
        self.L = W // 4  # i32 / f32 lanes
        self.q8 = kind == "q8_0"
        self.nbg = W // 32 if self.q8 else W // 16  # blocks per group
        self.lpb = self.L // self.nbg  # lanes per block
        self.nx = 1 if self.q8 else 2  # activation vectors per group
        self.GB = (self.nx + 2) * W  # prepared bytes per group and token: X.. | init | xd lanes


def _group_prep(e: "_Emit", G: "_Geom", xp, xdp, xsp, bp, xo, so, bo, rem):
    """Store one group's prepared activations (see _prep_codegen) at bp + bo, from the activation
    bytes at xp + xo and the scales and sums at xdp / xsp + so; rem: the valid blocks of a partial
    group (i32), or None."""
    b, kind, isa = e.b, G.kind, G.isa
    W, L, nbg, lpb = G.W, G.L, G.nbg, G.lpb
    lanes = [i // lpb for i in range(L)]
    if rem is None:
        mx0 = mx1 = mblk = None
    else:
        mx0 = e.lanes_below(W, b.mul(rem, I32(32)))
        mx1 = e.lanes_below(W, b.sub(b.mul(rem, I32(32)), I32(W)))
        mblk = e.lanes_below(nbg, rem)
    xd = e.load(xdp, so, _vec(F32, nbg), mblk)
    xs = e.load(xsp, so, _vec(I32, nbg), mblk)
    if G.q8:
        xs_ = [e.load(xp, xo, _vec(I8, W), mx0)]
    else:
        xa = e.load(xp, xo, _vec(I8, W), mx0)
        xb = e.load(xp, b.add(xo, ir.Constant(I64, W)), _vec(I8, W), mx1)
        xs_ = [e.shuffle(xa, xb, [32 * k + j for k in range(nbg) for j in range(16)]),
               e.shuffle(xa, xb, [32 * k + 16 + j for k in range(nbg) for j in range(16)])]
    if kind == "q4_0":  # sum (nib - 8) x = sum nib x - 8 xsum; 4 lanes per block
        init = e.shuffle(b.mul(xs, e.const(I32, nbg, [-2] * nbg)), None, lanes)
    elif G.q8 and isa == "vnni":  # sum (w + 128) x - 128 xsum; 8 lanes per block
        init = e.shuffle(b.mul(xs, e.const(I32, nbg, [-16] * nbg)), None, lanes)
    elif kind == "q4_1":
        xdsum = b.fmul(xd, b.sitofp(xs, _vec(F32, nbg)))
        widen = [min(i, nbg) for i in range(L)]  # lanes >= nbg: 0.0 from the second operand
        init = b.bitcast(e.shuffle(xdsum, ir.Constant(_vec(F32, nbg), None), widen), _vec(I32, L))
    else:
        init = ir.Constant(_vec(I32, L), None)
    for i, v in enumerate(xs_ + [init, e.shuffle(xd, None, lanes)]):
        b.store(v, e.addr(bp, b.add(bo, ir.Constant(I64, i * W))), align=1)


def _prep_codegen(kind: str, isa: str):
    """IR body that prepares the activations of T tokens for a kind's tiles.

    Per token and group (zero-padded to whole groups), ``GB`` bytes:
      X1 [, X2]  the group's activation bytes as the dot-product operand(s): q4: the first and
                 last 16 bytes of each block gathered (a 128-bit-lane shuffle); q8_0: as is
      init       <L x i32> accumulator start: q4_0 -2*xsum per lane; q8_0 (VNNI) -16*xsum
                 per lane; else 0. q4_1 keeps xd * xsum per block (<nbg x float>) here instead
      xdl        <L x float> activation scale of each lane's block
    """
    G = _Geom(kind, isa)
    nbg = G.nbg

    def codegen(context, builder, signature, args):
        (xp, xstride, xdp, xsp, sstride, nb, T, bp, bstride) = args
        b = builder
        e = _Emit(b, isa)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731

        def group(xrow, srow, brow, g, rem):
            _group_prep(e, G, xp, xdp, xsp, bp, b.add(xrow, b.mul(g, i64(32 * nbg))),
                        b.add(srow, b.mul(g, i64(4 * nbg))), b.add(brow, b.mul(g, i64(G.GB))), rem)

        ngroups = b.udiv(nb, i64(nbg))
        rem = b.trunc(b.urem(nb, i64(nbg)), I32)
        with cgutils.for_range(b, T) as tl:
            t = tl.index
            xrow, srow, brow = b.mul(t, xstride), b.mul(t, sstride), b.mul(t, bstride)
            with cgutils.for_range(b, ngroups) as gl:
                group(xrow, srow, brow, gl.index, None)
            with b.if_then(b.icmp_unsigned("!=", rem, I32(0)), likely=False):
                group(xrow, srow, brow, ngroups, rem)
        return context.get_dummy_value()

    return codegen


def _tile_at(b: ir.IRBuilder, args) -> tuple:
    """A tile intrinsic's arguments with its pointers moved to its own rows (n0) and tokens (t0):
    (wq, wstride, dp, mp, dstride, bp, bstride, op, ostride, nb)."""
    (wq, wstride, dp, mp, dstride, bp, bstride, op, ostride, nb, n0, t0) = args
    wq = b.add(wq, b.mul(n0, wstride))
    dp = b.add(dp, b.mul(n0, dstride))
    mp = b.add(mp, b.mul(n0, dstride))
    bp = b.add(bp, b.mul(t0, bstride))
    op = b.add(b.add(op, b.mul(t0, ostride)), b.mul(n0, ir.Constant(I64, 4)))
    return wq, wstride, dp, mp, dstride, bp, bstride, op, ostride, nb


def _q_codegen(kind: str, isa: str, R: int, U: int, prefetch: int = 0, pf_d: int = 0):
    """IR body of an R-row x U-token tile of a quantized matmul over prepared activations.

    prefetch: > 0: software-prefetch the weights this many bytes ahead (the rows are contiguous, so
    the tiles of a matrix are one stream; see below), and with pf_d > 0 the scales pf_d bytes
    ahead; < 0: prefetch the next R-row tile linearly while this tile is processed, R * W bytes
    per group step (the AVX2 short-row tiles)."""
    G = _Geom(kind, isa)
    W, L, nbg, lpb, q8 = G.W, G.L, G.nbg, G.lpb, G.q8
    lanes = [i // lpb for i in range(L)]

    def codegen(context, builder, signature, args):
        b = builder
        e = _Emit(b, isa)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        wq, wstride, dp, mp, dstride, bp, bstride, op, ostride, nb = _tile_at(b, args)
        fz = ir.Constant(_vec(F32, L), None)
        acc = [[cgutils.alloca_once_value(b, fz) for _ in range(U)] for _ in range(R)]
        macc = None
        if kind == "q4_1":
            mz = ir.Constant(_vec(F32, nbg), None)
            macc = [[cgutils.alloca_once_value(b, mz) for _ in range(U)] for _ in range(R)]

        def group(g, rem):
            """Accumulate group g (i64); rem = number of valid blocks (i32) in a partial group, or None."""
            if rem is None:
                mw = mblk = None
            else:
                mw = e.lanes_below(W, b.mul(rem, I32(32 if q8 else 16)))
                mblk = e.lanes_below(nbg, rem)
            goff_w = b.mul(g, i64(W))
            goff_h = b.mul(g, i64(2 * nbg))
            goff_b = b.mul(g, i64(G.GB))
            X, init, xdl, xdsum = [], [], [], []
            for u in range(U):
                bo = b.add(b.mul(i64(u), bstride), goff_b)
                X.append([e.load(bp, b.add(bo, i64(i * W)), _vec(I8, W)) for i in range(G.nx)])
                iv = e.load(bp, b.add(bo, i64(G.nx * W)), _vec(I32, L))
                if kind == "q4_1":
                    xdsum.append(e.shuffle(b.bitcast(iv, _vec(F32, L)), None, range(nbg)))
                    iv = ir.Constant(_vec(I32, L), None)
                init.append(iv)
                xdl.append(e.load(bp, b.add(bo, i64((G.nx + 1) * W)), _vec(F32, L)))
            if prefetch < 0 and rem is None:
                nxt = b.add(b.mul(i64(R), wstride), b.mul(goff_w, i64(R)))
                for r in range(R):
                    e.prefetch(wq, b.add(nxt, i64(r * W)))
                e.prefetch(dp, b.add(b.mul(i64(R), dstride), b.mul(goff_h, i64(R))))
            if prefetch > 0:
                # The R rows of a tile are contiguous (and so are the tiles), so the weights are one
                # stream: per group step (a partial one too) prefetch the next R * W bytes of it,
                # `prefetch` bytes ahead of the tile's start. R * W * ceil(nb / nbg) >= R * row bytes:
                # every line of the stream is covered whatever the row length.
                for r in range(R):
                    e.prefetch(wq, b.add(b.mul(goff_w, i64(R)), i64(prefetch + r * W)), _PF_LOCALITY)
                if pf_d > 0:  # the scales likewise: R rows of d (and m) are nb * 2 R contiguous bytes
                    e.prefetch(dp, b.add(b.mul(goff_h, i64(R)), i64(pf_d)), _PF_LOCALITY)
                    if kind == "q4_1":
                        e.prefetch(mp, b.add(b.mul(goff_h, i64(R)), i64(pf_d)), _PF_LOCALITY)
            for r in range(R):
                w = e.load(wq, b.add(b.mul(i64(r), wstride), goff_w), _vec(I8, W), mw)
                ho = b.add(b.mul(i64(r), dstride), goff_h)
                dl = e.shuffle(e.half4(dp, ho, nbg, mblk), None, lanes)
                if kind == "q4_1":
                    m4 = e.half4(mp, ho, nbg, mblk)
                if q8:
                    wu = b.xor(w, e.const(I8, W, [-128] * W)) if isa == "vnni" else e.iabs(w)
                else:
                    lo = b.and_(w, e.const(I8, W, [15] * W))
                    hi = b.lshr(w, e.const(I8, W, [4] * W))
                for u in range(U):
                    if q8:
                        xs_ = X[u][0] if isa == "vnni" else e.psign(X[u][0], w)
                        a = e.dot1(init[u], wu, xs_)
                    else:
                        a = e.dot2(init[u], lo, X[u][0], hi, X[u][1])
                    f = b.sitofp(a, _vec(F32, L))
                    sc = b.fmul(dl, xdl[u])
                    b.store(e.fma(f, sc, b.load(acc[r][u])), acc[r][u])
                    if kind == "q4_1":
                        b.store(e.fma(m4, xdsum[u], b.load(macc[r][u])), macc[r][u])

        e.chunked(nb, nbg, group)
        for r in range(R):
            for u in range(U):
                s = e.hsum(b.load(acc[r][u]))
                if macc is not None:
                    s = b.fadd(s, e.hsum(b.load(macc[r][u])))
                b.store(s, e.addr(op, b.add(b.mul(i64(u), ostride), i64(4 * r))))
        return context.get_dummy_value()

    return codegen


# -- q4_0 / q4_1 / q8_0 on VNNI: whole blocks per i32 lane (see the module docstring) -------------
_TR_NB = 16  # blocks per super-group: 256 weight bytes of a row, 4 zmm registers
# lane i of the tiles' vectors holds block _TR_PERM[kind][i] of the super-group (what the transpose gives)
_TR_PERM = {"q4_0": [4 * (i % 4) + i // 4 for i in range(16)], "q4_1": [4 * (i % 4) + i // 4 for i in range(16)],
            "q8_0": [2 * (i % 4) + (i // 4) % 2 + 8 * (i // 8) for i in range(16)]}
_TR_NREG = {"q4_0": 4, "q4_1": 4, "q8_0": 8}  # weight registers per super-group and row (16 or 32 bytes a block)
_TR_INIT = {"q4_0": -8, "q4_1": 0, "q8_0": -128}  # the offset folded into the accumulator start, times xsum
_TR_GB = (8 + 2) * 64  # prepared bytes per super-group and token: 8 operand vectors | init | xd
# A partial last super-group of at most _TR_TAIL blocks (one register of weight bytes) runs as one
# group of the 4-block tiles' per-dword layout (their _group_prep, and the tiles' tail) instead of a
# masked super-group that costs a whole one: rows of 16 n + 1..4 blocks (SmolLM2's K = 576: 16 + 2)
# then run these tiles at the cost of 16 n blocks and a small group.
_TR_TAIL = {k: _Geom(k, "vnni").nbg for k in _TR_PERM}  # q4: 4 blocks, q8_0: 2


def _tr_prep_codegen(kind: str):
    """IR body preparing activations for the transposed VNNI tiles (q4_0, q8_0). Per token and
    super-group of 16 blocks (zero-padded), ``_TR_GB`` bytes of <16 x i32> vectors, lane i for block
    p = _TR_PERM[kind][i]:
      q4_0: XL_j, XH_j (j = 0..3)  activation dwords j and 4 + j of block p (the elements that the
                             low and high nibbles of the block's weight dword j multiply)
      q8_0: X_j (j = 0..7)   activation dword j of block p
      init                   -8 * xsum[p] (q4_0: sum (nib - 8) x = sum nib x - 8 xsum) or -128 * xsum[p]
                             (q8_0: the weights enter vpdpbusd as unsigned w + 128)
      xd                     the activation scale of block p (float)"""
    P = _TR_PERM[kind]
    order = list(range(8)) if kind == "q8_0" else [j + 4 * h for j in range(4) for h in range(2)]
    TG = _Geom(kind, "vnni")  # the tail group's layout

    def codegen(context, builder, signature, args):
        (xp, xstride, xdp, xsp, sstride, nb, T, bp, bstride) = args
        b = builder
        e = _Emit(b, "vnni")
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731

        def sgroup(xrow, srow, brow, g, rem):
            mx = mb = None
            if rem is not None:
                mx = e.lanes_below(128, b.mul(rem, I32(8)))
                mb = e.lanes_below(16, rem)
            x = e.load(xp, b.add(xrow, b.mul(g, i64(32 * _TR_NB))), _vec(I32, 128), mx)
            so = b.add(srow, b.mul(g, i64(4 * _TR_NB)))
            xd = e.load(xdp, so, _vec(F32, 16), mb)
            xs = e.load(xsp, so, _vec(I32, 16), mb)
            vs = []
            for j in order:
                vs.append(e.shuffle(x, None, [8 * p + j for p in P]))
            if kind == "q4_1":  # no offset; instead xd * xsum per block (float) for the m term
                vs.append(b.bitcast(e.shuffle(b.fmul(xd, b.sitofp(xs, _vec(F32, 16))), None, P), _vec(I32, 16)))
            else:
                vs.append(e.shuffle(b.mul(xs, e.const(I32, 16, [_TR_INIT[kind]] * 16)), None, P))
            vs.append(e.shuffle(xd, None, P))
            bo = b.add(brow, b.mul(g, i64(_TR_GB)))
            for i, v in enumerate(vs):
                b.store(v, e.addr(bp, b.add(bo, i64(64 * i))), align=1)

        with cgutils.for_range(b, T) as tl:
            t = tl.index
            xrow, srow, brow = b.mul(t, xstride), b.mul(t, sstride), b.mul(t, bstride)
            def tail(g, rem):  # one group of the 4-block layout at super-group slot g
                _group_prep(e, TG, xp, xdp, xsp, bp, b.add(xrow, b.mul(g, i64(32 * _TR_NB))),
                            b.add(srow, b.mul(g, i64(4 * _TR_NB))), b.add(brow, b.mul(g, i64(_TR_GB))), rem)

            e.chunked(nb, _TR_NB, lambda g, rem: sgroup(xrow, srow, brow, g, rem), tail, _TR_TAIL[kind])
        return context.get_dummy_value()

    return codegen


def _tr_codegen(kind: str, R: int, U: int, prefetch: int = 0, pf_d: int = 0):
    """IR body of an R-row x U-token q4_0, q4_1 or q8_0 VNNI tile with whole blocks per i32 lane.

    Per super-group of 16 blocks and row: 4 zmm loads (A_k: blocks 4k..4k+3, one per 128-bit lane),
    a 4 x 4 dword transpose within each 128-bit lane (8 unpacks; T_j lane 4c+k = dword j of block
    4k+c, i.e. lane i holds block _TR_PERM[i]), lo/hi nibbles, the 16 fp16 scales converted and
    permuted; then per token 8 vpdpbusd into one <16 x i32> whose lanes are the blocks' exact
    integer dot products (started at -8 * xsum), and one sitofp, fmul(d, xd), fma per 16 blocks.
    Every tile of any shape (and the masked tail: missing blocks are zero weights, scales and
    activations, adding fma(0, 0, acc)) does the same float operations per lane, so a row's
    result does not depend on its tile. prefetch / pf_d as in _q_codegen (> 0 only).

    q4_1: no offset (the accumulator starts at 0); its m * xd * xsum per block (the prepared vector
    in init's place holds xd * xsum) is fma'd into the same lane after the d term.

    q8_0 (32 bytes a block): 8 registers per super-group (A_m: blocks 2m, 2m + 1, half a block per
    128-bit lane); the same transpose on A_0..3 and A_4..7, then 128-bit-lane selections
    (vshufi64x2) of the two results give registers whose lane i holds dword j of block
    _TR_PERM["q8_0"][i] (j = 0..7); the operand is w ^ 0x80 = w + 128 (unsigned), 8 vpdpbusd per
    token as for q4_0, and the accumulator starts at -128 * xsum."""
    P = _TR_PERM[kind]
    NREG = _TR_NREG[kind]
    DPB = 4 * NREG // 4  # weight dwords per block: 4 (q4_0) or 8 (q8_0)
    lo4 = lambda c: [4 * c, 16 + 4 * c, 4 * c + 1, 16 + 4 * c + 1]  # noqa: E731  (vpunpckldq)
    hi4 = lambda c: [4 * c + 2, 16 + 4 * c + 2, 4 * c + 3, 16 + 4 * c + 3]  # noqa: E731  (vpunpckhdq)
    UNPL = [i for c in range(4) for i in lo4(c)]
    UNPH = [i for c in range(4) for i in hi4(c)]
    QL = [i for c in range(4) for i in (4 * c, 4 * c + 1, 16 + 4 * c, 16 + 4 * c + 1)]  # vpunpcklqdq
    QH = [i for c in range(4) for i in (4 * c + 2, 4 * c + 3, 16 + 4 * c + 2, 16 + 4 * c + 3)]  # vpunpckhqdq
    W = 64 * NREG  # weight bytes per super-group and row
    # q8_0: 128-bit chunks 0, 2 / 1, 3 of two transposed registers
    C02 = [i for c in (0, 2) for i in range(4 * c, 4 * c + 4)] + [16 + i for c in (0, 2) for i in range(4 * c, 4 * c + 4)]
    C13 = [i for c in (1, 3) for i in range(4 * c, 4 * c + 4)] + [16 + i for c in (1, 3) for i in range(4 * c, 4 * c + 4)]
    V = _vec(I32, 16)

    def codegen(context, builder, signature, args):
        b = builder
        e = _Emit(b, "vnni")
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        wq, wstride, dp, mp, dstride, bp, bstride, op, ostride, nb = _tile_at(b, args)
        fz = ir.Constant(_vec(F32, 16), None)
        acc = [[cgutils.alloca_once_value(b, fz) for _ in range(U)] for _ in range(R)]
        m15 = e.const(I32, 16, [0x0F0F0F0F] * 16)
        sh4 = e.const(I32, 16, [4] * 16)
        m80 = e.const(I32, 16, [-0x7F7F7F80] * 16)  # 0x80808080

        def sgroup(g, rem):
            goff_w = b.mul(g, i64(W))
            goff_h = b.mul(g, i64(2 * _TR_NB))
            goff_b = b.mul(g, i64(_TR_GB))
            if prefetch > 0:  # the tiles' rows are one stream: R * W bytes per step, prefetch bytes ahead
                for i in range(R * W // 64):
                    e.prefetch(wq, b.add(b.mul(goff_w, i64(R)), i64(prefetch + 64 * i)), _PF_LOCALITY)
                if pf_d > 0:
                    for i in range((2 * _TR_NB * R + 63) // 64):
                        e.prefetch(dp, b.add(b.mul(goff_h, i64(R)), i64(pf_d + 64 * i)), _PF_LOCALITY)
                        if kind == "q4_1":
                            e.prefetch(mp, b.add(b.mul(goff_h, i64(R)), i64(pf_d + 64 * i)), _PF_LOCALITY)
            xb = [b.add(b.mul(i64(u), bstride), goff_b) for u in range(U)]
            mblk = None if rem is None else e.lanes_below(16, rem)
            nib, d, m = [], [], []
            for r in range(R):
                wo = b.add(b.mul(i64(r), wstride), goff_w)
                A = [e.load(wq, b.add(wo, i64(64 * k)), V,
                            None if rem is None else e.lanes_below(16, b.sub(b.mul(rem, I32(DPB)), I32(16 * k))))
                     for k in range(NREG)]

                def transpose4(a0, a1, a2, a3):
                    t01l, t01h = e.shuffle(a0, a1, UNPL), e.shuffle(a0, a1, UNPH)
                    t23l, t23h = e.shuffle(a2, a3, UNPL), e.shuffle(a2, a3, UNPH)
                    return [e.shuffle(t01l, t23l, QL), e.shuffle(t01l, t23l, QH),
                            e.shuffle(t01h, t23h, QL), e.shuffle(t01h, t23h, QH)]

                nr = []
                if kind != "q8_0":
                    for t in transpose4(*A):
                        nr.append(b.and_(t, m15))
                        nr.append(b.and_(b.lshr(t, sh4), m15))
                else:
                    S0, S1 = transpose4(*A[:4]), transpose4(*A[4:])
                    Tj = [e.shuffle(S0[j], S1[j], C02) for j in range(4)] + [e.shuffle(S0[j], S1[j], C13) for j in range(4)]
                    nr = [b.xor(t, m80) for t in Tj]
                nib.append(nr)
                d.append(e.shuffle(e.half4(dp, b.add(b.mul(i64(r), dstride), goff_h), 16, mblk), None, P))
                if kind == "q4_1":
                    m.append(e.shuffle(e.half4(mp, b.add(b.mul(i64(r), dstride), goff_h), 16, mblk), None, P))

            def dot(r, u, X):
                """X: the token's 10 prepared vectors (XL0 XH0 .. XL3 XH3, init, xd)"""
                a = ir.Constant(V, None) if kind == "q4_1" else X[8]
                for i in range(8):
                    a = e._vpdpbusd(a, nib[r][i], X[i])
                sc = b.fmul(d[r], X[9])
                v = e.fma(b.sitofp(a, _vec(F32, 16)), sc, b.load(acc[r][u]))
                if kind == "q4_1":  # + m * xd * xsum per block, into the same lane
                    v = e.fma(m[r], b.bitcast(X[8], _vec(F32, 16)), v)
                b.store(v, acc[r][u])

            if U == 1:
                # rows in turn, the token's vectors loaded once (10 registers) for the R rows
                X = [e.load(bp, b.add(xb[0], i64(64 * i)), V) for i in range(10)]
                X[9] = b.bitcast(X[9], _vec(F32, 16))
                for r in range(R):
                    dot(r, 0, X)
            else:
                # rows in turn, tokens inner: each prepared vector is used once per row and folds into
                # its vpdpbusd / vmulps as a memory operand (L1 hits: the U tokens' 640 U bytes of this
                # super-group are read by the R rows in a row), so the registers hold only one row's 8
                # nibble vectors, the scales and the R x U accumulators. The address passes through an
                # empty asm per row: LLVM would otherwise merge the rows' loads of a token's vectors into
                # values held across the rows, and spill them (seen in the assembly).
                for r in range(R):
                    bpr = bp if r == 0 else b.asm(ir.FunctionType(I64, [I64]), "", "=r,0", [bp], False)
                    for u in range(U):
                        X = [e.load(bpr, b.add(xb[u], i64(64 * i)), V) for i in range(10)]
                        X[9] = b.bitcast(X[9], _vec(F32, 16))
                        dot(r, u, X)

        def tail(g, rem):
            """The last rem <= _TR_TAIL blocks as one group of the 4-block tiles' layout (_group_prep):
            its sitofp(dot) * d * xd (q4_1: + m * xd * xsum, block k in lane k) is fma'd into the same
            accumulators, whose lanes are summed at the end whatever they hold."""
            nbt = _TR_TAIL[kind]
            lanes = [i // (16 // nbt) for i in range(16)]
            widen = [min(i, nbt) for i in range(16)]  # lanes >= nbt: 0.0 from the second operand
            goff_w = b.mul(g, i64(W))
            goff_h = b.mul(g, i64(2 * _TR_NB))
            goff_b = b.mul(g, i64(_TR_GB))
            if prefetch > 0:  # the stream goes on: R rows of at most 64 bytes each
                for i in range(R):
                    e.prefetch(wq, b.add(b.mul(goff_w, i64(R)), i64(prefetch + 64 * i)), _PF_LOCALITY)
                if pf_d > 0:
                    e.prefetch(dp, b.add(b.mul(goff_h, i64(R)), i64(pf_d)), _PF_LOCALITY)
                    if kind == "q4_1":
                        e.prefetch(mp, b.add(b.mul(goff_h, i64(R)), i64(pf_d)), _PF_LOCALITY)
            mw = e.lanes_below(64, b.mul(rem, I32(4 * DPB)))
            mblk = e.lanes_below(nbt, rem)
            nx = 1 if kind == "q8_0" else 2
            for r in range(R):
                w = e.load(wq, b.add(b.mul(i64(r), wstride), goff_w), _vec(I8, 64), mw)
                ho = b.add(b.mul(i64(r), dstride), goff_h)
                dl = e.shuffle(e.half4(dp, ho, nbt, mblk), None, lanes)
                if kind == "q4_1":
                    ml = e.shuffle(e.half4(mp, ho, nbt, mblk), ir.Constant(_vec(F32, nbt), None), widen)
                if kind == "q8_0":
                    ops = [b.xor(w, e.const(I8, 64, [-128] * 64))]
                else:
                    ops = [b.and_(w, e.const(I8, 64, [15] * 64)), b.lshr(w, e.const(I8, 64, [4] * 64))]
                for u in range(U):
                    bo = b.add(b.mul(i64(u), bstride), goff_b)
                    X = [e.load(bp, b.add(bo, i64(64 * i)), _vec(I8, 64)) for i in range(nx)]
                    iv = e.load(bp, b.add(bo, i64(64 * nx)), V)
                    xdl = e.load(bp, b.add(bo, i64(64 * (nx + 1))), _vec(F32, 16))
                    a = ir.Constant(V, None) if kind == "q4_1" else iv
                    for o, x in zip(ops, X):
                        a = e._vpdpbusd(a, o, x)
                    v = e.fma(b.sitofp(a, _vec(F32, 16)), b.fmul(dl, xdl), b.load(acc[r][u]))
                    if kind == "q4_1":
                        v = e.fma(ml, b.bitcast(iv, _vec(F32, 16)), v)
                    b.store(v, acc[r][u])

        e.chunked(nb, _TR_NB, sgroup, tail, _TR_TAIL[kind])
        for r in range(R):
            for u in range(U):
                b.store(e.hsum(b.load(acc[r][u])), e.addr(op, b.add(b.mul(i64(u), ostride), i64(4 * r))))
        return context.get_dummy_value()

    return codegen


def _transposed(kind: str, isa: str) -> bool:
    """q4_0 and q8_0 on VNNI run the whole-block-per-lane tiles (_tr_codegen)."""
    return kind in _TR_PERM and isa == "vnni"


def _make_tile(kind: str, isa: str, R: int, U: int, prefetch: int = 0, pf_d: int = 0, tr: bool = False):
    cg = _tr_codegen(kind, R, U, prefetch, pf_d) if tr else _q_codegen(kind, isa, R, U, prefetch, pf_d)
    return int_intrinsic(f"{isa}_{kind}_{'tr' if tr else 'tile'}_{R}x{U}",
                         "wq, wstride, dp, mp, dstride, bp, bstride, op, ostride, nb, n0, t0", cg)


def _make_prep(kind: str, isa: str, tr: bool = False):
    return int_intrinsic(f"{isa}_{kind}_{'trprep' if tr else 'prep'}", "xp, xstride, xdp, xsp, sstride, nb, T, bp, bstride",
                         _tr_prep_codegen(kind) if tr else _prep_codegen(kind, isa))


def _prefetch_range_codegen(context, builder, signature, args):
    base, n = args
    e = _Emit(builder, "")
    with cgutils.for_range(builder, builder.udiv(n, ir.Constant(I64, 64))) as loop:
        e.prefetch(base, builder.mul(loop.index, ir.Constant(I64, 64)), _PF_LOCALITY)
    return context.get_dummy_value()


@intrinsic
def _prefetch_range(typingctx, base, n):
    """Prefetch (into L2) the cache lines of n bytes from base: a stream's first PF bytes, which
    the tiles' own prefetches (PF bytes ahead of their loads) do not cover."""
    if not (isinstance(base, types.Integer) and isinstance(n, types.Integer)):
        return None
    return types.void(types.int64, types.int64), _prefetch_range_codegen


def group_bytes(kind: str, isa: str, tr: bool = False) -> tuple[int, int]:
    """(blocks per group, prepared activation bytes per group and token); tr: of the whole-block tiles."""
    if tr:
        return _TR_NB, _TR_GB
    g = _Geom(kind, isa)
    return g.nbg, g.GB


# Prefill (T > 1) tiles: R rows x U tokens (RT: R x 1 for the leftover tokens).
R_VNNI, U_VNNI = 4, 3
R_AVX2, U_AVX2 = 2, 2
# The whole-block tiles (_tr_codegen; q4_0, q4_1, q8_0 on VNNI): R rows x U tokens for prefill and (with
# 8, 4, 2, 1 tokens, prefetching) batched decode. Measured (1B shapes, one thread, cpu time on a
# loaded machine): 1 x 8 (the activations re-read per row: at K = 8192 and T = 16 they exceed L1)
# and 1 x 16 were slower at T = 16 than main; 4 x 3 / 4 x 8 spill the accumulators and were no
# better at T = 8; 2 x 8: T = 8 0.76x (gate) / 0.88x (down) main's time, prefill ~1.1-1.2x GFLOP/s.
R_Q40, U_Q40 = 2, 8
# T = 1 streams the weights once from memory. Long rows (nb >= NB_LONG blocks): one row at a
# time (the rows are contiguous, so the matrix is one sequential stream) with a software
# prefetch into L2 PF bytes ahead (measured here: ~1.3-1.7x the bandwidth of no prefetch or of
# 4 interleaved rows). Short rows: R1S rows per tile (per-row costs such as the masked tail and
# the final reduction are shared); the tiles are one stream too. VNNI: the short-row tiles
# prefetch PF_S bytes ahead and the scales PF_D bytes ahead, and each thread first prefetches
# the head of its range of rows (which the tiles' own prefetches do not reach). Measured here
# with the matrices in DRAM (SmolLM2 shapes, K = 576): ~1.3-1.5x the bandwidth of prefetching
# only the next tile (prefetcht0 instead of prefetcht1 was slower, 4 KiB distances slower,
# 8 KiB about the same).
# q8_0 (no partial group at K = 576): one row at a time for every K (NB_LONG_80), ~1.2x on the
# 49152 x 576 output matrix. The VNNI T = 1 row split and these choices do not change results:
# every row is computed by the same sequence of operations in any tile (see _JIT_PAR_STRICT).
R1S, PF, NB_LONG = 4, 16384, 32
PF_S, PF_D = 16384, 2048
# Batched decode (2 <= T <= T_SMALL tokens): too little work per weight tile to hide memory
# latency, so the tiles prefetch like the T = 1 stream, and a 2-token tail is one tile. Measured
# on the 1B shape at T = 8: 1.36x the rows per second of the prefill tiles (226 vs 307 ms a step).
T_SMALL = 16
NB_LONG_40, NB_LONG_41, NB_LONG_80 = NB_LONG, NB_LONG, 0

KINDS = ("q4_0", "q4_1", "q8_0")
# the tiles of each ISA by name: (R rows, U tokens, prefetch, pf_d) (see _q_codegen)
TILE_SHAPES = {
    "vnni": dict(RU=(R_VNNI, U_VNNI, 0, 0), R1=(1, 1, PF, PF_D), RS=(R1S, 1, PF_S, PF_D), RT=(R_VNNI, 1, 0, 0),
                 RUp=(R_VNNI, U_VNNI, PF_S, PF_D), R2p=(R_VNNI, 2, PF_S, PF_D), RTp=(R_VNNI, 1, PF_S, PF_D),
                 OU=(1, U_VNNI, 0, 0), O1=(1, 1, 0, 0)),
    "avx2": dict(RU=(R_AVX2, U_AVX2, 0, 0), R1=(1, 1, PF, 0), RS=(R1S, 1, -1, 0), RT=(R_AVX2, 1, 0, 0),
                 OU=(1, U_AVX2, 0, 0), O1=(1, 1, 0, 0)),
}
# the whole-block tiles by name (R x U as above; their batched-decode tiles R8p .. RTp: see _SMALL_Q40)
TILE_SHAPES_Q40 = dict(R1=(1, 1, PF, PF_D), RS=(R1S, 1, PF_S, PF_D), O1=(1, 1, 0, 0),
                       RU=(R_Q40, U_Q40, 0, 0), RT=(R_Q40, 1, 0, 0), OU=(1, U_Q40, 0, 0),
                       R8p=(R_Q40, 8, PF_S, PF_D), R4p=(R_Q40, 4, PF_S, PF_D),
                       R2p=(R_Q40, 2, PF_S, PF_D), RTp=(R_Q40, 1, PF_S, PF_D))
# the (R, U) names each runner uses
# The whole-block tiles process a partial last group of more than _TR_TAIL blocks at the cost of a
# whole one (masked), which made K = 576 (18 blocks) 1.2-1.3x slower than the 4-block groups at
# T = 1; a tail of at most _TR_TAIL blocks is one 4-block group (q8_0: 2). A matrix runs them when
# its rows are whole groups plus such a tail, or long enough (nb >= NB_TR) for a masked group to
# cost <= 1/8 more, otherwise the 4-block tiles. SmolLM2's K = 576 (16 + 2 blocks), from memory,
# one thread, against the 4-block tiles: q4_1 1536 x 576 at 8 / 16 tokens 0.86 / 0.80 of the time,
# 64 tokens 0.94-0.99, one token the same. The choice depends only on K, so a row's result still
# does not depend on T or its tile.
NB_TR = 128


def tile_shapes(isa: str, kind: str, tr: bool = False) -> dict:
    return TILE_SHAPES_Q40 if tr else TILE_SHAPES[isa]


NB_LONG_OF = {"vnni": {"q4_0": NB_LONG_40, "q4_1": NB_LONG_41, "q8_0": NB_LONG_80},
              "avx2": {k: NB_LONG for k in KINDS}}


# ----------------------------------------------------------------------------
# The runners, one per ISA and kind, generated from the templates below into a file (numba
# caches only functions in files) with the tiles bound by name (``<isa>_<kind>_<shape>``).
# q4_1 runs without fastmath (_JIT_PAR_STRICT): a row's result must not depend on its tile.
# The array-typed entry points (one compilation per array type, e.g. read-only memmaps) only
# check shapes and call the pointer-typed parallel runner (compiled once).
# ----------------------------------------------------------------------------
_HEAD = """

@njit({flags})
def run_{P}(wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, N, T):
    R, U = {RN}, {UN}
    bstride = (nb + {nbg} - 1) // {nbg} * {gb}
    buf = np.empty(max(1, T * bstride), np.uint8)  # prepared activations (see _prep_codegen)
    {P}_prep(xp, xstride, xdp, xsp, sstride, nb, T, buf.ctypes.data, bstride)
    a = (wq, wstride, dp, mp, dstride, buf.ctypes.data, bstride, op, ostride, nb)
"""
_RUN_VNNI = _HEAD + """\
    if T == 1:
        # one contiguous range of rows per thread; each starts by prefetching the head of its streams
        rt = 1 if nb >= {nb_long} else R1S
        ntiles = (N + rt - 1) // rt
        nch = max(1, min(_iget_num_threads(), ntiles))
        for c in prange(nch):
            n0 = c * ntiles // nch * rt
            n1 = min(N, (c + 1) * ntiles // nch * rt)
            _prefetch_range(wq + n0 * wstride, min(PF if rt == 1 else PF_S, (n1 - n0) * wstride))
            _prefetch_range(dp + n0 * dstride, min(PF_D, (n1 - n0) * dstride)){pf_m}
            if rt == 1:
                for n in range(n0, n1):
                    {P}_R1(*a, n, 0)
            else:
                n = n0
                while n + R1S <= n1:
                    {P}_RS(*a, n, 0)
                    n += R1S
                for n in range(n, n1):
                    {P}_O1(*a, n, 0)
    elif T <= T_SMALL:
        # a few tokens (batched decode): compute per weight tile is small, so the tiles stream the
        # weights with the same prefetch as T = 1, and a tail of 2 tokens is one tile, not two
        for i in prange((N + R - 1) // R):
            n0 = i * R
            if n0 + R <= N:
{small}
            else:
                for n in range(n0, N):
                    for t in range(T):
                        {P}_O1(*a, n, t)
    else:
{loop}    return buf.size  # keeps buf alive until the tiles are done
"""
_RUN_AVX2 = _HEAD + """\
    if T == 1 and nb >= {nb_long}:
        for n in prange(N):
            {P}_R1(*a, n, 0)
    elif T == 1:
        for i in prange((N + R1S - 1) // R1S):
            n0 = i * R1S
            if n0 + R1S <= N:
                {P}_RS(*a, n0, 0)
            else:
                for n in range(n0, N):
                    {P}_O1(*a, n, 0)
    else:
{loop}    return buf.size  # keeps buf alive until the tiles are done
"""
_RUN = {"vnni": _RUN_VNNI, "avx2": _RUN_AVX2}
# the tokens of a batched-decode row tile: U at a time, then a 2-token tile, then 1
_SMALL = """\
                t0 = 0
                while t0 + U <= T:
                    {P}_RUp(*a, n0, t0)
                    t0 += U
                if T - t0 == 2:
                    {P}_R2p(*a, n0, t0)
                elif T - t0 == 1:
                    {P}_RTp(*a, n0, t0)
"""
# the whole-block tiles: 8, 4, 2 and 1 tokens per tile (the rows' transposes are redone per tile)
_SMALL_Q40 = """\
                t0 = 0
                while t0 + 8 <= T:
                    {P}_R8p(*a, n0, t0)
                    t0 += 8
                if T - t0 >= 4:
                    {P}_R4p(*a, n0, t0)
                    t0 += 4
                if T - t0 >= 2:
                    {P}_R2p(*a, n0, t0)
                    t0 += 2
                if T - t0 == 1:
                    {P}_RTp(*a, n0, t0)
"""
# VNNI q4_1 also prefetches the head of its m stream
_PF_M = "\n            _prefetch_range(mp + n0 * dstride, min(PF_D, (n1 - n0) * dstride))"


# q4_0 / q4_1 / q8_0 on VNNI: the runner of the whole-block tiles (``<P>t``) or of the 4-block ones (``<P>g``) by K
_DISPATCH = """

@njit({flags})
def run_{P}(wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, N, T):
    if nb % {nbg} <= {tail} or nb >= NB_TR:
        return run_{P}t(wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, N, T)
    return run_{P}g(wq, wstride, dp, mp, dstride, xp, xstride, xdp, xsp, sstride, op, ostride, nb, N, T)
"""


def _runner(isa: str, kind: str, P: str, tr: bool) -> str:
    nbg, gb = group_bytes(kind, isa, tr)
    return _RUN[isa].format(small=(_SMALL_Q40 if tr else _SMALL).format(P=P),
                            flags=runners.flags(_JIT_PAR_STRICT if kind == "q4_1" else _JIT_PAR), P=P,
                            RN="R_Q40" if tr else f"R_{isa.upper()}", UN="U_Q40" if tr else f"U_{isa.upper()}",
                            nbg=nbg, gb=gb, nb_long=NB_LONG_OF[isa][kind], pf_m=_PF_M if kind == "q4_1" else "",
                            loop=runners.row_tiles(8, f"{P}_RU", f"{P}_RT", f"{P}_OU", f"{P}_O1"))


def _source() -> str:
    src = runners.HEADER.format(by=__name__) + "import numpy as np\n"
    for isa in TILE_SHAPES:
        for kind in KINDS:
            P = f"{isa}_{kind}"
            if _transposed(kind, isa):
                src += _runner(isa, kind, P + "g", False) + _runner(isa, kind, P + "t", True)
                src += _DISPATCH.format(flags=runners.flags(_JIT), P=P, nbg=_TR_NB, tail=_TR_TAIL[kind])
            else:
                src += _runner(isa, kind, P, False)
            src += runners.q_entry(f"{isa}_matmul_{kind}_q8_0", runners.flags(_JIT), kind, f"run_{P}")
    return src


def _names() -> dict:
    """What the generated runners use: the tiles (``<isa>_<kind>_<shape>``, ``_prep``), checks, constants."""
    names = dict(check_q=check_q, _prefetch_range=_prefetch_range, _iget_num_threads=_iget_num_threads,
                 R1S=R1S, PF=PF, PF_S=PF_S, PF_D=PF_D, T_SMALL=T_SMALL,
                 R_VNNI=R_VNNI, U_VNNI=U_VNNI, R_AVX2=R_AVX2, U_AVX2=U_AVX2, R_Q40=R_Q40, U_Q40=U_Q40, NB_TR=NB_TR)
    for isa in TILE_SHAPES:
        for kind in KINDS:
            both = _transposed(kind, isa)
            for tr in (False, True) if both else (False,):
                P = f"{isa}_{kind}" + (("t" if tr else "g") if both else "")
                names[f"{P}_prep"] = _make_prep(kind, isa, tr)
                for shape, (R, U, pf, pf_d) in tile_shapes(isa, kind, tr).items():
                    names[f"{P}_{shape}"] = _make_tile(kind, isa, R, U, pf, pf_d, tr)
    return names


_gen = jitcache.load_generated("x86", "x86_run", _source(), _names())
for _isa in TILE_SHAPES:  # the entry points: vnni_matmul_q4_0_q8_0, ..., avx2_matmul_q8_0_q8_0
    for _kind in KINDS:
        globals()[f"{_isa}_matmul_{_kind}_q8_0"] = getattr(_gen, f"{_isa}_matmul_{_kind}_q8_0")


# activation quantization and float matmuls: the portable kernels (LLVM vectorizes them for the host)
vnni_quantize_q8_0 = avx2_quantize_q8_0 = portable.quantize_q8_0
vnni_matmul_f16_f32 = avx2_matmul_f16_f32 = portable.matmul_f16_f32
vnni_matmul_f32_f32 = avx2_matmul_f32_f32 = portable.matmul_f32_f32


# the 5-bit, K-quant and MXFP4 types: kquant.py (vpdpbusd / vpmaddubsw on codes in element order)
from mpillm.kernels.kquant import (avx2_matmul_mxfp4_q8_0, avx2_matmul_q4_K_q8_0, avx2_matmul_q5_0_q8_0, avx2_matmul_q5_1_q8_0, avx2_matmul_q5_K_q8_0, avx2_matmul_q6_K_q8_0, vnni_matmul_mxfp4_q8_0, vnni_matmul_q4_K_q8_0, vnni_matmul_q5_0_q8_0, vnni_matmul_q5_1_q8_0, vnni_matmul_q5_K_q8_0, vnni_matmul_q6_K_q8_0)
# Q2_K and Q3_K: lowk.py
from mpillm.kernels.lowk import (avx2_matmul_q2_K_q8_0, avx2_matmul_q3_K_q8_0, vnni_matmul_q2_K_q8_0,  # noqa: E402,F401
                                 vnni_matmul_q3_K_q8_0)
# the IQ4 types: iquant.py
from mpillm.kernels.iquant import (avx2_matmul_iq4_nl_q8_0, avx2_matmul_iq4_xs_q8_0, vnni_matmul_iq4_nl_q8_0, vnni_matmul_iq4_xs_q8_0)  # noqa: E402,F401
# q4_0 / q4_1 / q8_0 / q4_K / q6_K / q2_K / q3_K with 16 rows interleaved (the runtime repacks them on VNNI): interleaved.py
from mpillm.kernels.interleaved import (vnni_matmul_q2_K_r16_q8_0, vnni_matmul_q3_K_r16_q8_0,  # noqa: E402,F401
                                        vnni_matmul_q4_0_r16_q8_0, vnni_matmul_q4_1_r16_q8_0,
                                        vnni_matmul_q4_K_r16_q8_0, vnni_matmul_q6_K_r16_q8_0,
                                        vnni_matmul_q8_0_r16_q8_0)
