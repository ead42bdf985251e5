"""K-quant matrix-matrix kernels (many rows per step) against q4_0's, in one process:
``python -m benchmarks.kquant_prompt --path vnni --threads 1 --json out.json``

Each case (weight type, shape, T rows) is timed best-of-reps; the JSON and the printout give
microseconds, GFLOP/s and the ratio of q4_0's time on the same shape and T to this type's
(q4_0's prompt kernel is the fast reference: > 1 means faster than q4_0). Shapes: the 1B dense
matrices at prompt sizes (T = 64, 512), and the Qwen3-30B-A3B experts' shares at -np 2 (gate/up
384 x 2048, down 2048 x 384 as the ``_32`` variants) at the small T an expert gets per step.
The weights rotate over copies totalling more than twice the last-level cache (each expert's
matrix is read once per step from memory in a real prompt).
"""
from __future__ import annotations

import argparse
import json

import numba
import numpy as np

from mpillm import kernels
from mpillm.formats import quant
from mpillm.kernels.bench import LLC_BYTES, time_matmul

CASES = {  # name: (N, K, Ts)
    "1b-gate 8192x2048": (8192, 2048, (64, 512)),
    "1b-down 2048x8192": (2048, 8192, (64,)),
    "a3b-exp-up 384x2048": (384, 2048, (2, 4, 8, 16)),
    "a3b-exp-down 2048x384": (2048, 384, (2, 4, 8, 16)),
}
TYPES = {  # per case: the types compared (the experts' down share is _32 at -np 2)
    "a3b-exp-down 2048x384": ("q4_0", "q4_K_32", "q6_K_32"),
}


def _arrays(wtype, N, K, rng):
    if wtype in quant.QUANTIZABLE:
        return quant.quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.02, wtype)
    if wtype.endswith("_32"):
        a, _ = quant.to_per32(quant.random_arrays(quant.base_type(wtype), N, 256 * -(-K // 256), rng),
                              quant.base_type(wtype))
        nb = K // 32
        return {k: np.ascontiguousarray(v[:, :v.shape[1] * nb // (256 * -(-K // 256) // 32)]) for k, v in a.items()}
    return quant.random_arrays(wtype, N, K, rng)


def run(path, threads, cases, types, reps):
    p = kernels.get_path(path)
    p.warmup()
    numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for cname in cases:
        N, K, Ts = CASES[cname]
        for T in Ts:
            x = rng.standard_normal((T, K)).astype(np.float32)
            xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, K // 32), np.float32), np.empty((T, K // 32), np.int32)
            p.quantize_q8_0(x, xq, xd, xs)
            out = np.empty((T, N), np.float32)
            base = None
            for wtype in TYPES.get(cname, types):
                a0 = _arrays(wtype, N, K, rng)
                nbytes = sum(v.nbytes for v in a0.values())
                copies = max(1, -(-2 * LLC_BYTES // nbytes))
                ws = [a0] + [{k: v.copy() for k, v in a0.items()} for _ in range(copies - 1)]
                sec, cpu = time_matmul(p, wtype, ws, xq, xd, xs, x, out, reps, min_inner=copies, max_inner=400)
                if wtype == "q4_0":
                    base, base_cpu = sec, cpu
                row = dict(path=path, threads=threads, shape=cname, T=T, wtype=wtype, us=round(sec * 1e6, 1),
                           gflops=round(2 * N * K * T / sec / 1e9, 1),
                           us_cpu=round(cpu * 1e6, 1), vs_q4_0=round(base / sec, 3) if base else None,
                           vs_q4_0_cpu=round(base_cpu / cpu, 3) if base else None)
                rows.append(row)
                print(f"{cname:24s} T={T:<4d} {wtype:8s} {row['us']:10.1f} us {row['gflops']:7.1f} GFLOP/s  "
                      f"q4_0/this {row['vs_q4_0']} (cpu-time {row['vs_q4_0_cpu']})", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=kernels.active_path())
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--types", default="q4_0,q4_K,q6_K")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = run(a.path, a.threads, a.cases.split(","), a.types.split(","), a.reps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
