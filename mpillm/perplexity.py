"""Perplexity of a text file, computed the way llama.cpp's llama-perplexity does.

  mpirun -np 2 python -m mpillm.perplexity --file text.txt --ctx 512

The text is tokenized once (with BOS when the model adds one), cut into
non-overlapping chunks of --ctx tokens (the first token of each chunk replaced by
BOS when the model adds one), and only the second half of each chunk is scored:
the negative log-likelihood of token j+1 given the logits at j, for j from
ctx/2 to ctx-2. The figures are directly comparable with llama.cpp's.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpillm.runtime.errors import run
from mpillm.options import add_model_args, parse_args_bcast, sync_table


def tokenize_for_perplexity(tok, text: str, ctx: int) -> tuple[list[list[int]], bool]:
    ids = tok.encode(text)  # adds BOS when the model does
    add_bos = bool(tok.add_bos) and tok.bos_id is not None
    n_chunks = len(ids) // ctx
    chunks = []
    for i in range(n_chunks):
        c = list(ids[i * ctx:(i + 1) * ctx])
        if add_bos:
            c[0] = tok.bos_id
        chunks.append(c)
    return chunks, add_bos


class _Parser(argparse.ArgumentParser):
    """Refuses the speculative-decoding flags the shared model arguments bring: perplexity scores
    given text, one forward per chunk, and generates nothing that a draft could speed up."""

    def parse_args(self, *a, **k):
        args = super().parse_args(*a, **k)
        if args.draft != "none" or args.draft_model:
            self.error("--draft / --draft-model speed up generation; perplexity scores the given text in one "
                       "forward per chunk and generates nothing, so it takes neither")
        return args


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m mpillm.perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--file", type=Path, required=True, help="plain-text file")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=0, help="score at most this many chunks (0 = all)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("--dump-tokens", type=Path, default=None,
                   help="write the token chunks as JSON (to score the same chunks with another engine)")
    args = parse_args_bcast(p, argv)
    from mpillm.runtime.engine import Engine
    from mpillm.startup import prepare_model
    from mpillm.formats.tokenizer import load_tokenizer

    comm = MPI.COMM_WORLD
    model_dir = prepare_model(args, comm)
    engine = Engine(model_dir, max_seq_len=max(args.ctx, args.max_seq_len),
                    threads=args.threads, verbose=False, buffer_type=args.buffer_type,
                    kv_type=args.kv_type, sync=args.sync, wait=args.wait,
                    sync_table=sync_table(args))

    def rank0() -> int:
        if args.ctx < 4:
            raise ValueError(f"--ctx must be >= 4, got {args.ctx}")
        tok = load_tokenizer(Path(model_dir))
        text = args.file.read_text(encoding="utf-8", errors="replace")
        chunks, add_bos = tokenize_for_perplexity(tok, text, args.ctx)
        if not chunks:
            raise ValueError(f"{args.file} has fewer than --ctx {args.ctx} tokens")
        if args.chunks:
            chunks = chunks[: args.chunks]
        if args.dump_tokens:
            args.dump_tokens.write_text(json.dumps(chunks))
        first = args.ctx // 2
        nll, t0 = [], time.perf_counter()
        for i, c in enumerate(chunks):
            nll.append(engine.score(c, first))  # vocabulary-parallel: no logits are gathered
            ppl = math.exp(float(np.concatenate(nll).mean()))
            print(f"[{i + 1}/{len(chunks)}] {ppl:.4f}", flush=True)
        allnll = np.concatenate(nll)
        ppl = math.exp(float(allnll.mean()))
        # standard error as llama.cpp reports it: from the variance of the per-token NLL
        err = ppl * float(allnll.std(ddof=1)) / math.sqrt(len(allnll)) if len(allnll) > 1 else 0.0
        dt = time.perf_counter() - t0
        res = {"perplexity": ppl, "stderr": err, "chunks": len(chunks), "ctx": args.ctx,
               "scored_tokens": int(len(allnll)), "bos_per_chunk": add_bos, "ranks": engine.size, "buffer_type": args.buffer_type,
               "kv_type": args.kv_type,
               "seconds": dt, "tok_per_s": len(chunks) * args.ctx / dt}
        print(f"Final estimate: PPL = {ppl:.4f} +/- {err:.5f}", flush=True)
        print(json.dumps(res), flush=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1) + "\n")
        return 0

    return engine.drive(rank0)


if __name__ == "__main__":
    run(main, "mpillm.perplexity")
