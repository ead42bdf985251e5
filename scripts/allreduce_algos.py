#!/usr/bin/env python3
"""Allreduce cost per message size on the emulated links, for each of Open MPI's coll_tuned
algorithms (needs root):

    python scripts/allreduce_algos.py [--hosts 2 4] [--profiles 1gbe 5gbe wifi] [--json out.json]

For every (hosts, profile) it starts the emulated cluster (tests/cluster/netns.py: real delay
through the TAP relay) and times Allreduce of float32 sums at the sizes the engine sends
(one layer's partial sum of SmolLM2 2304 B, of the 1B / 30B-A3B shapes 8 KiB, and 64 KiB,
1 MiB), each call timed on its own (25th percentile / median / mean of 30-150 calls; the
machine's other tenants only ever add time), with Open MPI's default decision and with each fixed algorithm
(``--mca coll_tuned_use_dynamic_rules 1 --mca coll_tuned_allreduce_algorithm N``:
1 basic linear, 2 non-overlapping, 3 recursive doubling, 4 ring, 5 segmented ring,
6 Rabenseifner), and prints the planner's prediction beside each size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import netns  # noqa: E402

ALGOS = {0: "default", 1: "basic_linear", 2: "nonoverlapping", 3: "recursive_doubling", 4: "ring",
         5: "segmented_ring", 6: "rabenseifner"}
SIZES = (2304, 8192, 65536, 1 << 20)
TIMER = """
import json, numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
out = {}
for s in %r:
    buf = np.ones(s // 4, np.float32)
    n = max(30, min(150, (4 << 20) // s))
    for _ in range(5):
        c.Allreduce(MPI.IN_PLACE, buf)
    dt = np.zeros(n)
    c.Barrier()
    for i in range(n):
        t = MPI.Wtime()
        c.Allreduce(MPI.IN_PLACE, buf)
        dt[i] = MPI.Wtime() - t
    c.Allreduce(MPI.IN_PLACE, dt, op=MPI.MAX)          # each call as long as its slowest rank
    out[s] = [float(np.percentile(dt, 25)), float(np.median(dt)), float(dt.mean())]
if c.Get_rank() == 0:
    print("RESULT", json.dumps(out))
""" % (SIZES,)


def time_on(c: netns.Cluster, algo: int, timeout: float) -> dict | None:
    with tempfile.TemporaryDirectory() as td:
        hf = c.write_hostfile(Path(td) / "hostfile")
        mca = [] if algo == 0 else ["--mca", "coll_tuned_use_dynamic_rules", "1",
                                    "--mca", "coll_tuned_allreduce_algorithm", str(algo)]
        argv = c.mpirun_argv(c.n, hf, [sys.executable, "-c", TIMER])
        i = argv.index("--bind-to")
        argv = argv[:i] + mca + argv[i:]
        extra = {"OMPI_MCA_mpi_yield_when_idle": "1"} if c.n > (os.cpu_count() or 1) else {}
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env(extra),
                             cwd=ROOT, start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.communicate()
            return None
        for line in out.splitlines():
            if line.startswith("RESULT "):
                return {int(k): v for k, v in json.loads(line[7:]).items()}   # size -> [p25, median, mean]
        sys.stderr.write(err[-1500:])
        return None


def main() -> int:
    from mpillm import planner

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    p.add_argument("--profiles", nargs="+", default=["1gbe", "5gbe", "wifi"])
    p.add_argument("--algos", type=int, nargs="+", default=list(ALGOS))
    p.add_argument("--timeout", type=float, default=180)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    rows, t0 = [], time.time()
    for n in a.hosts:
        for prof in a.profiles:
            with netns.Cluster(n, prof) as c:
                base = c.base_rtt_us
                for algo in a.algos:
                    r = time_on(c, algo, a.timeout)
                    for s in SIZES:
                        pred = planner.allreduce_s(s, n, planner.LINKS[prof])
                        row = {"hosts": n, "profile": prof, "algorithm": ALGOS[algo], "bytes": s,
                               "us": round(r[s][0] * 1e6, 1) if r else None,
                               "median_us": round(r[s][1] * 1e6, 1) if r else None,
                               "mean_us": round(r[s][2] * 1e6, 1) if r else None,
                               "predicted_us": round(pred * 1e6, 1), "emulator_rtt_us": round(base or 0, 1),
                               "load_average": os.getloadavg()[0]}
                        rows.append(row)
                    print(f"  {n} hosts {prof} {ALGOS[algo]}: " +
                          (", ".join(f"{s} B {r[s][0] * 1e6:.0f}/{r[s][1] * 1e6:.0f} us" for s in SIZES) if r else "failed"),
                          file=sys.stderr, flush=True)
    print(f"\nAllreduce on emulated hosts ({time.time() - t0:.0f} s): 25th percentile of the calls "
          f"(each as long as its slowest rank), like the link profiles' RTT; JSON has median and mean\n")
    print("| hosts | link | algorithm | " + " | ".join(f"{s} B us" for s in SIZES) + " |")
    print("| ---: | --- | --- | " + " | ".join("---:" for _ in SIZES) + " |")
    keyed = {}
    for r in rows:
        keyed.setdefault((r["hosts"], r["profile"], r["algorithm"]), {})[r["bytes"]] = r
    for (n, prof, alg), d in keyed.items():
        print(f"| {n} | {prof} | {alg} | " + " | ".join(
            f"{d[s]['us']:.0f}" if d[s]["us"] is not None else "-" for s in SIZES) + " |")
        if alg == "default":
            print(f"| {n} | {prof} | *planner* | " + " | ".join(f"{d[s]['predicted_us']:.0f}" for s in SIZES) + " |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
