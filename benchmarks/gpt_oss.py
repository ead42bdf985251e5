"""gpt-oss shape: mpillm at -np 2 (one thread per rank) against llama.cpp with 2 threads on the same
GGUF, ratios in one run (``--triad``: and each engine's weight bandwidth against the machine's STREAM
triad, measured before and after each round); optionally under a memory limit smaller than the model (weights page in
from disk through the memory maps).

  python -m benchmarks.gpt_oss --gguf cache/baseline/gpt-oss-20b-shape-mxfp4.gguf \
      --model DIR_CONVERTED_FROM_THAT_GGUF --rounds 3 --json out.json [--mem-limit-gib 8]

Each round runs llama.cpp's ``llama-bench -t 2 -p P -n G`` (its mean over ``-r`` repetitions) and
``mpirun -np 2 python -m mpillm.bench --threads 1`` (its best of ``--repeats``) back to back; the
ratios of a round use only that round's figures, and the report gives the medians over rounds.
llama.cpp's tools are baselines only (``--llama-bin``: a build of llama.cpp's tools).

With ``--mem-limit-gib`` each run is started in a memory cgroup of its own (cgroup v1 or v2) whose
limit is below the model's size, after the model's pages are dropped from the page cache
(``posix_fadvise(DONTNEED)`` on its files only), so every token reads the weights the limit cannot
hold from disk again; the cgroup's major page faults and the disk's read bytes are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LLAMA_BIN = ROOT / "cache" / "llamacpp" / "build" / "bin"   # scripts/build_llama_server.sh


# ---- page cache and memory cgroups -------------------------------------------------------------
def drop_cache(paths: list[Path]) -> None:
    """Evict these files' pages from the page cache (only theirs)."""
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class MemCgroup:
    """A child memory cgroup of this process's own, with a hard limit; removed on close."""

    def __init__(self, limit_bytes: int, name: str):
        self.v2 = False
        base = None
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrl, path = line.split(":", 2)
            if "memory" in ctrl.split(","):
                base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        if base is None or not base.is_dir():
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                if line.startswith("0::"):
                    root = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified").is_dir() \
                        else Path("/sys/fs/cgroup")
                    base, self.v2 = root / line[3:].lstrip("/"), True
        if base is None:
            raise RuntimeError("no memory cgroup found for this process")
        self.path = base / name
        self.path.mkdir(exist_ok=True)
        if self.v2:
            (self.path / "memory.max").write_text(str(limit_bytes))
            (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        self.limit = limit_bytes

    def enter(self) -> None:
        """preexec_fn: move the child (and so its descendants) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stat(self) -> dict:
        out = {}
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, v = line.split()
            out[k] = int(v)
        peak = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        if peak.exists():
            out["peak_bytes"] = int(peak.read_text())
        return out

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def disk_read_bytes() -> int:
    """Bytes read from every whole block device so far (/proc/diskstats)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        name = f[2]
        if name.startswith(("loop", "ram")) or name[-1].isdigit() and not name.startswith("nvme"):
            continue
        total += int(f[5]) * 512
    return total


# ---- the two programs --------------------------------------------------------------------------
def run_child(cmd: list[str], timeout: float, preexec=None, **kw) -> tuple[int, str, str, dict]:
    """Run cmd to completion; (returncode, stdout, stderr, usage) where usage is the child's own
    resource usage from wait4 (its reaped descendants included: mpirun's ranks): major page faults
    (pages read from disk) and the peak RSS of the largest process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=preexec, **kw)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, ru = os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        usage = {"major_faults": ru.ru_majflt, "max_rss_bytes": ru.ru_maxrss * 1024}
        return proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), usage


def run_llamacpp(bin_dir: Path, gguf: Path, threads: int, n_prompt: int, n_gen: int, reps: int,
                 timeout: float, preexec=None, extra: list[str] = ()) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n",
           str(n_gen), "-r", str(reps), "-o", "json", *extra]
    t0 = time.perf_counter()
    rc, stdout, stderr, usage = run_child(cmd, timeout, preexec)
    if rc != 0:
        raise RuntimeError(f"llama-bench failed ({rc}):\n{stderr[-3000:]}")
    rows = json.loads(stdout)
    out = {"cmd": " ".join(cmd), "wall_s": round(time.perf_counter() - t0, 1), **usage}
    for row in rows:
        key = "prompt_tok_s" if row["n_prompt"] and not row["n_gen"] else "generate_tok_s"
        out[key] = row["avg_ts"]
        out[key.replace("tok_s", "samples")] = row.get("samples_ts")
    return out


def run_mpillm(np_: int, model: Path, n_prompt: int, n_gen: int, reps: int, timeout: float, extra: list[str],
               preexec=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        mpirun = Path(sys.executable).with_name("mpirun")
        cmd = [str(mpirun if mpirun.exists() else "mpirun"), "-np", str(np_), "--bind-to", "core", sys.executable,
               "-m", "mpillm.bench", "--model", str(model), "--threads", "1", "--prompt-tokens", str(n_prompt),
               "--gen-tokens", str(n_gen), "--repeats", str(reps), "--json", str(out), *extra]
        t0 = time.perf_counter()
        rc, _, stderr, usage = run_child(cmd, timeout, preexec, cwd=ROOT, env=env)
        if rc != 0:
            raise RuntimeError(f"mpillm.bench -np {np_} failed ({rc}):\n{stderr[-3000:]}")
        res = json.loads(out.read_text())
        res["cmd"] = " ".join(cmd[cmd.index("-np"):])
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res.update(usage)   # the ranks' major faults summed, the largest process's peak RSS
        return res


def limited(name: str, limit: int | None, files: list[Path], fn):
    """Run fn(preexec) in a fresh memory cgroup with ``limit`` (or plainly), with paging figures."""
    if limit is None:
        return fn(None), None
    drop_cache(files)
    cg = MemCgroup(limit, f"gpt_oss_bench_{os.getpid()}_{name}")
    try:
        d0 = disk_read_bytes()
        res = fn(cg.enter)
        st = cg.stat()
        paging = {"limit_bytes": limit, "disk_read_bytes": disk_read_bytes() - d0,
                  "major_faults": st.get("total_pgmajfault", st.get("pgmajfault")),
                  "peak_bytes": st.get("peak_bytes")}
        return res, paging
    finally:
        cg.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpt_oss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True, help="the GGUF llama.cpp runs")
    p.add_argument("--model", type=Path, required=True, help="mpillm's model: that GGUF converted (or the GGUF)")
    p.add_argument("--np", type=int, default=2, help="mpillm ranks; llama.cpp gets as many threads")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="repetitions inside each program per round")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="run both under a memory cgroup limit of this size (weights page from disk)")
    p.add_argument("--only", choices=("mpillm", "llamacpp"), default=None, help="run just one side")
    p.add_argument("--llama-bin", type=Path, default=DEFAULT_LLAMA_BIN)
    p.add_argument("--llama-args", default="",
                   help="more llama-bench options, e.g. '--repack 0' (under a memory limit: its default repacks "
                        "the weights into anonymous memory, a second copy the limit cannot hold)")
    p.add_argument("--mpillm-args", default="", help="more mpillm.bench options")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--triad", action="store_true",
                   help="each round, STREAM triad with --np threads first, and each engine's weight bytes per token "
                        "x generate tok/s against it (both engines read the same weights per token)")
    a = p.parse_args(argv)
    limit = int(a.mem_limit_gib * 2**30) if a.mem_limit_gib else None
    rounds = []
    for k in range(a.rounds):
        rnd: dict = {"round": k, "t": time.strftime("%H:%M:%S", time.gmtime()), "load_avg": os.getloadavg()}
        if a.triad:  # before and after the round: this machine's bandwidth moves from minute to minute
            from hpl.stream import triad_bandwidth
            rnd["triad_before_gb_s"] = triad_bandwidth(threads=a.np)
        if a.only != "mpillm":
            rnd["llama_cpp"], rnd["llama_cpp_paging"] = limited(
                "llama", limit, [a.gguf], lambda pre: run_llamacpp(a.llama_bin, a.gguf, a.np, a.prompt_tokens,
                                                                   a.gen_tokens, a.repeats, a.timeout, pre,
                                                                   a.llama_args.split()))
        if a.only != "llamacpp":
            rnd["mpillm"], rnd["mpillm_paging"] = limited(
                "mpillm", limit, [a.model], lambda pre: run_mpillm(a.np, a.model, a.prompt_tokens, a.gen_tokens,
                                                                  a.repeats, a.timeout, a.mpillm_args.split(),
                                                                  pre))
        if "mpillm" in rnd and "llama_cpp" in rnd:
            m, L = rnd["mpillm"], rnd["llama_cpp"]
            rnd["ratios"] = {"generate_mpillm_over_llamacpp": m["generate_tok_s"] / L["generate_tok_s"],
                             "prompt_mpillm_over_llamacpp": m["prompt_tok_s"] / L["prompt_tok_s"]}
        if a.triad:
            rnd["triad_after_gb_s"] = triad_bandwidth(threads=a.np)
            rnd["triad_gb_s"] = (rnd["triad_before_gb_s"] + rnd["triad_after_gb_s"]) / 2
        if "mpillm" in rnd and "triad_gb_s" in rnd:  # the weights a generated token reads, per second, over the triad
            wb = rnd["mpillm"]["weight_bytes_per_token"]
            rnd["weight_gb_s_over_triad"] = {eng: r["generate_tok_s"] * wb / 1e9 / rnd["triad_gb_s"]
                                             for eng, r in (("mpillm", rnd["mpillm"]), ("llamacpp", rnd.get("llama_cpp")))
                                             if r}
        print(json.dumps({k2: v for k2, v in rnd.items() if k2 in ("round", "t", "ratios", "triad_before_gb_s",
                                                                     "triad_after_gb_s", "weight_gb_s_over_triad")}
                         | {"mpillm_tok_s": [rnd.get("mpillm", {}).get(x) for x in ("prompt_tok_s", "generate_tok_s")],
                            "llamacpp_tok_s": [rnd.get("llama_cpp", {}).get(x) for x in ("prompt_tok_s",
                                                                                       "generate_tok_s")]}),
              flush=True)
        rounds.append(rnd)

    def med(path):
        vals = []
        for r in rounds:
            v = r
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(v)
        return statistics.median(vals) if vals else None

    report = {
        "gguf": str(a.gguf), "model": str(a.model), "np": a.np, "llama_threads": a.np,
        "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "mem_limit_bytes": limit,
        "median": {
            "mpillm_prompt_tok_s": med(["mpillm", "prompt_tok_s"]), "mpillm_generate_tok_s": med(["mpillm", "generate_tok_s"]),
            "llamacpp_prompt_tok_s": med(["llama_cpp", "prompt_tok_s"]),
            "llamacpp_generate_tok_s": med(["llama_cpp", "generate_tok_s"]),
            "generate_mpillm_over_llamacpp": med(["ratios", "generate_mpillm_over_llamacpp"]),
            "prompt_mpillm_over_llamacpp": med(["ratios", "prompt_mpillm_over_llamacpp"]),
            "triad_gb_s": med(["triad_gb_s"]),
            "mpillm_weight_gb_s_over_triad": med(["weight_gb_s_over_triad", "mpillm"]),
            "llamacpp_weight_gb_s_over_triad": med(["weight_gb_s_over_triad", "llamacpp"]),
        },
        "rounds": rounds,
        "load_avg": os.getloadavg(),
    }
    print(json.dumps(report["median"], indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
