"""A candidate weight layout for steps of several rows, measured against the VNNI kernels in use:
``python -m benchmarks.interleaved --json out.json`` (one thread; the weights rotate over copies
totalling more than the last-level cache, as a model's layers do).

The kernels in use (mpillm.kernels.x86) keep a weight row's blocks in the lanes of a register and
sum the lanes at the end; per (row, token) they load 10 prepared activation vectors per 8
``vpdpbusd`` and reduce 16 lanes, and short rows (SmolLM2's K = 576) add a tail group. At 8 rows
a step of the bundled model reaches about 22% of the instruction's peak (scripts/vnni_peak.py).

The layout measured here interleaves 16 weight rows per register instead: for each group of 16
rows and each 32-weight block, 4 registers of codes (q8_0: 8), register c holding bytes 4c..4c+3
of the block of each of the 16 rows (the fp16 scales of the 16 rows beside them). A token's
activation dword is broadcast into ``vpdpbusd`` against such a register, so each lane accumulates
one row's exact integer dot product of the block, and one conversion, one multiply by d * xd
and one fma per (16 rows, token, block) follow: no horizontal sums, no tail groups (any K that
is a multiple of 32), the codes unpacked once per (16 rows, block) for all the tokens of a tile
(8 here, then a tile of 4, 2 and 1 as needed). q4_0 starts the integer sum at -8 xsum, q8_0 (stored as w + 128)
at -128 xsum, q4_1 adds m * xd * xsum per block. Every lane runs the same operations in any
tile, so a row's result does not depend on its batch; it differs from the current kernels' in
the order of float additions only (the printout gives the largest relative difference).

The weights are repacked in memory here (a shard would have to store them so: not done), so this
measures the arithmetic and the stream, not a loader. ``--prefetch`` issues a software prefetch
that many bytes ahead in the repacked stream.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils

from mpillm import kernels
from mpillm.formats import quant
from mpillm.kernels.bench import LLC_BYTES
from mpillm.kernels.irgen import F16, F32, I8, I16, I32, I64, Emit, int_intrinsic, vec

KINDS = ("q4_0", "q4_1", "q8_0")
ROWS = 16  # weight rows per register
U = 8  # tokens per tile
SHAPES = {  # name: (N, K)
    "smol-up 1536x576": (1536, 576),
    "smol-attn 576x576": (576, 576),
    "smol-down 576x1536": (576, 1536),
    "smol-out 49152x576": (49152, 576),
    "1b-gate 8192x2048": (8192, 2048),
    "1b-down 2048x8192": (2048, 8192),
}


def _codegen(kind: str, tokens: int, prefetch: int):
    q8 = kind == "q8_0"
    gbytes = 512 if q8 else 256  # code bytes per (16 rows, block)

    def codegen(context, b, sig, args):
        wp, dp, mp, ngroups, nb, xp, xsp, xdp, t0, op, ostride, K = args
        e = Emit(b)
        i64 = lambda v: ir.Constant(I64, v)  # noqa: E731
        V = vec(I32, 16)
        dot = e.decl("llvm.x86.avx512.vpdpbusd.512", V, [V, V, V])
        pf = e.decl("llvm.prefetch.p0", ir.VoidType(), [ir.PointerType(I8), I32, I32, I32])
        m15 = e.const(I32, 16, [0x0F0F0F0F] * 16)
        sh4 = e.const(I32, 16, [4] * 16)
        with cgutils.for_range(b, ngroups) as gl:
            acc = [cgutils.alloca_once_value(b, ir.Constant(vec(F32, 16), None)) for _ in range(tokens)]
            with cgutils.for_range(b, nb) as bl:
                blk = bl.index
                gb = b.add(b.mul(gl.index, nb), blk)
                if prefetch:  # the repacked matrix is one stream: this block's lines, prefetch bytes on
                    for line in range(gbytes // 64):
                        b.call(pf, [e.addr(wp, b.add(b.mul(gb, i64(gbytes)), i64(prefetch + 64 * line))),
                                    I32(0), I32(2), I32(1)])
                    for base in (dp, mp) if kind == "q4_1" else (dp,):
                        b.call(pf, [e.addr(base, b.add(b.mul(gb, i64(32)), i64(prefetch // 8))), I32(0), I32(2), I32(1)])
                if q8:
                    W = [e.load(wp, b.add(b.mul(gb, i64(gbytes)), i64(64 * c)), V) for c in range(8)]
                    xoff = [4 * c for c in range(8)]
                else:  # byte j of a block: element j (low nibble) and j + 16 (high)
                    raw = [e.load(wp, b.add(b.mul(gb, i64(gbytes)), i64(64 * c)), V) for c in range(4)]
                    W = [b.and_(r, m15) for r in raw] + [b.and_(b.lshr(r, sh4), m15) for r in raw]
                    xoff = [4 * c for c in range(4)] + [16 + 4 * c for c in range(4)]

                def half16(base):
                    h = e.load(base, b.mul(gb, i64(32)), vec(I16, 16))
                    return b.fpext(b.bitcast(h, vec(F16, 16)), vec(F32, 16))

                d = half16(dp)
                m = half16(mp) if kind == "q4_1" else None
                for u in range(tokens):
                    t = b.add(t0, i64(u))
                    so = b.mul(b.add(b.mul(t, nb), blk), i64(4))
                    xs = e.load(xsp, so, I32)
                    a = ir.Constant(V, None) if kind == "q4_1" else e.splat(b.mul(xs, I32(-128 if q8 else -8)), 16)
                    xrow = b.add(b.mul(t, K), b.mul(blk, i64(32)))
                    for c in range(8):
                        a = b.call(dot, [a, W[c], e.splat(e.load(xp, b.add(xrow, i64(xoff[c])), I32), 16)])
                    xd = e.load(xdp, so, F32)
                    v = e.fma(b.sitofp(a, vec(F32, 16)), b.fmul(d, e.splat(xd, 16)), b.load(acc[u]))
                    if m is not None:
                        v = e.fma(m, e.splat(b.fmul(xd, b.sitofp(xs, F32)), 16), v)
                    b.store(v, acc[u])
            for u in range(tokens):
                dst = b.add(b.mul(b.add(t0, i64(u)), ostride), b.mul(gl.index, i64(4 * ROWS)))
                b.store(b.load(acc[u]), e.addr(op, dst), align=1)
        return context.get_dummy_value()

    return codegen


def make_runner(kind: str, prefetch: int):
    """The jitted matmul over repacked weights: tiles of 8 tokens, then one of 4, 2 and 1 as needed."""
    params = "wp, dp, mp, ngroups, nb, xp, xsp, xdp, t0, op, ostride, K"
    t8, t4, t2, t1 = (int_intrinsic(f"ilv_{kind}_{u}_{prefetch}", params, _codegen(kind, u, prefetch))
                      for u in (U, 4, 2, 1))

    @njit
    def run(wq, d16, m16, xq, xs, xd, out):
        ngroups, nb = wq.shape[0], wq.shape[1]
        T, K = xq.shape
        a = (wq.ctypes.data, d16.ctypes.data, m16.ctypes.data, ngroups, nb, xq.ctypes.data, xs.ctypes.data,
             xd.ctypes.data)
        o = (out.ctypes.data, out.strides[0], K)
        t0 = 0
        while t0 + U <= T:
            t8(*a, t0, *o)
            t0 += U
        if T - t0 >= 4:
            t4(*a, t0, *o)
            t0 += 4
        if T - t0 >= 2:
            t2(*a, t0, *o)
            t0 += 2
        if T - t0 == 1:
            t1(*a, t0, *o)

    return run


def repack(kind: str, arrays: dict) -> tuple:
    """(codes (N/16, nb, bytes), d (N/16, nb, 16) fp16 bits, m likewise or a dummy) from a matrix's arrays."""
    q = np.asarray(arrays["qs"])
    N, nb = q.shape[0], np.asarray(arrays["d"]).shape[1]
    if N % ROWS:
        raise ValueError(f"rows {N} not a multiple of {ROWS}")
    if kind == "q8_0":
        u = (q.astype(np.int16) + 128).astype(np.uint8).reshape(N // ROWS, ROWS, nb, 8, 4).transpose(0, 2, 3, 1, 4)
        codes = np.ascontiguousarray(u).reshape(N // ROWS, nb, 512)
    else:
        u = q.reshape(N // ROWS, ROWS, nb, 4, 4).transpose(0, 2, 3, 1, 4)
        codes = np.ascontiguousarray(u).reshape(N // ROWS, nb, 256)

    def scales(a):
        return np.ascontiguousarray(np.asarray(a).view(np.uint16).reshape(N // ROWS, ROWS, nb).transpose(0, 2, 1))

    return codes, scales(arrays["d"]), scales(arrays["m"]) if kind == "q4_1" else np.zeros(1, np.uint16)


def measure(kind: str, N: int, K: int, Ts, prefetch: int, rounds: int, rng, copies: int | None = None) -> list[dict]:
    """Per T: both kernels' best time over ``copies`` copies of one random matrix (default: enough to
    exceed twice the last-level cache), their largest relative difference, and whether every row
    of the interleaved result is bit-identical to the row computed alone."""
    path = kernels.get_path("vnni")
    run = make_runner(kind, prefetch)
    base = quant.quantize((rng.standard_normal((N, K)) * 0.02).astype(np.float32), kind)
    copies = copies or max(2, -(-2 * LLC_BYTES // sum(v.nbytes for v in base.values())))
    mats = [base] + [{k: v.copy() for k, v in base.items()} for _ in range(copies - 1)]
    packed = [repack(kind, w) for w in mats]
    out = []
    for T in Ts:
        x = rng.standard_normal((T, K)).astype(np.float32)
        xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, K // 32), np.float32), np.empty((T, K // 32), np.int32)
        path.quantize_q8_0(x, xq, xd, xs)
        cur, new = np.empty((T, N), np.float32), np.empty((T, N), np.float32)
        path.matmul(kind, mats[0], xq, xd, xs, x, cur)
        run(*packed[0], xq, xs, xd, new)
        diff = float(np.abs(cur - new).max() / np.abs(cur).max())
        alone = np.empty((1, N), np.float32)
        batch_free = True  # each row of the batch bit-identical to the row alone
        for t in range(T):
            run(*packed[0], xq[t:t + 1], xs[t:t + 1], xd[t:t + 1], alone)
            batch_free &= bool(np.array_equal(alone[0], new[t]))
        best = {"current": 1e9, "interleaved": 1e9}
        for _ in range(rounds):  # alternated, best of rounds
            for name in best:
                t0 = time.perf_counter()
                for w, p in zip(mats, packed):
                    if name == "current":
                        path.matmul(kind, w, xq, xd, xs, x, cur)
                    else:
                        run(*p, xq, xs, xd, new)
                best[name] = min(best[name], (time.perf_counter() - t0) / len(mats))
        out.append({"type": kind, "N": N, "K": K, "T": T, "us_current": 1e6 * best["current"],
                    "us_interleaved": 1e6 * best["interleaved"], "time_ratio": best["interleaved"] / best["current"],
                    "gmac_s_interleaved": N * K * T / best["interleaved"] / 1e9,
                    "gmac_s_current": N * K * T / best["current"] / 1e9,
                    "max_rel_diff": diff, "rows_independent_of_batch": batch_free})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default=",".join(KINDS))
    p.add_argument("--shapes", default=",".join(SHAPES), help="names from SHAPES, comma-separated")
    p.add_argument("--rows", default="1,8,16,64", help="tokens T per call")
    p.add_argument("--prefetch", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if kernels.active_path() != "vnni":
        raise SystemExit("interleaved: needs the vnni path (AVX-512 VNNI)")
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    res = []
    for name in a.shapes.split(","):
        N, K = SHAPES[name]
        for kind in a.types.split(","):
            for r in measure(kind, N, K, [int(t) for t in a.rows.split(",")], a.prefetch, a.rounds, rng):
                r["shape"] = name
                res.append(r)
                print(f"{kind:5s} {name:20s} T={r['T']:3d}: current {r['us_current']:8.1f} us, interleaved "
                      f"{r['us_interleaved']:8.1f} us, time ratio {r['time_ratio']:.2f}, "
                      f"{r['gmac_s_interleaved']:.0f} vs {r['gmac_s_current']:.0f} GMAC/s, "
                      f"diff {r['max_rel_diff']:.1e}, batch-free {r['rows_independent_of_batch']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": "python -m benchmarks.interleaved " + " ".join(sys.argv[1:] if argv is None else argv),
                       "load_average": os.getloadavg(), "prefetch": a.prefetch, "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
