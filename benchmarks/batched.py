"""Continuous batching side by side: mpillm's aggregate generate tok/s with N sequences decoding
together (mpillm.bench --concurrency) at -np 1 and -np 2, and llama.cpp's own batched decoding
(llama-batched-bench, built from the llama.cpp sources vendored in the llama-cpp-python source
package: scripts/build_llama_server.sh) with 1 and 2 threads, on the same GGUF, in one run.

  python -m benchmarks.batched --model cache/baseline/llama-3.2-1b-shape-q4_0.gguf [--rounds 2]

Each round runs all four back to back; ratios are taken within a round and the report gives
the median over rounds (the machines are shared and their speed moves from minute to minute).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import numpy as np

from .compare import ROOT, run_mpillm


def run_llama_batched(binary: Path, model: str, threads: int, seqs: list[int], prompt: int, gen: int,
                      timeout: float) -> dict:
    """llama-batched-bench: {B: S_TG aggregate generate tok/s}, and the prompt rate at B = 1."""
    cmd = [str(binary), "-m", model, "-c", str(max(seqs) * (prompt + gen) + 64), "-b", "512", "-ub", "512",
           "-npp", str(prompt), "-ntg", str(gen), "-npl", ",".join(map(str, seqs)), "-t", str(threads),
           "-tb", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed:\n{r.stderr[-3000:]}")
    rows = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[0]):
            pp, tg, b = (int(c) for c in cells[:3])
            rows[b] = {"prompt_tok_s": float(cells[5]), "aggregate_tok_s": float(cells[7])}
    if set(rows) != set(seqs):
        raise RuntimeError(f"could not read llama-batched-bench's table:\n{r.stdout[-3000:]}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batched", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a GGUF both engines read")
    p.add_argument("--seqs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--llama-bin", type=Path, default=ROOT / "cache" / "llamacpp" / "build" / "bin")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=1800)
    a = p.parse_args(argv)
    binary = a.llama_bin / "llama-batched-bench"
    rounds = []
    for _ in range(a.rounds):
        rd = {}
        for n in (1, 2):
            res = run_mpillm(n, a.model, ["--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
                                          "--ctx-size", str(a.prompt_tokens + a.gen_tokens + 8),
                                          "--repeats", "1", "--concurrency", *map(str, a.seqs)], a.timeout)
            rd[f"mpillm_np{n}"] = {"prompt_tok_s": res["prompt_tok_s"], "generate_tok_s": res["generate_tok_s"],
                                   "batched": {b["sequences"]: b["aggregate_tok_s"] for b in res["batched"]}}
            if binary.exists():
                ll = run_llama_batched(binary, a.model, n, a.seqs, a.prompt_tokens, a.gen_tokens, a.timeout)
                rd[f"llamacpp_{n}t"] = {"prompt_tok_s": ll[1]["prompt_tok_s"] if 1 in ll else None,
                                        "batched": {b: v["aggregate_tok_s"] for b, v in ll.items()}}
        ratios = {}
        for n in (1, 2):
            m = rd[f"mpillm_np{n}"]
            for b, v in m["batched"].items():
                ratios[f"np{n}_{b}_over_1"] = v / m["batched"][min(m["batched"])]
                ratios[f"np{n}_{b}_over_prompt_rate"] = v / m["prompt_tok_s"]
                ll = rd.get(f"llamacpp_{n}t")
                if ll and b in ll["batched"]:
                    ratios[f"np{n}_{b}_over_llamacpp_{n}t"] = v / ll["batched"][b]
        rd["ratios"] = ratios
        rounds.append(rd)
    keys = sorted(set().union(*(r["ratios"] for r in rounds)))
    report = {"model": a.model, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "seqs": a.seqs,
              "llamacpp": str(binary) if binary.exists() else f"not built ({binary}): scripts/build_llama_server.sh",
              "median_ratios": {k: float(np.median([r["ratios"][k] for r in rounds if k in r["ratios"]])) for k in keys},
              "rounds": rounds}
    print(json.dumps(report, indent=1))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
