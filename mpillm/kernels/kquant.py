"""Matmul kernels for the 5-bit, K-quant and MXFP4 weight types, in all three paths.

Types and their split layouts: ``mpillm.formats.quant`` (q5_0, q5_1, q4_K, q5_K, q6_K, mxfp4; the
``_32`` K-quant variants use the same kernels: the super-block scale index is b >> dshift,
dshift = 3 for per-256 scales, 0 for per-32 ones, read from the shape of ``d``).

Activations are q8_0 (xq int8, xd float32 and xsum int32 per 32-block), as for q4_0. Every
kernel computes, per 32-element sub-block b of a row and a token,

    out += xd_b * ( sum_g D_bg * isum_bg  +  M_b * xsum_b )

with isum an exact integer dot product of the sub-block's codes and activation bytes (per
16 elements for q6_K, g = 0, 1; one g otherwise), D the float scale and M the float
offset term of the type:

    q5_0   D = d          M = -16 d           (codes 0..31)
    q5_1   D = d          M = m
    q4_K   D = d_s * sc   M = -dmin_s * mn    (codes 0..15; s = super-block)
    q5_K   as q4_K                            (codes 0..31)
    q6_K   D = d_s * sc_g, codes 0..63 with the offset 32 inside the integer dot
    mxfp4  D = 2^(e-128)  M = -12 D           (codes: 12 + 2 x E2M1 value, 0..24)

(the portable path uses signed codes instead: q - 16, q - 32, 2 x E2M1, and no M for those).

Decoding: the low nibbles are in the q4_0 order (byte j of a sub-block: element j low, j + 16
high), so ``lo``/``hi`` of 16 bytes concatenated give the sub-block's 32 codes in element
order, matching the activation bytes as they are (no preparation pass, unlike the q4_0
kernels); q5_0 / q5_1 high bits come from 32-bit masks (``bitcast i32 -> <32 x i1>``,
zero-extended to bytes: kmov + vpmovm2b on AVX-512), q5_K's from one i32 per sub-block (bit
2c + h of byte k: element 8c + 4h + k, moved to bit 4 by a 32-bit shift), q6_K's from 2-bit
fields (one i64 per sub-block: byte k holds q >> 4 of elements k, k + 8, k + 16, k + 24, moved
to bits 4-5 by a 64-bit shift); MXFP4 codes map through a 16-entry table (pshufb on x86,
selects in the portable IR).

x86 (``vnni``, ``avx2``): the activations are prepared once per call (``_prep_codegen``, into a
buffer the entry point allocates): per token and 8 sub-blocks the operands of the low and of the
high nibbles (XL, XH: the first / last 16 bytes of each sub-block, 4 sub-blocks per 64 bytes), xd
in the lanes' order and, for q6_K, -32 x the activation sums its offset needs, in the lanes of
the dots; the tiles only load them. The codes stay in the qs nibble order (``_codes_nib``), their
high bits added by one masked vpaddb per 64 codes and bit (the masks: one word shuffle of qh,
stored, loaded into mask registers), q5_K's and q6_K's by a dword / qword permute, a variable
shift and an and-or (vpternlog) per 64 codes. Per 8 sub-blocks (``group_x86_8``), per 4 of them ``vpdpbusd`` (VNNI) or
``vpmaddubsw`` + ``vpmaddwd`` (AVX2; codes < 64 so the i16 pair sums cannot saturate) of the low
nibbles with XL and of the high nibbles with XH land in 16 i32 lanes (q6_K: low and high halves
apart); ``vpackssdw`` of the two halves' lanes and ``vpmaddwd`` with the integer scales as words (sc
of q4_K / q5_K, q6_K's two per sub-block, 1 for the other types) leave 16 exact i32 lanes, two per
sub-block (q6_K: its dots start from the prepared -32 x sums, so their lanes hold the sums of
(q - 32) x, which fit the words exactly), converted once and FMA'd with d * xd into a <16 x float> accumulator per (row,
token). Each row and token of a tile is emitted after the previous one's accumulator (``_E.after``:
LLVM otherwise interleaved them and spilled). A tail of sub-blocks (q5_0 / q5_1 / mxfp4 rows,
``_32`` slices) runs from xq: 4 sub-blocks together when it has them (as a half group), the rest
one at a time (32 codes in element order, float scales). M terms go to
an 8-lane accumulator in a loop of their own after the dots (in the same loop they spilled the
dots' registers in the multi-token tiles; in the one-token tiles, together with the split below,
they were faster from memory on the 1B down shape, q4_K 0.86 -> 1.00 of q4_0's GB/s, but slower
on the gate shape, 0.97 -> 0.88, and on short rows, 2048 x 512 q4_K 37 -> 54 us in cache). q4_K's
and q5_K's one-token loops are emitted twice: for d and dmin per 256 columns (one fp16 load and
splat per row and group; with dvec's masked load and select LLVM branched inside the loop) and as
before for the ``_32`` slices. From memory, one thread, q4_0 called alternately
(``scripts/decode_interleave.py``, 7 alternated rounds, load 0.6-1.0), q5_K on the 1B gate shape
went from 0.83 (0.72-0.93) to 1.02 (0.98-1.06) of q4_0's GB/s, the AVX2 path's 0.88 -> 1.02; q4_K
and the down shape stayed inside the noise, as did the expert shapes (2048 x 384 ``_32``, 2048 x
512, 384 x 2048) in cache (``benchmarks/results/kquant_decode_split_2026-12-07.json``). Tiles: per 4-row tile, each whole 8
tokens in 2 x 8 tiles (W: a row's decoding amortized over 8 tokens), then 4 x 4 (S) and a 4 x 1..3
tail (T = 1: 4 x 1), each row's streams (qs, qh) prefetched PF bytes of the matrix ahead (the same
place k R rows on: the rows are contiguous). The runners are compiled without fastmath:
with it LLVM contracted the tiles' float operations differently per tile shape, and a row's
last bit depended on its batch (test_row_does_not_depend_on_its_batch). Portable: one sub-block at a time, ``sdot`` shape
(``reduce.add(sext * sext)``) per 16 bytes (``irgen.Emit.sdot``, as in ``portable.py``). ``f64`` tiles accumulate
in float64 (``--buffer-type f64``, kernels.exact).
"""
from __future__ import annotations

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit
from numba.core import cgutils

from mpillm.formats import quant
from mpillm.kernels import jitcache, runners
from mpillm.kernels.checks import rows_ok
from mpillm.kernels.irgen import F16, F32, F64, I1, I8, I16, I32, I64, VNNI_BYTE_OPERANDS, Emit, int_intrinsic
from mpillm.kernels.irgen import vec as _vec

_llvm.initialize_native_asmparser()  # the inline masked vpaddb (_E.add_masked) is parsed by LLVM
KINDS = ("q5_0", "q5_1", "q4_K", "q5_K", "q6_K", "mxfp4")
KIND_ID = {k: i for i, k in enumerate(KINDS)}
ARR = {k: tuple(n for n, _ in quant.ARRAYS[k]) for k in KINDS}
NSLOT = 6  # array slots in a tile's arguments (q5_K has six arrays)

_JIT = dict(cache=True, fastmath=True, nogil=True)
# Portable: unsigned codes (q5_1, q4_K, q5_K; 0..31 or 0..15) are centred to signed ones and the
# offset added back as c * xsum. LLVM proves the raw codes non-negative and turns their sext into
# zext; a zext x sext product is AArch64's usdot (+i8mm, not on a Cortex-A76) and without it
# LLVM falls back to smull/smlal: the a76 build of these three kernels had no sdot at all.
_CENTRE = {"q5_1": 16, "q4_K": 8, "q5_K": 16}
_MXFP4_U = [12 + v for v in (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)]


class _E(Emit):
    def __init__(self, builder, isa):
        super().__init__(builder)
        self.isa = isa

    def i64(self, v):
        return ir.Constant(I64, v)

    def prefetch(self, base, off, locality=2):
        """prefetcht1 (into L2): the weights are read once."""
        super().prefetch(base, off, locality)

    def half4(self, base, off, n):
        """n fp16 values -> <n x float>."""
        h = self.load(base, off, _vec(I16, n))
        return self.b.fpext(self.b.bitcast(h, _vec(F16, n)), _vec(F32, n))

    def u8f(self, base, off):
        return self.b.uitofp(self.load(base, off, I8), F32)

    def s8f(self, base, off):
        return self.b.sitofp(self.load(base, off, I8), F32)

    def e8m0_half(self, base, off):
        """GGML's ggml_e8m0_to_fp32_half of a byte: float bits (e - 1) << 23, or 0x200000 << e for e < 2."""
        b = self.b
        e = b.zext(self.load(base, off, I8), I32)
        norm = b.shl(b.sub(e, I32(1)), I32(23))
        den = b.shl(I32(0x00200000), e)
        return b.bitcast(b.select(b.icmp_unsigned("<", e, I32(2)), den, norm), F32)

    def splat_const(self, ty, n, v):
        return self.const(ty, n, [v] * n)

    def bits_to_bytes(self, masks, n):
        """<k x i32> bit masks -> <32k x i8> of 0/1, element i = bit i (little-endian)."""
        b = self.b
        bits = b.bitcast(masks, _vec(I1, 32 * n))
        return b.zext(bits, _vec(I8, 32 * n))

    # -- x86 dot products: i32 lanes += 4 (u8 x s8) products ------------------------------
    def dot(self, acc, a, x):
        n = a.type.count
        b = self.b
        if self.isa == "vnni":
            lanes = n // 4
            opty = _vec(I8, n) if VNNI_BYTE_OPERANDS else _vec(I32, lanes)
            f = self.decl(f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", acc.type, [acc.type, opty, opty])
            if not VNNI_BYTE_OPERANDS:
                a, x = b.bitcast(a, opty), b.bitcast(x, opty)
            return b.call(f, [acc, a, x])
        mub = self.decl("llvm.x86.avx2.pmadd.ub.sw", _vec(I16, 16), [_vec(I8, 32), _vec(I8, 32)])
        mwd = self.decl("llvm.x86.avx2.pmadd.wd", _vec(I32, 8), [_vec(I16, 16), _vec(I16, 16)])
        parts = []
        for c in range(n // 32):
            ac = self.shuffle(a, None, range(32 * c, 32 * c + 32)) if n > 32 else a
            xc = self.shuffle(x, None, range(32 * c, 32 * c + 32)) if n > 32 else x
            parts.append(b.call(mwd, [b.call(mub, [ac, xc]), self.splat_const(I16, 16, 1)]))
        res = parts[0] if len(parts) == 1 else self.shuffle(parts[0], parts[1], range(16))
        return b.add(acc, res)

    def _x86_2op(self, a, c, name512, name256, outel):
        """A two-operand x86 integer instruction on 512 bits: one call (vnni) or two 256-bit halves."""
        n = a.type.count
        b = self.b
        rn = 2 * n if outel is I16 else n // 2
        if self.isa == "vnni":
            f = self.decl(name512, _vec(outel, rn), [a.type, c.type])
            return b.call(f, [a, c])
        h = n // 2
        ht = _vec(a.type.element, h)
        f = self.decl(name256, _vec(outel, rn // 2), [ht, _vec(c.type.element, h)])
        parts = [b.call(f, [self.shuffle(a, None, range(h * i, h * i + h)),
                            self.shuffle(c, None, range(h * i, h * i + h))]) for i in range(2)]
        return self.shuffle(parts[0], parts[1], range(rn))

    def packssdw(self, a, c):
        """<16 x i32> x 2 -> <32 x i16>: per 128-bit lane a's 4 dwords then c's, as words (saturating)."""
        return self._x86_2op(a, c, "llvm.x86.avx512.packssdw.512", "llvm.x86.avx2.packssdw", I16)

    def pmaddwd(self, a, c):
        """<32 x i16> x 2 -> <16 x i32>: dword j = a[2j] c[2j] + a[2j+1] c[2j+1]."""
        return self._x86_2op(a, c, "llvm.x86.avx512.pmaddw.d.512", "llvm.x86.avx2.pmadd.wd", I32)

    def dpwssd(self, acc, a, c):
        """acc + pmaddwd(a, c) (<16 x i32>): one vpdpwssd on VNNI."""
        if self.isa == "vnni":
            ty = _vec(I32, 16)
            f = self.decl("llvm.x86.avx512.vpdpwssd.512", ty, [ty, ty, ty])
            return self.b.call(f, [acc, self.b.bitcast(a, ty), self.b.bitcast(c, ty)])
        return self.b.add(acc, self.pmaddwd(a, c))

    def after(self, v, deps):
        """v (i64) as an empty inline asm's result that takes deps (float vectors) as inputs: what is
        computed from it comes after deps in the code LLVM emits (no instruction; the CPU sees v as
        it was). Without it LLVM's scheduler interleaved a tile's rows and tokens, its registers
        did not hold them, and the loop spilled (q6_K 4 x 4: 90 spills in 256 instructions)."""
        b = self.b
        ins = [b.extract_element(d, I32(0)) for d in deps]
        ft = ir.FunctionType(I64, [I64] + [d.type for d in ins])
        return b.asm(ft, "", "=r,0" + ",x" * len(ins), [v] + ins, False)

    def opaque(self, v):
        """v through an empty inline asm: the same value, but LLVM cannot see through it (so it does
        not move the shuffles of v's uses before the operations that made v)."""
        ft = ir.FunctionType(v.type, [v.type])
        return self.b.asm(ft, "", "=v,0" if self.isa == "vnni" else "=x,0", [v], False)

    def masks64(self, words):
        """<4k x i16> -> k i64 masks, through a stack slot (stored once, each mask loaded into a mask
        register from there: without the slot LLVM extracted each with a shift and a truncation)."""
        b = self.b
        n = words.type.count // 4
        slot = cgutils.alloca_once(b, _vec(I64, n))
        st = b.store(b.bitcast(words, _vec(I64, n)), slot)
        st.volatile = True
        out = []
        for i in range(n):
            ld = b.load(self.addr(b.ptrtoint(slot, I64), I64(8 * i)), typ=I64)
            ld.volatile = True
            out.append(ld)
        return out

    def add_masked(self, v, m, val):
        """v + val in the bytes whose bit of the i64 mask m is set (v: <64 x i8>): one masked vpaddb
        on AVX-512 (inline: LLVM turns the add of a known-zero bit into an or, and a masked or of
        bytes does not exist, so it emitted an or and a blend); elsewhere a select."""
        b = self.b
        c = self.splat_const(I8, 64, val)
        if self.isa == "vnni":
            ft = ir.FunctionType(v.type, [I64, v.type, v.type])
            return b.asm(ft, "vpaddb $3, $2, $0 {$1}", "=v,^Yk,0,v", [m, v, c], False)
        return b.select(b.bitcast(m, _vec(I1, 64)), b.add(v, c), v)

    def pshufb(self, table, idx):
        """Per-128-bit-lane byte table lookup (idx < 16), any multiple of 32 bytes."""
        n = idx.type.count
        b = self.b
        if self.isa == "vnni" and n == 64:
            f = self.decl("llvm.x86.avx512.pshuf.b.512", _vec(I8, 64), [_vec(I8, 64), _vec(I8, 64)])
            return b.call(f, [self.const(I8, 64, table * 4), idx])
        f = self.decl("llvm.x86.avx2.pshuf.b", _vec(I8, 32), [_vec(I8, 32), _vec(I8, 32)])
        parts = [b.call(f, [self.const(I8, 32, table * 2), self.shuffle(idx, None, range(32 * c, 32 * c + 32))
                            if n > 32 else idx]) for c in range(n // 32)]
        return parts[0] if len(parts) == 1 else self.shuffle(parts[0], parts[1], range(64))

    def pf_offsets(self, A: dict, streams, R: int, pf: int) -> dict:
        """Decode prefetch distance of each stream (name, ...) of A: k R row strides, k the least power
        of two that makes it >= pf bytes (pf itself for a zero stride), so the prefetched lines are
        the same place of a row tile this thread runs later."""
        b, i64 = self.b, self.i64
        out = {}
        for name, *_ in streams:
            off = b.mul(A[name][1], i64(R))
            off = b.select(b.icmp_unsigned("==", off, i64(0)), i64(pf), off)
            for _ in range(pf.bit_length()):
                off = b.select(b.icmp_unsigned("<", off, i64(pf)), b.shl(off, i64(1)), off)
            out[name] = off
        return out


def _nibbles(e: _E, A: dict, r, b0, nsub: int):
    """The qs bytes of sub-blocks [b0, b0 + nsub) of row r split into (low, high) nibbles,
    each <16 nsub x i8> as they lie."""
    b = e.b
    n = 16 * nsub
    base, stride = A["qs"]
    w = e.load(base, b.add(b.mul(r, stride), b.mul(b0, e.i64(16))), _vec(I8, n))
    return b.and_(w, e.splat_const(I8, n, 15)), b.lshr(w, e.splat_const(I8, n, 4))


def _codes(e: _E, kind: str, A: dict, r, b0, nsub: int):
    """The codes of sub-blocks [b0, b0 + nsub) of row r: <32 nsub x i8> in element order.
    x86: unsigned (see the table in the module docstring); portable: signed values."""
    b = e.b
    i64 = e.i64
    n = 16 * nsub
    lo, hi = _nibbles(e, A, r, b0, nsub)
    order = [i for j in range(nsub) for i in list(range(16 * j, 16 * j + 16)) + list(range(n + 16 * j, n + 16 * j + 16))]
    q = e.shuffle(lo, hi, order)
    N = 32 * nsub
    if kind in ("q5_0", "q5_1"):
        hb, hs = A["qh"]
        m = e.load(hb, b.add(b.mul(r, hs), b.mul(b0, i64(4))), _vec(I32, nsub))
        q = b.or_(q, b.shl(e.bits_to_bytes(m, nsub), e.splat_const(I8, N, 4)))
    elif kind == "q5_K":  # bit 2c + h of byte k of a sub-block's 4: q >> 4 of element 8c + 4h + k
        hb, hs = A["qh"]
        m = e.load(hb, b.add(b.mul(r, hs), b.mul(b0, i64(4))), _vec(I8, 4 * nsub))
        rep = e.shuffle(m, None, [4 * j + i % 4 for j in range(nsub) for i in range(32)])
        h = b.lshr(rep, e.const(I8, N, [i // 4 for _ in range(nsub) for i in range(32)]))
        q = b.or_(q, b.shl(b.and_(h, e.splat_const(I8, N, 1)), e.splat_const(I8, N, 4)))
    elif kind == "q6_K":  # byte k of a sub-block's 8: q >> 4 of element 8c + k in bits 2c, 2c + 1
        hb, hs = A["qh"]
        m = e.load(hb, b.add(b.mul(r, hs), b.mul(b0, i64(8))), _vec(I8, 8 * nsub))
        rep = e.shuffle(m, None, [8 * j + i % 8 for j in range(nsub) for i in range(32)])
        h = b.lshr(rep, e.const(I8, N, [2 * (i // 8) for _ in range(nsub) for i in range(32)]))
        q = b.or_(q, b.shl(b.and_(h, e.splat_const(I8, N, 3)), e.splat_const(I8, N, 4)))
    if e.isa == "portable":
        if kind in _CENTRE:  # signed codes: LLVM selects sdot only for sext x sext (see _CENTRE)
            q = b.sub(q, e.splat_const(I8, N, _CENTRE[kind]))
        elif kind == "q5_0":
            q = b.sub(q, e.splat_const(I8, N, 16))
        elif kind == "q6_K":
            q = b.sub(q, e.splat_const(I8, N, 32))
        elif kind == "mxfp4":  # 2 x E2M1 value of the code: m < 4: m; m < 6: 2m - 4; else 4m - 16
            mag = b.and_(q, e.splat_const(I8, N, 7))
            lt = lambda v: b.icmp_unsigned("<", mag, e.splat_const(I8, N, v))  # noqa: E731
            v6 = b.sub(b.shl(mag, e.splat_const(I8, N, 1)), e.splat_const(I8, N, 4))
            v8 = b.sub(b.shl(mag, e.splat_const(I8, N, 2)), e.splat_const(I8, N, 16))
            v = b.select(lt(4), mag, b.select(lt(6), v6, v8))
            neg = b.icmp_unsigned(">", q, e.splat_const(I8, N, 7))
            q = b.select(neg, b.sub(ir.Constant(_vec(I8, N), None), v), v)
    elif kind == "mxfp4":
        q = e.pshufb(_MXFP4_U, q)
    return q


def _codes_nib(e: _E, kind: str, A: dict, r, b0, nsub: int):
    """x86: the unsigned codes of sub-blocks [b0, b0 + nsub) of row r in the qs nibble order:
    (lo, hi), each <16 nsub x i8>, lo = elements 0..15 of each sub-block (the low nibbles as they
    lie), hi = elements 16..31; for nsub = 1 a single <32 x i8> in element order (lo, hi).

    High bits: the qh masks are read as 16-bit words (word 2s / 2s + 1: elements 0..15 / 16..31
    of sub-block s); the words of one code vector, gathered by one word shuffle, are its byte mask
    (<16 nsub x i1>: an AVX-512 mask register) and the bit is added where it is set (one masked
    vpaddb per mask). q5_K: sub-block s's i32 W (bit 8k + 2c + h: element 8c + 4h + k) goes to
    dwords 4s .. 4s + 3 of both code vectors, shifted so that bit i (lo) / 4 + i (hi) of each byte
    lands in bit 4 of dword i, and or-ed in under the mask 0x10. q6_K: sub-block s's 8 qh bytes as one i64 H (bits 8k + 2c, 8k + 2c + 1: the
    2 high bits of element 8c + k) go to the qwords 2s, 2s + 1 of the code vectors (elements 0..7,
    8..15 of lo; 16..23, 24..31 of hi), shifted so field c lands in each byte's bits 4-5 (lo: << 4,
    << 2; hi: >> 0, >> 2: the bits of the neighbouring fields and bytes fall outside 4-5), and
    or-ed in under the mask 0x30: per 64 codes a permute, a shift and a vpternlog, no mask
    registers (the format-1 layout, two bit masks, cost 8 kmov + 8 masked vpaddb + 2 stores per
    256 codes)."""
    b = e.b
    i64 = e.i64
    lo, hi = _nibbles(e, A, r, b0, nsub)
    q = e.shuffle(lo, hi, range(32)) if nsub == 1 else None

    def put(v, bits, mask):  # v | (bits & mask): one vpternlog
        return b.or_(v, b.and_(b.bitcast(bits, v.type), e.splat_const(I8, v.type.count, mask)))

    def add_where(v, words, idx, val):
        m = b.bitcast(e.shuffle(words, None, idx), _vec(I1, 16 * len(idx)))
        return b.select(m, b.add(v, e.splat_const(I8, v.type.count, val)), v)

    if kind == "q6_K":  # per sub-block one i64 H: bits 8k + 2c, 8k + 2c + 1 = q >> 4 of element 8c + k
        hb, hs = A["qh"]
        H = e.load(hb, b.add(b.mul(r, hs), b.mul(b0, i64(8))), _vec(I64, nsub))
        if nsub == 1:  # qword k of the 32 codes (elements 8k ..): H's field c = k moved to bits 4, 5
            T = e.shuffle(H, None, [0] * 4)
            q = put(q, b.lshr(b.shl(T, e.const(I64, 4, [4, 2, 0, 0])), e.const(I64, 4, [0, 0, 0, 2])), 0x30)
        else:  # H of sub-block s to qwords 2s, 2s + 1 (elements 0..7, 8..15 of lo; 16..23, 24..31 of hi)
            T = e.shuffle(H, None, [s_ for s_ in range(nsub) for _ in (0, 1)])
            lo = put(lo, b.shl(T, e.const(I64, 2 * nsub, [4, 2] * nsub)), 0x30)
            hi = put(hi, b.lshr(T, e.const(I64, 2 * nsub, [0, 2] * nsub)), 0x30)
    elif kind == "q5_K":  # per sub-block one i32 W: bit 8k + 2c + h = q >> 4 of element 8c + 4h + k
        hb, hs = A["qh"]
        W = e.load(hb, b.add(b.mul(r, hs), b.mul(b0, i64(4))), _vec(I32, nsub))
        if nsub == 1:  # dword i of the 32 codes (elements 4i ..): W's bit i of each byte to bit 4
            T = e.shuffle(W, None, [0] * 8)
            q = put(q, b.lshr(b.shl(T, e.const(I32, 8, [4, 3, 2, 1, 0, 0, 0, 0])), e.const(I32, 8, [0, 0, 0, 0, 0, 1, 2, 3])),
                    0x10)
        else:  # W of sub-block s to dwords 4s .. 4s + 3 (elements 4i .. of lo: bit i; 16 + 4i .. of hi: bit 4 + i)
            T = e.shuffle(W, None, [s_ for s_ in range(nsub) for _ in range(4)])
            lo = put(lo, b.shl(T, e.const(I32, 4 * nsub, [4, 3, 2, 1] * nsub)), 0x10)
            hi = put(hi, b.lshr(T, e.const(I32, 4 * nsub, [0, 1, 2, 3] * nsub)), 0x10)
    elif kind in ("q5_0", "q5_1"):
        hb, hs = A["qh"]
        wps = 2  # mask words per sub-block
        w = e.load(hb, b.add(b.mul(r, hs), b.mul(b0, i64(2 * wps))), _vec(I16, wps * nsub))
        bits = ((0, 16),)
        if nsub == 4:  # one word shuffle gives every 64-bit mask of the two code vectors
            order = [(t + h, val) for t, val in bits for h in (0, 1)]
            m = e.masks64(e.shuffle(w, None, [wps * s_ + t for t, _ in order for s_ in range(4)]))
            for i, (t, val) in enumerate(order):
                if t % 2 == 0:
                    lo = e.add_masked(lo, m[i], val)
                else:
                    hi = e.add_masked(hi, m[i], val)
        else:
            for t, val in bits:
                if nsub == 1:
                    q = add_where(q, w, [t, t + 1], val)
                else:
                    lo = add_where(lo, w, [wps * s_ + t for s_ in range(nsub)], val)
                    hi = add_where(hi, w, [wps * s_ + t + 1 for s_ in range(nsub)], val)
    if nsub == 1:
        return (e.pshufb(_MXFP4_U, q) if kind == "mxfp4" else q),
    if kind == "mxfp4":
        lo, hi = e.pshufb(_MXFP4_U, lo), e.pshufb(_MXFP4_U, hi)
    return lo, hi


def _scales(e: _E, kind: str, A: dict, r, blk, dshift):
    """Float scales of sub-block blk of row r: ([D] or [D0, D1] for q6_K, M or None)."""
    b = e.b
    i64 = e.i64
    row = lambda name: b.mul(r, A[name][1])  # noqa: E731
    port = e.isa == "portable"
    if kind in ("q5_0", "q5_1"):
        d = e.half(A["d"][0], b.add(row("d"), b.mul(blk, i64(2))))
        if kind == "q5_1":
            return [d], e.half(A["m"][0], b.add(row("m"), b.mul(blk, i64(2))))
        return [d], (None if port else b.fmul(d, ir.Constant(F32, -16.0)))
    if kind == "mxfp4":
        d = e.e8m0_half(A["e"][0], b.add(row("e"), blk))
        return [d], (None if port else b.fmul(d, ir.Constant(F32, -12.0)))
    s = b.lshr(blk, dshift)
    d = e.half(A["d"][0], b.add(row("d"), b.mul(s, i64(2))))
    if kind == "q6_K":
        so = b.add(row("sc"), b.mul(blk, i64(2)))
        return [b.fmul(d, e.s8f(A["sc"][0], so)), b.fmul(d, e.s8f(A["sc"][0], b.add(so, i64(1))))], None
    dm = e.half(A["dmin"][0], b.add(row("dmin"), b.mul(s, i64(2))))
    sc = e.u8f(A["sc"][0], b.add(row("sc"), blk))
    mn = e.u8f(A["mn"][0], b.add(row("mn"), blk))
    return [b.fmul(d, sc)], b.fmul(b.fmul(dm, mn), ir.Constant(F32, -1.0))


SEL = [k if j < 2 else 4 + k for k in range(4) for j in range(4)]  # group_x86_8: lane -> sub-block
GB = 384  # x86: prepared bytes per token and 8 sub-blocks (see _prep_codegen)
GB6 = 576  # q6_K: the same and its four offset vectors
GBK = {k: GB6 if k == "q6_K" else GB for k in KINDS}


def _prep_codegen(isa: str, q6: bool):
    """x86: the activations of T tokens prepared once per call for group_x86_8, per token and group
    of 8 sub-blocks (GB bytes, GB6 for q6_K; the sub-blocks past the last whole group are read from
    xq by the tails): XL0, XH0, XL1, XH1 (<64 x i8> each: the first / last 16 bytes of each of
    sub-blocks 0..3 / 4..7, the operands of the low / high nibbles), xd in the lanes' order
    (<16 x float>, lane l: sub-block SEL[l]) and, for q6_K, I0 .. I3 (<16 x i32>): lane l of Ik =
    -32 x the sum of the 4 activation bytes that lane l of vpdpbusd with Xk (k: XL0, XH0, XL1, XH1)
    multiplies (|.| <= 32 x 4 x 128), the accumulators the tile's dots start from: its codes' offset
    32 then enters inside the dots, and their lanes hold the exact sum of (q - 32) x."""
    lo_idx = [32 * s_ + i for s_ in range(4) for i in range(16)]
    hi_idx = [32 * s_ + 16 + i for s_ in range(4) for i in range(16)]
    gb = GB6 if q6 else GB

    def codegen(context, builder, signature, args):
        xp, xstride, xdp, xsp, sstride, nb, T, bp, bstride = args
        b = builder
        e = _E(b, isa)
        i64 = e.i64
        z = ir.Constant(_vec(I32, 16), None)
        with cgutils.for_range(b, T) as tl:
            t = tl.index
            with cgutils.for_range(b, b.udiv(nb, i64(8))) as gl:
                g = gl.index
                xo = b.add(b.mul(t, xstride), b.mul(g, i64(256)))
                bo = b.add(b.mul(t, bstride), b.mul(g, i64(gb)))
                out = []
                for j0 in (0, 4):
                    x = e.load(xp, b.add(xo, i64(32 * j0)), _vec(I8, 128))
                    out += [e.shuffle(x, None, lo_idx), e.shuffle(x, None, hi_idx)]
                xd = e.load(xdp, b.add(b.mul(t, sstride), b.mul(g, i64(32))), _vec(F32, 8))
                vals = out + [e.shuffle(xd, None, SEL)]
                if q6:
                    m32 = e.splat_const(I8, 64, 32)
                    vals += [b.sub(z, e.dot(z, m32, o)) for o in out]
                for k, v in enumerate(vals):
                    b.store(v, e.addr(bp, b.add(bo, i64(64 * k))), align=1)
        return context.get_dummy_value()

    return codegen


def _make_prep(isa: str, q6: bool):
    return int_intrinsic(f"kq_{isa}_prep{'6' if q6 else ''}", "xp, xstride, xdp, xsp, sstride, nb, T, bp, bstride",
                         _prep_codegen(isa, q6))


def _tile_codegen(kind: str, isa: str, R: int, U: int, f64: bool = False, pf: bool = False, xouter: bool = False):
    has_min = kind in ("q5_1", "q4_K", "q5_K") or (isa != "portable" and kind in ("q5_0", "mxfp4"))
    FT, esz = (F64, 8) if f64 else (F32, 4)

    def codegen(context, builder, signature, args):
        b = builder
        e = _E(b, isa)
        i64 = e.i64
        slots = args[:2 * NSLOT]
        if isa == "portable":
            dshift, xp, xstride, xdp, xsp, sstride, op, ostride, nb, n0, t0 = args[2 * NSLOT:]
        else:  # bp, bstride: the activations prepared by _prep_codegen
            dshift, xp, xstride, xdp, xsp, sstride, op, ostride, nb, bp, bstride, n0, t0 = args[2 * NSLOT:]
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
        if isa == "portable":
            acc = [[cgutils.alloca_once_value(b, ir.Constant(FT, 0.0)) for _ in range(U)] for _ in range(R)]
        else:
            acc = [[cgutils.alloca_once_value(b, ir.Constant(_vec(F32, 16), None)) for _ in range(U)] for _ in range(R)]
        macc = [[cgutils.alloca_once_value(b, ir.Constant(FT, 0.0)) for _ in range(U)] for _ in range(R)]
        macc8 = [[cgutils.alloca_once_value(b, ir.Constant(_vec(F32, 8), None)) for _ in range(U)] for _ in range(R)]
        rows_cur = [None]  # the row dvec reads (set by scales_vec)
        mode = [False]  # True: the loops of a tile whose d (and dmin) are per 256 columns (dshift 3)
        D = (lambda v: b.fpext(v, FT)) if f64 else (lambda v: v)  # noqa: E731

        def tok(u, blk):
            """Token u's xd and xd * xsum of sub-block blk (float scalars) and xsum (i32)."""
            so = b.add(b.mul(i64(u), sstride), b.mul(blk, i64(4)))
            xd = e.load(xdp, so, F32)
            xs = e.load(xsp, so, I32)
            return xd, xs

        def group_portable(blk):
            xv, xdv = [], []
            for u in range(U):
                xo = b.add(b.mul(i64(u), xstride), b.mul(blk, i64(32)))
                xv.append((e.load(xp, xo, _vec(I8, 16)), e.load(xp, b.add(xo, i64(16)), _vec(I8, 16))))
                xdv.append(tok(u, blk))
            for r in range(R):
                q = _codes(e, kind, A, rows[r], blk, 1)
                q0, q1 = e.shuffle(q, None, range(16)), e.shuffle(q, None, range(16, 32))
                Ds, M = _scales(e, kind, A, rows[r], blk, dshift)
                for u in range(U):
                    xd, xs = xdv[u]
                    if kind == "q6_K":
                        s0, s1 = e.sdot([(q0, xv[u][0])]), e.sdot([(q1, xv[u][1])])
                        t = b.fadd(b.fmul(D(Ds[0]), b.sitofp(s0, FT)), b.fmul(D(Ds[1]), b.sitofp(s1, FT)))
                    else:
                        s = e.sdot([(q0, xv[u][0]), (q1, xv[u][1])])
                        if kind in _CENTRE:  # sum q x = sum (q - c) x + c xsum, exact in i32
                            s = b.add(s, b.mul(xs, ir.Constant(I32, _CENTRE[kind])))
                        t = b.fmul(D(Ds[0]), b.sitofp(s, FT))
                    b.store(b.fadd(b.load(acc[r][u]), b.fmul(t, D(xd))), acc[r][u])
                    if M is not None:
                        mt = b.fmul(b.fmul(D(M), D(xd)), b.sitofp(xs, FT))
                        b.store(b.fadd(b.load(macc[r][u]), mt), macc[r][u])

        # dvec's choice between one super-block scale and per-32 ones, made once per tile: a masked
        # load (1 or 8 lanes) and a select, no branch in the loop (a branch there splits the loop
        # body into blocks that LLVM schedules one by one)
        sup = b.icmp_unsigned("==", dshift, i64(3))
        dmask = {n: e.lanes_below(n, b.select(sup, I32(1), I32(n))) for n in (8, 4, 2, 1)}
        # vnni q6_K: the lanes' order SEL of 8 per-32 scales, or lane 0 everywhere for one per 256: one
        # vpermps in the loop (with dvec's select LLVM emitted a branch there, and a broadcast);
        # measured in cache, 1 thread: q6_K 1.13x -> 1.28x the format-1 kernel's speed with it, but
        # q4_K 0.87x (5 alternated runs each), so q4_K / q5_K keep dvec's select
        dsel = (b.select(sup, ir.Constant(_vec(I32, 16), None), e.const(I32, 16, SEL))
                if isa == "vnni" and kind == "q6_K" else None)

        def dsplat(name, b0, n):
            """mode[0] (d per 256 columns): the one fp16 scale of sub-blocks [b0, b0 + 8) as <n x float>."""
            base, st = A[name]
            h = e.load(base, b.add(b.mul(rows_cur[0], st), b.mul(b.lshr(b0, i64(3)), i64(2))), I16)
            return e.splat(b.fpext(b.bitcast(h, F16), F32), n)

        def dlanes(name, b0):
            """The super-block scale of each of group_x86_8's 16 lanes (lane l: sub-block b0 + SEL[l])."""
            if mode[0]:
                return dsplat(name, b0, 16)
            if dsel is None:
                return e.shuffle(dvec(name, b0, 8), None, SEL)
            base, st = A[name]
            h = e.load(base, b.add(b.mul(rows_cur[0], st), b.mul(b.lshr(b0, dshift), i64(2))), _vec(I16, 8), dmask[8])
            v = b.fpext(b.bitcast(h, _vec(F16, 8)), _vec(F32, 8))
            f = e.decl("llvm.x86.avx512.permvar.sf.512", _vec(F32, 16), [_vec(F32, 16), _vec(I32, 16)])
            return b.call(f, [e.shuffle(v, ir.Constant(v.type, None), list(range(16))), dsel])

        def dvec(name, b0, n):
            """<n x float> super-block scales of sub-blocks [b0, b0 + n): one fp16 splat when d is
            per 256 columns (dshift 3; the n sub-blocks then share it), else n fp16 values."""
            if mode[0]:
                return dsplat(name, b0, n)
            base, st = A[name]
            row = b.mul(rows_cur[0], st)
            h = e.load(base, b.add(row, b.mul(b.lshr(b0, dshift), i64(2))), _vec(I16, n), dmask[n])
            v = b.fpext(b.bitcast(h, _vec(F16, n)), _vec(F32, n))
            return b.select(sup, e.shuffle(v, None, [0] * n), v)

        def scales_vec(r, b0, n):
            """(D <G x float>, M <n x float> or None) of row r's sub-blocks [b0, b0 + n); G = 2n for
            q6_K (per 16 elements), else n."""
            rows_cur[0] = r
            row = lambda name: b.mul(r, A[name][1])  # noqa: E731
            if kind in ("q5_0", "q5_1"):
                d = e.half4(A["d"][0], b.add(row("d"), b.mul(b0, i64(2))), n)
                if kind == "q5_1":
                    return d, e.half4(A["m"][0], b.add(row("m"), b.mul(b0, i64(2))), n)
                return d, b.fmul(d, e.splat(ir.Constant(F32, -16.0), n))
            if kind == "mxfp4":
                ev = b.zext(e.load(A["e"][0], b.add(row("e"), b0), _vec(I8, n)), _vec(I32, n))
                den = b.shl(e.splat(I32(0x00200000), n), ev)
                norm = b.shl(b.sub(ev, e.splat(I32(1), n)), e.splat(I32(23), n))
                d = b.bitcast(b.select(b.icmp_unsigned("<", ev, e.splat(I32(2), n)), den, norm), _vec(F32, n))
                return d, b.fmul(d, e.splat(ir.Constant(F32, -12.0), n))
            d = dvec("d", b0, n)
            if kind == "q6_K":
                sc = b.sitofp(e.load(A["sc"][0], b.add(row("sc"), b.mul(b0, i64(2))), _vec(I8, 2 * n)), _vec(F32, 2 * n))
                return b.fmul(e.shuffle(d, None, [i // 2 for i in range(2 * n)]), sc), None
            sc = b.uitofp(e.load(A["sc"][0], b.add(row("sc"), b0), _vec(I8, n)), _vec(F32, n))
            mn = b.uitofp(e.load(A["mn"][0], b.add(row("mn"), b0), _vec(I8, n)), _vec(F32, n))
            dm = dvec("dmin", b0, n)
            return b.fmul(d, sc), b.fmul(b.fmul(dm, mn), e.splat(ir.Constant(F32, -1.0), n))

        z = ir.Constant(_vec(I32, 16), None)

        def prefetch(b0):
            """Each row's streams (qs, qh) pf_off bytes ahead: the same place kR rows further on,
            in a row tile this thread runs later (the rows of a matrix are contiguous, so that is
            the next kR row-lengths of the stream; pf_off >= PF)."""
            for r in range(R):
                for name, bpb in PF_STREAMS[kind]:
                    base, st = A[name]
                    off = b.add(b.add(b.mul(rows[r], st), b.mul(b0, i64(bpb))), pf_off[name])
                    for line in range(0, 8 * bpb, 64):
                        e.prefetch(base, b.add(off, i64(line)))

        def group_x86_8(b0):
            """Sub-blocks [b0, b0 + 8) (the main loop), integer until one conversion per (row, token):
            per 4 sub-blocks (part p) the dot products of the codes in the qs nibble order (low
            nibbles with the activations' first 16 bytes of each sub-block, XL, high with the last
            16, XH: both prepared, see _prep_codegen) land in 16 i32 lanes, 4 per sub-block (q6_K:
            low and high halves in separate lanes); vpackssdw of the two parts' lanes (exact:
            |lane| <= 4 x 63 x 128 < 2^15) and vpmaddwd with the sub-blocks' integer scales as words
            (q4_K, q5_K: sc; q6_K: sc of each half, two of them; the other types: 1) give 16 i32
            lanes, 2 per sub-block (lane l: sub-block SEL[l]); q6_K's offset 32 enters inside the
            dots, which start from the prepared -32 x (activation sums) (lanes of sum (q - 32) x,
            |.| <= 4 x 32 x 128: exact in the words; the same integers as the format-1 kernel's
            vpdpwssd of the sums with the negated scales, one instruction and a scale vector less
            per row); |S| < 2^24, so the conversion is exact; then one FMA with the lanes' float scale (d, or the type's D) times xd."""
            q6 = kind == "q6_K"
            go = b.mul(b.udiv(b0, i64(8)), i64(GBK[kind]))  # the group's prepared bytes, per token
            if pf:
                prefetch(b0)

            def X(p, k, ty=_vec(I8, 64)):
                """Prepared vector k of a token whose bytes start at p (0..3: XL0, XH0, XL1, XH1; 4: xd
                lanes; 5: q6_K's words)."""
                return e.load(p, i64(64 * k), ty)
            def row_setup(row):
                """Row row's decoded codes and scales for the group: (codes, dl, scw)."""
                codes = [_codes_nib(e, kind, A, row, b.add(b0, i64(j0)), 4) for j0 in (0, 4)]
                if kind in quant.K_TYPES:
                    rows_cur[0] = row
                    dl = dlanes("d", b0)
                    so = b.add(b.mul(row, A["sc"][1]), b.mul(b0, i64(2 if q6 else 1)))
                    if q6:  # sc of sub-block s: low half 2s, high half 2s + 1
                        # widened once, then two word permutes (the barrier: LLVM otherwise moved the
                        # shuffles before the sign extension, 3 x (vpshufb + vpmovsxbw) with nsc)
                        sc = e.opaque(b.sext(e.load(A["sc"][0], so, _vec(I8, 16)), _vec(I16, 16)))
                        scw = [e.shuffle(sc, None, [2 * SEL[m // 2] + h for m in range(32)]) for h in (0, 1)]
                    else:
                        sc = b.zext(e.load(A["sc"][0], so, _vec(I8, 8)), _vec(I16, 8))
                        scw = [e.shuffle(sc, None, [SEL[m // 2] for m in range(32)])]
                else:
                    dl = e.shuffle(scales_vec(row, b0, 8)[0], None, SEL)
                    scw = [e.splat_const(I16, 32, 1)]
                return codes, dl, scw

            def row_token(rd, pu, r, u):
                """One (row, token): the same operations in every tile shape."""
                codes, dl, scw = rd
                XL0, XH0, XL1, XH1 = (X(pu, k) for k in range(4))
                if q6:  # the dots start from the prepared -32 x (activation sums): lanes of sum (q - 32) x
                    I0, I1, I2, I3 = (X(pu, 5 + k, _vec(I32, 16)) for k in range(4))
                    lo = e.packssdw(e.dot(I0, codes[0][0], XL0), e.dot(I2, codes[1][0], XL1))
                    hi = e.packssdw(e.dot(I1, codes[0][1], XH0), e.dot(I3, codes[1][1], XH1))
                    S = e.dpwssd(e.pmaddwd(lo, scw[0]), hi, scw[1])
                else:
                    i0 = e.dot(e.dot(z, codes[0][0], XL0), codes[0][1], XH0)
                    i1 = e.dot(e.dot(z, codes[1][0], XL1), codes[1][1], XH1)
                    S = e.pmaddwd(e.packssdw(i0, i1), scw[0])
                a = e.fma(b.sitofp(S, _vec(F32, 16)), b.fmul(dl, X(pu, 4, _vec(F32, 16))), b.load(acc[r][u]))
                b.store(a, acc[r][u])
                return a

            last = []  # the accumulators just computed: the next row / token comes after them
            if xouter:  # every row decoded first, then token by token (the token's loads shared by the rows)
                rds = [row_setup(rows[r]) for r in range(R)]
                for u in range(U):
                    pu = b.add(b.add(bp, b.mul(i64(u), bstride)), go)
                    pu = e.after(pu, last) if last else pu
                    last = [row_token(rds[r], pu, r, u) for r in range(R)]
                return
            for r in range(R):
                rd = row_setup(e.after(rows[r], last) if last else rows[r])
                for u in range(U):
                    pu = b.add(b.add(bp, b.mul(i64(u), bstride)), go)
                    pu = e.after(pu, last) if last else pu
                    a = row_token(rd, pu, r, u)
                    # one token (decode): the rows interleaved and the loads shared, but for q5_K and q6_K, whose
                    # rows hold more registers (measured: q4_K vnni 1.08x slower with the barrier, q6_K avx2
                    # 0.84x without; q5_K vnni: 8 spills in the loop without it, none with it)
                    last = [a] if U > 1 or kind in ("q5_K", "q6_K") else []

        def group_x86(b0, n):
            """Sub-blocks [b0, b0 + n), n = 8 (the main loop), 4, 2 or 1 (tails). The codes stay in
            the qs nibble order (``_codes_nib``): per 4 sub-blocks, one dot of the low nibbles with
            the activations' first 16 bytes of each sub-block (XL) and one of the high nibbles with
            the last 16 (XH) land in the same 16 i32 lanes, lane l holding sub-block l // 4; one
            conversion and one FMA per 4 sub-blocks then (q6_K: two, its scales being per 16
            elements). A tail of one sub-block dots its 32 codes in element order (8 lanes)."""
            subs = [(4 * j, 4) for j in range(n // 4)] if n >= 4 else [(0, n)]
            xv, xdl, init = [], [], []
            for u in range(U):
                xrow = b.add(b.mul(i64(u), xstride), b.mul(b0, i64(32)))
                so = b.add(b.mul(i64(u), sstride), b.mul(b0, i64(4)))
                xd = e.load(xdp, so, _vec(F32, n))
                xs_, xl_, ini = [], [], []
                for j0, ns in subs:
                    L = 4 * ns if ns > 1 else 8
                    x = e.load(xp, b.add(xrow, i64(32 * j0)), _vec(I8, 32 * ns))
                    if ns > 1:
                        ops = (e.shuffle(x, None, [32 * s + i for s in range(ns) for i in range(16)]),
                               e.shuffle(x, None, [32 * s + 16 + i for s in range(ns) for i in range(16)]))
                        xl_.append(e.shuffle(xd, None, [j0 + i // 4 for i in range(L)]))
                    else:
                        ops = (x,)
                        xl_.append(e.splat(e.b.extract_element(xd, I32(j0)), L))
                    xs_.append(ops)
                    if kind == "q6_K":  # -32 * (sum of each lane's 4 activations)
                        z = ir.Constant(_vec(I32, L), None)
                        ini.append(tuple(b.sub(z, e.dot(z, e.splat_const(I8, o.type.count, 32), o))
                                         for o in ops))
                    else:
                        ini.append(None)
                xv.append(xs_)
                xdl.append(xl_)
                init.append(ini)
            pad16 = lambda v, L: v if L == 16 else e.shuffle(  # noqa: E731
                v, ir.Constant(v.type, None), list(range(L)) + [L] * (16 - L))
            for r in range(R):
                Dv, Mv = scales_vec(rows[r], b0, n)
                qs_ = [_codes_nib(e, kind, A, rows[r], b.add(b0, i64(j0)), ns) for j0, ns in subs]
                Dl = []  # per part: the lanes' scales (q6_K: (low, high) halves)
                for j0, ns in subs:
                    L = 4 * ns if ns > 1 else 8
                    if kind == "q6_K":
                        if ns > 1:
                            Dl.append((e.shuffle(Dv, None, [2 * (j0 + i // 4) for i in range(L)]),
                                       e.shuffle(Dv, None, [2 * (j0 + i // 4) + 1 for i in range(L)])))
                        else:
                            Dl.append((e.shuffle(Dv, None, [i // 4 for i in range(L)]),))
                    else:
                        Dl.append(e.shuffle(Dv, None, [j0 + i // 4 for i in range(L)]) if ns > 1 else e.splat(
                            b.extract_element(Dv, I32(0)), L))
                for u in range(U):
                    a = b.load(acc[r][u])
                    for p_, ((j0, ns), q, x, ini) in enumerate(zip(subs, qs_, xv[u], init[u])):
                        L = 4 * ns if ns > 1 else 8
                        cvt = lambda v: b.sitofp(v, _vec(F32, L))  # noqa: E731
                        z = ir.Constant(_vec(I32, L), None)
                        if kind == "q6_K" and ns > 1:
                            ilo = e.dot(ini[0], q[0], x[0])
                            ihi = e.dot(ini[1], q[1], x[1])
                            t = e.fma(cvt(ihi), Dl[p_][1], b.fmul(cvt(ilo), Dl[p_][0]))
                            a = e.fma(pad16(t, L), pad16(xdl[u][p_], L), a)
                        else:
                            if ns > 1:
                                i = e.dot(e.dot(z, q[0], x[0]), q[1], x[1])
                            else:
                                i = e.dot(ini[0] if kind == "q6_K" else z, q[0], x[0])
                            P = b.fmul(Dl[p_][0] if kind == "q6_K" else Dl[p_], xdl[u][p_])
                            a = e.fma(pad16(cvt(i), L), pad16(P, L), a)
                    b.store(a, acc[r][u])

        def group_min(b0, n):
            """The offset terms M * xd * xsum of sub-blocks [b0, b0 + n) (a loop of their own after
            the dot products: in the same loop their 8-lane accumulators spilled the dots' registers)."""
            xdsum = []
            for u in range(U):
                so = b.add(b.mul(i64(u), sstride), b.mul(b0, i64(4)))
                v = b.fmul(e.load(xdp, so, _vec(F32, n)), b.sitofp(e.load(xsp, so, _vec(I32, n)), _vec(F32, n)))
                xdsum.append(e.shuffle(v, ir.Constant(v.type, None), list(range(n)) + [n] * (8 - n)) if n < 8 else v)
            for r in range(R):
                _, Mv = scales_vec(rows[r], b0, n)
                Mp = e.shuffle(Mv, ir.Constant(Mv.type, None), list(range(n)) + [n] * (8 - n)) if n < 8 else Mv
                for u in range(U):
                    b.store(e.fma(Mp, xdsum[u], b.load(macc8[r][u])), macc8[r][u])

        pf_off = e.pf_offsets(A, PF_STREAMS[kind], R, PF) if pf else {}
        if isa == "portable":
            with cgutils.for_range(b, nb) as loop:
                group_portable(loop.index)
        else:
            n8 = b.udiv(nb, i64(8))
            # one token (decode, and the token tails of T > 1), q4_K and q5_K: the loops emitted twice, for
            # d and dmin per 256 columns (one fp16 load and splat per row and group: no branch inside the
            # loop) and as before for the _32 slices (module docstring: measured)
            split = kind in ("q4_K", "q5_K") and U == 1

            def loops(m):
                mode[0] = m
                for grp, grp8 in ((group_x86, group_x86_8), (group_min, None)) if has_min else ((group_x86, group_x86_8),):
                    with cgutils.for_range(b, n8) as loop:
                        (grp8 or (lambda b0: grp(b0, 8)))(b.mul(loop.index, i64(8)))
                    if m:  # d per 256 columns: nb % 8 == 0 (_dshift), no tail
                        continue
                    # the tail (q5_0 / q5_1 / mxfp4 rows, _32 slices): up to 7 sub-blocks, 4 of them together
                    # when there are (Qwen3-30B-A3B's expert down-projection at 2 ranks: 8 + 4 sub-blocks a
                    # row, at 4 ranks 4 + 2), the rest one at a time (no 2-path: less code to compile)
                    rest = b.urem(nb, i64(8))
                    first = b.sub(nb, rest)
                    four = b.icmp_unsigned(">=", rest, i64(4))
                    with b.if_then(four):
                        grp(first, 4)
                    first = b.add(first, b.select(four, i64(4), i64(0)))
                    with cgutils.for_range(b, b.sub(nb, first)) as loop:
                        grp(b.add(first, loop.index), 1)
                mode[0] = False
            if split:
                with b.if_else(sup) as (then, other):
                    with then:
                        loops(True)
                    with other:  # the _32 slices: dvec's masked load and select, as the other tiles
                        loops(False)
            else:
                loops(False)
        for r in range(R):
            for u in range(U):
                a = b.load(acc[r][u])
                if isa != "portable":
                    a = b.fadd(e.hsum(a), e.hsum(b.load(macc8[r][u])))
                b.store(b.fadd(a, b.load(macc[r][u])), e.addr(op, b.add(b.mul(i64(u), ostride), i64(esz * r))))
        return context.get_dummy_value()

    return codegen


def _make_tile(kind, isa, R, U, f64=False, pf=False, xouter=False):
    return int_intrinsic(f"kq_{isa}_{kind}_tile_{R}x{U}{'_f64' if f64 else ''}{'_pf' if pf else ''}{'_xo' if xouter else ''}",
                         "a0, s0, a1, s1, a2, s2, a3, s3, a4, s4, a5, s5, dshift, xp, xstride, xdp, xsp, sstride, op, "
                         f"ostride, nb, {'' if isa == 'portable' else 'bp, bstride, '}n0, t0",
                         _tile_codegen(kind, isa, R, U, f64, pf, xouter))


# tiles per path and kind: R rows x U tokens; portable and f64: RU for T > 1, R1 for its token tail and
# D for T = 1, single rows (O*) after the last whole row tile
R_S, U_S = 4, 4
PF = 16384  # prefetch distance: of the matrix (each stream, qs and qh, kR rows ahead: k R row lengths >= PF)
# the arrays streamed per row that decode prefetches, with their bytes per 32-element sub-block
PF_STREAMS = {k: (("qs", 16),) + ((("qh", 8 if k == "q6_K" else 4),) if "qh" in ARR[k] else ()) for k in KINDS}
R_P, U_P = 4, 2
# x86: S (R_S x U_S) and its token tails S1 .. S<U_S - 1> for every T > 1 and S1 for T = 1 (D), all
# prefetching; O1 for the rows after the last whole row tile
# W (R_W x U_W, R_W dividing R_S): the whole groups of U_W tokens of a row tile first (the weights'
# decoding per row and group amortized over U_W tokens instead of U_S)
R_W, U_W = 2, 8
_X86 = dict(W=(R_W, U_W, True, True), S=(R_S, U_S, True), **{f"S{t}": (R_S, t, True) for t in range(1, U_S)}, O1=(1, 1))
SHAPES = {"vnni": _X86, "avx2": dict(_X86),
          "portable": dict(RU=(R_P, U_P), R1=(R_P, 1), OU=(1, U_P), O1=(1, 1), D=(R_P, 1)),
          "f64": dict(RU=(R_P, 1), R1=(R_P, 1), OU=(1, 1), O1=(1, 1), D=(R_P, 1))}
TILES = {}  # "<path>_<kind>_<shape>" -> intrinsic (made on first use: see _tiles_of)


def tile(path: str, kind: str, shape: str):
    key = f"{path}_{kind}_{shape}"
    if key not in TILES:
        R, U, *fl = SHAPES[path][shape]  # fl: (prefetch, tokens outer)
        fl = list(fl) + [False] * (2 - len(fl))
        TILES[key] = _make_tile(kind, "portable" if path == "f64" else path, R, U, path == "f64", fl[0], fl[1])
    return TILES[key]


# ----------------------------------------------------------------------------------------------
# shape checks of the array-typed entry points (below)
# ----------------------------------------------------------------------------------------------
@njit(**_JIT)
def _chk(w, N, width):
    if w.shape[0] != N or w.shape[1] != width:
        raise ValueError("matmul: weight arrays do not match (N, K)")
    if not rows_ok(w):
        raise ValueError("matmul: every array's rows must be contiguous")


@njit(**_JIT)
def _check(qs, xq, xd, xsum, out, qs_bytes=16):
    """(N, nb, T) after checking the activations and out against qs (``qs_bytes`` per 32-block:
    16 for the nibble types, 8 for lowk's 2-bit codes)."""
    N = qs.shape[0]
    T, K = xq.shape
    nb = K // 32
    if K % 32 or qs.shape[1] != nb * qs_bytes:
        raise ValueError("matmul: weight arrays do not match (N, K)")
    if xd.shape[0] != T or xd.shape[1] != nb or xsum.shape[0] != T or xsum.shape[1] != nb:
        raise ValueError("matmul: xd and xsum must be (T, K // 32)")
    if out.shape[0] != T or out.shape[1] != N:
        raise ValueError("matmul: out must be (T, N)")
    if T > 1 and xsum.strides[0] != xd.strides[0]:
        raise ValueError("matmul: xd and xsum must have the same row stride")
    if not (rows_ok(qs) and rows_ok(xq) and rows_ok(xd) and rows_ok(xsum) and rows_ok(out)):
        raise ValueError("matmul: every array's rows must be contiguous")
    return N, nb, T


@njit(**_JIT)
def _dshift(d, N, nb):
    """3 when d holds one scale per 256 columns, 0 for one per 32 (the ``_32`` variants)."""
    if nb % 8 == 0 and d.shape[1] == nb // 8 and nb > 0:
        _chk(d, N, nb // 8)
        return 3
    _chk(d, N, nb)
    return 0


@njit(**_JIT)
def _args(p0, s0, p1, s1, p2, s2, p3, s3, p4, s4, p5, s5, dshift, xq, xd, xsum, out, nb):
    """The tile arguments as one tuple type (all int64), so each runner compiles once for every type."""
    i = np.int64
    return (i(p0), i(s0), i(p1), i(s1), i(p2), i(s2), i(p3), i(s3), i(p4), i(s4), i(p5), i(s5), i(dshift),
            i(xq.ctypes.data), i(xq.strides[0]), i(xd.ctypes.data), i(xsum.ctypes.data), i(xd.strides[0]),
            i(out.ctypes.data), i(out.strides[0]), i(nb))


@njit(**_JIT)
def q5_0(qs, qh, d, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out)
    _chk(qh, N, nb * 4)
    _chk(d, N, nb)
    return _args(qs.ctypes.data, qs.strides[0], qh.ctypes.data, qh.strides[0], d.ctypes.data, d.strides[0],
        0, 0, 0, 0, 0, 0, 0, xq, xd, xsum, out, nb), N, T


@njit(**_JIT)
def q5_1(qs, qh, d, m, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out)
    _chk(qh, N, nb * 4)
    _chk(d, N, nb)
    _chk(m, N, nb)
    return _args(qs.ctypes.data, qs.strides[0], qh.ctypes.data, qh.strides[0], d.ctypes.data, d.strides[0],
        m.ctypes.data, m.strides[0], 0, 0, 0, 0, 0, xq, xd, xsum, out, nb), N, T


@njit(**_JIT)
def q4_K(qs, sc, mn, d, dmin, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out)
    _chk(sc, N, nb)
    _chk(mn, N, nb)
    ds = _dshift(d, N, nb)
    _chk(dmin, N, d.shape[1])
    return _args(qs.ctypes.data, qs.strides[0], sc.ctypes.data, sc.strides[0], mn.ctypes.data, mn.strides[0],
        d.ctypes.data, d.strides[0], dmin.ctypes.data, dmin.strides[0], 0, 0, ds, xq, xd, xsum, out, nb), N, T


@njit(**_JIT)
def q5_K(qs, qh, sc, mn, d, dmin, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out)
    _chk(qh, N, nb * 4)
    _chk(sc, N, nb)
    _chk(mn, N, nb)
    ds = _dshift(d, N, nb)
    _chk(dmin, N, d.shape[1])
    return _args(qs.ctypes.data, qs.strides[0], qh.ctypes.data, qh.strides[0], sc.ctypes.data, sc.strides[0],
        mn.ctypes.data, mn.strides[0], d.ctypes.data, d.strides[0], dmin.ctypes.data, dmin.strides[0], ds,
        xq, xd, xsum, out, nb), N, T


@njit(**_JIT)
def q6_K(qs, qh, sc, d, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out)
    _chk(qh, N, nb * 8)
    _chk(sc, N, nb * 2)
    ds = _dshift(d, N, nb)
    return _args(qs.ctypes.data, qs.strides[0], qh.ctypes.data, qh.strides[0], sc.ctypes.data, sc.strides[0],
        d.ctypes.data, d.strides[0], 0, 0, 0, 0, ds, xq, xd, xsum, out, nb), N, T


@njit(**_JIT)
def mxfp4(qs, e, xq, xd, xsum, out):
    N, nb, T = _check(qs, xq, xd, xsum, out)
    _chk(e, N, nb)
    return _args(qs.ctypes.data, qs.strides[0], e.ctypes.data, e.strides[0], 0, 0, 0, 0, 0, 0, 0, 0, 0,
        xq, xd, xsum, out, nb), N, T


# ----------------------------------------------------------------------------------------------
# runners and the per-path entry points (the kernel API's names; fp16 arrays as uint16 views),
# one per path and type, generated from the templates below into a file (numba caches only
# functions that live in files; one runner per type keeps each compilation to that type's tiles)
# with the tiles (``<path>_<kind>_<shape>``) and the checks above (``check_<kind>``) bound by name.
# prange over row tiles (numba gives each thread a contiguous range); a row tile is used for all
# T tokens, U at a time, while it is in cache. ``a``: the tile arguments from the slots to nb.
# ----------------------------------------------------------------------------------------------
# T = 1: the row tiles (D, the last rows one at a time with O1), shared with lowk's x86 runners
T1_ROWS = """\
    if T == 1:
        for i in prange((N + RD - 1) // RD):
            n0 = i * RD
            if n0 + RD <= N:
                {P}_{K}_D(*a, n0, 0)
            else:
                for n in range(n0, N):
                    {P}_{K}_O1(*a, n, 0)
        return
"""
_RUN = """

@njit(cache=True, fastmath=False, nogil=True, parallel=True)
def run_{P}_{K}(a, N, T):
    RD, R, U = {RD}, {R}, {U}
""" + T1_ROWS + "{loop}"
# the x86 paths: per R_S-row tile, the whole groups of U_W tokens in R_W x U_W tiles (W), then R_S x U_S
# tiles (S) and a tail of fewer than U_S tokens (S<t>; T = 1: S1); all prefetch (the T = 1 stream);
# rows after the last whole row tile one by one (O1)
# (the activations prepared first into buf, which the entry point allocates and holds for the call:
# see iquant's note on a buffer allocated in the parallel runner)
_RUN_S = """

@njit(cache=True, fastmath=False, nogil=True, parallel=True)
def run_{P}_{K}(a, N, T, buf):
    RS, US, RW, UW = {RS}, {US}, {RW}, {UW}
    dshift, xp, xstride, xdp, xsp, sstride, op, ostride, nb = a[12:]
    bp, bs = buf.ctypes.data, buf.shape[0] // max(T, 1)
    {P}_prep{Q6}(xp, xstride, xdp, xsp, sstride, nb, T, bp, bs)
    for i in prange((N + RS - 1) // RS):
        n0 = i * RS
        if n0 + RS <= N:
            t0 = 0
            while t0 + UW <= T:
                for r in range(0, RS, RW):
                    {P}_{K}_W(*a, bp, bs, n0 + r, t0)
                t0 += UW
            while t0 + US <= T:
                {P}_{K}_S(*a, bp, bs, n0, t0)
                t0 += US
{tails}        else:
            for n in range(n0, N):
                for t in range(T):
                    {P}_{K}_O1(*a, bp, bs, n, t)
"""
# the entry point of a runner that prepares the activations: it allocates their buffer (``size``
# bytes, an expression of T and xd) and holds it for the call; kquant, lowk and iquant x86
ENTRY_BUF = """

@njit({flags})
def {name}({arrays}, xq, xd, xsum, out):
    a, N, T = check_{K}({arrays}, xq, xd, xsum, out)
    buf = np.empty({size}, np.uint8)
    run_{P}_{K}(a, N, T, buf)
"""
_ENTRY = """

@njit({flags})
def {name}({arrays}, xq, xd, xsum, out):
    a, N, T = check_{K}({arrays}, xq, xd, xsum, out)
    run_{P}_{K}(a, N, T)
"""


def entry_name(path: str, kind: str) -> str:
    """The name of a path's kernel for a kind: <path>_matmul_<kind>_q8_0, f64: matmul_<kind>_q8_0_f64."""
    return f"matmul_{kind}_q8_0_f64" if path == "f64" else f"{path}_matmul_{kind}_q8_0"


def _runners_source() -> str:
    src = runners.HEADER.format(by=__name__) + "import numpy as np\n"
    for P, sh in SHAPES.items():
        for K in KINDS:
            if "S" in sh:
                tails = "".join(f"            {'if' if t == 1 else 'elif'} T - t0 == {t}:\n"
                                f"                {P}_{K}_S{t}(*a, bp, bs, n0, t0)\n" for t in range(1, sh["S"][1]))
                src += _RUN_S.format(P=P, K=K, RS=sh["S"][0], US=sh["S"][1], RW=sh["W"][0], UW=sh["W"][1], tails=tails,
                                     Q6="6" if K == "q6_K" else "")
                src += ENTRY_BUF.format(flags=runners.flags(_JIT), name=entry_name(P, K), arrays=", ".join(ARR[K]),
                                        P=P, K=K, size=f"T * max(1, xd.shape[1] // 8 * {GBK[K]})")
                continue
            src += _RUN.format(P=P, K=K, RD=sh["D"][0], R=sh["RU"][0], U=sh["RU"][1],
                               loop=runners.row_tiles(4, *(f"{P}_{K}_{s}" for s in ("RU", "R1", "OU", "O1"))))
            src += _ENTRY.format(flags=runners.flags(_JIT), name=entry_name(P, K), arrays=", ".join(ARR[K]), P=P, K=K)
    return src


def _runner_names() -> dict:
    names = {f"check_{K}": globals()[K] for K in KINDS}
    names.update({f"{P}_{K}_{sh}": tile(P, K, sh) for P in SHAPES for K in KINDS for sh in SHAPES[P]})
    names.update({f"{P}_prep{q}": _make_prep(P, q == "6") for P in ("vnni", "avx2") for q in ("", "6")})
    return names


_R = jitcache.load_generated("kq", "kq_run", _runners_source(), _runner_names())
for _P in SHAPES:  # vnni_matmul_q5_0_q8_0, ..., portable_matmul_mxfp4_q8_0, matmul_q5_0_q8_0_f64, ...
    for _K in KINDS:
        globals()[entry_name(_P, _K)] = getattr(_R, entry_name(_P, _K))
