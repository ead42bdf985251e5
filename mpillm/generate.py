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

from mpillm.runtime.errors import run


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="converted model directory, or a GGUF file / Hugging Face directory to convert on first use "
                        "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=1, help="numba threads per rank (default: %(default)s)")
    p.add_argument("--ctx-size", "--max-seq-len", dest="max_seq_len", type=int, default=2048,
                   help="tokens per sequence slot, prompt and completion together (default: %(default)s)")
    p.add_argument("--parallel", type=int, default=1,
                   help="sequence slots: how many sequences run at once, each with its own KV cache "
                        "(default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=64,
                   help="rows per step: every running sequence's next token plus prompt chunks "
                        "(default: %(default)s)")
    p.add_argument("--buffer-type", choices=("f32", "f16", "q8_0", "f64"), default="f32",
                   help="precision of the partial sums exchanged between ranks: f32 (MPI_Allreduce), "
                        "f16 or q8_0 (compressed, Allgather + local sum), or f64 (exact sums, dense models: the same "
                        "tokens at every rank count, twice the bytes of f32) (default: %(default)s)")
    p.add_argument("--kv-type", choices=("f16", "f32"), default="f16",
                   help="KV cache element type: f16 halves the cache's memory and the bytes attention reads "
                        "per token (default: %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="check every tensor of each rank's shard against its checksum before loading "
                        "(all ranks in parallel; a damaged shard stops every rank, naming rank, file and tensor)")
    add_draft_args(p)


def add_draft_args(p: argparse.ArgumentParser) -> None:
    from mpillm.serving.speculative import add_draft_args as add

    add(p)


def open_drafter(args, engine, tok):
    """Rank 0: the speculative drafter --draft / --draft-model ask for, or None (pass it to Service)."""
    from mpillm.serving.speculative import make_drafter

    return make_drafter(args, engine, tok)


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


def open_engine(args, model_dir, verbose: bool | None = None, **kw):
    """The engine for the shared model flags (every rank)."""
    from mpillm.runtime.engine import Engine

    return Engine(model_dir, max_seq_len=args.max_seq_len, threads=args.threads,
                  verbose=not getattr(args, "quiet", False) if verbose is None else verbose,
                  buffer_type=args.buffer_type, kv_type=args.kv_type, n_slots=args.parallel,
                  max_batch=args.batch_tokens, **kw)


def build_prompt(tok, args) -> list[int]:
    if args.chat:
        from mpillm.serving import harmony

        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        if harmony.is_harmony(tok):
            return tok.encode(harmony.prompt_text(tok, messages, args.reasoning_effort), add_bos=False)
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)
    return tok.encode(args.prompt)


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


def sampling_params(args):
    from mpillm.serving.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, stop=tuple(args.stop))


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
    from mpillm.runtime.engine import Stats
    from mpillm.startup import prepare_model
    from mpillm.serving.service import Service
    from mpillm.formats.tokenizer import load_tokenizer

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
        from mpillm.serving.harmony import is_harmony

        show = HarmonyPrinter(tok, sys.stdout, args.show_reasoning) if args.chat and is_harmony(tok) else None
        generate(Service(engine, tok, drafter=open_drafter(args, engine, tok)), ids, params, stats=stats, show=show)
        stats.gather_bytes = engine.logits_bytes_per_token if params.needs_logits else 16 * (engine.size > 1)
        print(flush=True)
        print(stats.line(engine.size), flush=True)
        return 0

    return engine.drive(rank0)


if __name__ == "__main__":
    run(main, "mpillm.generate")
