"""What the launcher tells a rank (its node's rank count), and stale Open MPI session
directories and their removal.

``mpirun`` (PRRTE) keeps its session in ``$TMPDIR/ompi.<its pid>`` (the PMIx rendezvous socket,
the shared-memory segments of its ranks) and removes it when it exits. One killed with SIGKILL
(``kill -9``, the OOM killer, a test's timeout) leaves it behind, and much later an ``mpirun``
that is given the same pid -- pids wrap at ``kernel.pid_max``, 32768 by default -- finds the old
socket in its way and exits at once with status 213 and only "The PMIx server's listener thread
failed to start". That is what failed a CI run of ours after 20 minutes of jobs.

``clear_stale`` removes the directories of this user whose pid no longer runs a launcher.
Each node's first rank calls it when an mpillm job starts (mpillm/__init__.py) and says on stderr
what it removed, so a killed job cannot break the launches that come after it; the tests call it
before each launch of theirs (tests/mpiutil.py).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

_NAME = re.compile(r"ompi\.(\d+)")
# processes that own a session directory: the launcher and PRRTE's daemons
_LAUNCHERS = {"mpirun", "mpiexec", "prterun", "prte", "prted", "orterun", "orted"}


def local_ranks() -> int:
    """Ranks the launcher started on this node (Open MPI / PRRTE, PMIx, MPICH hydra); 1 if unknown."""
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        try:
            return max(1, int(os.environ[var]))
        except (KeyError, ValueError):
            pass
    return 1


def session_base() -> Path:
    """Where PRRTE puts its session directories: the first of TMPDIR, TEMP, TMP that is set, else /tmp."""
    for var in ("TMPDIR", "TEMP", "TMP"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path("/tmp")


def _runs_a_launcher(pid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False   # no such process (or no /proc: then nothing is removed, see clear_stale)
    return comm in _LAUNCHERS


def clear_stale(base: Path | None = None, min_age: float = 10.0) -> list[Path]:
    """Remove this user's ``ompi.<pid>`` directories under ``base`` whose pid is not a running
    launcher and that are older than ``min_age`` seconds (a launcher just starting is never
    touched). Returns the directories removed. Does nothing where /proc is missing."""
    if not Path("/proc/self").exists():
        return []
    base = session_base() if base is None else Path(base)
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    now = time.time()
    for e in entries:
        m = _NAME.fullmatch(e.name)
        if not m:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid != os.getuid() or not e.is_dir(follow_symlinks=False) or now - st.st_mtime < min_age:
            continue
        if _runs_a_launcher(int(m.group(1))):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        if not os.path.exists(e.path):
            removed.append(Path(e.path))
    return removed
