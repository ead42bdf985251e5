"""q4_0 / q4_1 / q8_0 / q4_K / q6_K / q2_K / q3_K with 16 weight rows interleaved per register (VNNI):
the layout that makes a step of several rows cheap.

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
-(dmin * mn) (exact in float32) and goes on as q4_1 with them as the scale and the min.

q6_K (and q6_K_32) keeps its low 4 bits as q4_1's codes and its high 2 bits in two more registers
per (16 rows, block), byte 4r + k of register h holding those of row r's elements 4c + k for the
four code registers c = 4h .. 4h + 3 (``_high_bits``), so one shift and one mask put them under
each code register's nibbles; its int8 scales (one per 16 elements) and fp16 d as stored:

    qs (G, nb, 256)    qh (G, nb, 128)    sc (G, 2 nb, 16) int8    d (G, nb / 8 | nb, 16) fp16 bits

Each half block is its own integer sum (4 vpdpbusd) started at -32 x the sum of its 16
activations (taken once per call, for all groups), times d * sc of that half.

q2_K (and q2_K_32) keeps its 2-bit codes as two registers per (16 rows, block), one per 16-element
half (sub-block): row r's dword h of the split layout's 8 bytes per block (byte 4h + m holds
elements 16h + 4k + m at bits 2k, mpillm.formats.quant) goes to lane r of register h, so one shift
by 2k and a mask give register c = 4h + k's codes, elements 4c .. 4c + 3 in each lane, as the
other types' registers hold them; its scale / min bytes (one per 16 elements) and fp16 d and dmin
as stored:

    qs (G, nb, 128)    sc (G, 2 nb, 16) uint8 (scale | min << 4)    d, dmin (G, nb / 8 | nb, 16) fp16 bits

Each half block is its own integer sum (4 vpdpbusd, from 0: the codes are unsigned); the two
sums times their scales and the two mins times the halves' activation sums (as q6_K's halves take
them) are added as integers, then times d and -dmin.

q3_K (and q3_K_32) keeps the low 2 bits of its 3-bit codes c as q2_K's two registers and the
high bits in one more, byte k of lane r holding those of row r's elements 4c + k at bit c
(c = 0..7), so a shift and a mask put them at bit 2 under code register c; its int8 scales (one
per 16 elements, minus 32) and fp16 d as stored:

    qs (G, nb, 128)    qh (G, nb, 64)    sc (G, 2 nb, 16) int8    d (G, nb / 8 | nb, 16) fp16 bits

Each half block's integer sum starts at -4 x the half's activation sum (the codes' offset); the
two sums times their scales are added as integers, then times d.

Every lane runs the same operations in any tile, so a row's result does not depend on its batch,
its tile, the thread count or its rank's row range; it differs from the split-layout kernels' in
the order of float additions only. The rows past N in the last group are
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

from mpillm.formats import quant
from mpillm.kernels import jitcache, runners
from mpillm.kernels.checks import check_r16, check_r16k, check_r16q2, check_r16q3, check_r16q6
from mpillm.kernels.irgen import F16, F32, I1, I8, I16, I32, I64, PTR, VNNI_BYTE_OPERANDS, Emit, int_intrinsic, vec

ROWS = 16  # weight rows per register
KINDS = ("q4_0", "q4_1", "q8_0", "q4_K", "q4_K_32", "q6_K", "q6_K_32", "q2_K", "q2_K_32", "q3_K", "q3_K_32")
RTYPE = {k: f"{quant.base_type(k)}_r16" for k in KINDS}  # split type -> interleaved type (q4_K_32 and q4_K share one)
BASE = {"q4_0_r16": "q4_0", "q4_1_r16": "q4_1", "q8_0_r16": "q8_0", "q4_K_r16": "q4_K", "q6_K_r16": "q6_K",
        "q2_K_r16": "q2_K", "q3_K_r16": "q3_K"}
RKINDS = tuple(BASE.values())  # the kernels' kinds
# the interleaved types' arrays, in the order the kernels take them (as mpillm.formats.quant.ARRAYS)
ARRAYS = {"q4_0_r16": (("qs", "uint8"), ("d", "float16")),
          "q4_1_r16": (("qs", "uint8"), ("d", "float16"), ("m", "float16")),
          "q8_0_r16": (("qs", "uint8"), ("d", "float16")),
          "q4_K_r16": (("qs", "uint8"), ("sc", "uint8"), ("mn", "uint8"), ("d", "float16"), ("dmin", "float16")),
          "q6_K_r16": (("qs", "uint8"), ("qh", "uint8"), ("sc", "int8"), ("d", "float16")),
          "q2_K_r16": (("qs", "uint8"), ("sc", "uint8"), ("d", "float16"), ("dmin", "float16")),
          "q3_K_r16": (("qs", "uint8"), ("qh", "uint8"), ("sc", "int8"), ("d", "float16"))}
# (low) code bytes per (16 rows, block)
GBYTES = {"q4_0": 256, "q4_1": 256, "q8_0": 512, "q4_K": 256, "q6_K": 256, "q2_K": 128, "q3_K": 128}
HBYTES = 128  # q6_K: high-bit bytes per (16 rows, block)
HBYTES3 = 64  # q3_K: high-bit bytes per (16 rows, block)
# A batched step streams the weights once for all tokens: tiles of 2+ tokens prefetch PF bytes ahead
# in the code stream (and PF / 8 in the scales); one token is fastest without (measured from memory,
# one thread: benchmarks/results/interleaved_layout_2026-12-07.json and docs/performance.md).
PF = 16384
# One token on rows of at least this many blocks takes the prefetching tile too (one thread, from
# memory, same process, alternated): q2_K's T = 1 kernel read 12-37% more GB/s with it at K = 7168
# and 8192 and 2-6% less at K <= 2048; q3_K's 6-7% more at K = 1024 and 2048, 20% more at 7168 and
# 8192 (cold experts picked at random too).
PF1_BLOCKS = {"q2_K": 128, "q3_K": 0}
TILE_TOKENS = (8, 4, 2, 1)
CHAINS = {8: 1, 4: 1, 2: 2, 1: 4}  # independent vpdpbusd chains per token of a tile of U tokens
# rows of groups per pass over a thread's range: a pass's weights (about CHUNK bytes) stay in L2
# while every token tile of a step reads them
CHUNK = 262144
ENV = "MPILLM_REPACK"


def wanted(path: str) -> bool:
    """Whether the runtime repacks q4_0 / q4_1 / q8_0 / q4_K / q6_K / q2_K / q3_K weights on kernel path ``path``."""
    return path == "vnni" and os.environ.get(ENV, "1").strip() != "0"


# ----------------------------------------------------------------------------------------------
# The layout (numpy): split arrays <-> interleaved arrays
# ----------------------------------------------------------------------------------------------
def repack(wtype: str, arrays: dict) -> tuple[str, dict]:
    """(interleaved type, arrays) of a q4_0 / q4_1 / q8_0 / q4_K / q6_K / q2_K / q3_K (or _32) matrix's split
    arrays (N, ...) or a stack of them (E, N, ...); the rows are padded to whole groups of 16 with
    zero codes and scales. Every per-row array of scales (N, n) becomes (G, n, 16): q4_K's d and
    dmin keep their one value per super-block (q4_K_32: per block), its sc and mn one byte per block."""
    kind = quant.base_type(wtype)
    q = np.asarray(arrays["qs"])
    lead, N = q.shape[:-2], q.shape[-2]
    nb = q.shape[-1] // quant.QS_BYTES[kind]
    G = -(-N // ROWS)
    pad = [(0, 0)] * len(lead) + [(0, G * ROWS - N), (0, 0)]
    if kind == "q3_K":  # the codes' low 2 bits as q2_K's qs; the high bits in their own register
        q, hbytes = _q3_parts(q.reshape(-1, q.shape[-1]), np.asarray(arrays["qh"]).reshape(-1, nb * 4), nb)
        u = np.pad(q.reshape(*lead, N, -1), pad).reshape(*lead, G, ROWS, nb, 2, 4)
        qh = np.pad(hbytes.reshape(*lead, N, nb, 4), pad + [(0, 0)]).reshape(*lead, G, ROWS, nb, 4)
        qh = np.ascontiguousarray(np.swapaxes(qh, -3, -2)).reshape(*lead, G, nb, HBYTES3)  # (G, nb, row, k)
    elif kind == "q8_0":  # w + 128 as an unsigned byte (vpdpbusd's unsigned operand)
        u = np.pad(q.view(np.uint8) ^ np.uint8(0x80), pad).reshape(*lead, G, ROWS, nb, 8, 4)
    else:  # q4: byte j of a block holds element j (low nibble) and j + 16 (high); q2_K: dword h, half h
        u = np.pad(q, pad).reshape(*lead, G, ROWS, nb, GBYTES[kind] // 64, 4)
    n = len(lead)
    order = tuple(range(n)) + (n, n + 2, n + 3, n + 1, n + 4)  # (G, nb, register, row, byte)
    out = {"qs": np.ascontiguousarray(u.transpose(order)).reshape(*lead, G, nb, GBYTES[kind])}

    def scales(a):
        a = np.asarray(a)
        s = a.view(np.uint16) if a.dtype == np.float16 else a
        s = np.pad(s, pad).reshape(*lead, G, ROWS, s.shape[-1])
        return np.ascontiguousarray(np.swapaxes(s, -1, -2)).view(a.dtype)

    for k, _ in ARRAYS[RTYPE[wtype]][1:]:
        if k == "qh":
            out[k] = qh if kind == "q3_K" else _high_bits(arrays[k], lead, G, nb, pad)
        else:
            out[k] = scales(arrays[k])
    return RTYPE[wtype], out


def _q3_parts(qs, qh, nb: int, codes: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """q3_K's stored qs and qh (M rows) -> (the low 2 bits in q2_K's stored layout (M, 8 nb), the
    high bits (M, nb, 4): byte k of a block holds those of its elements 4c + k at bit c), about
    ``codes`` codes at a time (a stack of experts' int16 codes would take several GB at once)."""
    M = qs.shape[0]
    low_b, high_b = np.empty((M, nb * 8), np.uint8), np.empty((M, nb, 4), np.uint8)
    step = max(1, codes // (32 * nb))
    for i in range(0, M, step):
        c = quant.lowk_codes({"qs": qs[i:i + step], "qh": qh[i:i + step]}, "q3_K").astype(np.uint8)
        low = c.reshape(-1, nb, 2, 4, 4) & 3  # element 16h + 4k + m: [h, k, m]
        low_b[i:i + step] = (low[:, :, :, 0] | low[:, :, :, 1] << 2 | low[:, :, :, 2] << 4
                             | low[:, :, :, 3] << 6).reshape(-1, nb * 8)
        hb = (c >> 2).reshape(-1, nb, 8, 4)  # element 4c + k: [c, k]
        high_b[i:i + step] = (hb << np.arange(8, dtype=np.uint8)[:, None]).sum(-2, dtype=np.uint8)
    return low_b, high_b


def _high_bits(qh, lead, G: int, nb: int, pad) -> np.ndarray:
    """q6_K's split high bits (..., N, 8 nb: byte j of a block holds q >> 4 of its elements j, j + 8,
    j + 16, j + 24 at bits 0, 2, 4, 6) -> (..., G, nb, 128): per (group, block) two registers H0, H1,
    whose byte 4r + k holds q >> 4 of row r's elements 4c + k, c = 4h .. 4h + 3 (register h), at
    bits 2 (c - 4h): the element of byte k of code register c, whatever c."""
    q = np.pad(np.asarray(qh), pad).reshape(*lead, G, ROWS, nb, 8)
    hi = (q[..., None] >> (2 * np.arange(4, dtype=np.uint8))) & 3  # [j, i]: element 8i + j
    e = np.swapaxes(hi, -1, -2).reshape(*lead, G, ROWS, nb, 2, 4, 4)  # element 16h + 4c' + k: [h, c', k]
    H = (e << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2, dtype=np.uint8)  # [h, k]
    n = len(lead)
    return np.ascontiguousarray(np.moveaxis(H, n + 1, n + 3)).reshape(*lead, G, nb, HBYTES)  # (G, nb, h, row, k)


def _high_bits_back(H: np.ndarray, N: int) -> np.ndarray:
    """``_high_bits``' inverse for one matrix: (G, nb, 128) -> (N, 8 nb)."""
    G, nb = H.shape[:2]
    h = H.reshape(G, nb, 2, ROWS, 4)
    e = (h[:, :, :, :, None, :] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # [G, nb, h, row, c', k]
    e = e.transpose(0, 3, 1, 2, 4, 5).reshape(G * ROWS, nb, 4, 8)  # element 8i + j: [i, j]
    qh = (e << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2, dtype=np.uint8)
    return np.ascontiguousarray(qh.reshape(G * ROWS, nb * 8)[:N])


def unpack(rtype: str, arrays: dict, N: int) -> tuple[str, dict]:
    """The split arrays (N rows) and type of an interleaved 2-D matrix: ``repack``'s inverse (q4_K_r16:
    q4_K when d holds one value per 8 blocks, else q4_K_32; q6_K_r16, q2_K_r16 and q3_K_r16 alike)."""
    kind = BASE[rtype]
    qs = np.asarray(arrays["qs"])
    G, nb = qs.shape[0], qs.shape[1]
    regs = GBYTES[kind] // 64
    u = qs.reshape(G, nb, regs, ROWS, 4).transpose(0, 3, 1, 2, 4).reshape(G * ROWS, nb * regs * 4)[:N]
    out = {"qs": (u ^ np.uint8(0x80)).view(np.int8) if kind == "q8_0" else u.copy()}
    if kind == "q3_K":  # 3-bit codes from the two parts, then the stored qs and qh
        low = (u.reshape(N, nb, 2, 1, 4) >> np.arange(0, 8, 2, dtype=np.uint8)[:, None]) & 3  # [h, k, m]
        h = np.asarray(arrays["qh"]).reshape(G, nb, ROWS, 4).transpose(0, 2, 1, 3).reshape(G * ROWS, nb, 1, 4)[:N]
        high = (h >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # element 4c + k: [c, k]
        out["qs"], out["qh"] = quant.q3_pack(low.reshape(N, nb, 32) | high.reshape(N, nb, 32) << 2)
    for k, _ in ARRAYS[rtype][1:]:
        a = np.asarray(arrays[k])
        if k == "qh":
            if kind == "q6_K":
                out[k] = _high_bits_back(a, N)
            continue
        s = a.view(np.uint16) if a.dtype == np.float16 else a
        out[k] = np.ascontiguousarray(s.transpose(0, 2, 1).reshape(G * ROWS, s.shape[1])[:N]).view(a.dtype)
    if kind in ("q4_K", "q6_K", "q2_K", "q3_K") and np.asarray(arrays["d"]).shape[1] * 8 != nb:
        kind += "_32"
    return kind, out


# ----------------------------------------------------------------------------------------------
# The tiles: U tokens x the groups g0..g1 of a matrix (LLVM IR)
# ----------------------------------------------------------------------------------------------
PARAMS = "wp, dp, mp, sp, np_, dsh, g0, g1, nb, xp, xstride, xsp, xdp, sstride, t0, op, ostride, N"


def _codegen(kind: str, U: int, prefetch: int):
    q8, qk, q6, q2, q3 = kind == "q8_0", kind == "q4_K", kind == "q6_K", kind == "q2_K", kind == "q3_K"
    mins = kind in ("q4_1", "q4_K")  # a per-block min term: m * xd * xsum
    gbytes = GBYTES[kind]

    def codegen(context, b, sig, args):
        # q4_K: dp, mp = d, dmin (G, nd, 16) with nd = nb >> dsh (dsh 3: one per super-block; 0:
        # q4_K_32), sp, np_ = sc, mn (G, nb, 16) bytes; q6_K: dp = d (G, nd, 16), mp = qh (G, nb, 128),
        # sp = sc (G, 2 nb, 16) int8; q2_K: dp, mp = d, dmin (G, nd, 16), sp = sc (G, 2 nb, 16) bytes;
        # q3_K: dp = d (G, nd, 16), mp = qh (G, nb, 64), sp = sc (G, 2 nb, 16) int8;
        # the others: dp, mp = d, m (G, nb, 16)
        wp, dp, mp, sp, np_, dsh, g0, g1, nb, xp, xstride, xsp, xdp, sstride, t0, op, ostride, N = args
        e = Emit(b)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        V, VB, F = vec(I32, 16), vec(I8, 64), vec(F32, 16)
        opnd = VB if VNNI_BYTE_OPERANDS else V
        dot = e.decl("llvm.x86.avx512.vpdpbusd.512", V, [V, opnd, opnd])
        dpw = e.decl("llvm.x86.avx512.vpdpwssd.512", V, [V, V, V]) if q2 else None
        mstore = e.decl("llvm.masked.store.v16f32.p0", ir.VoidType(), [F, PTR, I32, vec(I1, 16)])
        m15 = e.const(I32, 16, [0x0F0F0F0F] * 16)
        sh4 = e.const(I32, 16, [4] * 16)
        acc = [cgutils.alloca_once(b, F) for _ in range(U)]
        xoffs = [4 * c for c in range(8)] if q8 or q2 or q3 else [4 * c for c in range(4)] + [16 + 4 * c for c in range(4)]
        # per token: the row offsets of its activations and of its scale sums
        xrow = [b.mul(b.add(t0, i64(u)), xstride) for u in range(U)]
        srow = [b.mul(b.add(t0, i64(u)), sstride) for u in range(U)]
        if q6 or q2 or q3:  # a term per half block (q6_K: -32 x, q3_K: -4 x, q2_K: the min x its activation sum): each
            # token's sums of its blocks' first 16 activations, once per call for all the groups (on the
            # stack, freed at the end of the call)
            saved = b.call(e.decl("llvm.stacksave.p0", PTR, []), [])
            lo16 = b.alloca(I32, size=b.mul(nb, i64(U)))
            red = e.decl("llvm.vector.reduce.add.v16i32", I32, [V])
            for u in range(U):
                with cgutils.for_range(b, nb) as bl:
                    x16 = e.load(xp, b.add(xrow[u], b.mul(bl.index, i64(32))), vec(I8, 16))
                    lo = b.call(red, [b.sext(x16, V)])
                    if q2:  # both halves' sums as the two words of a dword (|sum| <= 16 x 128), for vpdpwssd
                        hi = b.sub(e.load(xsp, b.add(srow[u], b.mul(bl.index, i64(4))), I32), lo)
                        lo = b.or_(b.and_(lo, I32(0xFFFF)), b.shl(hi, I32(16)))
                    b.store(lo, b.gep(lo16, [b.add(b.mul(i64(u), nb), bl.index)]))
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
                    elif q2 or q3:  # the scale bytes: a quarter of the codes' (d and dmin: the hardware follows them)
                        e.prefetch(sp, b.add(b.mul(gb, i64(32)), i64(prefetch // 4)), 2)
                        if q3:  # the high bits: half the codes'
                            e.prefetch(mp, b.add(b.mul(gb, i64(HBYTES3)), i64(prefetch // 2)), 2)
                    elif q6:
                        for line in range(HBYTES // 64):
                            e.prefetch(mp, b.add(b.mul(gb, i64(HBYTES)), i64(prefetch // 2 + 64 * line)), 2)
                        e.prefetch(sp, b.add(b.mul(gb, i64(32)), i64(prefetch // 8)), 2)
                    else:
                        for base in (dp, mp) if mins else (dp,):
                            e.prefetch(base, b.add(b.mul(gb, i64(32)), i64(prefetch // 8)), 2)
                if q8:
                    W = [e.load(wp, b.add(wo, i64(64 * c)), V) for c in range(8)]
                elif q2 or q3:  # register c = 4h + k: half h's dwords shifted right by 2k, masked to 2 bits
                    raw = [e.load(wp, b.add(wo, i64(64 * h)), V) for h in range(2)]
                    m3 = e.const(I32, 16, [0x03030303] * 16)
                    W = [b.and_(b.lshr(raw[c // 4], e.const(I32, 16, [2 * (c % 4)] * 16)) if c % 4 else raw[c // 4], m3)
                         for c in range(8)]
                    if q3:  # the high bits: bit c of each byte of H, moved to bit 2 under register c
                        H = e.load(mp, b.mul(gb, i64(HBYTES3)), V)
                        m4 = e.const(I32, 16, [0x04040404] * 16)

                        def high3(c):
                            if c < 2:
                                return b.and_(b.shl(H, e.const(I32, 16, [2 - c] * 16)), m4)
                            return b.and_(b.lshr(H, e.const(I32, 16, [c - 2] * 16)) if c > 2 else H, m4)

                        W = [b.or_(w, high3(c)) for c, w in enumerate(W)]
                else:
                    raw = [e.load(wp, b.add(wo, i64(64 * c)), V) for c in range(4)]
                    W = [b.and_(r, m15) for r in raw] + [b.and_(b.lshr(r, sh4), m15) for r in raw]
                if q6:  # the high 2 bits of register c's codes: bits 2 (c mod 4) of H[c // 4], moved to bits 4-5
                    H = [e.load(mp, b.add(b.mul(gb, i64(HBYTES)), i64(64 * h)), V) for h in range(2)]
                    m30 = e.const(I32, 16, [0x30303030] * 16)

                    def high(c):
                        h, sft = H[c // 4], 2 * (c % 4)
                        if sft < 4:
                            h = b.shl(h, e.const(I32, 16, [4 - sft] * 16))
                        elif sft > 4:
                            h = b.lshr(h, e.const(I32, 16, [sft - 4] * 16))
                        return b.and_(h, m30)

                    W = [b.or_(w, high(c)) for c, w in enumerate(W)]
                if VNNI_BYTE_OPERANDS:
                    W = [b.bitcast(w, VB) for w in W]

                def half16(base, i):
                    h = e.load(base, b.mul(i, i64(32)), vec(I16, 16))
                    return b.fpext(b.bitcast(h, vec(F16, 16)), F)

                if qk or q6 or q2 or q3:
                    di = b.add(b.mul(g, b.lshr(nb, dsh)), b.lshr(blk, dsh))  # (group, super-block)

                def half_scales(ext):  # per row, the scale bytes of each half block, widened by ext
                    return [ext(e.load(sp, b.add(b.mul(gb, i64(32)), i64(16 * h)), vec(I8, 16)), V) for h in range(2)]

                if q6:  # per row: d * sc of each half block (exact in float32)
                    d = [b.fmul(half16(dp, di), b.sitofp(s, F)) for s in half_scales(b.sext)]
                    m = None
                elif q2:  # per row: each half block's scale and min as integers, d and -dmin
                    sb = half_scales(b.zext)
                    hsc = [b.and_(s, e.const(I32, 16, [15] * 16)) for s in sb]
                    sh4v = e.const(I32, 16, [4] * 16)  # the two mins as the two words of each row's dword
                    hmn = b.or_(b.lshr(sb[0], sh4v), b.shl(b.lshr(sb[1], sh4v), e.const(I32, 16, [16] * 16)))
                    d, m = half16(dp, di), b.fneg(half16(mp, di))
                elif q3:  # per row: each half block's signed scale as an integer, d
                    hsc = half_scales(b.sext)
                    d, m = half16(dp, di), None
                elif qk:  # per row: d * sc and -(dmin * mn) of this block (exact in float32)

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
                    if q6 or q2 or q3:  # two integer sums, one per half block (its own scale); q6_K's start
                        # at -32 x the half's xsum, q3_K's at -4 x, q2_K's at 0 (see below)
                        lo = b.load(b.gep(lo16, [b.add(b.mul(i64(u), nb), blk)]))
                        nh = max(1, CHAINS[U] // 2)
                        xb = b.add(xrow[u], bx)
                        v = b.load(acc[u])
                        xd = e.load(xdp, so, F32)
                        sums = []
                        for h in range(2):
                            ch = [ir.Constant(V, None) for _ in range(nh)]
                            if q6 or q3:  # lo: the first half's activation sum (q2_K: both halves', packed)
                                part = lo if h == 0 else b.sub(xs, lo)
                                ch[0] = e.splat(b.mul(part, I32(-32 if q6 else -4)), 16)
                            for c in range(4 * h, 4 * h + 4):
                                x = e.splat(e.load(xp, b.add(xb, i64(xoffs[c])), I32), 16)
                                ch[c % nh] = b.call(dot, [ch[c % nh], W[c], b.bitcast(x, opnd) if VNNI_BYTE_OPERANDS else x])
                            a = ch[0]
                            for c in ch[1:]:
                                a = b.add(a, c)
                            if q6:
                                v = e.fma(b.sitofp(a, F), b.fmul(d[h], e.splat(xd, 16)), v)
                            sums.append(a)
                        if q2 or q3:  # sc0 x sum0 + sc1 x sum1, exact as an integer (|.| < 2^19), times d x xd;
                            # q2_K: mn0 x xsum0 + mn1 x xsum1 in one vpdpwssd, times -dmin x xd
                            S = b.add(b.mul(sums[0], hsc[0]), b.mul(sums[1], hsc[1]))
                            xv = e.splat(xd, 16)
                            v = e.fma(b.sitofp(S, F), b.fmul(d, xv), v)
                            if q2:
                                M = b.call(dpw, [ir.Constant(V, None), hmn, e.splat(lo, 16)])
                                v = e.fma(b.sitofp(M, F), b.fmul(m, xv), v)
                        b.store(v, acc[u])
                        continue
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
        if q6 or q2 or q3:
            b.call(e.decl("llvm.stackrestore.p0", ir.VoidType(), [PTR]), [saved])
        return context.get_dummy_value()

    return codegen


def _tile_name(kind: str, U: int, prefetch: bool) -> str:
    return f"ilv_{kind}_{U}{'p' if prefetch else ''}"


# ----------------------------------------------------------------------------------------------
# The runners and entry points (generated source: numba caches only functions in files)
# ----------------------------------------------------------------------------------------------
_RUN = """

@njit({serial})
def groups_{kind}(wp, dp, mp, sp, np_, dsh, G, nb, xp, xstride, xsp, xdp, sstride, op, ostride, N, T, g0, g1):
    # the groups g0..g1, in passes of about CHUNK bytes of weights that every token tile of the
    # step reads while they are in L2
    per = max(1, CHUNK // max(1, nb * {gbytes}))
    while g0 < g1:
        ge = min(g1, g0 + per)
        if T == 1:
            {one}
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


@njit({flags})
def run_{kind}(wp, dp, mp, sp, np_, dsh, G, nb, xp, xstride, xsp, xdp, sstride, op, ostride, N, T, nch):
    # one contiguous range of groups per thread
    for c in prange(nch):
        groups_{kind}(wp, dp, mp, sp, np_, dsh, G, nb, xp, xstride, xsp, xdp, sstride, op, ostride, N, T,
                      c * G // nch, (c + 1) * G // nch)


@njit({entry})
def vnni_matmul_{kind}_r16_q8_0({args}xq, xd, xsum, out):
    {check}
    G = qs.shape[0]
    nch = max(1, min(_iget_num_threads(), G))
    if nch == 1:  # one thread: no parallel region (its launch costs about 1 us a call)
        groups_{kind}(qs.ctypes.data, {ptrs}, G, qs.shape[1], xq.ctypes.data, xq.strides[0], xsum.ctypes.data,
                      xd.ctypes.data, xd.strides[0], out.ctypes.data, out.strides[0], out.shape[1], xq.shape[0], 0, G)
    else:
        run_{kind}(qs.ctypes.data, {ptrs}, G, qs.shape[1], xq.ctypes.data, xq.strides[0], xsum.ctypes.data,
                   xd.ctypes.data, xd.strides[0], out.ctypes.data, out.strides[0], out.shape[1], xq.shape[0], nch)
"""
# per kernel kind: its entry's weight arguments, shape check, and the runner's pointers dp, mp, sp, np_, dsh
_ENTRY = {
    "q4_0": ("qs, d, ", "check_r16(qs, d, d, xq, xd, xsum, out, 256)", "d.ctypes.data, 0, 0, 0, 0"),
    "q8_0": ("qs, d, ", "check_r16(qs, d, d, xq, xd, xsum, out, 512)", "d.ctypes.data, 0, 0, 0, 0"),
    "q4_1": ("qs, d, m, ", "check_r16(qs, d, m, xq, xd, xsum, out, 256)", "d.ctypes.data, m.ctypes.data, 0, 0, 0"),
    "q4_K": ("qs, sc, mn, d, dmin, ", "dsh = check_r16k(qs, sc, mn, d, dmin, xq, xd, xsum, out)",
             "d.ctypes.data, dmin.ctypes.data, sc.ctypes.data, mn.ctypes.data, dsh"),
    "q6_K": ("qs, qh, sc, d, ", "dsh = check_r16q6(qs, qh, sc, d, xq, xd, xsum, out)",
             "d.ctypes.data, qh.ctypes.data, sc.ctypes.data, 0, dsh"),
    "q2_K": ("qs, sc, d, dmin, ", "dsh = check_r16q2(qs, sc, d, dmin, xq, xd, xsum, out)",
             "d.ctypes.data, dmin.ctypes.data, sc.ctypes.data, 0, dsh"),
    "q3_K": ("qs, qh, sc, d, ", "dsh = check_r16q3(qs, qh, sc, d, xq, xd, xsum, out)",
             "d.ctypes.data, qh.ctypes.data, sc.ctypes.data, 0, dsh"),
}
# no fastmath: every lane must run the same float operations in every tile
_JIT_PAR = dict(cache=True, nogil=True, parallel=True)
_JIT = dict(cache=True, nogil=True)


def _one_token(kind: str) -> str:
    """The runner's one-token call: the plain tile, or the prefetching one on rows of at least
    PF1_BLOCKS[kind] blocks (at 0 the plain tile is not called, so not compiled)."""
    call = f"ilv_{kind}_1{{}}(wp, dp, mp, sp, np_, dsh, g0, ge, nb, xp, xstride, xsp, xdp, sstride, 0, op, ostride, N)"
    if kind not in PF1_BLOCKS:
        return call.format("")
    if PF1_BLOCKS[kind] == 0:
        return call.format("p")
    return (f"if nb < {PF1_BLOCKS[kind]}:\n                {call.format('')}\n"
            f"            else:  # long rows: the prefetching tile\n                {call.format('p')}")


def _source() -> str:
    src = runners.HEADER.format(by=__name__)
    for kind in RKINDS:
        args, check, ptrs = _ENTRY[kind]
        src += _RUN.format(flags=runners.flags(_JIT_PAR), serial=runners.flags(_JIT), entry=runners.flags(_JIT),
                           kind=kind, k=f"ilv_{kind}", gbytes=GBYTES[kind], args=args, check=check, ptrs=ptrs,
                           one=_one_token(kind))
    return src


def _names() -> dict:
    names = dict(check_r16=check_r16, check_r16k=check_r16k, check_r16q6=check_r16q6, check_r16q2=check_r16q2,
                 check_r16q3=check_r16q3, _iget_num_threads=_iget_num_threads, CHUNK=CHUNK)
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
vnni_matmul_q6_K_r16_q8_0 = _gen.vnni_matmul_q6_K_r16_q8_0
vnni_matmul_q2_K_r16_q8_0 = _gen.vnni_matmul_q2_K_r16_q8_0
vnni_matmul_q3_K_r16_q8_0 = _gen.vnni_matmul_q3_K_r16_q8_0
