"""q4_0 / q4_1 / q8_0 / q4_K with 16 weight rows interleaved per register (VNNI): the layout that
makes a step of several rows cheap.

The split layout keeps a row's blocks in the lanes of a register, so a (row, token) dot product
ends in a horizontal sum, and a step of k rows redoes the activation preparation and the sums k
times (a step of 8 rows reached about 22% of the ``vpdpbusd`` peak, docs/performance.md). Here a
matrix is stored per group of 16 rows and per 32-weight block: the block's codes of the 16 rows,
register c holding bytes 4c..4c+3 of each row's block (4 registers of 64 bytes; q8_0: 8), and
their 16 fp16 scales (q4_1: and mins) beside them:

    qs (G, nb, 256 | 512) uint8    d (G, nb, 16) fp16 bits    [m (G, nb, 16)]    G = ceil(N / 16)

A token's activation dword is broadcast into ``vpdpbusd`` against such a register, so lane r
accumulates row r's exact integer dot product of the block; one conversion, one multiply by
d * xd and one fma per (16 rows, token, block) follow: no horizontal sums, no tail groups, and
the codes are unpacked once per (16 rows, block) for all the tokens of a tile (8, 4, 2, 1).
q4_0 starts the integer sum at -8 xsum, q8_0 (stored as w + 128) at -128 xsum, q4_1 adds
m * xd * xsum per block.

q4_K (and q4_K_32, the same values cut at a 32-column boundary) has q4_1's codes per block, one
6-bit scale and min per block and the fp16 d and dmin per super-block of 8 blocks (q4_K_32: per
block); they are kept as stored, per group of 16 rows:

    qs (G, nb, 256)    sc, mn (G, nb, 16) uint8    d, dmin (G, nb / 8 | nb, 16) fp16 bits

so the bytes are the split layout's. Per (16 rows, block) the kernel forms d * sc and
-(dmin * mn) (exact in float32) and goes on as q4_1 with them as the scale and the min. Every lane runs the same operations in any tile, so a row's result does
not depend on its batch, its tile, the thread count or its rank's row range; it differs from the
split-layout kernels' in the order of float additions only. The rows past N in the last group are
zero and are never stored (masked store).

The runtime repacks the shards' split arrays into this layout when it loads a model on the VNNI
path (``repack``; mpillm.runtime.model), as llama.cpp repacks Q4_0 for its CPU backends; the shards
themselves keep the split layout, which every node of a mixed cluster reads. ``MPILLM_REPACK=0``
keeps the memory-mapped split layout.
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.np.ufunc.parallel import _iget_num_threads  # the thread count, cacheable (no ctypes global)

from mpillm.kernels import jitcache, runners
from mpillm.kernels.checks import check_r16, check_r16k
from mpillm.kernels.irgen import F16, F32, I1, I8, I16, I32, I64, PTR, VNNI_BYTE_OPERANDS, Emit, int_intrinsic, vec

ROWS = 16  # weight rows per register
KINDS = ("q4_0", "q4_1", "q8_0", "q4_K", "q4_K_32")
RTYPE = {k: f"{k[:4]}_r16" for k in KINDS}  # split type -> interleaved type (q4_K_32 and q4_K share one)
BASE = {"q4_0_r16": "q4_0", "q4_1_r16": "q4_1", "q8_0_r16": "q8_0", "q4_K_r16": "q4_K"}
RKINDS = tuple(BASE.values())  # the kernels' kinds
# the interleaved types' arrays, in the order the kernels take them (as mpillm.formats.quant.ARRAYS)
ARRAYS = {"q4_0_r16": (("qs", "uint8"), ("d", "float16")),
          "q4_1_r16": (("qs", "uint8"), ("d", "float16"), ("m", "float16")),
          "q8_0_r16": (("qs", "uint8"), ("d", "float16")),
          "q4_K_r16": (("qs", "uint8"), ("sc", "uint8"), ("mn", "uint8"), ("d", "float16"), ("dmin", "float16"))}
GBYTES = {"q4_0": 256, "q4_1": 256, "q8_0": 512, "q4_K": 256}  # code bytes per (16 rows, block)
# A batched step streams the weights once for all tokens: tiles of 2+ tokens prefetch PF bytes ahead
# in the code stream (and PF / 8 in the scales); one token is fastest without (measured from memory,
# one thread: benchmarks/results/interleaved_layout_2026-12-07.json and docs/performance.md).
PF = 16384
TILE_TOKENS = (8, 4, 2, 1)
CHAINS = {8: 1, 4: 1, 2: 2, 1: 4}  # independent vpdpbusd chains per token of a tile of U tokens
# rows of groups per pass over a thread's range: a pass's weights (about CHUNK bytes) stay in L2
# while every token tile of a step reads them
CHUNK = 262144
ENV = "MPILLM_REPACK"


def wanted(path: str) -> bool:
    """Whether the runtime repacks q4_0 / q4_1 / q8_0 / q4_K weights on kernel path ``path``."""
    return path == "vnni" and os.environ.get(ENV, "1").strip() != "0"


# ----------------------------------------------------------------------------------------------
# The layout (numpy): split arrays <-> interleaved arrays
# ----------------------------------------------------------------------------------------------
def _kind(wtype: str) -> str:
    return wtype[:4]  # q4_K_32 -> q4_K


def repack(wtype: str, arrays: dict) -> tuple[str, dict]:
    """(interleaved type, arrays) of a q4_0 / q4_1 / q8_0 / q4_K(_32) matrix's split arrays (N, ...)
    or a stack of them (E, N, ...); the rows are padded to whole groups of 16 with zero codes and
    scales. Every per-row array of scales (N, n) becomes (G, n, 16): q4_K's d and dmin keep their
    one value per super-block (q4_K_32: per block), its sc and mn one byte per block."""
    kind = _kind(wtype)
    q = np.asarray(arrays["qs"])
    lead, N = q.shape[:-2], q.shape[-2]
    nb = q.shape[-1] // (32 if kind == "q8_0" else 16)
    G = -(-N // ROWS)
    pad = [(0, 0)] * len(lead) + [(0, G * ROWS - N), (0, 0)]
    if kind == "q8_0":  # w + 128 as an unsigned byte (vpdpbusd's unsigned operand)
        u = np.pad(q.view(np.uint8) ^ np.uint8(0x80), pad).reshape(*lead, G, ROWS, nb, 8, 4)
    else:  # byte j of a block: element j (low nibble) and j + 16 (high)
        u = np.pad(q, pad).reshape(*lead, G, ROWS, nb, 4, 4)
    n = len(lead)
    order = tuple(range(n)) + (n, n + 2, n + 3, n + 1, n + 4)  # (G, nb, register, row, byte)
    out = {"qs": np.ascontiguousarray(u.transpose(order)).reshape(*lead, G, nb, GBYTES[kind])}

    def scales(a):
        a = np.asarray(a)
        s = a.view(np.uint16) if a.dtype == np.float16 else a
        s = np.pad(s, pad).reshape(*lead, G, ROWS, s.shape[-1])
        return np.ascontiguousarray(np.swapaxes(s, -1, -2)).view(a.dtype)

    for k, _ in ARRAYS[RTYPE[wtype]][1:]:
        out[k] = scales(arrays[k])
    return RTYPE[wtype], out


def unpack(rtype: str, arrays: dict, N: int) -> tuple[str, dict]:
    """The split arrays (N rows) and type of an interleaved 2-D matrix: ``repack``'s inverse (q4_K_r16:
    q4_K when d holds one value per 8 blocks, else q4_K_32)."""
    kind = BASE[rtype]
    qs = np.asarray(arrays["qs"])
    G, nb = qs.shape[0], qs.shape[1]
    regs = GBYTES[kind] // 64
    u = qs.reshape(G, nb, regs, ROWS, 4).transpose(0, 3, 1, 2, 4).reshape(G * ROWS, nb * regs * 4)[:N]
    out = {"qs": (u ^ np.uint8(0x80)).view(np.int8) if kind == "q8_0" else u.copy()}
    for k, _ in ARRAYS[rtype][1:]:
        a = np.asarray(arrays[k])
        s = a.view(np.uint16) if a.dtype == np.float16 else a
        out[k] = np.ascontiguousarray(s.transpose(0, 2, 1).reshape(G * ROWS, s.shape[1])[:N]).view(a.dtype)
    if kind == "q4_K" and np.asarray(arrays["d"]).shape[1] * 8 != nb:
        kind = "q4_K_32"
    return kind, out


# ----------------------------------------------------------------------------------------------
# The tiles: U tokens x the groups g0..g1 of a matrix (LLVM IR)
# ----------------------------------------------------------------------------------------------
PARAMS = "wp, dp, mp, sp, np_, dsh, g0, g1, nb, xp, xstride, xsp, xdp, sstride, t0, op, ostride, N"


def _codegen(kind: str, U: int, prefetch: int):
    q8, qk = kind == "q8_0", kind == "q4_K"
    mins = kind in ("q4_1", "q4_K")  # a per-block min term: m * xd * xsum
    gbytes = GBYTES[kind]

    def codegen(context, b, sig, args):
        # q4_K: dp, mp = d, dmin (G, nd, 16) with nd = nb >> dsh (dsh 3: one per super-block; 0:
        # q4_K_32), sp, np_ = sc, mn (G, nb, 16) bytes; the others: dp, mp = d, m (G, nb, 16)
        wp, dp, mp, sp, np_, dsh, g0, g1, nb, xp, xstride, xsp, xdp, sstride, t0, op, ostride, N = args
        e = Emit(b)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        V, VB, F = vec(I32, 16), vec(I8, 64), vec(F32, 16)
        opnd = VB if VNNI_BYTE_OPERANDS else V
        dot = e.decl("llvm.x86.avx512.vpdpbusd.512", V, [V, opnd, opnd])
        mstore = e.decl("llvm.masked.store.v16f32.p0", ir.VoidType(), [F, PTR, I32, vec(I1, 16)])
        m15 = e.const(I32, 16, [0x0F0F0F0F] * 16)
        sh4 = e.const(I32, 16, [4] * 16)
        acc = [cgutils.alloca_once(b, F) for _ in range(U)]
        xoffs = [4 * c for c in range(8)] if q8 else [4 * c for c in range(4)] + [16 + 4 * c for c in range(4)]
        # per token: the row offsets of its activations and of its scale sums
        xrow = [b.mul(b.add(t0, i64(u)), xstride) for u in range(U)]
        srow = [b.mul(b.add(t0, i64(u)), sstride) for u in range(U)]
        with cgutils.for_range_slice(b, g0, g1, i64(1)) as (g, _):
            for a in acc:
                b.store(ir.Constant(F, None), a)
            with cgutils.for_range(b, nb) as bl:
                blk = bl.index
                gb = b.add(b.mul(g, nb), blk)  # (group, block) index in the stream
                wo = b.mul(gb, i64(gbytes))
                if prefetch:  # into L2 (the weights are read once)
                    for line in range(gbytes // 64):
                        e.prefetch(wp, b.add(wo, i64(prefetch + 64 * line)), 2)
                    if qk:  # the super-blocks' d and dmin: 1 / 8 of the scale bytes (the hardware follows them)
                        for base in (sp, np_):
                            e.prefetch(base, b.add(b.mul(gb, i64(16)), i64(prefetch // 16)), 2)
                    else:
                        for base in (dp, mp) if mins else (dp,):
                            e.prefetch(base, b.add(b.mul(gb, i64(32)), i64(prefetch // 8)), 2)
                if q8:
                    W = [e.load(wp, b.add(wo, i64(64 * c)), V) for c in range(8)]
                else:
                    raw = [e.load(wp, b.add(wo, i64(64 * c)), V) for c in range(4)]
                    W = [b.and_(r, m15) for r in raw] + [b.and_(b.lshr(r, sh4), m15) for r in raw]
                if VNNI_BYTE_OPERANDS:
                    W = [b.bitcast(w, VB) for w in W]

                def half16(base, i):
                    h = e.load(base, b.mul(i, i64(32)), vec(I16, 16))
                    return b.fpext(b.bitcast(h, vec(F16, 16)), F)

                if qk:  # per row: d * sc and -(dmin * mn) of this block (exact in float32)
                    di = b.add(b.mul(g, b.lshr(nb, dsh)), b.lshr(blk, dsh))

                    def byte16(base):
                        return b.uitofp(b.zext(e.load(base, b.mul(gb, i64(16)), vec(I8, 16)), vec(I32, 16)), F)

                    d = b.fmul(half16(dp, di), byte16(sp))
                    m = b.fneg(b.fmul(half16(mp, di), byte16(np_)))
                else:
                    d = half16(dp, gb)
                    m = half16(mp, gb) if mins else None
                bx = b.mul(blk, i64(32))
                bs = b.mul(blk, i64(4))
                for u in range(U):
                    so = b.add(srow[u], bs)
                    xs = e.load(xsp, so, I32)
                    # CHAINS[U] independent vpdpbusd chains (one token has no other work to overlap the
                    # 8 dependent ones with), summed as integers: exact, so a row's result is the same in any tile
                    ch = [ir.Constant(V, None) for _ in range(CHAINS[U])]
                    if not mins:
                        ch[0] = e.splat(b.mul(xs, I32(-128 if q8 else -8)), 16)
                    xb = b.add(xrow[u], bx)
                    for c in range(8):
                        x = e.splat(e.load(xp, b.add(xb, i64(xoffs[c])), I32), 16)
                        k = c % len(ch)
                        ch[k] = b.call(dot, [ch[k], W[c], b.bitcast(x, opnd) if VNNI_BYTE_OPERANDS else x])
                    a = ch[0]
                    for c in ch[1:]:
                        a = b.add(a, c)
                    xd = e.load(xdp, so, F32)
                    v = e.fma(b.sitofp(a, F), b.fmul(d, e.splat(xd, 16)), b.load(acc[u]))
                    if m is not None:
                        v = e.fma(m, e.splat(b.fmul(xd, b.sitofp(xs, F32)), 16), v)
                    b.store(v, acc[u])
            # the 16 rows' results of each token; the last group of a matrix may be partial
            left = b.trunc(b.sub(N, b.mul(g, i64(ROWS))), I32)
            mask = e.lanes_below(16, left)
            for u in range(U):
                dst = e.addr(op, b.add(b.mul(b.add(t0, i64(u)), ostride), b.mul(g, i64(4 * ROWS))))
                b.call(mstore, [b.load(acc[u]), dst, I32(4), mask])
        return context.get_dummy_value()

    return codegen


def _tile_name(kind: str, U: int, prefetch: bool) -> str:
    return f"ilv_{kind}_{U}{'p' if prefetch else ''}"


# ----------------------------------------------------------------------------------------------
# The runners and entry points (generated source: numba caches only functions in files)
# ----------------------------------------------------------------------------------------------
_RUN = """

@njit({flags})
def run_{kind}(wp, dp, mp, sp, np_, dsh, G, nb, xp, xstride, xsp, xdp, sstride, op, ostride, N, T):
    # one contiguous range of groups per thread, in passes of about CHUNK bytes of weights that
    # every token tile of the step reads while they are in L2
    nch = max(1, min(_iget_num_threads(), G))
    per = max(1, CHUNK // max(1, nb * {gbytes}))
    for c in prange(nch):
        g0 = c * G // nch
        g1 = (c + 1) * G // nch
        while g0 < g1:
            ge = min(g1, g0 + per)
            if T == 1:
                {k}_1(wp, dp, mp, sp, np_, dsh, g0, ge, nb, xp, xstride, xsp, xdp, sstride, 0, op, ostride, N)
            else:
                t0 = 0
                while t0 + 8 <= T:
                    {k}_8p(wp, dp, mp, sp, np_, dsh, g0, ge, nb, xp, xstride, xsp, xdp, sstride, t0, op, ostride, N)
                    t0 += 8
                if T - t0 >= 4:
                    {k}_4p(wp, dp, mp, sp, np_, dsh, g0, ge, nb, xp, xstride, xsp, xdp, sstride, t0, op, ostride, N)
                    t0 += 4
                if T - t0 >= 2:
                    {k}_2p(wp, dp, mp, sp, np_, dsh, g0, ge, nb, xp, xstride, xsp, xdp, sstride, t0, op, ostride, N)
                    t0 += 2
                if T - t0 == 1:
                    {k}_1p(wp, dp, mp, sp, np_, dsh, g0, ge, nb, xp, xstride, xsp, xdp, sstride, t0, op, ostride, N)
            g0 = ge


@njit({entry})
def vnni_matmul_{kind}_r16_q8_0({args}xq, xd, xsum, out):
    {check}
    run_{kind}(qs.ctypes.data, {ptrs}, qs.shape[0], qs.shape[1], xq.ctypes.data, xq.strides[0],
               xsum.ctypes.data, xd.ctypes.data, xd.strides[0], out.ctypes.data, out.strides[0], out.shape[1],
               xq.shape[0])
"""
# per kernel kind: its entry's weight arguments, shape check, and the runner's pointers dp, mp, sp, np_, dsh
_ENTRY = {
    "q4_0": ("qs, d, ", "check_r16(qs, d, d, xq, xd, xsum, out, 256)", "d.ctypes.data, 0, 0, 0, 0"),
    "q8_0": ("qs, d, ", "check_r16(qs, d, d, xq, xd, xsum, out, 512)", "d.ctypes.data, 0, 0, 0, 0"),
    "q4_1": ("qs, d, m, ", "check_r16(qs, d, m, xq, xd, xsum, out, 256)", "d.ctypes.data, m.ctypes.data, 0, 0, 0"),
    "q4_K": ("qs, sc, mn, d, dmin, ", "dsh = check_r16k(qs, sc, mn, d, dmin, xq, xd, xsum, out)",
             "d.ctypes.data, dmin.ctypes.data, sc.ctypes.data, mn.ctypes.data, dsh"),
}
# no fastmath: every lane must run the same float operations in every tile
_JIT_PAR = dict(cache=True, nogil=True, parallel=True)
_JIT = dict(cache=True, nogil=True)


def _source() -> str:
    src = runners.HEADER.format(by=__name__)
    for kind in RKINDS:
        args, check, ptrs = _ENTRY[kind]
        src += _RUN.format(flags=runners.flags(_JIT_PAR), entry=runners.flags(_JIT), kind=kind, k=f"ilv_{kind}",
                           gbytes=GBYTES[kind], args=args, check=check, ptrs=ptrs)
    return src


def _names() -> dict:
    names = dict(check_r16=check_r16, check_r16k=check_r16k, _iget_num_threads=_iget_num_threads, CHUNK=CHUNK)
    for kind in RKINDS:
        for U in TILE_TOKENS:
            for p in (False, True):
                if U == 1 or p:  # one token: alone without prefetch, the last of a batch with; several: with
                    names[_tile_name(kind, U, p)] = int_intrinsic(_tile_name(kind, U, p), PARAMS,
                                                                  _codegen(kind, U, PF if p else 0))
    return names


_gen = jitcache.load_generated("x86", "interleaved_run", _source(), _names())
vnni_matmul_q4_0_r16_q8_0 = _gen.vnni_matmul_q4_0_r16_q8_0
vnni_matmul_q4_1_r16_q8_0 = _gen.vnni_matmul_q4_1_r16_q8_0
vnni_matmul_q8_0_r16_q8_0 = _gen.vnni_matmul_q8_0_r16_q8_0
vnni_matmul_q4_K_r16_q8_0 = _gen.vnni_matmul_q4_K_r16_q8_0
