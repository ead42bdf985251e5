"""The command-line options every command shares, and what they build.

Rank 0 parses (and prints usage errors); the other ranks receive the parsed options by broadcast
(``parse_args_bcast``), so every rank of a job sees the same options. The commands
(mpillm.generate, chat, serve, bench, perplexity, ...) are thin modules over this one and
mpillm.startup.
"""
from __future__ import annotations

import argparse
import sys

from mpi4py import MPI

from mpillm.serving import harmony
from mpillm.serving.sampling import SamplingParams


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
    p.add_argument("--sync", choices=("auto", "allreduce", "p2p"), default="auto",
                   help="how the partial sums travel: allreduce (MPI_Allreduce, or one Allgather for f16 / q8_0), "
                        "p2p (one round: every rank sends to every other, then sums in rank order), or auto "
                        "(p2p from 3 ranks for small messages) (default: %(default)s)")
    p.add_argument("--cluster", default=None, metavar="FILE",
                   help="a cluster file from `mpillm.check --calibrate`: --sync auto then picks each sync's exchange "
                        "from the timings measured on these ranks")
    p.add_argument("--wait", choices=("auto", "poll", "block"), default="auto",
                   help="how a rank waits for the others: poll (MPI spins), block (spin briefly, then sleep: "
                        "frees the core for a computing rank), or auto (block when the node has more ranks than "
                        "cores or a CPU quota) (default: %(default)s)")
    p.add_argument("--kv-type", choices=("f16", "f32"), default="f16",
                   help="KV cache element type: f16 halves the cache's memory and the bytes attention reads "
                        "per token (default: %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="check every tensor of each rank's shard against its checksum before loading "
                        "(all ranks in parallel; a damaged shard stops every rank, naming rank, file and tensor)")
    add_draft_args(p)


def add_draft_args(p) -> None:
    g = p.add_argument_group("speculative decoding (rank 0 drafts, every rank verifies in one step)")
    g.add_argument("--draft", choices=("none", "lookup"), default="none",
                   help="draft tokens by prompt lookup: the continuation of the latest earlier occurrence of the "
                        "sequence's last n tokens (default: %(default)s)")
    g.add_argument("--draft-model", default=None, metavar="PATH",
                   help="a small model with the target's tokenizer (GGUF, HF directory or converted) that rank 0 "
                        "runs alone to draft tokens")
    g.add_argument("--draft-max", type=int, default=8,
                   help="most tokens per draft; the length adapts per sequence below it (default: %(default)s)")
    g.add_argument("--draft-ngram", type=int, default=4,
                   help="--draft lookup: longest n-gram matched (default: %(default)s)")
    g.add_argument("--draft-ngram-min", type=int, default=2,
                   help="--draft lookup: shortest n-gram matched; 1 drafts after any repeated token, which "
                        "fails often and shortens the adaptive length for the drafts that would have been "
                        "accepted (default: %(default)s)")


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


def sync_table(args, comm: MPI.Comm = MPI.COMM_WORLD) -> dict | None:
    """Collective: the measured sync choices of ``--cluster`` (rank 0 reads the file), or None."""
    from mpillm.runtime.errors import agree

    path = getattr(args, "cluster", None)
    if not path:
        return None
    table, err = None, None
    if comm.Get_rank() == 0:
        from mpillm import planner

        try:
            table = planner.read_cluster(path).get("sync") or None
            if table is not None and str(comm.Get_size()) not in table:
                err = (f"--cluster {path} was measured on {', '.join(sorted(table))} rank(s), this job has "
                       f"{comm.Get_size()}: run `mpillm.check --calibrate` with this job's ranks")
        except ValueError as e:
            err = str(e)
    agree(comm, err)                       # names rank 0, which read the file
    return comm.bcast(table, root=0)


def open_engine(args, model_dir, verbose: bool | None = None, **kw):
    """The engine for the shared model flags (every rank; collective)."""
    from mpillm.runtime.engine import Engine

    kw.setdefault("sync_table", sync_table(args))
    return Engine(model_dir, max_seq_len=args.max_seq_len, threads=args.threads,
                  verbose=not getattr(args, "quiet", False) if verbose is None else verbose,
                  buffer_type=args.buffer_type, kv_type=args.kv_type, n_slots=args.parallel,
                  max_batch=args.batch_tokens, sync=args.sync, wait=args.wait, **kw)


def build_prompt(tok, args) -> list[int]:
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        if harmony.is_harmony(tok):
            return tok.encode(harmony.prompt_text(tok, messages, args.reasoning_effort), add_bos=False)
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)
    return tok.encode(args.prompt)


def sampling_params(args):
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, stop=tuple(args.stop))


__all__ = ["add_model_args", "add_draft_args", "parse_args_bcast", "sync_table", "open_engine", "build_prompt",
           "sampling_params"]
