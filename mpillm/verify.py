"""Check shard files against their per-tensor checksums, without MPI (one process):

  python -m mpillm.verify MODEL_DIR/ws4/rank2.h5 [more shards...]

Used by the Slurm staging (slurm/stage_task.sh) on the copy it just made. Prints one line per
file: intact, unverifiable (no checksums: an older converter) or damaged, naming the tensor;
exits 1 if any file is damaged or unreadable. ``python -m mpillm.check`` does the same for a
whole job, every rank its own shard in parallel.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpillm.formats import format as fmt


def open_shard(path: Path) -> fmt.Shard:
    """Open a shard whatever world size and rank it was written for (read from its attributes)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ws, rank = int(f.attrs[fmt.ATTR_WORLD_SIZE]), int(f.attrs[fmt.ATTR_RANK])
    except (OSError, KeyError, ValueError) as e:
        if not Path(path).exists():
            raise ValueError(f"shard file {path} is missing") from None
        raise ValueError(f"shard file {path} is corrupt or not an mpillm shard ({e})") from None
    return fmt.Shard(path, ws, rank)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpillm.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", type=Path, nargs="+", help="shard files (ws{N}/rank{R}.h5)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per file")
    a = p.parse_args(argv)
    from mpillm.startup import verify_shard

    rc = 0
    for path in a.shards:
        try:
            res = verify_shard(open_shard(path), a.progress, f"verifying {path.name}")
            print(f"mpillm.verify: {res.describe()}", file=sys.stderr if res.bad else sys.stdout, flush=True)
            rc |= bool(res.bad)
        except ValueError as e:
            print(f"mpillm.verify: {e}", file=sys.stderr, flush=True)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
