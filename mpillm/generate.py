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

from mpillm.options import add_model_args, build_prompt, open_engine, parse_args_bcast, sampling_params
from mpillm.runtime.errors import run


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
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than min-p times the most likely one (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default: %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--quiet", action="store_true", help="print only the generated text and the stats line")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default=None,
                   help="harmony models (gpt-oss) with --chat: the reasoning effort the system message asks for "
                        "(default: medium)")
    p.add_argument("--show-reasoning", action="store_true",
                   help="harmony models with --chat: print the reasoning (analysis channel) before the answer; "
                        "without it only the final answer is printed")
    return p


class HarmonyPrinter:
    """Rank 0, --chat on a harmony model: prints the final answer as it streams; the reasoning
    only with ``show_reasoning`` (under a heading, before the answer); tool-call text never."""

    def __init__(self, tok, out, show_reasoning: bool):
        from mpillm.serving.harmony import HarmonyParser

        self.parser, self.out, self.show = HarmonyParser(tok), out, show_reasoning
        self.current: str | None = None

    def __call__(self, o) -> None:
        deltas = self.parser.feed_all(o.token_ids)
        if o.finish_reason is not None:
            deltas += self.parser.finish()
        for d in deltas:
            if d.channel == "final" or (self.show and d.channel == "analysis"):
                if self.show and d.channel != self.current:
                    self.out.write(("\n" if self.current else "") + f"[{'reasoning' if d.channel == 'analysis' else 'answer'}]\n")
                    self.current = d.channel
                self.out.write(d.text)
        self.out.flush()


def generate(service, ids: list[int], params, out=sys.stdout, stats=None, show=None) -> list[int]:
    """Rank 0: run one request through the service, streaming its text (or handing each output to
    ``show``, e.g. a ``HarmonyPrinter``); returns the generated ids."""
    m = service.engine.model
    c0 = service.metrics()
    gen: list[int] = []
    t0 = time.perf_counter()
    t1 = None
    for o in service.stream(ids, params):
        if t1 is None:  # the first token ends the prompt phase
            t1 = time.perf_counter()
            m.stats.reset()
        gen.extend(o.token_ids)
        if show is not None:
            show(o)
        elif o.text and out is not None:
            out.write(o.text)
            out.flush()
    if stats is not None:
        stats.prompt_tokens, stats.prompt_s = len(ids), t1 - t0
        stats.gen_tokens, stats.gen_s = len(gen) - 1, time.perf_counter() - t1
        stats.gen_comm_s, stats.gen_allreduce_bytes = m.stats.seconds, m.stats.payload_bytes
        if service.drafter is not None:
            c1 = service.metrics()
            stats.draft_tokens = c1["draft_tokens_total"] - c0["draft_tokens_total"]
            stats.draft_accepted = c1["draft_accepted_total"] - c0["draft_accepted_total"]
            stats.decode_steps = c1["decode_steps_total"] - c0["decode_steps_total"]
    return gen


def main(argv: list[str] | None = None) -> int:
    args = parse_args_bcast(parser(), argv)
    from mpillm.formats.tokenizer import load_tokenizer
    from mpillm.runtime.stats import Stats
    from mpillm.serving.harmony import is_harmony
    from mpillm.serving.service import Service
    from mpillm.startup import make_drafter, prepare_model

    comm = MPI.COMM_WORLD
    model_dir = prepare_model(args, comm)
    engine = open_engine(args, model_dir)

    def rank0() -> int:
        tok = load_tokenizer(Path(model_dir))
        params = sampling_params(args)
        params.validate()
        ids = build_prompt(tok, args)
        if not args.quiet:
            print(f"start-up {engine.startup_s:.2f} s; prompt {len(ids)} tokens", flush=True)
        stats = Stats()
        show = HarmonyPrinter(tok, sys.stdout, args.show_reasoning) if args.chat and is_harmony(tok) else None
        generate(Service(engine, tok, drafter=make_drafter(args, engine, tok)), ids, params, stats=stats, show=show)
        stats.gather_bytes = engine.logits_bytes_per_token if params.needs_logits else 16 * (engine.size > 1)
        print(flush=True)
        print(stats.line(engine.size), flush=True)
        return 0

    return engine.drive(rank0)


if __name__ == "__main__":
    run(main, "mpillm.generate")
