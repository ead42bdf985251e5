"""Generate text across MPI ranks.

  mpirun -np 4 --hostfile hostfile python -m mpillm.generate --chat --prompt "Why is the sky blue?"

Rank 0 parses the options and broadcasts them, tokenizes, samples and streams the
text; every rank runs its slice of each forward step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mpi4py import MPI

from .comm import run


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="converted model directory, or a GGUF file / Hugging Face directory to convert on first use "
                        "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=1, help="numba threads per rank (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="KV cache length per sequence, prompt included (default: %(default)s)")
    p.add_argument("--buffer-type", choices=("f32", "f16", "q8_0", "f64"), default="f32",
                   help="precision of the partial sums exchanged between ranks: f32 (MPI_Allreduce), "
                        "f16 or q8_0 (compressed, Allgather + local sum), or f64 (exact sums, dense models: the same "
                        "tokens at every rank count, twice the bytes of f32) (default: %(default)s)")
    p.add_argument("--kv-type", choices=("f16", "f32"), default="f16",
                   help="KV cache element type: f16 halves the cache's memory and the bytes attention reads "
                        "per token (default: %(default)s)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpillm.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", default="Once upon a time", help="prompt text (default: %(default)r)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat (default: the template's own)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--quiet", action="store_true", help="print only the generated text and the stats line")
    return p


def parse_args_bcast(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Rank 0 parses (and prints usage errors); the others receive the result or exit with it."""
    comm = MPI.COMM_WORLD
    args, code = None, None
    if comm.Get_rank() == 0:
        try:
            args = p.parse_args(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    args, code = comm.bcast((args, code), root=0)
    if code is not None:
        sys.exit(code)
    return args


def build_prompt(tok, args) -> list[int]:
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)
    return tok.encode(args.prompt)


def generate(engine, tok, ids: list[int], sampler, max_tokens: int, out=sys.stdout, stats=None):
    """Rank 0: prefill ``ids`` then sample up to max_tokens, streaming text; returns generated ids."""
    from .tokenizer import StreamDecoder

    m = engine.model
    greedy = sampler.temperature == 0.0  # then only the winning token id crosses the network
    t0 = time.perf_counter()
    res = engine.step_greedy(ids, 0) if greedy else engine.step(ids, 0)
    t1 = time.perf_counter()
    if stats is not None:
        stats.prompt_tokens, stats.prompt_s = len(ids), t1 - t0
    m.stats.reset()
    dec = StreamDecoder(tok)
    gen, pos = [], len(ids)
    tg0 = time.perf_counter()
    for _ in range(max_tokens):
        nxt = res if greedy else sampler(res[0])
        gen.append(nxt)
        if nxt in tok.eos_ids:
            break
        piece = dec.put(nxt)
        if piece and out is not None:
            out.write(piece)
            out.flush()
        if pos >= engine.max_seq_len:
            break
        res = engine.step_greedy([nxt], pos) if greedy else engine.step([nxt], pos)
        pos += 1
    tail = dec.flush()
    if tail and out is not None:
        out.write(tail)
    if stats is not None:
        stats.gen_tokens, stats.gen_s = len(gen), time.perf_counter() - tg0
        stats.gen_comm_s, stats.gen_allreduce_bytes = m.stats.seconds, m.stats.payload_bytes
    return gen


def main(argv: list[str] | None = None) -> int:
    args = parse_args_bcast(parser(), argv)
    from .engine import Engine, Stats
    from .models import resolve_model
    from .sampling import Sampler
    from .tokenizer import load_tokenizer

    comm = MPI.COMM_WORLD
    model_dir = resolve_model(args.model, comm)
    engine = Engine(model_dir, max_seq_len=args.max_seq_len, threads=args.threads, verbose=not args.quiet,
                    buffer_type=args.buffer_type, kv_type=args.kv_type)

    def rank0() -> int:
        tok = load_tokenizer(Path(model_dir))
        sampler = Sampler(engine.cfg.vocab_size, args.temperature, args.top_k, args.top_p, args.seed)
        ids = build_prompt(tok, args)
        if len(ids) >= engine.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; --max-seq-len {engine.max_seq_len} leaves no room "
                             f"to generate (raise --max-seq-len or shorten the prompt)")
        if not args.quiet:
            print(f"start-up {engine.startup_s:.2f} s; prompt {len(ids)} tokens", flush=True)
        stats = Stats()
        generate(engine, tok, ids, sampler, args.max_tokens, stats=stats)
        stats.gather_bytes = 16 if args.temperature == 0.0 and engine.size > 1 else engine.logits_bytes_per_token
        print(flush=True)
        print(stats.line(engine.size), flush=True)
        return 0

    return engine.drive(rank0)


if __name__ == "__main__":
    run(main, "mpillm.generate")
