"""mpillm: tensor-parallel LLM inference over MPI."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__version__ = "0.1.0"


def _key_jit_cache() -> None:
    """Put numba's cache in a directory named by a hash of this package's sources.

    numba invalidates a cached function when its own file changes, not when a function it
    inlined from another file does (the generated whole-block functions in mpillm.fused
    inline kernels from mpillm.ops and mpillm.kernels). After an update the old machine
    code would run on; a cache keyed by every source file of the package cannot go stale.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha1()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    base = Path(os.environ.get("NUMBA_CACHE_DIR") or Path.home() / ".cache" / "mpillm" / "numba")
    if base.name.startswith("src-"):  # inherited from a parent process that already keyed it
        base = base.parent
    current = base / f"src-{h.hexdigest()[:12]}"
    os.environ["NUMBA_CACHE_DIR"] = str(current)
    _prune(base, current)
    import sys
    if "numba" in sys.modules:  # imported before us: its config has already read the variable
        sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


def _prune(base: Path, current: Path, max_age_days: float = 14.0) -> None:
    """Drop the caches of other source versions untouched for max_age_days (each holds tens
    of MB of machine code; a checkout that is updated often would otherwise pile them up).
    Another checkout of an older version that shares the base recompiles once."""
    import shutil
    import time

    try:
        old = [d for d in base.glob("src-*") if d != current and time.time() - d.stat().st_mtime > max_age_days * 86400]
    except OSError:
        return
    for d in old:
        shutil.rmtree(d, ignore_errors=True)


_key_jit_cache()
