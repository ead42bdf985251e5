"""Per-rank calibration for uneven splits (``python -m mpillm.check --calibrate FILE``).

Every rank, at the same time (so ranks that share a host share it as in the real job),
streams the model's weight types through the active matvec kernel from DRAM (copies of a
random matrix totalling 64 MiB, more than the last-level cache) for a fixed wall time and
reports GB/s per type; ``weight_gbps`` combines them by the bytes the model holds of each
type (a harmonic mean: time adds up). Wall time, not CPU time: a rank throttled by a cgroup
quota or sharing a core is slower, and that is what the split must know. Rank 0 writes the
cluster file (mpillm.planner's format) that ``python -m convert --cluster`` reads.
"""
from __future__ import annotations

import time
from pathlib import Path

import numba
import numpy as np
from mpi4py import MPI

from mpillm.formats import format as fmt
from mpillm import kernels
from mpillm.formats import quant

STREAM_BYTES = 64 << 20


def model_weight_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes per weight type of the matrices one token reads (from a converted world size)."""
    m = fmt.read_manifest(model_dir)
    ws = min(m["world_sizes"])
    out: dict[str, int] = {}
    for r in range(ws):
        p = Path(model_dir) / fmt.shard_relpath(ws, r)
        if not p.exists():
            continue
        sh = fmt.Shard(p, ws, r)
        for name, t in sh.tensors.items():
            if len(t.shape) < 2 or (name == "tok_embd" and sh.has("output")) or name.endswith("router"):
                continue
            out[t.wtype] = out.get(t.wtype, 0) + t.nbytes
        break
    return out or {"q4_0": 1}


def kernel_gbps(wtype: str, K: int, seconds: float = 0.6, seed: int = 0) -> float:
    """GB/s of weights of type wtype streamed by the active matvec kernel (T = 1, from DRAM)."""
    K = max(256, K // 32 * 32)
    N = 2048
    rng = np.random.default_rng(seed)
    base = quant.quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.02, wtype)
    nbytes = quant.nbytes(wtype, N, K)
    copies = max(2, -(-STREAM_BYTES // nbytes))
    ws = [{k: v.copy() for k, v in base.items()} for _ in range(copies)]
    path = kernels.get_path(kernels.active_path())
    x = rng.standard_normal((1, K)).astype(np.float32)
    xq, xd = np.empty((1, K), np.int8), np.empty((1, K // 32), np.float32)
    xs = np.empty((1, K // 32), np.int32)
    out = np.empty((1, N), np.float32)
    path.quantize_q8_0(x, xq, xd, xs)
    for w in ws:                                   # warm-up: compile, fault the pages in
        path.matmul(wtype, w, xq, xd, xs, x, out)
    done, t0 = 0, time.perf_counter()
    while True:
        for w in ws:
            path.matmul(wtype, w, xq, xd, xs, x, out)
        done += copies
        el = time.perf_counter() - t0
        if el >= seconds:
            return done * nbytes / el / 1e9


def calibrate_rank(comm: MPI.Comm, model_dir: Path, avail_bytes: int | None, seconds: float = 0.6,
                   threads: int = 1) -> dict:
    """Collective: this rank's speeds, measured while every other rank measures its own, with
    the numba thread count the job will use (mpillm.generate --threads, default 1)."""
    from mpillm.formats.config import ModelConfig

    kernels.set_threads(threads)
    cfg = ModelConfig.from_dict(fmt.read_manifest(model_dir)["config"])
    by_type = model_weight_bytes(model_dir)
    gbps = {}
    for wt in sorted(by_type):
        comm.Barrier()
        gbps[wt] = round(kernel_gbps(wt, cfg.dim, seconds), 3)
    total = sum(by_type.values())
    combined = total / sum(b / gbps[t] for t, b in by_type.items())
    return {"rank": comm.Get_rank(), "host": MPI.Get_processor_name(), "kernels": kernels.active_path(),
            "threads": numba.get_num_threads(),
            "avail_bytes": avail_bytes, "gbps": gbps, "weight_gbps": round(combined, 3)}


def sync_choices(bench) -> list[list]:
    """The faster exchange per measured size, as the engine's --sync auto reads it from a cluster
    file ([[up to bytes, algorithm], ...]; mpillm.runtime.exchange.choose_algorithm)."""
    return [[s, "p2p" if tp < ta else "allreduce"] for s, ta, tp in bench]


def write_cluster_file(path: Path, reps: list[dict], model_dir: Path, bench) -> None:
    from mpillm import planner

    bench = bench or []
    planner.write_cluster(path, reps, allreduce=[[s, t] for s, t, _ in bench], model=str(model_dir),
                          weight_types=model_weight_bytes(model_dir), p2p=[[s, tp] for s, _, tp in bench],
                          sync={str(len(reps)): sync_choices(bench)} if bench else {})


def print_calibration(reps: list[dict], path: Path) -> None:
    fastest = max(r["weight_gbps"] for r in reps)
    print(f"  calibration (weight streaming through the {reps[0]['kernels']} kernels, all ranks at once):")
    for r in reps:
        types = ", ".join(f"{t} {g:.1f}" for t, g in r["gbps"].items())
        print(f"  {r['rank']:>4}  {r['host']:<12} {r['weight_gbps']:>7.2f} GB/s ({types})  "
              f"split weight {r['weight_gbps'] / fastest:.2f}")
    print(f"  wrote {path}: `python -m convert MODEL OUT --cluster {path}` splits by these speeds")
