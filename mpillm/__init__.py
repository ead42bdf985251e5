"""mpillm: tensor-parallel LLM inference over MPI.

Where a request goes, by folder and file:

    commands       generate.py chat.py serve/ bench.py perplexity.py check.py warmup.py ... (cli.py: `mpillm X`)
                   over options.py (shared flags, broadcast) and startup.py (model, conversion, warm-up)
    step plan      serving/scheduler.py makes it, runtime/steps.py defines it
    shard          formats/format.py (HDF5, memory-mapped), formats/partition.py (who holds what)
    forward        runtime/engine.py broadcasts the plan; runtime/model.py runs it (kernels/, runtime/fused.py)
    Allreduce      runtime/collectives.py (model.py calls self.sync(...) twice per layer)
    sample         serving/sampling.py on rank 0, via serving/service.py
    HTTP           serving/http/ (Starlette app, OpenAI wire format, chat page)

docs/architecture.md walks one request through these files.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__version__ = "0.1.0"


def _key_jit_cache() -> None:
    """Put numba's cache in a directory named by a hash of this package's sources.

    numba invalidates a cached function when its own file changes, not when a function it
    inlined from another file does (the generated whole-block functions in mpillm.runtime.fused
    inline kernels from mpillm.runtime.ops and mpillm.kernels). After an update the old machine
    code would run on; a cache keyed by every source file of the package cannot go stale.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha1()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    base = Path(os.environ.get("NUMBA_CACHE_DIR") or Path(os.environ.get("MPILLM_CACHE") or
                                                           Path.home() / ".cache" / "mpillm") / "numba")
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


def _yield_when_oversubscribed() -> None:
    """Ranks waiting in a collective give their core away (Open MPI's mpi_yield_when_idle), set
    before MPI starts (mpi4py initializes it when first imported) so the documented mpirun line
    needs no environment. Open MPI busy-polls by default, and with more ranks than cores -- or
    a machine busy with other work -- the polling ranks starve the one doing the work: 4 ranks
    on 2 cores generated 1.6 tok/s instead of ~90. With a free core per rank the yield costs
    nothing measurable (a sched_yield that returns at once; see the README's figures), so it is
    on whenever a launcher started us, and always when ranks outnumber cores. An explicit
    OMPI_MCA_mpi_yield_when_idle in the environment wins."""
    from mpillm.runtime.mpisession import local_ranks

    if local_ranks() > (os.cpu_count() or 1) or "OMPI_COMM_WORLD_SIZE" in os.environ:
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")


def _clear_stale_mpi_sessions() -> None:
    """Once per node and job (the node's first rank): remove session directories that killed
    launchers left, before a later mpirun is given their pid (mpillm/mpisession.py)."""
    if os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK") != "0":
        return
    import sys

    from mpillm.runtime.mpisession import clear_stale

    for d in clear_stale():
        print(f"mpillm: removed {d}, the session directory of a killed mpirun (its pid would fail a "
              f"later mpirun that is given it)", file=sys.stderr)


_key_jit_cache()
_yield_when_oversubscribed()
_clear_stale_mpi_sessions()
from mpillm.runtime import cpu as _cpu  # noqa: E402 - aarch64: the CPU numba compiles for, before anything is jitted

_cpu.configure()
