"""Preflight check of a cluster, run with the same mpirun line as the real job:

  mpirun -np 4 --hostfile hostfile python -m mpillm.check [--model DIR] [--max-seq-len 2048]

Every rank reports its host, MPI library, Python / mpi4py / numpy / mpillm versions,
the memory its shard and KV cache need against what its host has free, and whether
its shard file is present and intact (every rank checks each tensor of its own shard
against the checksum the converter wrote, all ranks in parallel, with a progress bar on
rank 0); then all ranks time Allreduce at a few sizes.
Rank 0 prints one table and exits non-zero, naming the cause, when anything is wrong
(mixed software versions, a missing or damaged shard -- naming the rank, the file and the
tensor --, a world size the model was not
converted for, too little memory). Every rank exits with the same code; none hangs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpillm.runtime import memory
from mpillm.runtime.errors import FatalError, run

# Resident memory of one rank besides its weights and KV cache: Python, numpy, numba,
# the MPI library and the engine's activation buffers (measured ~210-300 MiB RSS).
RUNTIME_OVERHEAD = 256 * 2**20
MAX_BATCH = 64            # the engine's default prefill batch (logits buffers on rank 0)
COMM_SIZES = (8, 2048, 64 * 1024, 1024 * 1024)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpillm.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="converted model directory, or a GGUF / Hugging Face source (located or converted "
                        "in the cache as mpillm.generate does; default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="KV cache length the job will use (default: %(default)s)")
    p.add_argument("--simulate-mem-bytes", type=int, default=None,
                   help="pretend every host has only this many bytes of memory available (to test the check)")
    p.add_argument("--comm-iters", type=float, default=1.0,
                   help="scale the Allreduce repetition counts (default: %(default)s)")
    p.add_argument("--no-comm", action="store_true", help="skip the Allreduce timings")
    p.add_argument("--calibrate", nargs="?", const="cluster.json", default=None, metavar="FILE",
                   help="also measure each rank's weight-streaming speed for the model's types and write a "
                        "cluster file for `python -m convert --cluster` (default file: cluster.json)")
    p.add_argument("--calibrate-seconds", type=float, default=0.6, help="timing per weight type (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="numba threads per rank for --calibrate, as the job will run (default: %(default)s)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the per-tensor checksum check (which reads every byte of each shard)")
    p.add_argument("--read-all", action="store_true",
                   help="read every byte of each shard even with --no-verify (finds I/O errors)")
    return p


# ----------------------------------------------------------------------------------------------
# what one rank finds out about itself
# ----------------------------------------------------------------------------------------------
def code_hash() -> str:
    """Short digest of this mpillm installation's sources: the same version string with different
    code on two hosts is a mixed cluster too."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def available_memory() -> int:
    """Bytes this host can still give a job: MemAvailable, capped by the cgroup's limit if any
    (Slurm's and containers' memory limits; runtime.memory); the free physical pages where
    neither is known."""
    avail = memory.available_memory()
    return avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def software() -> dict:
    from mpillm import __version__

    lib = MPI.Get_library_version().strip().splitlines()[0].split(",")[0].strip()
    import mpi4py

    return {"mpillm": f"{__version__}+{code_hash()}", "mpi": lib,
            "mpi_std": "%d.%d" % MPI.Get_version(), "mpi4py": mpi4py.__version__,
            "python": platform.python_version(), "numpy": np.__version__}


def shard_report(model_dir: Path, size: int, rank: int, max_seq_len: int, read_all: bool,
                 verify: bool = True) -> dict:
    """Open this rank's shard the way the engine does; return sizes or the problem found."""
    from mpillm.formats import format as fmt
    from mpillm.formats.config import ModelConfig

    out: dict = {"shard": None, "weights": None, "kv": None, "problem": None, "verify": None}
    try:
        manifest = fmt.read_manifest(model_dir)
        cfg = ModelConfig.from_dict(manifest["config"])
        out["cfg"] = cfg
        if size not in manifest["world_sizes"]:
            raise ValueError(f"the model was converted for world sizes {manifest['world_sizes']}, "
                             f"this job has {size} ranks (convert with --world-size {size})")
        if not 2 <= max_seq_len <= cfg.context_length:
            raise ValueError(f"--max-seq-len {max_seq_len} must be in [2, {cfg.context_length}]")
        path = Path(model_dir) / fmt.shard_relpath(size, rank)
        out["shard"] = str(path)
        shard = fmt.Shard(path, size, rank)
        if shard.config.to_dict() != cfg.to_dict():
            raise ValueError(f"{path} belongs to a different model than the manifest")
        if verify:
            from mpillm.startup import verify_shard

            res = verify_shard(shard, rank == 0, f"checking rank 0's shard ({size} ranks in parallel)")
            out["verify"] = res.status
            out["verify_line"] = res.describe()
            if res.bad:
                raise ValueError(res.describe())
        elif read_all:
            for t in shard.tensors.values():
                for a in t.arrays.values():
                    np.asarray(a).view(np.uint8).sum(dtype=np.uint64)
        kv_heads = shard.slice["kv_heads"][1] - shard.slice["kv_heads"][0]
        out["weights"] = shard.nbytes
        out["kv"] = cfg.n_layers * cfg.kv_values_per_token(kv_heads) * max_seq_len * 4   # f32 K and V (or latent)
        out["logits"] = 2 * MAX_BATCH * cfg.vocab_size * 4 if rank == 0 else 0
    except (ValueError, OSError) as e:
        out["problem"] = str(e)
    return out


def local_report(args, model_dir: Path, comm: MPI.Comm) -> dict:
    rank, size = comm.Get_rank(), comm.Get_size()
    rep = {"rank": rank, "host": MPI.Get_processor_name(), "problems": [], "cpus": len(os.sched_getaffinity(0))}
    try:
        rep.update(software())
    except Exception as e:  # noqa: BLE001 - report, never leave the collective
        rep["problems"].append(f"cannot read versions: {e}")
    try:
        rep["avail"] = args.simulate_mem_bytes if args.simulate_mem_bytes is not None else available_memory()
    except Exception as e:  # noqa: BLE001
        rep["avail"] = None
        rep["problems"].append(f"cannot read free memory: {e}")
    sh = shard_report(model_dir, size, rank, args.max_seq_len, args.read_all, not args.no_verify)
    cfg = sh.pop("cfg", None)
    rep["dim"], rep["n_layers"] = (cfg.dim, cfg.n_layers) if cfg else (None, None)
    if sh["problem"]:
        rep["problems"].append(sh.pop("problem"))
    sh.pop("problem", None)
    rep.update(sh)
    if rep.get("weights") is not None:
        rep["need"] = rep["weights"] + rep["kv"] + rep["logits"] + RUNTIME_OVERHEAD
    else:
        rep["need"] = None
    return rep


# ----------------------------------------------------------------------------------------------
# collective timing
# ----------------------------------------------------------------------------------------------
def time_calls(comm: MPI.Comm, call, iters: int, rounds: int = 10) -> float:
    """Seconds per ``call()``, OSU style (barrier, warm-up, MPI.Wtime): each round is timed on the
    slowest rank; the best round is kept, so a busy machine's hiccups do not hide the link's speed."""
    for _ in range(max(3, iters // 10)):
        call()
    per = max(1, iters // rounds)
    times = np.zeros(rounds)
    for k in range(rounds):
        comm.Barrier()
        t0 = MPI.Wtime()
        for _ in range(per):
            call()
        times[k] = (MPI.Wtime() - t0) / per
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return float(times.min())


def time_allreduce(comm: MPI.Comm, nbytes: int, iters: int, rounds: int = 10) -> float:
    """Seconds per in-place float32 Allreduce of nbytes."""
    buf = np.ones(max(1, nbytes // 4), np.float32)
    return time_calls(comm, lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), iters, rounds)


def time_p2p(comm: MPI.Comm, nbytes: int, iters: int, rounds: int = 10) -> float:
    """Seconds per one-round exchange of an nbytes float32 partial (the engine's --sync p2p,
    mpillm.runtime.collectives)."""
    from mpillm.runtime.collectives import Sync

    n = max(1, nbytes // 4)
    sync = Sync(comm, "f32", 1, n, "p2p", "poll")
    buf = np.ones((1, n), np.float32)
    return time_calls(comm, lambda: sync(buf), iters, rounds)


def comm_bench(comm: MPI.Comm, scale: float, extra_size: int | None) -> list[tuple[int, float, float]]:
    """(bytes, seconds per Allreduce, seconds per one-round p2p exchange) per message size."""
    sizes = sorted(set(COMM_SIZES) | ({extra_size} if extra_size else set()))
    out = []
    for s in sizes:
        iters = max(3, int(scale * min(200, max(10, (4 * 2**20) // s))))
        out.append((s, time_allreduce(comm, s, iters), time_p2p(comm, s, iters)))
    return out


# ----------------------------------------------------------------------------------------------
# rank 0: judge and print
# ----------------------------------------------------------------------------------------------
def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def human_size(b: int) -> str:
    if b < 1024 or b % 1024:
        return f"{b} B"
    return f"{b // 1024} KiB" if b < 2**20 else f"{b // 2**20} MiB"


def judge(reps: list[dict]) -> list[str]:
    """Problems across the whole job, each naming the ranks concerned."""
    problems = [f"rank {r['rank']} ({r['host']}): {p}" for r in reps for p in r["problems"]]
    for r in reps:
        r["problems"] = list(r["problems"])
    for key, what in (("mpillm", "mpillm version"), ("mpi", "MPI library"), ("python", "Python version"),
                      ("mpi4py", "mpi4py version"), ("numpy", "numpy version")):
        groups: dict = {}
        for r in reps:
            groups.setdefault(r.get(key), []).append(r["rank"])
        if len(groups) > 1:
            desc = "; ".join(f"{v} on ranks {','.join(map(str, rs))}" for v, rs in groups.items())
            problems.append(f"mixed cluster: {what} differs ({desc})")
    hosts: dict = {}
    for r in reps:
        hosts.setdefault(r["host"], []).append(r)
    for host, rs in hosts.items():
        avail = min((r["avail"] for r in rs if r["avail"] is not None), default=None)
        needs = [r["need"] for r in rs if r["need"] is not None]
        if avail is not None and needs and sum(needs) > avail:
            for r in rs:
                r["problems"].append(f"too little memory on host {host}")
            problems.append(f"too little memory on {host}: ranks {','.join(str(r['rank']) for r in rs)} need "
                            f"{mib(sum(needs))} (weights + KV cache at --max-seq-len + runtime), "
                            f"{mib(avail)} available")
    return problems


def print_table(reps: list[dict], model_dir: Path, args, bench, out=sys.stdout) -> None:
    hosts = {r["host"] for r in reps}
    r0 = reps[0]
    print(f"mpillm preflight: {len(reps)} rank(s) on {len(hosts)} host(s); model {model_dir}; "
          f"max-seq-len {args.max_seq_len}", file=out)
    print(f"  software: mpillm {r0.get('mpillm')}, {r0.get('mpi')} (MPI {r0.get('mpi_std')}), "
          f"mpi4py {r0.get('mpi4py')}, Python {r0.get('python')}, numpy {r0.get('numpy')}", file=out)
    head = f"  {'rank':>4}  {'host':<12} {'cpus':>4}  {'weights':>9} {'KV cache':>9} {'need':>9} " \
           f"{'free(host)':>11}  status"
    print(head, file=out)
    for r in reps:
        status = (r.get("verify") or "ok") if not r["problems"] else r["problems"][0]
        if len(status) > 90:
            status = status[:87] + "..."
        print(f"  {r['rank']:>4}  {r['host']:<12} {r['cpus']:>4}  {mib(r.get('weights')):>9} "
              f"{mib(r.get('kv')):>9} {mib(r.get('need')):>9} {mib(r.get('avail')):>11}  {status}", file=out)
    if any(r.get("verify_line") for r in reps):
        print("  shards:", file=out)
        for r in reps:
            if r.get("verify_line"):
                print(f"    rank {r['rank']}: {r['verify_line']}", file=out)
    if bench:
        n = len(reps)
        print(f"  Allreduce and the one-round p2p exchange (float32 sum, {n} ranks; slowest rank):", file=out)
        print(f"  {'size':>9} {'Allreduce':>11} {'algbw':>11} {'busbw':>11} {'p2p':>11}  --sync auto", file=out)
        for s, t, tp in bench:
            bw = s / t / 1e9
            print(f"  {human_size(s):>9} {t * 1e6:>8.1f} us {bw:>7.3f} GB/s {bw * 2 * (n - 1) / n:>6.3f} GB/s "
                  f"{tp * 1e6:>8.1f} us  {'p2p' if tp < t else 'allreduce'}", file=out)
        dim, layers = r0.get("dim"), r0.get("n_layers")
        if dim and layers and n > 1:
            t = {b[0]: min(b[1], b[2]) for b in bench}.get(dim * 4)
            if t:
                print(f"  => the model's 2 syncs per layer x {layers} layers of {dim * 4} B cost about "
                      f"{2 * layers * t * 1e3:.2f} ms per token at this latency", file=out)


def calibrate_step(args, comm: MPI.Comm, model_dir: Path, rep: dict, bench) -> list[dict] | None:
    """--calibrate: every rank times its kernels at once; rank 0 writes the cluster file."""
    if not args.calibrate:
        return None
    from mpillm.calibrate import calibrate_rank, write_cluster_file

    err, mine = None, None
    try:
        mine = calibrate_rank(comm, model_dir, rep.get("avail"), args.calibrate_seconds, args.threads)
    except (ValueError, OSError) as e:
        err = f"calibration failed: {e}"
    from mpillm.runtime.errors import agree

    agree(comm, err)
    reps = comm.gather(mine, root=0)
    if comm.Get_rank() == 0:
        write_cluster_file(Path(args.calibrate), reps, model_dir, bench)
    return reps


def main(argv: list[str] | None = None) -> int:
    from mpillm.options import parse_args_bcast

    args = parse_args_bcast(parser(), argv)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    from mpillm.startup import resolve_model   # collective: locates (or converts, like a real job) the model

    model_dir = resolve_model(args.model, comm)
    rep = local_report(args, model_dir, comm)
    reps = comm.gather(rep, root=0)
    bench = None
    if not args.no_comm and comm.Get_size() > 1:
        dims = comm.allgather(rep.get("dim"))
        bench = comm_bench(comm, args.comm_iters, (dims[0] or 0) * 4 or None)
    cal = calibrate_step(args, comm, model_dir, rep, bench)
    rc = 0
    if rank == 0:
        problems = judge(reps)
        print_table(reps, model_dir, args, bench)
        if cal:
            from mpillm.calibrate import print_calibration

            print_calibration(cal, Path(args.calibrate))
        if problems:
            print(f"mpillm.check: FAILED ({len(problems)} problem{'s' if len(problems) > 1 else ''}):",
                  file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            rc = 1
        else:
            unverifiable = [r["rank"] for r in reps if r.get("verify") == "unverifiable"]
            if unverifiable:
                print(f"mpillm.check: OK, but the shards of rank(s) {','.join(map(str, unverifiable))} are "
                      f"unverifiable (no checksums: written by an older converter)", flush=True)
            else:
                print("mpillm.check: OK", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    return comm.bcast(rc, root=0)


if __name__ == "__main__":
    run(main, "mpillm.check")


__all__ = ["main", "judge", "available_memory", "FatalError"]
