"""The ``mpillm`` command: one entry point for every tool, dispatched by module name.

  mpillm generate --prompt "Hello"                     (= python -m mpillm.generate ...)
  mpirun -np 4 --hostfile hostfile mpillm generate --chat --prompt "Why is the sky blue?"
  mpillm convert model.gguf models/m --world-size 1 2 4
  mpillm check | bench | perplexity | chat | serve | hpl | warmup   (each: mpillm SUB --help)

A subcommand runs its module exactly as ``python -m MODULE`` would (same arguments, same
exit handling, so it behaves the same under mpirun); the ``python -m`` forms keep working.
A subcommand whose module is not part of this installation says so and exits 2.
"""
from __future__ import annotations

import importlib.util
import runpy
import sys

# subcommand -> (module run as __main__, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("mpillm.generate", "generate text across MPI ranks"),
    "chat": ("mpillm.chat", "interactive chat with a model"),
    "serve": ("mpillm.serve", "OpenAI-compatible HTTP server (rank 0 listens on 127.0.0.1)"),
    "convert": ("convert", "convert a GGUF / Hugging Face model into per-rank shards (`convert synth`: random weights)"),
    "check": ("mpillm.check", "preflight: versions, memory, shard checksums, Allreduce latency"),
    "bench": ("mpillm.bench", "benchmark the engine, JSON out"),
    "perplexity": ("mpillm.perplexity", "perplexity over a text file (llama-perplexity's method)"),
    "hpl": ("hpl", "HPL (FP64 Linpack) over MPI"),
    "warmup": ("mpillm.warmup", "compile the kernels for this CPU once (scripts/setup.sh runs it)"),
}


def usage() -> str:
    from mpillm import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: mpillm COMMAND [ARGS...]   (mpillm {__version__})", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "`mpillm COMMAND --help` shows a command's options. Under MPI:",
              "  mpirun -np 4 --hostfile hostfile mpillm generate --prompt \"Hello\""]
    return "\n".join(lines)


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from mpillm import __version__

        print(f"mpillm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mpillm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    if not _available(module):
        print(f"mpillm {name}: not available in this installation (module {module} is missing)", file=sys.stderr)
        return 2
    sys.argv = [f"mpillm {name}", *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
