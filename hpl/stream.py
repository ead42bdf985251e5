"""STREAM triad (a = b + s * c) in numba: the memory bandwidth a rank, a node and the job reach.

``triad_bandwidth(n_bytes, threads, repeats)`` is the kernel used by the cluster
report and by the LLM bench (to express weight streaming as a fraction of
what the memory can deliver).  Bandwidth is counted the STREAM way: 24 bytes
per element (two loads, one store; the write-allocate read is not counted),
best of ``repeats`` runs.

``python -m hpl.stream`` (optionally under mpirun) measures every rank at the
same time and prints per-rank, per-node and total GB/s.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numba
import numpy as np

BYTES_PER_ELEMENT = 24      # STREAM's count for triad: read b, read c, write a


@numba.njit(parallel=True, fastmath=True, cache=True)
def _triad(a: np.ndarray, b: np.ndarray, c: np.ndarray, s: float) -> None:
    for i in numba.prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


@numba.njit(fastmath=True, cache=True)
def _triad_serial(a: np.ndarray, b: np.ndarray, c: np.ndarray, s: float) -> None:
    for i in range(a.shape[0]):
        a[i] = b[i] + s * c[i]


def _arrays(n_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = max(1024, int(n_bytes) // BYTES_PER_ELEMENT)
    a = np.empty(n)
    b = np.full(n, 1.0)
    c = np.full(n, 2.0)
    a[:] = 0.0                       # touch every page before timing
    return a, b, c


def triad_bandwidth(n_bytes: int = 384 << 20, threads: int = 1, repeats: int = 5,
                    barrier=None) -> float:
    """Best triad bandwidth in GB/s (1e9 bytes/s) over ``repeats`` runs.

    n_bytes: total size of the three arrays (make it several times the last-level cache).
    threads: numba threads for this call (1 = the serial kernel, no thread pool).
    barrier: optional callable run before each timed repetition (e.g. ``comm.Barrier``)
             so that all ranks of a node stream at the same time.
    """
    threads = max(1, int(threads))
    a, b, c = _arrays(n_bytes)
    if threads > 1:
        prev = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        kernel = _triad
    else:
        prev = None
        kernel = _triad_serial
    try:
        kernel(a, b, c, 3.0)          # compile / warm up
        best = float("inf")
        for _ in range(max(1, repeats)):
            if barrier is not None:
                barrier()
            t0 = time.perf_counter()
            kernel(a, b, c, 3.0)
            best = min(best, time.perf_counter() - t0)
    finally:
        if prev is not None:
            numba.set_num_threads(prev)
    if not np.all(a[:8] == 7.0):
        raise RuntimeError("triad produced wrong values")
    return BYTES_PER_ELEMENT * a.shape[0] / best / 1e9


def measure_job(comm, n_bytes: int = 384 << 20, threads: int | None = None, repeats: int = 5) -> dict:
    """Collective: every rank streams at once; GB/s per rank, per node and in total.

    threads defaults to (cores on the node / ranks on the node), at least 1.
    """
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    if threads is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            cpus = os.cpu_count() or 1
        threads = max(1, cpus // node.Get_size())
    gbs = triad_bandwidth(n_bytes, threads, repeats, barrier=comm.Barrier)
    host = MPI.Get_processor_name()
    rows = comm.allgather((comm.Get_rank(), host, gbs, threads))
    node.Free()
    per_node: dict[str, float] = {}
    for _, h, g, _t in rows:
        per_node[h] = per_node.get(h, 0.0) + g
    return {
        "per_rank": [{"rank": r, "host": h, "gbs": g, "threads": t} for r, h, g, t in rows],
        "per_node": per_node,
        "total_gbs": sum(per_node.values()),
        "n_bytes": int(n_bytes),
        "threads_per_rank": threads,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpl.stream", description="STREAM triad per rank / node / job")
    ap.add_argument("--mib", type=int, default=384, help="MiB for the three arrays of each rank (default 384)")
    ap.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / ranks on node)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    res = measure_job(comm, args.mib << 20, args.threads, args.repeats)
    if comm.Get_rank() == 0:
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            print(f"STREAM triad, {args.mib} MiB per rank, {res['threads_per_rank']} thread(s) per rank")
            for r in res["per_rank"]:
                print(f"  rank {r['rank']:>4d}  {r['host']:<20s} {r['gbs']:8.2f} GB/s")
            for h, g in res["per_node"].items():
                print(f"  node {h:<25s} {g:8.2f} GB/s")
            print(f"  total {res['total_gbs']:30.2f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
