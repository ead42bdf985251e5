"""python -m convert SRC OUT --world-size N [N ...]   (SRC: a GGUF file or a Hugging Face directory)
python -m convert SRC OUT --split 2,1,1              (3 ranks; rank 0 twice the work of the others)
python -m convert SRC OUT --cluster cluster.json     (split by the speeds `mpillm.check --calibrate`
                                                      measured, capped by each rank's free memory)
python -m convert synth --shape NAME OUT --world-size N   (random weights of a real model's shape)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpillm.formats.partition import parse_split, plan

from .shards import WEIGHT_TYPE_CHOICES, convert_model
from .sources import GGUFSource, open_source


def write_tokenizer_for(source):
    from .tokenizer_export import export_from_gguf, export_from_hf

    if isinstance(source, GGUFSource):
        return lambda out: export_from_gguf(source.reader, Path(out))
    return lambda out: export_from_hf(source.path, Path(out))


def convert(src: Path, out: Path, world_sizes: list[int], weight_type: str = "auto",
            ranks: list[int] | None = None, progress: bool = True, tokenizer: bool = True,
            split: list[float] | None = None, cluster: Path | None = None, max_seq_len: int = 2048) -> None:
    source = open_source(src)
    splits = None
    if split is not None or cluster is not None:
        sp = uneven_split(source, weight_type, split, cluster, max_seq_len)
        world_sizes = [len(sp["weights"])]
        splits = {world_sizes[0]: sp}
    convert_model(source, out, world_sizes, weight_type, ranks=ranks, progress=progress,
                  write_tokenizer=write_tokenizer_for(source) if tokenizer else None, splits=splits)


def uneven_split(source, weight_type: str, split: list[float] | None, cluster: Path | None,
                 max_seq_len: int) -> dict:
    """{"weights", "gbps"} for --split / --cluster; with a cluster file the split is fitted to
    each rank's memory (an explicit --split is only checked against it)."""
    from mpillm import planner

    cfg = source.config
    gbps = None
    if cluster is not None:
        doc = planner.read_cluster(cluster)
        gbps = [r["weight_gbps"] for r in doc["ranks"]]
        if split is not None and len(split) != len(gbps):
            raise ValueError(f"--split has {len(split)} weights but {cluster} describes {len(gbps)} ranks")
        weights = list(split) if split is not None else list(gbps)
        wtype = weight_type if weight_type != "auto" else (source.load("layers/0/wq").wtype or "f32")
        avail = [r["avail_bytes"] for r in doc["ranks"]]
        weights = planner.fit_memory(cfg, weights, avail, wtype, max_seq_len, adjust=split is None)
    else:
        weights = list(split)
    plan(cfg, len(weights), weights)   # raises for an impossible world size
    return {"weights": [round(w, 6) for w in weights], "gbps": gbps}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synth"]:
        from .synth import main as synth_main

        return synth_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="GGUF file or Hugging Face model directory")
    p.add_argument("out", type=Path, help="output model directory (created; existing world sizes are kept)")
    p.add_argument("--world-size", type=int, nargs="+", default=None,
                   help="world sizes (MPI ranks) to write shards for, e.g. --world-size 1 2 4")
    p.add_argument("--split", default=None,
                   help="uneven split, one relative speed per rank, e.g. 2,1,1 (sets the world size)")
    p.add_argument("--cluster", type=Path, default=None,
                   help="cluster file from `mpillm.check --calibrate`: split by measured speed, capped by memory")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="KV cache length the memory check assumes with --cluster (default: %(default)s)")
    p.add_argument("--weight-type", choices=WEIGHT_TYPE_CHOICES, default="auto",
                   help="storage type of the weight matrices; auto keeps a supported GGUF type bit-exactly "
                        "and float sources as f32; MXFP4 tensors (gpt-oss experts) always stay MXFP4 "
                        "(default: %(default)s)")
    p.add_argument("--rank", type=int, nargs="+", default=None,
                   help="write only these ranks' shards (e.g. each node converts its own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write a tokenizer (weights only)")
    a = p.parse_args(argv)
    try:
        split = parse_split(a.split) if a.split is not None else None
        if a.world_size is None and split is None and a.cluster is None:
            raise ValueError("give --world-size, --split or --cluster")
        if a.world_size is not None and (split is not None or a.cluster is not None):
            n = len(split) if split is not None else None
            if n is not None and a.world_size != [n]:
                raise ValueError(f"--split {a.split} means world size {n}; drop --world-size or make it {n}")
        convert(a.src, a.out, a.world_size or [], a.weight_type, a.rank, progress=not a.no_progress,
                tokenizer=not a.no_tokenizer, split=split, cluster=a.cluster, max_seq_len=a.max_seq_len)
    except ValueError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} for world sizes {a.world_size or 'of the split'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
