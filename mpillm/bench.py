"""Benchmark the engine on the current MPI job and print JSON.

  mpirun -np 2 python -m mpillm.bench [--model DIR|GGUF] [--prompt-tokens 64] [--gen-tokens 64]

Reports prompt and generate tok/s, ms per generated token split into compute and
communication (time inside collectives, waiting included), bytes each rank hands to
Allreduce and sends in the logits gather per token, weight bytes a token reads (per rank and in
all; a MoE model's tokens read top-k of its experts, see ``weight_bytes_read_per_token``),
peak RSS per rank, and start-up time (process start to first token).
With --draft lookup / --draft-model it also times plain and speculative greedy decoding of the
same prompt through the Service ("speculative": tok/s of both, drafted and accepted tokens,
acceptance rate, tokens per step, whether the tokens equal plain decoding's).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpillm.runtime.errors import run
from mpillm.options import add_model_args, parse_args_bcast, sync_table


def process_age_s() -> float:
    """Seconds since this process started (from /proc; falls back to 0)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# expert-indexed tensors, (n_experts, ...): a token reads the rows of its n_experts_used experts
EXPERT_TENSORS = ("exp_gate", "exp_up", "exp_down", "exp_gate_b", "exp_up_b", "exp_down_b")


def weight_bytes_read_per_token(shard) -> int:
    """Bytes of its shard one rank reads to generate a token: every dense tensor (attention, norms,
    the router, dense FFNs, the output matrix) whole; of each expert-indexed tensor the share
    n_experts_used / n_experts (a token's top-k experts; the rank's slice of each); of an untied
    embedding table one row, which lives on one rank (so 1 / vocab_size of the rank's slice here,
    the expected share). A dense model with tied embeddings reads its whole shard."""
    cfg = shard.config
    total = 0.0
    for name, t in shard.tensors.items():
        leaf = name.rsplit("/", 1)[-1]
        if cfg.is_moe and leaf in EXPERT_TENSORS:
            if t.shape[0] != cfg.n_experts:
                raise ValueError(f"{shard.path}: {name} has {t.shape[0]} experts, the config {cfg.n_experts}")
            total += t.nbytes * cfg.n_experts_used / cfg.n_experts
        elif name == "tok_embd" and not cfg.tied_embeddings:
            total += t.nbytes / cfg.vocab_size
        else:
            total += t.nbytes
    return round(total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpillm.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default: %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is reported")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--concurrency", type=int, nargs="*", default=[],
                   help="also measure continuous batching: aggregate generate tok/s with this many sequences "
                        "decoding at once, e.g. --concurrency 1 2 4 8 16 (greedy, through mpillm.serving.service)")
    p.add_argument("--spec-prompt", choices=("random", "grounded", "free"), default="random",
                   help="with --draft / --draft-model: the prompt both plain and speculative decoding get: "
                        "random tokens (--prompt-tokens of them), or mpillm.bench_spec's grounded (~1,000 tokens "
                        "to repeat) or free (an open story) chat prompt (default: %(default)s)")
    args = parse_args_bcast(p, argv)
    from mpillm.runtime.engine import Engine
    from mpillm.startup import prepare_model

    comm = MPI.COMM_WORLD
    model_dir = prepare_model(args, comm)
    speculate = args.draft != "none" or bool(args.draft_model)
    need = args.prompt_tokens + args.gen_tokens + 1 + (1100 if speculate and args.spec_prompt == "grounded" else 0)
    slots = max(args.concurrency or [1])
    engine = Engine(model_dir, max_seq_len=max(args.max_seq_len, need), threads=args.threads, verbose=False,
                    buffer_type=args.buffer_type, kv_type=args.kv_type, n_slots=slots,
                    max_batch=max(args.batch_tokens, slots), sync=args.sync, wait=args.wait,
                    sync_table=sync_table(args))
    m = engine.model

    def measure() -> dict:
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, engine.cfg.vocab_size, args.prompt_tokens)
        t0 = time.perf_counter()
        tok = engine.step_greedy(prompt, 0)
        prompt_s = time.perf_counter() - t0
        m.stats.reset()
        pos = args.prompt_tokens
        t0 = time.perf_counter()
        for _ in range(args.gen_tokens):
            tok = engine.step_greedy([tok], pos)
            pos += 1
        gen_s = time.perf_counter() - t0
        n = args.gen_tokens
        return {"prompt_tok_s": args.prompt_tokens / prompt_s, "generate_tok_s": n / gen_s,
                "ms_per_token": 1e3 * gen_s / n, "comm_ms_per_token": 1e3 * m.stats.seconds / n,
                "compute_ms_per_token": 1e3 * (gen_s - m.stats.seconds) / n,
                "allreduce_payload_bytes_per_token": m.stats.payload_bytes / n,
                "allreduce_calls_per_token": m.stats.calls / n}

    tokenizer = None

    def measure_batched(n: int) -> dict:
        """n sequences (distinct random prompts) through the service: once all have their first
        token, time the lock-step decode of the rest; every step carries one row per sequence."""
        from mpillm.serving.sampling import SamplingParams
        from mpillm.serving.service import Service

        rng = np.random.default_rng(n)
        svc = Service(engine, tokenizer, parallel=n)
        params = SamplingParams(max_tokens=args.gen_tokens + 1, ignore_eos=True)
        hs = [svc.submit(list(rng.integers(0, engine.cfg.vocab_size, args.prompt_tokens)), params)
              for _ in range(n)]
        while not all(h.outputs.qsize() for h in hs):
            svc.step()
        m.stats.reset()
        steps0, t0 = svc.counters["steps_total"], time.perf_counter()
        while svc.step():
            pass
        dt, steps = time.perf_counter() - t0, svc.counters["steps_total"] - steps0
        assert all(h.finished for h in hs)
        toks = n * args.gen_tokens
        return {"sequences": n, "aggregate_tok_s": toks / dt, "per_sequence_tok_s": args.gen_tokens / dt,
                "ms_per_step": 1e3 * dt / steps, "comm_ms_per_step": 1e3 * m.stats.seconds / steps,
                "allreduce_payload_bytes_per_step": m.stats.payload_bytes / steps}

    def measure_speculative(drafter) -> dict:
        """Plain and speculative greedy decoding of the same prompt through the Service, one after
        the other in each repetition (ratios under the same load; medians over the repetitions)."""
        import statistics

        from mpillm.bench_spec import FREE_PROMPT, TEXT, chat_ids, timed
        from mpillm.serving.sampling import SamplingParams
        from mpillm.serving.service import Service

        if args.spec_prompt == "random":
            ids = [int(t) for t in np.random.default_rng(0).integers(0, engine.cfg.vocab_size, args.prompt_tokens)]
        else:
            ids = chat_ids(tokenizer, FREE_PROMPT if args.spec_prompt == "free" else
                           TEXT + "\n\nRepeat the text above exactly, word for word.")
        params = SamplingParams(max_tokens=args.gen_tokens + 1, ignore_eos=True)
        runs = []
        for _ in range(max(1, args.repeats)):
            plain = timed(Service(engine, tokenizer), ids, params)
            if hasattr(drafter, "state"):
                drafter.state.clear()   # a fresh Service reuses slot indices: start the draft cache afresh
            spec = timed(Service(engine, tokenizer, drafter=drafter), ids, params)
            runs.append({"plain_tok_s": plain["tok_s"], "spec_tok_s": spec["tok_s"],
                         "speedup": spec["tok_s"] / plain["tok_s"] if plain["tok_s"] else 0.0,
                         "drafted": spec["drafted"], "accepted": spec["accepted"],
                         "acceptance_rate": spec["acceptance_rate"], "tokens_per_step": spec["tokens_per_step"],
                         "draft_s": spec["draft_s"], "identical_to_plain": spec["tokens"] == plain["tokens"]})
        med = {k: statistics.median(r[k] for r in runs) for k in
               ("plain_tok_s", "spec_tok_s", "speedup", "acceptance_rate", "tokens_per_step")}
        return {"draft": "model" if args.draft_model else args.draft, "draft_model": args.draft_model,
                "draft_max": args.draft_max, "draft_ngram": [args.draft_ngram_min, args.draft_ngram],
                "prompt": args.spec_prompt, "prompt_tokens": len(ids), **{f"median_{k}": v for k, v in med.items()},
                "drafted": sum(r["drafted"] for r in runs), "accepted": sum(r["accepted"] for r in runs),
                "identical_to_plain": all(r["identical_to_plain"] for r in runs), "runs": runs}

    def rank0() -> int:
        nonlocal tokenizer
        if args.concurrency or speculate:
            from mpillm.formats.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(Path(model_dir))
        engine.step([0], 0)  # first token: compiles/loads every kernel, touches the weights
        startup = process_age_s()
        runs = [measure() for _ in range(max(1, args.repeats))]
        best = max(runs, key=lambda r: r["generate_tok_s"])
        best["prompt_tok_s"] = max(r["prompt_tok_s"] for r in runs)
        best["startup_s"] = startup
        if args.concurrency:
            batched = []
            for n in args.concurrency:
                rs = [measure_batched(n) for _ in range(max(1, args.repeats))]
                batched.append(max(rs, key=lambda r: r["aggregate_tok_s"]))
            best["batched"] = batched
            by_n = {r["sequences"]: r["aggregate_tok_s"] for r in batched}
            if 1 in by_n:
                best["batched_speedup_vs_1"] = {str(n): v / by_n[1] for n, v in by_n.items()}
            best["batched_over_prompt_rate"] = {str(n): v / best["prompt_tok_s"] for n, v in by_n.items()}
        if speculate:
            from mpillm.startup import make_drafter

            drafter = make_drafter(args, engine, tokenizer)
            try:
                best["speculative"] = measure_speculative(drafter)
            finally:
                drafter.close()
        return best

    def report(res: dict, rss: list[int]) -> int:
        res.update({
            "model": str(model_dir), "arch": engine.cfg.arch, "ranks": engine.size, "threads_per_rank": args.threads,
            "buffer_type": args.buffer_type, "kv_type": args.kv_type,
            "kernels": __import__("mpillm.kernels", fromlist=["active_path"]).active_path(),
            "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
            "greedy_token_bytes_per_rank": 16 if engine.size > 1 else 0,
            # what one rank puts on the network per generated token (greedy): partial sums + (max, id)
            "comm_bytes_per_token": res["allreduce_payload_bytes_per_token"] + (16 if engine.size > 1 else 0),
            "logits_gather_bytes_per_token_when_sampling": engine.logits_bytes_per_token,
            "weight_bytes_per_token_per_rank": read_bytes,
            "weight_bytes_per_token": sum(read_bytes),
            "flops_per_token": 2 * n_params,
            "peak_rss_bytes_per_rank": rss,
            "shard_bytes_per_rank": shard_bytes,
            "kv_cache_bytes_per_rank": int(m.k_cache.nbytes + m.v_cache.nbytes),
            "engine_startup_s": engine.startup_s,
        })
        print(json.dumps(res, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1) + "\n")
        return 0

    # collectives every rank joins before rank 0 starts driving
    shard_bytes = comm.gather(m.weight_bytes, root=0)
    read_bytes = comm.gather(weight_bytes_read_per_token(engine.shard), root=0)
    n_params = count_params(engine)
    if engine.rank != 0:
        rc = engine.serve()
        comm.gather(peak_rss_bytes(), root=0)
        return rc
    try:
        res = rank0()
    except BaseException:
        engine.stop(1)
        raise
    engine.stop(0)
    return report(res, comm.gather(peak_rss_bytes(), root=0))


def count_params(engine) -> int:
    """Matrix parameters used per token (MoE: only the active experts), for FLOP estimates."""
    c = engine.cfg
    attn = c.dim * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.dim
    ffn = (3 * c.dim * c.expert_ffn_dim * c.n_experts_used + c.dim * c.n_experts   # experts + router
           if c.is_moe else 3 * c.dim * c.ffn_dim)
    return c.n_layers * (attn + ffn) + c.dim * c.vocab_size


if __name__ == "__main__":
    run(main, "mpillm.bench")
