"""Compile the kernels for this CPU once, ahead of the first run: ``python -m mpillm.warmup``.

``scripts/setup.sh`` runs it for the bundled model on the ranks of ``hostfile``; a job that finds
its kernels cold compiles them itself (mpillm.startup), saying so first. The mechanics -- the
signature of what is compiled, the node's compile lock, the tiny twin model -- live in
mpillm.runtime.warm.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from mpi4py import MPI

from mpillm.formats import format as fmt
from mpillm.options import parse_args_bcast
from mpillm.runtime import warm
from mpillm.runtime.engine import compile_tiny
from mpillm.runtime.errors import agree, run
from mpillm.startup import resolve_model


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpillm.warmup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as for mpillm.generate (default: the bundled model)")
    p.add_argument("--kv-type", choices=("f16", "f32"), nargs="+", default=["f16"],
                   help="KV cache types to compile for (default: f16)")
    p.add_argument("--buffer-type", choices=("f32", "f16", "q8_0", "f64"), nargs="+", default=["f32"],
                   help="sync buffer types to compile for (default: f32)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Collective over COMM_WORLD: locate (or convert) the model for this world size, then each
    rank makes sure its kernels are compiled (one rank per node compiles, the others load)."""
    args = parse_args_bcast(parser(), argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    model_dir = resolve_model(args.model, comm)
    t0 = time.perf_counter()
    err, did = None, False
    try:
        shard = fmt.Shard(Path(model_dir) / fmt.shard_relpath(size, rank), size, rank)
        for kv in args.kv_type:
            for bt in args.buffer_type:
                did |= warm.ensure_shard(shard, kv, bt, compile_tiny, progress=rank == 0)
    except ValueError as e:
        err = str(e)
    agree(comm, err)
    did_any = comm.allreduce(int(did), op=MPI.SUM)
    if rank == 0:
        what = "compiled" if did_any else "already compiled (cache warm)"
        print(f"kernels {what} in {time.perf_counter() - t0:.1f} s; cache {warm.cache_dir()}", flush=True)
    return 0


if __name__ == "__main__":
    run(main, "mpillm.warmup")
