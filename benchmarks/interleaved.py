"""The interleaved layout (mpillm.kernels.interleaved, 16 weight rows per register) against the split
layout's VNNI kernels, per matrix shape and rows per call: ``python -m benchmarks.interleaved --json
out.json`` (one thread; the weights rotate over copies totalling more than the last-level cache, as
a model's layers do).

The split-layout kernels (mpillm.kernels.x86) keep a weight row's blocks in the lanes of a register
and sum the lanes at the end; per (row, token) they load 10 prepared activation vectors per 8
``vpdpbusd`` and reduce 16 lanes, and short rows (SmolLM2's K = 576) add a tail group. The
interleaved kernels broadcast a token's activation dword against 16 rows' codes instead (see that
module). The runtime repacks q4_0 / q4_1 / q8_0 into the interleaved layout on VNNI; this measures
the kernels alone, and checks that each row of a batch is bit-identical to the row computed alone
and gives the largest relative difference from the split layout's result (float addition order).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numba
import numpy as np

from mpillm import kernels
from mpillm.formats import quant
from mpillm.kernels import interleaved
from mpillm.kernels.bench import LLC_BYTES

KINDS = interleaved.RKINDS
SHAPES = {  # name: (N, K)
    "smol-up 1536x576": (1536, 576),
    "smol-attn 576x576": (576, 576),
    "smol-down 576x1536": (576, 1536),
    "smol-out 49152x576": (49152, 576),
    "1b-gate 8192x2048": (8192, 2048),
    "1b-down 2048x8192": (2048, 8192),
}


def measure(kind: str, N: int, K: int, Ts, rounds: int, rng, copies: int | None = None) -> list[dict]:
    """Per T: both kernels' best time over ``copies`` copies of one random matrix (default: enough to
    exceed twice the last-level cache), their largest relative difference, and whether every row
    of the interleaved result is bit-identical to the row computed alone."""
    path = kernels.get_path("vnni")
    fn = getattr(interleaved, f"vnni_matmul_{kind}_r16_q8_0")

    keys = [k for k, _ in interleaved.ARRAYS[interleaved.RTYPE[kind]]]

    def run(r, xq, xd, xs, out):
        fn(*(r[k].view(np.uint16) if r[k].dtype == np.float16 else r[k] for k in keys), xq, xd, xs, out)

    base = quant.random_arrays(kind, N, K, rng) if kind in quant.K_TYPES else \
        quant.quantize((rng.standard_normal((N, K)) * 0.02).astype(np.float32), kind)
    copies = copies or max(2, -(-2 * LLC_BYTES // sum(v.nbytes for v in base.values())))
    mats = [base] + [{k: v.copy() for k, v in base.items()} for _ in range(copies - 1)]
    packed = [interleaved.repack(kind, w)[1] for w in mats]
    out = []
    for T in Ts:
        x = rng.standard_normal((T, K)).astype(np.float32)
        xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, K // 32), np.float32), np.empty((T, K // 32), np.int32)
        path.quantize_q8_0(x, xq, xd, xs)
        cur, new = np.empty((T, N), np.float32), np.empty((T, N), np.float32)
        path.matmul(kind, mats[0], xq, xd, xs, x, cur)
        run(packed[0], xq, xd, xs, new)
        diff = float(np.abs(cur - new).max() / np.abs(cur).max())
        alone = np.empty((1, N), np.float32)
        batch_free = True  # each row of the batch bit-identical to the row alone
        for t in range(T):
            run(packed[0], xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], alone)
            batch_free &= bool(np.array_equal(alone[0], new[t]))
        best = {"current": 1e9, "interleaved": 1e9}
        for _ in range(rounds):  # alternated, best of rounds
            for name in best:
                t0 = time.perf_counter()
                for w, p in zip(mats, packed):
                    if name == "current":
                        path.matmul(kind, w, xq, xd, xs, x, cur)
                    else:
                        run(p, xq, xd, xs, new)
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
            if kind in quant.K_TYPES and K % 256:  # K-quant super-blocks need 256 | K
                continue
            for r in measure(kind, N, K, [int(t) for t in a.rows.split(",")], a.rounds, rng):
                r["shape"] = name
                res.append(r)
                print(f"{kind:5s} {name:20s} T={r['T']:3d}: current {r['us_current']:8.1f} us, interleaved "
                      f"{r['us_interleaved']:8.1f} us, time ratio {r['time_ratio']:.2f}, "
                      f"{r['gmac_s_interleaved']:.0f} vs {r['gmac_s_current']:.0f} GMAC/s, "
                      f"diff {r['max_rel_diff']:.1e}, batch-free {r['rows_independent_of_batch']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": "python -m benchmarks.interleaved " + " ".join(sys.argv[1:] if argv is None else argv),
                       "load_average": os.getloadavg(), "results": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
