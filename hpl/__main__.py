"""``mpirun -np N [--hostfile H] python -m hpl [--n N] [--nb NB] [--p P] [--q Q] ...``

Every rank parses the same command line, so bad input is found on every rank at
once and each exits non-zero with the same message (no rank waits for another).
"""
from __future__ import annotations

import argparse
import json

from mpi4py import MPI

from . import blas
from .dat import read as read_dat
from .driver import (InputError, check_memory, n_from_mem_fraction, node_info, print_header,
                     report_error, run_hpl, validate)
from .grid import closest_square


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpl", description=(
        "HPL (High-Performance Linpack) in Python over MPI: solves a random dense N x N system "
        "with LU + partial pivoting on a P x Q block-cyclic grid and reports Gflops."))
    ap.add_argument("--n", type=int, default=None, help="problem size N (default 10000, or from --mem-fraction)")
    ap.add_argument("--nb", type=int, default=None, help="block size NB (default 192)")
    ap.add_argument("--p", type=int, default=None, help="process rows P (default: P x Q closest to square)")
    ap.add_argument("--q", type=int, default=None, help="process columns Q (default: world size / P)")
    ap.add_argument("--mem-fraction", type=float, default=None,
                    help="size N to use this fraction of the nodes' total memory: N = sqrt(f * mem / 8)")
    ap.add_argument("--dat", default=None, help="read Ns, NBs, grids, PMAP and threshold from an HPL.dat file")
    ap.add_argument("--seed", type=int, default=42, help="seed of the random matrix")
    ap.add_argument("--threshold", type=float, default=None, help="residual threshold (default 16, or HPL.dat's)")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="BLAS threads per rank (default: cores per node / ranks per node)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file (rank 0)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--corrupt", action="store_true", help=argparse.SUPPRESS)   # tests: break U on purpose
    return ap


def plan_runs(args: argparse.Namespace, size: int) -> tuple[list[tuple[int, int, int, int]], int, float, bool]:
    """The (N, NB, P, Q) list, PMAP, threshold, and whether N comes from --mem-fraction."""
    pmap, threshold = 0, 16.0
    if args.dat:
        try:
            dat = read_dat(args.dat)
        except OSError as e:
            raise InputError(f"cannot read {args.dat}: {e.strerror}") from None
        except ValueError as e:
            raise InputError(str(e)) from None
        ns, nbs, grids, pmap, threshold = dat.ns, dat.nbs, dat.grids, dat.pmap, dat.threshold
    else:
        ns, nbs, grids = [10000], [192], []
    if args.n is not None:
        ns = [args.n]
    if args.nb is not None:
        nbs = [args.nb]
    if args.threshold is not None:
        threshold = args.threshold
    if args.p is not None or args.q is not None:
        if args.p is not None and args.q is not None:
            grids = [(args.p, args.q)]
        elif args.p is not None:
            if args.p < 1 or size % args.p:
                raise InputError(f"P={args.p} does not divide the {size} MPI ranks")
            grids = [(args.p, size // args.p)]
        else:
            if args.q < 1 or size % args.q:
                raise InputError(f"Q={args.q} does not divide the {size} MPI ranks")
            grids = [(size // args.q, args.q)]
    elif not grids:
        grids = [closest_square(size)]
    from_mem = args.mem_fraction is not None
    if from_mem and not 0.0 < args.mem_fraction <= 0.95:
        raise InputError(f"--mem-fraction must be in (0, 0.95], got {args.mem_fraction}")
    if args.dat and args.p is None and args.q is None:
        usable = [g for g in grids if g[0] * g[1] == size]
        if not usable:
            raise InputError(f"none of the grids in {args.dat} ({', '.join(f'{p}x{q}' for p, q in grids)}) "
                             f"matches the {size} MPI ranks")
        grids = usable
    runs = [(n, nb, p, q) for n in ns for nb in nbs for (p, q) in grids]
    for n, nb, p, q in runs:
        validate(n if not from_mem else 1, nb, p, q, size)
    return runs, pmap, threshold, from_mem


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    try:
        if args.blas_threads is not None and args.blas_threads < 1:
            raise InputError(f"--blas-threads must be >= 1, got {args.blas_threads}")
        runs, pmap, threshold, from_mem = plan_runs(args, size)
        info = node_info(comm)
        threads = args.blas_threads or max(1, info.cpus // info.ranks_on_node)
        blas.set_threads(threads)
        if from_mem:
            runs = [(n_from_mem_fraction(args.mem_fraction, info.total_mem, nb), nb, p, q)
                    for (_, nb, p, q) in runs]
            runs = list(dict.fromkeys(runs))
        for n, nb, p, q in runs:
            rank = comm.Get_rank()
            grid_pos = (rank % p, rank // p) if pmap else divmod(rank, q)
            check_memory(comm, info, n, nb, p, q, grid_pos)
    except InputError as e:
        report_error(comm, str(e))
        return 2
    print_header(comm, info, threads)
    results = []
    for n, nb, p, q in runs:
        results.append(run_hpl(comm, n, nb, p, q, column_major=bool(pmap), seed=args.seed, threshold=threshold,
                               progress=not args.quiet, corrupt=args.corrupt))
    if comm.Get_rank() == 0:
        npass = sum(r["passed"] for r in results)
        print(f"Finished {len(results):6d} tests with the following results:")
        print(f"         {npass:6d} tests completed and passed residual checks,")
        print(f"         {len(results) - npass:6d} tests completed and failed residual checks.")
        print("=" * 80, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": size, "blas_threads": threads, "blas": blas.core_name(), "runs": results},
                          f, indent=2, default=float)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    from mpillm.runtime.errors import run

    run(main, "hpl")  # an unexpected failure on one rank takes the whole job down
