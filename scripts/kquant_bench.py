#!/usr/bin/env python
"""Side-by-side kernel timing of two source trees (e.g. main and a branch), alternated, for the
K-quant / q4_0 decode and small-batch kernels: per tree, path, type and T (tokens per call), the
best time of one matmul over weights rotated through copies larger than the last-level cache (as
``mpillm.kernels.bench``), its GB/s of weights, its ratio to T = 1 and, at T = 1, the type's GB/s
relative to q4_0's in the same tree and round.

    python scripts/kquant_bench.py --trees before=/work/main,after=. --rounds 2 \\
        --json benchmarks/results/kquant_decode_batch_2026-12-06.json

Each (tree, round) runs in its own process (``--worker``), the trees alternating, and writes the
load average (``/proc/loadavg``) beside its figures; the summary keeps each figure's best round.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(a) -> None:
    sys.path.insert(0, os.path.abspath(a.root))
    import numba
    import numpy as np

    from mpillm import kernels
    from mpillm.formats import quant
    from mpillm.kernels import bench

    N, K, _ = bench.SHAPES[a.shape]
    rng = np.random.default_rng(0)
    numba.set_num_threads(a.threads)
    load0 = open("/proc/loadavg").read().split()[:3]
    rows = []
    for wtype in a.types.split(","):
        nbytes = quant.nbytes(wtype, N, K)
        copies = max(1, -(-2 * bench.LLC_BYTES // nbytes))
        ws = bench._weights(wtype, N, K, copies, rng)
        for T in map(int, a.batches.split(",")):
            x = rng.standard_normal((T, K)).astype(np.float32)
            xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, K // 32), np.float32), np.empty((T, K // 32), np.int32)
            out = np.empty((T, N), np.float32)
            for pname in a.paths.split(","):
                p = kernels.get_path(pname)
                p.quantize_q8_0(x, xq, xd, xs)
                sec, cpu = bench.time_matmul(p, wtype, ws, xq, xd, xs, x, out, a.reps, min_inner=copies)
                rows.append(dict(path=pname, wtype=wtype, T=T, us=round(sec * 1e6, 1), cpu_us=round(cpu * 1e6, 1),
                                 GBps=round(nbytes / sec / 1e9, 2)))
    print(json.dumps(dict(load_start=load0, load_end=open("/proc/loadavg").read().split()[:3], rows=rows)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", default="before=/work/main,after=.", help="label=dir,... (alternated)")
    ap.add_argument("--paths", default="vnni,avx2")
    ap.add_argument("--types", default="q4_0,q4_K,q5_K,q6_K")
    ap.add_argument("--shape", default="1b-gate 8192x2048")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true", help="compare by CPU time per call (a loaded machine)")
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--root")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    trees = dict(t.split("=", 1) for t in a.trees.split(","))
    runs = []
    for rnd in range(a.rounds):
        for label, root in trees.items():
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--root", root, "--paths", a.paths,
                   "--types", a.types, "--shape", a.shape, "--batches", a.batches, "--threads", str(a.threads),
                   "--reps", str(a.reps)]
            t0 = time.time()
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                            cwd=root).stdout.strip().splitlines()[-1])
            res.update(tree=label, root=os.path.abspath(root), round=rnd, seconds=round(time.time() - t0, 1))
            runs.append(res)
            print(f"# round {rnd} {label}: load {' '.join(res['load_start'])} -> {' '.join(res['load_end'])}",
                  flush=True)
    best = {}  # per figure the best round; with --cpu-time by this process's CPU time per call
    key = "cpu_us" if a.cpu_time else "us"
    for run in runs:
        for r in run["rows"]:
            k = (run["tree"], r["path"], r["wtype"], r["T"])
            if k not in best or r[key] < best[k][key]:
                best[k] = dict(r, round=run["round"])
    summary = []
    for (tree, path, wtype, T), r in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        one = best.get((tree, path, wtype, 1))
        q40 = best.get((tree, path, "q4_0", 1))
        row = dict(tree=tree, path=path, wtype=wtype, T=T, us=r["us"], cpu_us=r["cpu_us"], GBps=r["GBps"],
                   vs_T1=round(r[key] / one[key], 3) if one else None)
        if T == 1 and q40:  # bytes per second relative to q4_0's: (bytes / time) / (q4_0 bytes / q4_0 time)
            row["GBps_vs_q4_0"] = round(r["GBps"] / q40["GBps"] * (q40[key] / q40["us"]) / (r[key] / r["us"]), 3)
        summary.append(row)
        print(f"{tree:8s} {path:5s} {wtype:5s} T={T:<3d} {r['us']:9.1f} us (cpu {r['cpu_us']:9.1f}) {r['GBps']:7.2f} GB/s"
              f"  x{row['vs_T1'] or 0:5.2f} of T=1" + (f"  {row['GBps_vs_q4_0']:.3f} of q4_0" if "GBps_vs_q4_0" in row
                                                     else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(compared_by=key, command=" ".join([os.path.basename(sys.executable)] + sys.argv), shape=a.shape,
                           threads=a.threads, summary=summary, runs=runs), f, indent=1)


if __name__ == "__main__":
    main()
