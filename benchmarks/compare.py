"""Side-by-side benchmark in one run: mpillm at -np 1 and -np 2 (one thread per rank), the
machine's STREAM-triad bandwidth, and llama.cpp on the same GGUF with 1 and 2 threads.

  python -m benchmarks.compare --model cache/baseline/smollm2-135m-q4_0.gguf [--json out.json]

Not run under mpirun: it launches each MPI job itself. llama.cpp comes from the separate
bench venv (scripts/setup_llamacpp.sh); without it those columns are left out, saying why.
Every figure is a ratio against a baseline measured in the same run: --rounds repeats all
four runs back to back, each round's ratios use only that round's figures, and the report
gives the median over rounds (figures and ratios; each round's are kept in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_mpillm(np_: int, model: str, extra: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        mpirun = Path(sys.executable).with_name("mpirun")
        cmd = [str(mpirun if mpirun.exists() else "mpirun"), "-np", str(np_), "--bind-to", "core",
               sys.executable, "-m", "mpillm.bench", "--model", model, "--threads", "1", "--json", str(out), *extra]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"mpillm.bench -np {np_} failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def ratios_of(r: dict) -> dict:
    """The target ratios of one round (every figure from that round)."""
    m1, m2, L, st = r["mpillm"]["1"], r["mpillm"]["2"], r["llama_cpp"], r["stream_gb_s"]
    wb = m2["weight_bytes_per_token"]
    ratios = {
        "np2_weight_gb_s": wb * m2["generate_tok_s"] / 1e9,
        "np2_weight_bw_over_stream2": wb * m2["generate_tok_s"] / 1e9 / st["2"],
        "np1_weight_bw_over_stream1": m1["weight_bytes_per_token"] * m1["generate_tok_s"] / 1e9 / st["1"],
        "scaling_generate_np2_over_np1": m2["generate_tok_s"] / m1["generate_tok_s"],
        "scaling_prompt_np2_over_np1": m2["prompt_tok_s"] / m1["prompt_tok_s"],
    }
    if L:
        ratios.update({
            "generate_np1_over_llamacpp_1t": m1["generate_tok_s"] / L["1"]["generate_tok_s"],
            "generate_np2_over_llamacpp_2t": m2["generate_tok_s"] / L["2"]["generate_tok_s"],
            "prompt_np1_over_llamacpp_1t": m1["prompt_tok_s"] / L["1"]["prompt_tok_s"],
            "prompt_np2_over_llamacpp_2t": m2["prompt_tok_s"] / L["2"]["prompt_tok_s"],
            "llamacpp_2t_weight_bw_over_stream2": wb * L["2"]["generate_tok_s"] / 1e9 / st["2"],
        })
    return ratios


def median_of(rounds: list[dict]) -> dict:
    """Per engine and size, each number's median over the rounds (other fields from round 1)."""
    out: dict = {"stream_gb_s": {k: float(np.median([r["stream_gb_s"][k] for r in rounds]))
                                 for k in rounds[0]["stream_gb_s"]}}
    for eng in ("mpillm", "llama_cpp"):
        out[eng] = {}
        for size, first in rounds[0][eng].items():
            out[eng][size] = {k: (type(v)(np.median([r[eng][size][k] for r in rounds]))
                                  if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                              for k, v in first.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a GGUF file (both engines run it)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per run (best is taken)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of all four runs; figures and ratios are medians over rounds")
    p.add_argument("--buffer-type", default="f32")
    p.add_argument("--kv-type", default="f16", help="mpillm's KV cache type (llama.cpp's default is f16 too)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=1800)
    a = p.parse_args(argv)
    from hpl.stream import triad_bandwidth

    from . import baseline

    extra = ["--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
             "--repeats", str(a.repeats), "--buffer-type", a.buffer_type, "--kv-type", a.kv_type]
    have_llamacpp = baseline.available()
    rounds = []
    for i in range(max(1, a.rounds)):
        # one round measures everything once, back to back; ratios are taken within a round
        # (the machines are shared: a noisy minute then hits both sides of a ratio)
        r: dict = {"stream_gb_s": {}, "mpillm": {}, "llama_cpp": {}}
        for th in (1, 2):
            r["stream_gb_s"][str(th)] = triad_bandwidth(threads=th)
        for np_ in (1, 2):
            r["mpillm"][str(np_)] = run_mpillm(np_, a.model, extra, a.timeout)
        if have_llamacpp:
            for th in (1, 2):
                r["llama_cpp"][str(th)] = baseline.run_llamacpp(a.model, th, a.prompt_tokens, a.gen_tokens,
                                                                repeats=a.repeats)
        r["ratios"] = ratios_of(r)
        rounds.append(r)
        print(f"round {i + 1}/{a.rounds}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items()),
              file=sys.stderr, flush=True)
    res = {"model": a.model, "rounds_run": len(rounds), "stat": "median over rounds", **median_of(rounds)}
    res["ratios"] = {k: float(np.median([r["ratios"][k] for r in rounds])) for k in rounds[0]["ratios"]}
    res["rounds"] = rounds
    if not have_llamacpp:
        res["llama_cpp_missing"] = "bench venv not installed: scripts/setup_llamacpp.sh"
    m1, m2, L, ratios = res["mpillm"]["1"], res["mpillm"]["2"], res["llama_cpp"], res["ratios"]
    rows = [("", "prompt tok/s", "generate tok/s", "comm ms/tok", "sent KiB/tok/rank")]
    for k, v in (("mpillm -np 1", m1), ("mpillm -np 2", m2)):
        rows.append((k, f"{v['prompt_tok_s']:.1f}", f"{v['generate_tok_s']:.1f}", f"{v['comm_ms_per_token']:.2f}",
                     f"{v['comm_bytes_per_token'] / 1024:.1f}"))
    for th, v in L.items():
        rows.append((f"llama.cpp {th}t", f"{v['prompt_tok_s']:.1f}", f"{v['generate_tok_s']:.1f}", "-", "-"))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    table = "\n".join("  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)
    print(table)
    print(f"STREAM triad: {res['stream_gb_s']['1']:.1f} GB/s (1 thread), {res['stream_gb_s']['2']:.1f} GB/s (2)")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
