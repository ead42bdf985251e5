#!/usr/bin/env python3
"""One sync's cost on the emulated links, against the floor a ping-pong sets (needs root):

    python scripts/sync_bench.py [--hosts 2 4] [--profiles 1gbe 5gbe] [--dim 2048] [--json out.json]

For every (hosts, profile) it starts the emulated cluster (tests/cluster/netns.py: shaped links,
real delay through the relay), one rank per host, and times on the real ranks:

* a ping-pong between rank 0 and rank 1 with a message of the sync's size: half its round trip
  is one way's latency plus serialization, the floor of any one-round exchange;
* a bare MPI_Sendrecv between ranks 0 and 1 with the same message, both directions at once as a
  sync's messages travel: what the link itself charges for the exchange, before any of mpillm's
  packing, summing and Python;
* the engine's sync (mpillm.runtime.collectives.Sync, T = 1 row of ``--dim``) for each buffer
  type, exchange (allreduce, p2p) and wait mode (poll, block), as a decode step calls it.

Each figure is the 25th percentile of single timed calls (each as long as its slowest rank: the
machine's other tenants only ever add time). The ratio column is sync / one-way floor.
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

TIMER = r"""
import json, sys
import numpy as np
from mpi4py import MPI
from mpillm.runtime.collectives import Sync
from mpillm.runtime.exchange import message_bytes
c = MPI.COMM_WORLD
rank, P = c.Get_rank(), c.Get_size()
dim, n = int(sys.argv[1]), int(sys.argv[2])
out = {}

def timed(fn):
    for _ in range(10):
        fn()
    dt = np.zeros(n)
    c.Barrier()
    for i in range(n):
        t = MPI.Wtime()
        fn()
        dt[i] = MPI.Wtime() - t
    c.Allreduce(MPI.IN_PLACE, dt, op=MPI.MAX)
    return float(np.percentile(dt, 25))

for bt in ("f32", "q8_0"):
    m = message_bytes(bt, 1, dim)
    msg = np.zeros(m, np.uint8)
    def pingpong():
        if rank == 0:
            c.Send(msg, dest=1, tag=3); c.Recv(msg, source=1, tag=3)
        elif rank == 1:
            c.Recv(msg, source=0, tag=3); c.Send(msg, dest=0, tag=3)
    out[f"pingpong|{bt}"] = timed(pingpong) / 2          # one way
    other = np.zeros_like(msg)
    def exchange():      # both ways at once, as a sync's messages travel: the link's own floor for it
        if rank < 2:
            c.Sendrecv(msg, dest=1 - rank, sendtag=4, recvbuf=other, source=1 - rank, recvtag=4)
    out[f"{bt}|sendrecv (MPI only)|poll"] = timed(exchange)
    for algo in ("allreduce", "p2p"):
        for wait in ("poll", "block"):
            s = Sync(c, bt, 1, dim, algo, wait)
            buf = np.ones((1, dim), np.float32)
            out[f"{bt}|{algo}|{wait}"] = timed(lambda: s(buf))
if rank == 0:
    print("RESULT", json.dumps(out))
"""


def time_on(c: netns.Cluster, dim: int, n: int, timeout: float) -> dict | None:
    with tempfile.TemporaryDirectory() as td:
        hf = c.write_hostfile(Path(td) / "hostfile", slots=1)
        argv = c.mpirun_argv(c.n, hf, [sys.executable, "-c", TIMER, str(dim), str(n)])
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
                return json.loads(line[7:])
        sys.stderr.write(err[-2000:])
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, nargs="+", default=[2])
    p.add_argument("--profiles", nargs="+", default=["1gbe", "5gbe"])
    p.add_argument("--dim", type=int, default=2048, help="the model width (default: the 1B shape's 2048)")
    p.add_argument("--calls", type=int, default=300, help="timed calls per figure (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    rows = []
    for n in a.hosts:
        for prof in a.profiles:
            with netns.Cluster(n, prof) as c:
                r = time_on(c, a.dim, a.calls, a.timeout)
            if r is None:
                print(f"{n} hosts {prof}: failed", file=sys.stderr)
                continue
            for bt in ("f32", "q8_0"):
                floor = r[f"pingpong|{bt}"]
                for k, v in r.items():
                    kind, algo, wait = (k.split("|") + ["", ""])[:3]
                    if kind == bt:
                        rows.append({"hosts": n, "profile": prof, "buffer_type": bt, "sync": algo, "wait": wait,
                                     "us": round(v * 1e6, 1), "one_way_us": round(floor * 1e6, 1),
                                     "ratio": round(v / floor, 2), "dim": a.dim,
                                     "load_average": round(os.getloadavg()[0], 2), "when": time.strftime("%F %T")})
    print("| hosts | link | buffer | sync | wait | us per sync | one-way floor us | ratio |")
    print("| ---: | --- | --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['hosts']} | {r['profile']} | {r['buffer_type']} | {r['sync']} | {r['wait']} | {r['us']} | "
              f"{r['one_way_us']} | {r['ratio']} |")
    if rows:
        print(f"\nload average {rows[-1]['load_average']}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
