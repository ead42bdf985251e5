#!/usr/bin/env python3
"""Speculative decoding across emulated hosts, per link profile (needs root):

    python scripts/netns_spec.py [--hosts 2] [--profiles 1gbe 2.5gbe 5gbe thunderbolt wifi]
                                 [--gen-tokens 96] [--repeats 1] [--json out.json] [-- bench_spec flags]

For every (hosts, profile) it builds the emulated cluster of scripts/netns_bench.py (one network
namespace per host on a bridge, links shaped by the profile's rate and delayed by the userspace
relay of tests/cluster/linkemu.py) and runs ``mpillm.bench_spec`` inside it: plain and
``--draft lookup`` decoding of the grounded and the free workload, one after the other in each
repetition, so each ratio is measured under the same machine load. A run on one host (shared
memory) is the reference row. Prints a Markdown table and writes every bench_spec JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import netns_bench  # noqa: E402  (also puts tests/ and tests/cluster on the path)
from netns_bench import ROOT, netns  # noqa: E402


def spec_argv(a, out: Path) -> list[str]:
    return [sys.executable, "-m", "mpillm.bench_spec", "--gen-tokens", str(a.gen_tokens), "--repeats",
            str(a.repeats), "--workloads", a.workloads, "--json", str(out), *a.bench_args]


def run_one(a, hosts: int, profile: str | None) -> dict | None:
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "spec.json"
        if profile is None:
            import subprocess

            from mpiutil import mpi_env, mpirun_cmd
            r = subprocess.run(mpirun_cmd(hosts) + spec_argv(a, out), capture_output=True, text=True,
                               timeout=a.timeout, env=mpi_env(), cwd=ROOT)
            if r.returncode != 0:
                sys.stderr.write(r.stderr[-2000:])
                return None
        else:
            with netns.Cluster(hosts, profile) as c:
                if netns_bench._run_in(c, spec_argv(a, out), a.timeout, Path(td)) is None:
                    return None
        return json.loads(out.read_text()) if out.exists() else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, nargs="+", default=[2])
    p.add_argument("--profiles", nargs="+", default=["1gbe", "2.5gbe", "5gbe", "thunderbolt", "wifi"],
                   choices=list(netns.PROFILES))
    p.add_argument("--gen-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workloads", default="grounded,free")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("bench_args", nargs="*", help="more mpillm.bench_spec flags (after --)")
    a = p.parse_args()
    reason = netns.have_netns()
    if reason:
        print(f"netns_spec: {reason}", file=sys.stderr)
        return 2
    rows, t0 = [], time.time()
    for n in a.hosts:
        for prof in [None, *a.profiles]:
            load = os.getloadavg()[0]
            res = run_one(a, n, prof)
            name = prof or "one host (shared memory)"
            rows.append({"hosts": 1 if prof is None else n, "ranks": n, "profile": name, "load_avg_1min_before": load,
                         "bench_spec": res})
            if res:
                s = res["summary"]
                print(f"  {n} ranks, {name}: " + ", ".join(f"{k} {v['median_speedup_vs_plain']:.2f}x "
                                                            f"({v['median_tok_s']:.1f} tok/s)"
                                                            for k, v in s.items()), file=sys.stderr, flush=True)
            else:
                print(f"  {n} ranks, {name}: failed", file=sys.stderr, flush=True)
    print(f"\nmpillm.bench_spec, bundled SmolLM2-135M Q4_1, {a.gen_tokens} tokens, greedy, one rank per host, "
          f"medians of {a.repeats} ({time.time() - t0:.0f} s)\n")
    print("| ranks | link | load | workload | plain tok/s | lookup tok/s | lookup vs plain | accepted | tok/step "
          "| = plain |")
    print("| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        res = r["bench_spec"]
        if not res:
            print(f"| {r['ranks']} | {r['profile']} | | | failed | | | | | |")
            continue
        s = res["summary"]
        for wl in a.workloads.split(","):
            pl, lk = s[f"{wl}/plain"], s[f"{wl}/lookup"]
            print(f"| {r['ranks']} | {r['profile']} | {res['load_avg_1min']['median']:.1f} | {wl} | "
                  f"{pl['median_tok_s']:.1f} | {lk['median_tok_s']:.1f} | **{lk['median_speedup_vs_plain']:.2f}x** | "
                  f"{100 * lk['acceptance_rate']:.0f}% | {lk['tokens_per_step']:.2f} | "
                  f"{'yes' if lk['identical_to_plain'] else 'no'} |")
    if a.json:
        a.json.write_text(json.dumps({"gen_tokens": a.gen_tokens, "repeats": a.repeats, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["bench_spec"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
