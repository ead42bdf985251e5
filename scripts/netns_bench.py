#!/usr/bin/env python3
"""The engine across 2 and 4 emulated hosts at each link profile (needs root):

    python scripts/netns_bench.py [--hosts 2 4] [--profiles 1gbe 2.5gbe 5gbe 10gbe thunderbolt]
                                  [--max-tokens 32] [--json out.json]

Each emulated host is a network namespace on a bridge shaped with tc tbf to the profile's
rate (tests/cluster/netns.py); Open MPI's TCP traffic crosses the shaped links only. For
every (hosts, profile) it runs mpillm.generate with a fixed prompt and prints generate tok/s,
ms per token and its communication part, and the bytes each rank sends per token (from the
stats line), as a Markdown table. A single-host row (shared memory) is the reference.

On a 2-core machine 4 ranks share 2 cores: there the rows measure the software's overhead
more than the link; on real hosts each rank has its own cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
sys.path.insert(0, str(ROOT / "tests"))

import netns  # noqa: E402

PROMPT = "The capital of France is"
STATS = re.compile(r"generate (\d+) tok, ([\d.]+) tok/s \| ([\d.]+) ms/tok = ([\d.]+) compute \+ ([\d.]+) comm \| "
                   r"sent/rank/tok: ([\d.]+) KiB allreduce payload(?: \+ ([\d.]+) KiB logits)?")


def parse(out: str) -> dict | None:
    m = STATS.search(out)
    if not m:
        return None
    return {"tok_s": float(m[2]), "ms_tok": float(m[3]), "comm_ms": float(m[5]),
            "kib_tok": float(m[6]) + float(m[7] or 0)}


def gen_args(n_tokens: int, buffer_type: str | None = None) -> list[str]:
    return [sys.executable, "-m", "mpillm.generate", "--prompt", PROMPT, "--max-tokens", str(n_tokens), "--quiet"] + \
        (["--buffer-type", buffer_type] if buffer_type else [])


def run_local(np_: int, n_tokens: int, timeout: float, bt: str | None) -> dict | None:
    from mpiutil import mpi_env, mpirun_cmd

    r = subprocess.run(mpirun_cmd(np_) + gen_args(n_tokens, bt), capture_output=True, text=True, timeout=timeout,
                       env=mpi_env(), cwd=ROOT)
    return parse(r.stdout) if r.returncode == 0 else None


def _run_in(c, argv: list[str], timeout: float, td: Path) -> str | None:
    hf = c.write_hostfile(Path(td) / "hostfile")
    extra = {"OMPI_MCA_mpi_yield_when_idle": "1"} if c.n > (os.cpu_count() or 1) else {}
    proc = subprocess.Popen(c.mpirun_argv(c.n, hf, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=c.env(extra), cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return None
    if proc.returncode != 0:
        sys.stderr.write(err[-2000:])
        return None
    return out


def run_netns(n: int, profile: str, n_tokens: int, timeout: float, bt: str | None, predict_layer_us=None) -> dict | None:
    """One cluster: (with --predict) calibrate inside it and ask the planner, then generate."""
    with netns.Cluster(n, profile) as c, tempfile.TemporaryDirectory() as td:
        pred = None
        if predict_layer_us is not None:
            pred = predict_in(c, Path(td), bt or "f32", predict_layer_us, timeout)
        out = _run_in(c, gen_args(n_tokens, bt), timeout, Path(td))
        r = parse(out) if out else None
        if r and pred:
            r.update(pred)
            r["emulator_rtt_us"] = round(c.base_rtt_us or 0, 1)
            r["relay_hold_us"] = round(c.one_way_us, 1)
        return r


def predict_in(c, td: Path, bt: str, layer_us: float, timeout: float) -> dict | None:
    """mpillm.check --calibrate inside the cluster (speeds + Allreduce table), then the planner."""
    from mpillm import planner
    from mpillm.formats.config import ModelConfig

    cf = td / "cluster.json"
    out = _run_in(c, [sys.executable, "-m", "mpillm.check", "--comm-iters", "0.5", "--max-seq-len", "256",
                      "--calibrate", str(cf), "--calibrate-seconds", "0.4"], timeout, td)
    if out is None:
        return None
    doc = planner.read_cluster(cf)
    model = Path(doc["model"])
    cfg = ModelConfig.from_dict(json.loads((model / "manifest.json").read_text())["config"])
    speeds = [r["weight_gbps"] for r in doc["ranks"]]
    # bytes each rank reads per token: the model's 2-D weights (from the smallest world size's shard)
    total = sum(doc["weight_types"].values()) * min(json.loads((model / "manifest.json").read_text())["world_sizes"])
    comp = [total / c.n / (s * 1e9) + cfg.n_layers * layer_us * 1e-6 for s in speeds]
    comm = planner.comm_s(cfg, c.n, planner.LINKS.get(c.profile.name, planner.LINKS["1gbe"]), bt, doc["allreduce"])
    link_model = planner.comm_s(cfg, c.n, planner.LINKS[c.profile.name], bt) if c.profile.name in planner.LINKS else None
    return {"pred_ms_tok": round(1e3 * (max(comp) + comm), 2), "pred_comm_ms": round(1e3 * comm, 2),
            "pred_compute_ms": round(1e3 * max(comp), 2), "calibrated_gbps": speeds,
            "link_model_comm_ms": round(1e3 * link_model, 2) if link_model is not None else None,
            "allreduce_table": doc["allreduce"]}


def fit_layer_us(timeout: float) -> float:
    """Fixed cost per layer and token on this machine, from one rank: (ms/token - bytes/speed) / layers."""
    from mpiutil import mpi_env, mpirun_cmd

    with tempfile.TemporaryDirectory() as td:
        cf = Path(td) / "c.json"
        r = subprocess.run(mpirun_cmd(1) + [sys.executable, "-m", "mpillm.check", "--no-comm", "--max-seq-len", "256",
                                            "--calibrate", str(cf)], capture_output=True, text=True,
                           timeout=timeout, env=mpi_env(), cwd=ROOT)
        g = run_local(1, 48, timeout, None)
        if r.returncode != 0 or not g:
            return 0.0
        doc = json.loads(cf.read_text())
        model = Path(doc["model"])
        cfg = json.loads((model / "manifest.json").read_text())["config"]
        total = sum(doc["weight_types"].values()) * min(json.loads((model / "manifest.json").read_text())["world_sizes"])
        stream_ms = total / (doc["ranks"][0]["weight_gbps"] * 1e9) * 1e3
        return max(0.0, (g["ms_tok"] - stream_ms) * 1e3 / cfg["n_layers"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    p.add_argument("--profiles", nargs="+", default=["1gbe", "2.5gbe", "5gbe", "10gbe", "thunderbolt"],
                   choices=list(netns.PROFILES))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--buffer-types", nargs="+", default=["f32"],
                   help="mpillm.generate --buffer-type values to compare, e.g. f32 f16 q8_0 (default: f32)")
    p.add_argument("--repeats", type=int, default=1, help="runs per cell; the best tok/s is kept")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--predict", action="store_true",
                   help="also calibrate inside each cluster and print the planner's prediction beside the measurement")
    a = p.parse_args()
    reason = netns.have_netns()
    if reason:
        print(f"netns_bench: {reason}", file=sys.stderr)
        return 2
    rows = []

    def best(fn) -> dict | None:
        got = [r for r in (fn() for _ in range(a.repeats)) if r]
        return max(got, key=lambda r: r["tok_s"]) if got else None

    t0 = time.time()
    layer_us = fit_layer_us(a.timeout) if a.predict else None
    if a.predict:
        print(f"  fixed cost per layer and token on one rank here: {layer_us:.1f} us", file=sys.stderr)
    for n in a.hosts:
        for bt in a.buffer_types:
            r = best(lambda: run_local(n, a.max_tokens, a.timeout, bt))
            rows.append({"hosts": 1, "ranks": n, "buffer": bt, "profile": "one host (shared memory)", **(r or {})})
            print(f"  {n} ranks on one host, {bt}: {r}", file=sys.stderr)
            for prof in a.profiles:
                r = best(lambda: run_netns(n, prof, a.max_tokens, a.timeout, bt, layer_us))
                rows.append({"hosts": n, "ranks": n, "buffer": bt, "profile": prof, **(r or {})})
                print(f"  {n} hosts, {prof}, {bt}: {r}", file=sys.stderr)
    print(f"\nmpillm.generate, bundled SmolLM2-135M Q4_1, {a.max_tokens} tokens, one rank per host "
          f"({os.cpu_count()} cores in all; {time.time() - t0:.0f} s)\n")
    print("| ranks | link | buffer | generate tok/s | ms/token | of which comm ms | KiB sent per rank per token |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "tok_s" in r:
            print(f"| {r['ranks']} | {r['profile']} | {r['buffer']} | {r['tok_s']:.1f} | {r['ms_tok']:.1f} | "
                  f"{r['comm_ms']:.1f} | {r['kib_tok']:.1f} |")
        else:
            print(f"| {r['ranks']} | {r['profile']} | {r['buffer']} | failed | | | |")
    if a.predict:
        print("\nPlanner (calibrated inside each cluster: speeds and Allreduce table) against the measurement:\n")
        print("| ranks | link | buffer | measured ms/token | predicted | pred/meas | measured comm ms | predicted comm "
              "| link-model comm |")
        print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            if "pred_ms_tok" in r:
                print(f"| {r['ranks']} | {r['profile']} | {r['buffer']} | {r['ms_tok']:.1f} | {r['pred_ms_tok']:.1f} | "
                      f"{r['pred_ms_tok'] / r['ms_tok']:.2f} | {r['comm_ms']:.1f} | {r['pred_comm_ms']:.1f} | "
                      f"{r['link_model_comm_ms']} |")
    if a.json:
        a.json.write_text(json.dumps({"layer_us": layer_us, "load_average": os.getloadavg(), "rows": rows},
                                     indent=1) + "\n")
    return 0 if all("tok_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
