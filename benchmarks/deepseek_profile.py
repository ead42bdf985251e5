"""Where a deepseek2 model's time goes, per rank: the time of every weight's matmul (by tensor
kind), of the MLA block, the dense FFN, the MoE block and the syncs, for one prompt step and for
the decode steps after it, how many distinct experts the router picked, and the page faults.

  mpirun -np 2 --bind-to core python -m benchmarks.deepseek_profile --model DIR_OR_GGUF \
      [--prompt-tokens 64] [--gen-tokens 32] [--json out.json]

The same prompt (random tokens, seed 0) and greedy decoding as ``mpillm.bench``. Rank 0 prints the
plan line (weights + KV cache per rank) and one JSON object: per rank, milliseconds per prompt step
and per generated token, split by part. Timing wraps each call in perf_counter (about 1 us a call).
MLA's per-head loops are one jitted call each (mpillm.runtime.fused.mla_heads), so their kv_b
matmuls count under block.mla; with MPILLM_FUSED=0 the loops run head by head in Python and each
head's calls show (about 9 a head and layer, each carrying the timer's overhead).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict

import numpy as np
from mpi4py import MPI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deepseek_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--ctx-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passes", type=int, default=2,
                   help="runs of the same prompt and decode; the last is reported (the first maps the weights "
                        "the router picks into memory)")
    p.add_argument("--touch-all", action="store_true",
                   help="read every page of the shard before the passes (all experts resident, as in a server "
                        "that has routed many tokens): the peak RSS then checks the plan's weights + KV cache")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from mpillm.runtime import mla as mla_mod
    from mpillm.runtime import model as model_mod
    from mpillm.runtime.engine import Engine
    from mpillm.startup import resolve_model

    comm = MPI.COMM_WORLD
    model_dir = resolve_model(a.model, comm)
    engine = Engine(model_dir, max_seq_len=a.ctx_size, threads=a.threads, verbose=True,
                    max_batch=max(64, a.prompt_tokens))
    m = engine.model
    acc: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def label(obj, name):
        if isinstance(obj, model_mod.Linear):
            obj._label = name
        elif isinstance(obj, list):
            for x in obj:
                label(x, name)

    for L in m.layers:
        for k, v in vars(L).items():
            label(v, ("moe." if L.moe else "dense.") + k if k.startswith(("w_", "exp_", "shexp_", "router"))
                  else "attn." + k)
    label(m.output, "output")

    def timed(fn, key):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                acc[key] += time.perf_counter() - t0
                calls[key] += 1
        return wrapper

    lin_call = model_mod.Linear.__call__

    def lin_timed(self, a_, T, out):
        t0 = time.perf_counter()
        lin_call(self, a_, T, out)
        k = "matmul." + getattr(self, "_label", "?")
        acc[k] += time.perf_counter() - t0
        calls[k] += 1

    model_mod.Linear.__call__ = lin_timed
    model_mod.Acts.quantize = timed(model_mod.Acts.quantize, "quantize_acts")
    for fname in ("take_cols", "put_cols", "rmsnorm_cols", "rope_parts", "store_latent"):
        setattr(mla_mod, fname, timed(getattr(mla_mod, fname), "mla." + fname))
    for fname in ("_mla", "_ffn", "_moe", "sync"):
        setattr(m, fname, timed(getattr(m, fname), "block." + fname.lstrip("_")))
    orig_attn = model_mod.ops.attention_ext
    model_mod.ops.attention_ext = timed(orig_attn, "mla.attention")
    m.route_log = []
    steps: list[tuple] = []   # per forward: T, times, calls, wall, routes, (major, minor) page faults
    fwd = m.forward

    def faults():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return np.array([ru.ru_majflt, ru.ru_minflt])

    def forward(tokens, *args, **kw):
        acc.clear()
        calls.clear()
        m.route_log.clear()
        f0, t0 = faults(), time.perf_counter()
        try:
            return fwd(tokens, *args, **kw)
        finally:
            steps.append((len(tokens), dict(acc), dict(calls), time.perf_counter() - t0, list(m.route_log),
                          faults() - f0))

    m.forward = forward
    if a.touch_all:
        for t in engine.shard.tensors.values():
            for arr in t.arrays.values():
                b = np.asarray(arr).reshape(-1).view(np.uint8)
                int(b[::4096].sum())
    if engine.rank == 0:
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, engine.cfg.vocab_size, a.prompt_tokens)
        for _ in range(a.passes):   # the same prompt and greedy path each pass: the last pass is reported
            tok = engine.step_greedy(prompt, 0)
            pos = a.prompt_tokens
            for _ in range(a.gen_tokens):
                tok = engine.step_greedy([tok], pos)
                pos += 1
        engine.stop(0)
    else:
        engine.serve()
    per_pass = 1 + a.gen_tokens
    last = steps[-per_pass:]
    prompt_steps = [s_ for s_ in last if s_[0] > 1]
    gen_steps = [s_ for s_ in last if s_[0] == 1]

    def total(sel, i):
        out: dict = defaultdict(float)
        for s_ in sel:
            for k, v in s_[i].items():
                out[k] += v
        return out

    def ms(d, n):
        return {k: round(1e3 * v / n, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}

    n = max(len(gen_steps), 1)
    gen_routes = [r for s_ in gen_steps for r in s_[4]]
    moe_layers = max(len(prompt_steps[0][4]) if prompt_steps else 1, 1)
    mine = {
        "rank": engine.rank,
        "prompt_rows": [s_[0] for s_ in prompt_steps],
        "prompt_ms": round(1e3 * sum(s_[3] for s_ in prompt_steps), 2),
        "prompt_parts_ms": ms(total(prompt_steps, 1), 1),
        "prompt_calls": dict(total(prompt_steps, 2)),
        "prompt_page_faults_major_minor": [int(x) for x in sum(s_[5] for s_ in prompt_steps)],
        "gen_page_faults_major_minor_per_token": [float(x) / n for x in sum(s_[5] for s_ in gen_steps)],
        "first_pass_page_faults_major_minor": [int(x) for x in sum(s_[5] for s_ in steps[:per_pass])],
        "gen_tokens": len(gen_steps),
        "gen_forward_ms_per_token": round(1e3 * sum(s_[3] for s_ in gen_steps) / n, 3),
        "gen_parts_ms_per_token": ms(total(gen_steps, 1), n),
        "gen_calls_per_token": {k: v / n for k, v in total(gen_steps, 2).items()},
        "prompt_distinct_experts_per_moe_layer": [int(len(np.unique(r[0]))) for s_ in prompt_steps for r in s_[4]],
        "gen_distinct_experts_per_moe_layer": [
            int(len(np.unique(np.concatenate([r[0].ravel() for r in gen_routes[li::moe_layers]]))))
            for li in range(moe_layers)] if gen_routes else [],
    }
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    mine["memory"] = {
        "plan_weights_bytes": int(engine.shard.nbytes),
        "plan_kv_cache_bytes": int(m.k_cache.nbytes + m.v_cache.nbytes),
        **{k: int(status[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile") if k in status},
        "touched_all": a.touch_all,
    }
    everyone = comm.gather(mine, root=0)
    if engine.rank == 0:
        out = {"model": str(model_dir), "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
               "load_avg": list(__import__("os").getloadavg()), "ranks": everyone}
        print(json.dumps(out, indent=1))
        if a.json:
            with open(a.json, "w") as f:
                f.write(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
