"""How much memory this process can still be given: the host's MemAvailable, capped by the memory
limit of its cgroup (Slurm jobs, containers) when one is set."""
from __future__ import annotations

import os
from pathlib import Path

from mpillm.runtime.mpisession import local_ranks

_V1_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # None for "max" (no limit) or garbage


def mem_available(meminfo: Path) -> int | None:
    """MemAvailable in bytes, None where the file or the line is missing."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_headroom(proc_cgroup: Path, root: Path) -> int | None:
    """Bytes this process's cgroup may still allocate (limit - usage, at least 0), None without a
    limit. cgroup v2 (``0::<path>``): memory.max - memory.current; v1 (a ``memory`` controller
    line): memory.limit_in_bytes - memory.usage_in_bytes."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":
            limit_f, used_f, base = "memory.max", "memory.current", root / rel.lstrip("/")
        elif "memory" in controllers.split(","):
            limit_f, used_f, base = "memory.limit_in_bytes", "memory.usage_in_bytes", root / "memory" / rel.lstrip("/")
        else:
            continue
        limit, used = _read_int(base / limit_f), _read_int(base / used_f)
        if limit is not None and used is not None and limit < _V1_UNLIMITED:
            return max(0, limit - used)
    return None


def available_memory(meminfo: Path = Path("/proc/meminfo"), proc_cgroup: Path = Path("/proc/self/cgroup"),
                     cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still be given: the smaller of MemAvailable and the cgroup's headroom
    (whichever are known); None when neither is."""
    known = [v for v in (mem_available(meminfo), cgroup_headroom(proc_cgroup, cgroup_root)) if v is not None]
    return min(known) if known else None


def rank_budget(fraction: float, avail: int | None = None) -> int | None:
    """``fraction`` of what this node can still give (MPILLM_MEMORY_LIMIT, in bytes, overrides the
    measured figure or ``avail``: tests), shared by the node's ranks; None (no limit known) when
    unmeasurable."""
    env = os.environ.get("MPILLM_MEMORY_LIMIT")
    avail = int(env) if env else (available_memory() if avail is None else avail)
    if avail is None:
        return None
    return int(avail * fraction) // local_ranks()
