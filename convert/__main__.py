"""python -m convert SRC OUT --world-size N [N ...]   (SRC: a GGUF file or a Hugging Face directory)
python -m convert synth --shape NAME OUT --world-size N   (random weights of a real model's shape)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .shards import WEIGHT_TYPE_CHOICES, convert_model
from .sources import GGUFSource, open_source


def write_tokenizer_for(source):
    from mpillm import tokenizer

    if isinstance(source, GGUFSource):
        return lambda out: tokenizer.export_from_gguf(source.reader, Path(out))
    return lambda out: tokenizer.export_from_hf(source.path, Path(out))


def convert(src: Path, out: Path, world_sizes: list[int], weight_type: str = "auto",
            ranks: list[int] | None = None, progress: bool = True, tokenizer: bool = True) -> None:
    source = open_source(src)
    convert_model(source, out, world_sizes, weight_type, ranks=ranks, progress=progress,
                  write_tokenizer=write_tokenizer_for(source) if tokenizer else None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synth"]:
        from .synth import main as synth_main

        return synth_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="GGUF file or Hugging Face model directory")
    p.add_argument("out", type=Path, help="output model directory (created; existing world sizes are kept)")
    p.add_argument("--world-size", type=int, nargs="+", required=True,
                   help="world sizes (MPI ranks) to write shards for, e.g. --world-size 1 2 4")
    p.add_argument("--weight-type", choices=WEIGHT_TYPE_CHOICES, default="auto",
                   help="storage type of the weight matrices; auto keeps a supported GGUF type bit-exactly "
                        "and float sources as f32 (default: %(default)s)")
    p.add_argument("--rank", type=int, nargs="+", default=None,
                   help="write only these ranks' shards (e.g. each node converts its own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write a tokenizer (weights only)")
    a = p.parse_args(argv)
    try:
        convert(a.src, a.out, a.world_size, a.weight_type, a.rank, progress=not a.no_progress,
                tokenizer=not a.no_tokenizer)
    except ValueError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} for world sizes {a.world_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
