#!/usr/bin/env python3
"""One rank throttled: the calibrated uneven split against the even split (needs root).

    python scripts/split_bench.py [--model GGUF] [--quota 0.5] [--rounds 3] [--json out.json]

Rank 1 of a 2-rank job runs inside a CPU cgroup with a quota of ``--quota`` CPUs (cgroup v2
``cpu.max`` where the cpu controller is on the unified hierarchy, else v1
``cpu.cfs_quota_us``); rank 0 runs unconstrained. A wrapper puts the rank's own process into
the cgroup before it execs Python, so every thread of that rank is throttled. Then:

1. ``mpillm.check --calibrate`` measures both ranks' weight-streaming speed (at the same time,
   rank 1 throttled) and writes the cluster file;
2. ``python -m convert GGUF OUT --cluster FILE`` writes the calibrated split;
3. ``mpillm.bench`` runs the even and the calibrated model alternately, ``--rounds`` times.

The ideal the measured speeds allow: with speeds s0, s1 the even split takes max(1/s0, 1/s1)/2
per unit of work and a perfect split 1/(s0 + s1), so ideal = even x (s0 + s1) x max(1/s0, 1/s1) / 2.
Ratios are medians of per-round ratios (this machine is shared; absolute figures move).
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
sys.path.insert(0, str(ROOT / "tests"))

from mpiutil import mpi_env, mpirun_cmd  # noqa: E402


class CpuQuota:
    """A cgroup limiting its members to ``cpus`` CPUs; removed on exit."""

    def __init__(self, cpus: float, period_us: int = 10_000):
        name = f"mpillm-split-{os.getpid()}"
        v2 = Path("/sys/fs/cgroup/unified")
        v2 = v2 if v2.is_dir() else Path("/sys/fs/cgroup")
        quota = int(cpus * period_us)
        if "cpu" in (v2 / "cgroup.controllers").read_text().split() if (v2 / "cgroup.controllers").exists() else False:
            self.path = v2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {period_us}\n")
            self.kind = "cgroup v2 cpu.max"
        elif Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
            self.path = Path("/sys/fs/cgroup/cpu") / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(f"{period_us}\n")
            (self.path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
            self.kind = "cgroup v1 cpu.cfs_quota_us"
        else:
            raise RuntimeError("no CPU cgroup controller found (cgroup v2 cpu.max or v1 cpu.cfs_quota_us)")
        self.procs = self.path / "cgroup.procs"
        self.desc = f"{self.kind} = {quota} us per {period_us} us ({cpus:g} CPU)"

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:        # members still exiting
                time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wrapped(cg: CpuQuota, argv: list[str], throttled_rank: int = 1) -> list[str]:
    """argv run by every rank; the throttled rank joins the cgroup first."""
    script = (f'if [ "${{OMPI_COMM_WORLD_RANK:-}}" = "{throttled_rank}" ]; then echo $$ > {cg.procs}; fi; '
              f'exec "$@"')
    return ["sh", "-c", script, "sh"] + argv


def run(cmd: list[str], timeout: float) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env(), cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:12])}... failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def bench(cg: CpuQuota, model: Path, gen_tokens: int, timeout: float, wait: str = "auto") -> dict:
    out = run(mpirun_cmd(2) + wrapped(cg, [sys.executable, "-m", "mpillm.bench", "--model", str(model),
                                          "--gen-tokens", str(gen_tokens), "--prompt-tokens", "16",
                                          "--repeats", "2", "--wait", wait]), timeout)
    return json.loads(out[out.index("{"):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF or HF source (default: the bundled SmolLM2)")
    p.add_argument("--quota", type=float, default=0.5, help="CPUs rank 1 may use (default: %(default)s)")
    p.add_argument("--period-us", type=int, default=10_000,
                   help="quota period: short, so a rank that spends its quota waiting in a collective "
                        "is not frozen for many tokens at once (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--even-wait", choices=("auto", "poll", "block"), default="poll",
                   help="--wait of the even-split runs (default: %(default)s: how the previous release waited)")
    p.add_argument("--split-wait", choices=("auto", "poll", "block"), default="auto",
                   help="--wait of the calibrated-split runs (default: %(default)s: the throttled rank sees its "
                        "CPU quota and sleeps while it waits)")
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cluster", type=Path, default=None,
                   help="the calibration to split by: read if the file exists, else measured and written there "
                        "(so two trees can be compared on the same split; the calibration itself varies run to run)")
    a = p.parse_args()
    if a.model is None:
        from mpillm.startup import bundled_gguf

        a.model = bundled_gguf()
    t0 = time.time()
    with CpuQuota(a.quota, a.period_us) as cg, tempfile.TemporaryDirectory(prefix="mpillm-split-") as td:
        td = Path(td)
        even, split, cluster = td / "even", td / "split", a.cluster or td / "cluster.json"
        run([sys.executable, "-m", "convert", str(a.model), str(even), "--world-size", "2", "--no-progress"], a.timeout)
        cal_out = f"calibration read from {cluster}"
        if not cluster.exists():
            cal_out = run(mpirun_cmd(2) + wrapped(cg, [sys.executable, "-m", "mpillm.check", "--model", str(even),
                                                      "--no-comm", "--calibrate", str(cluster)]), a.timeout)
        speeds = [r["weight_gbps"] for r in json.loads(cluster.read_text())["ranks"]]
        run([sys.executable, "-m", "convert", str(a.model), str(split), "--cluster", str(cluster), "--no-progress"],
            a.timeout)
        weights = json.loads((split / "manifest.json").read_text())["splits"]["2"]["weights"]
        rounds = []
        for i in range(a.rounds):
            e = bench(cg, even, a.gen_tokens, a.timeout, a.even_wait)
            s = bench(cg, split, a.gen_tokens, a.timeout, a.split_wait)
            rounds.append({"even": e, "split": s})
            print(f"  round {i + 1}: even {e['generate_tok_s']:.1f} tok/s, split {s['generate_tok_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
        desc = cg.desc
    s0, s1 = speeds
    ideal_gain = (s0 + s1) * max(1 / s0, 1 / s1) / 2
    gains = [r["split"]["generate_tok_s"] / r["even"]["generate_tok_s"] for r in rounds]
    even_med = statistics.median(r["even"]["generate_tok_s"] for r in rounds)
    split_med = statistics.median(r["split"]["generate_tok_s"] for r in rounds)
    res = {
        "what": "rank 1 throttled; calibrated uneven split vs even split, generate tok/s",
        "model": str(a.model), "throttle": desc, "calibrated_gbps": speeds, "split_weights": weights,
        "even_wait": a.even_wait, "split_wait": a.split_wait,
        "even_generate_tok_s": [round(r["even"]["generate_tok_s"], 2) for r in rounds],
        "split_generate_tok_s": [round(r["split"]["generate_tok_s"], 2) for r in rounds],
        "even_ms_per_token": [round(r["even"]["ms_per_token"], 2) for r in rounds],
        "split_ms_per_token": [round(r["split"]["ms_per_token"], 2) for r in rounds],
        "even_comm_ms_per_token": [round(r["even"]["comm_ms_per_token"], 2) for r in rounds],
        "split_comm_ms_per_token": [round(r["split"]["comm_ms_per_token"], 2) for r in rounds],
        "gain_median": round(statistics.median(gains), 3), "gain_per_round": [round(g, 3) for g in gains],
        "ideal_gain": round(ideal_gain, 3),
        "fraction_of_ideal": round(statistics.median(gains) / ideal_gain, 3),
        "even_median_tok_s": round(even_med, 2), "split_median_tok_s": round(split_med, 2),
        "load_average": os.getloadavg(), "seconds": round(time.time() - t0, 1),
        "calibration_output": cal_out.strip().splitlines()[-5:],
    }
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
