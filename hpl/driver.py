"""One HPL run end to end: checks, matrix generation, timed solve, residual, HPL-style output."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from . import blas
from .grid import Grid, generate_local, numroc
from .lu import LU, scaled_residual

THRESHOLD = 16.0
RULE = "=" * 80
DASH = "-" * 80
TV = "WR10R2R16"      # wall time, row-major, look-ahead 1, ring bcast, recursive right-looking, NDIV 2, NBMIN 16


class InputError(ValueError):
    """Bad input detected identically on every rank; each one reports it and exits."""


@dataclass
class NodeInfo:
    name: str
    ranks_on_node: int
    local_rank: int
    mem_total: int          # bytes
    mem_available: int      # bytes
    cpus: int
    nodes: int              # number of distinct nodes in the job
    total_mem: int          # sum of mem_total over nodes


def _meminfo() -> tuple[int, int]:
    total = avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, val = line.split(":", 1)
                if key == "MemTotal":
                    total = int(val.split()[0]) * 1024
                elif key == "MemAvailable":
                    avail = int(val.split()[0]) * 1024
    except OSError:
        pass
    if total == 0:          # not Linux: ask sysconf
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 8 << 30
    return total, (avail or total)


def node_info(comm: MPI.Comm) -> NodeInfo:
    """Collective: what each node has and how many of our ranks share it."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    total, avail = _meminfo()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    leader = node.Get_rank() == 0
    counts = comm.allreduce(np.array([1 if leader else 0, total if leader else 0], dtype=np.int64), op=MPI.SUM)
    info = NodeInfo(MPI.Get_processor_name(), node.Get_size(), node.Get_rank(), total, avail, cpus,
                    int(counts[0]), int(counts[1]))
    node.Free()
    return info


def bytes_needed(n: int, nb: int, p: int, q: int, prow: int, pcol: int) -> int:
    """Memory one rank needs for N, NB on a P x Q grid: [A|b], two panel buffers, a little slack."""
    mp = numroc(n, nb, prow, p)
    nq = numroc(n + 1, nb, pcol, q)
    panels = 2 * 8 * (nb + nb * nb + mp * nb)
    return 8 * mp * nq + panels + 8 * 4 * (n + mp) + (64 << 20)


def n_from_mem_fraction(frac: float, total_mem: int, nb: int) -> int:
    """HPL tuning rule: N ~ sqrt(fraction * total memory / 8), rounded down to a multiple of NB."""
    n = int(math.sqrt(frac * total_mem / 8.0))
    return max(nb, (n // nb) * nb)


def check_memory(comm: MPI.Comm, info: NodeInfo, n: int, nb: int, p: int, q: int, grid_rank) -> None:
    """Collective: raise InputError on every rank if any node lacks the memory for N."""
    prow, pcol = grid_rank
    need = bytes_needed(n, nb, p, q, prow, pcol)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    need_node = node.allreduce(need, op=MPI.SUM)
    node.Free()
    short = need_node > 0.95 * info.mem_available
    worst = comm.allreduce((need_node / max(info.mem_available, 1), need_node, info.mem_available, info.name)
                           if short else (0.0, 0, 0, ""), op=MPI.MAX)
    if worst[0] > 0:
        _, need_b, avail_b, name = worst
        nmax = max(nb, int(n * math.sqrt(0.9 * avail_b / need_b)) // nb * nb)
        raise InputError(f"memory too small for N={n}: node {name} needs {need_b / 2**30:.1f} GiB for its ranks "
                         f"but has {avail_b / 2**30:.1f} GiB available; try N <= {nmax} "
                         f"(or --mem-fraction, or more nodes)")


def validate(n: int, nb: int, p: int, q: int, size: int) -> None:
    if n < 1:
        raise InputError(f"N must be >= 1, got {n}")
    if nb < 1:
        raise InputError(f"NB must be >= 1, got {nb}")
    if p < 1 or q < 1:
        raise InputError(f"P and Q must be >= 1, got P={p} Q={q}")
    if p * q != size:
        raise InputError(f"P x Q = {p} x {q} = {p * q} does not match the {size} MPI ranks "
                         f"(run with mpirun -np {p * q}, or pass --p/--q whose product is {size})")


def gflops(n: int, seconds: float) -> float:
    return (2.0 / 3.0 * n ** 3 + 1.5 * n ** 2) / seconds / 1e9


def _say(comm: MPI.Comm, *msg: str) -> None:
    if comm.Get_rank() == 0:
        print(*msg, flush=True)


def run_hpl(comm: MPI.Comm, n: int, nb: int, p: int, q: int, *, column_major: bool = False,
            seed: int = 42, threshold: float = THRESHOLD, verbose: bool = True, progress: bool = True,
            corrupt: bool = False) -> dict:
    """Collective: one timed solve. Returns a result dict (identical on every rank)."""
    grid = Grid(comm, p, q, column_major)
    a = generate_local(grid, n, n + 1, nb, seed)

    def report(col: int, total: int) -> None:
        if progress and comm.Get_rank() == 0:
            el = MPI.Wtime() - t0
            done = 2.0 / 3.0 * (total ** 3 - (total - col) ** 3)
            print(f"  ... column {col:>8d} of {total} ({100.0 * col / total:5.1f} %)  {el:8.1f} s"
                  f"  ~{done / el / 1e9:8.2f} Gflops so far", flush=True)

    lu = LU(grid, a, n, nb, progress=report)
    comm.Barrier()
    t0 = MPI.Wtime()
    cpu0 = time.process_time()
    wall0 = time.time()
    # A singular matrix (SingularMatrix) is raised on the ranks that see the zero pivot only;
    # it propagates and the entry point aborts the whole job rather than leaving others waiting.
    lu.factor()
    if corrupt and grid.myrow == 0 and grid.mycol == 0 and a.size:
        a[0, min(1, a.shape[1] - 1)] += 0.5      # a deliberately wrong U entry
    x = lu.solve()
    elapsed = comm.allreduce(MPI.Wtime() - t0, op=MPI.MAX)
    cpu = comm.allreduce(time.process_time() - cpu0, op=MPI.MAX)
    # regenerate A and b (in the same memory) for the check
    a = generate_local(grid, n, n + 1, nb, seed, out=a)
    res = scaled_residual(grid, a, x, n, nb)
    timers = comm.allreduce([lu.t.as_dict()], op=MPI.SUM)
    grid.free()
    passed = bool(np.isfinite(res["resid"])) and res["resid"] < threshold
    out = {
        "tv": ("WC" if column_major else "WR") + TV[2:], "n": n, "nb": nb, "p": p, "q": q,
        "time": elapsed, "gflops": gflops(n, elapsed), "cpu_time": cpu, "resid": res["resid"], "threshold": threshold,
        "passed": passed, "start": wall0, "norms": res, "timers": timers,
    }
    if verbose:
        print_result(comm, out)
    return out


def print_header(comm: MPI.Comm, info: NodeInfo, threads: int) -> None:
    if comm.Get_rank() != 0:
        return
    core = blas.core_name()
    print(RULE)
    print("HPLinpack in Python -- mpillm's hpl module (numpy + OpenBLAS through ctypes, mpi4py)")
    print("Right-looking blocked LU, partial pivoting, 2-D block-cyclic, look-ahead depth 1")
    print(RULE)
    print(f"MPI ranks : {comm.Get_size()} on {info.nodes} node(s); {threads} BLAS thread(s) per rank")
    print(f"BLAS      : {blas.BACKEND} (kernel {core})")
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(f"note      : OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set and forces that kernel")
    print(f"Gflops    = (2/3 N^3 + 3/2 N^2) / Time;  check: ||Ax-b||_oo/(eps*(||A||_oo*||x||_oo+||b||_oo)*N) "
          f"< {THRESHOLD:g}")
    print(RULE, flush=True)


def print_result(comm: MPI.Comm, r: dict) -> None:
    if comm.Get_rank() != 0:
        return
    print(RULE)
    print(f"{'T/V':<10}{'N':>9}{'NB':>6}{'P':>6}{'Q':>6}{'Time':>19}{'Gflops':>23}")
    print(DASH)
    print(f"{r['tv']:<10}{r['n']:>9d}{r['nb']:>6d}{r['p']:>6d}{r['q']:>6d}{r['time']:>19.2f}{r['gflops']:>23.4e}")
    print(f"HPL_pdgesv() start time {time.ctime(r['start'])}")
    print(f"HPL_pdgesv() end time   {time.ctime(r['start'] + r['time'])}")
    t = r["timers"]
    nr = max(1, comm.Get_size())
    print(f"  per-rank mean: panel {sum(x['panel'] for x in t) / nr:.2f} s, panel wait "
          f"{sum(x['wait'] for x in t) / nr:.2f} s, swaps {sum(x['swap'] for x in t) / nr:.2f} s, update "
          f"{sum(x['update'] for x in t) / nr:.2f} s, solve {sum(x['solve'] for x in t) / nr:.2f} s; "
          f"max CPU time {r['cpu_time']:.2f} s")
    print(DASH)
    verdict = "PASSED" if r["passed"] else "FAILED"
    print(f"||Ax-b||_oo/(eps*(||A||_oo*||x||_oo+||b||_oo)*N)= {r['resid']:16.8e} ...... {verdict}")
    print(RULE, flush=True)


def report_error(comm: MPI.Comm, msg: str) -> None:
    """Every rank says what is wrong (stderr), so no rank is left waiting in silence."""
    sys.stderr.write(f"hpl: error [rank {comm.Get_rank()} of {comm.Get_size()}]: {msg}\n")
    sys.stderr.flush()
