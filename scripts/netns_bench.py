#!/usr/bin/env python3
"""The engine across 2 and 4 emulated hosts at each link profile (needs root):

    python scripts/netns_bench.py [--hosts 2 4] [--profiles 1gbe 2.5gbe 5gbe 10gbe thunderbolt]
                                  [--max-tokens 32] [--json out.json] [--model M.gguf]
                                  [--baseline dllama --dllama-model M.m --dllama-tokenizer T.t]

Each emulated host is a network namespace on a bridge shaped with tc tbf to the profile's
rate (tests/cluster/netns.py); Open MPI's TCP traffic crosses the shaped links only. For
every (hosts, profile) it runs mpillm.generate with a fixed prompt and prints generate tok/s,
ms per token and its communication part, and the bytes each rank sends per token (from the
stats line), as a Markdown table. A single-host row (shared memory) is the reference.

On a 2-core machine 4 ranks share 2 cores: there the rows measure the software's overhead
more than the link; on real hosts each rank has its own cores.

--baseline dllama runs distributed-llama (benchmarks/dllama.py: root on host 0, one worker per
other host, 1 thread each, q80 sync) in the same cluster as mpillm, right after it, repeat by
repeat (the order alternates), so both see the same links, the same relay calibration and the
same load. Its rows carry tool "dllama" and its own figures: tok/s and ms/token from its
"Prediction" summary, comm = its per-token "Sync" time. The weights must be the same as
mpillm's --model (docs/cluster.md, "distributed-llama baseline", makes both from one GGUF).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

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


GEN_EXTRA: list[str] = []   # --model / --max-seq-len for mpillm.generate, set by main()
MODEL_ARGS: list[str] = []  # --model alone, for the calibrations (mpillm.check) of the same model


def gen_args(n_tokens: int, buffer_type: str | None = None) -> list[str]:
    return [sys.executable, "-m", "mpillm.generate", "--prompt", PROMPT, "--max-tokens", str(n_tokens), "--quiet"] + \
        (["--buffer-type", buffer_type] if buffer_type else []) + GEN_EXTRA


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


def run_pair(n: int, profile: str, a, layer_us=None) -> list[dict]:
    """One cluster for mpillm (each --buffer-types) and distributed-llama, alternating run by run:
    repeat k runs mpillm first when k is even, distributed-llama first when odd. Best tok/s of
    each (tool, buffer) is kept, with every run's figures beside it."""
    from benchmarks import dllama

    turbo = a.dllama_net_turbo == "1" or (a.dllama_net_turbo == "auto" and not netns.PROFILES[profile].rtt_us
                                          and n <= (os.cpu_count() or 1))
    runs: dict[tuple, list] = {}
    with netns.Cluster(n, profile) as c, tempfile.TemporaryDirectory() as td:
        cal = {"emulator_rtt_us": round(c.base_rtt_us or 0, 1), "relay_hold_us": round(c.one_way_us, 1)}

        def mp():
            for bt in a.buffer_types:
                out = _run_in(c, gen_args(a.max_tokens, bt), a.timeout, Path(td))
                r = parse(out) if out else None
                runs.setdefault(("mpillm", bt), []).append(r)
                print(f"    {n} hosts {profile} mpillm {bt}: {r}", file=sys.stderr)

        def dl():
            logs = Path(td) / f"dl{len(runs.get(('dllama', 'q80'), []))}"
            logs.mkdir()
            r, info = dllama.run_in_cluster(c, a.dllama_model, a.dllama_tokenizer, PROMPT, a.max_tokens, a.timeout,
                                            binary=a.dllama_bin, turbo=turbo, max_seq_len=a.max_seq_len or 512,
                                            log_dir=logs)
            if r is None:
                print(f"    dllama failed: {info.get('error')}", file=sys.stderr)
                for f in sorted(logs.glob("dllama-worker-*.log")):
                    sys.stderr.write(f"    {f.name}: {f.read_text()[-400:]}\n")
            runs.setdefault(("dllama", "q80"), []).append(r)
            DLLAMA_CMDS.setdefault(n, info)
            print(f"    {n} hosts {profile} dllama (net-turbo {int(turbo)}): {r}", file=sys.stderr)

        for k in range(a.repeats):
            for f in ((mp, dl) if k % 2 == 0 else (dl, mp)):
                f()
    rows = []
    for (tool, bt), got in runs.items():
        ok = [r for r in got if r]
        best = max(ok, key=lambda r: r["tok_s"]) if ok else {}
        row = {"hosts": n, "ranks": n, "tool": tool, "buffer": bt, "profile": profile, **best, **cal,
               "runs": got}
        if tool == "dllama":
            row["net_turbo"] = int(turbo)
        rows.append(row)
    return rows


DLLAMA_CMDS: dict = {}


def predict_in(c, td: Path, bt: str, layer_us: float, timeout: float) -> dict | None:
    """mpillm.check --calibrate inside the cluster (speeds + Allreduce table), then the planner."""
    from mpillm import planner
    from mpillm.formats.config import ModelConfig

    cf = td / "cluster.json"
    out = _run_in(c, [sys.executable, "-m", "mpillm.check", "--comm-iters", "0.5", "--max-seq-len", "256",
                      "--calibrate", str(cf), "--calibrate-seconds", "0.4"] + MODEL_ARGS, timeout, td)
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
                                            "--calibrate", str(cf)] + MODEL_ARGS, capture_output=True, text=True,
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
    p.add_argument("--model", default=None,
                   help="mpillm.generate --model (a GGUF or converted directory; default: the bundled SmolLM2)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length for both tools (default: theirs; "
                   "512 for distributed-llama)")
    p.add_argument("--no-local", action="store_true", help="skip the one-host (shared memory) rows")
    p.add_argument("--baseline", choices=["dllama"], default=None,
                   help="also run distributed-llama in each cluster, alternating with mpillm (benchmarks/dllama.py)")
    p.add_argument("--dllama-model", type=Path, default=None, help="its weights (dllama_model_*_q40.m)")
    p.add_argument("--dllama-tokenizer", type=Path, default=None, help="its tokenizer (dllama_tokenizer_*.t)")
    p.add_argument("--dllama-bin", type=Path, default=ROOT / "cache" / "dllama" / "dllama",
                   help="the binary scripts/build_dllama.sh made (default: %(default)s)")
    p.add_argument("--dllama-net-turbo", choices=["auto", "0", "1"], default="auto",
                   help="its --net-turbo (non-blocking sockets, spinning on EAGAIN). auto: on, except where the "
                        "links go through the delay relay or hosts outnumber cores, where a spinning node takes "
                        "the relay's CPU (mpillm yields there too: OMPI_MCA_mpi_yield_when_idle)")
    a = p.parse_args()
    if a.model:
        GEN_EXTRA.extend(["--model", a.model])
        MODEL_ARGS.extend(["--model", a.model])
    if a.max_seq_len:
        GEN_EXTRA.extend(["--max-seq-len", str(a.max_seq_len)])
    if a.baseline == "dllama":
        missing = [f"--{k.replace('_', '-')}" for k in ("dllama_model", "dllama_tokenizer") if getattr(a, k) is None]
        if missing:
            p.error(f"--baseline dllama needs {' and '.join(missing)}")
        for f in (a.dllama_bin, a.dllama_model, a.dllama_tokenizer):
            if not Path(f).is_file():
                p.error(f"{f} does not exist (docs/cluster.md: distributed-llama baseline)")
        if a.predict:
            p.error("--predict and --baseline are separate runs")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = os.getloadavg()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
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
        for bt in ([] if a.no_local else a.buffer_types):
            r = best(lambda: run_local(n, a.max_tokens, a.timeout, bt))
            rows.append({"hosts": 1, "ranks": n, "tool": "mpillm", "buffer": bt, "profile": "one host (shared memory)",
                         **(r or {})})
            print(f"  {n} ranks on one host, {bt}: {r}", file=sys.stderr)
        if a.baseline:
            for prof in a.profiles:
                rows += run_pair(n, prof, a)
            continue
        for bt in a.buffer_types:
            for prof in a.profiles:
                r = best(lambda: run_netns(n, prof, a.max_tokens, a.timeout, bt, layer_us))
                rows.append({"hosts": n, "ranks": n, "tool": "mpillm", "buffer": bt, "profile": prof, **(r or {})})
                print(f"  {n} hosts, {prof}, {bt}: {r}", file=sys.stderr)
    model_name = Path(a.model).name if a.model else "bundled SmolLM2-135M Q4_1"
    print(f"\nmpillm.generate{' and distributed-llama' if a.baseline else ''}, {model_name}, {a.max_tokens} tokens, "
          f"one rank per host ({os.cpu_count()} cores in all; {time.time() - t0:.0f} s; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print("| ranks | link | tool | buffer | generate tok/s | ms/token | of which comm ms | KiB sent per rank per token |")
    print("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "tok_s" in r:
            print(f"| {r['ranks']} | {r['profile']} | {r['tool']} | {r['buffer']} | {r['tok_s']:.1f} | {r['ms_tok']:.1f} | "
                  f"{r['comm_ms']:.1f} | {r['kib_tok']:.1f} |")
        else:
            print(f"| {r['ranks']} | {r['profile']} | {r['tool']} | {r['buffer']} | failed | | | |")
    if a.baseline:
        print("\n(dllama: ms/token and tok/s from its own microsecond totals of Pred + Sync; comm = mean of its "
              "per-token Sync, printed in whole ms, truncated; KiB = what its root sent per token to all workers together)")
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
        from benchmarks import dllama

        doc = {"date": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": " ".join(shlex.quote(x) for x in sys.argv),
               "uptime_before": uptime_before, "load_average_before": load_before,
               "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip(),
               "load_average": os.getloadavg(), "cores": os.cpu_count(), "max_tokens": a.max_tokens,
               "prompt": PROMPT, "mpillm_model": a.model or "bundled SmolLM2-135M Q4_1",
               "mpillm_commit": subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                               text=True, timeout=10).stdout.strip(),
               "layer_us": layer_us, "rows": rows}
        if a.baseline:
            doc["dllama"] = {"version": dllama.version(a.dllama_bin), "model": str(a.dllama_model),
                             "tokenizer": str(a.dllama_tokenizer), "net_turbo": a.dllama_net_turbo,
                             "commands": {str(k): v for k, v in DLLAMA_CMDS.items()}}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all("tok_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
