"""The sync: summing the ranks' row-parallel partial results, in place, on every rank.

The forward pass (mpillm.runtime.model) calls ``sync(x)`` after each row-parallel projection
(twice per layer, and once for the vocabulary-parallel embedding).

What travels (``--buffer-type``), as ONE message per rank and sync:

  f32, f64   the partial itself
  f16        the partial as fp16
  q8_0       the partial quantized to q8_0: T*dim int8 codes, then T*dim/32 float32 scales, packed
             into one byte buffer (one message, not one per array: on a real link each message
             pays the latency)

How it travels (``--sync``):

  allreduce  MPI_Allreduce (f32 / f64) or one MPI_Allgather of the packed messages (f16 / q8_0).
             Open MPI picks the algorithm: for small messages recursive doubling, log2(P) rounds
             (more when P is not a power of two), each paying the link's latency.
  p2p        one round whatever P: every rank sends its message to every other rank and
             receives theirs (persistent point-to-point requests, all started at once), then sums
             the P parts. This is distributed-llama's sync; it pays off from 3-4 ranks on a
             latency-bound link.
  auto       p2p for P >= 3 ranks on more than one host when a step's message is small, else
             allreduce (at P = 2 both are one round and MPI's own is leaner, and so is shared
             memory); a cluster file from ``mpillm.check --calibrate`` (``--cluster``) replaces
             the rule with measured per-(P, bytes) choices (mpillm.runtime.exchange).

Every exchange that sums locally (f16, q8_0, and p2p at any type) sums the parts in rank order
with the same code on every rank, so the ranks never diverge.

How a rank waits (``--wait``): ``poll`` lets MPI wait in its own calls (busy-polling, or yielding
the core when Open MPI's mpi_yield_when_idle is set); ``block`` starts the nonblocking form of
every collective and tests it, spinning for ``SPIN_S`` and then sleeping between tests, so a
waiting rank gives its core to the rank that computes (more ranks than cores, a CPU quota, a
node that also does other work); ``auto`` is block exactly when this node has more ranks than
cores or a CPU quota, else poll. ``Waiter`` is shared with the engine's own collectives.

Every buffer is allocated once, here; ``stats`` counts the time, bytes and calls.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpillm import kernels
from mpillm.formats.quant import QK
from mpillm.runtime import ops
from mpillm.runtime.exchange import BUFFER_TYPES, SYNC_ALGORITHMS, choose_algorithm, message_bytes
from mpillm.runtime.mpisession import local_ranks
from mpillm.runtime.stats import CommStats

WAIT_MODES = ("auto", "poll", "block")
SPIN_S = 50e-6              # block: test in a loop this long before sleeping
SLEEP_S = 20e-6             # block: then sleep this long between tests (the kernel rounds it up)
# The timer slack stays Linux's default (50 us: a 20 us nap lasts about 90 us). With 1 ns (prctl)
# a nap lasts 40 us and an idle-link blocking sync costs half (p2p 751 -> 362 us at 1gbe), but each
# nap also costs about 17 us of CPU on a VM, so a rank under a CPU quota woke twice as often and
# burned its quota: the throttled split ran 8% slower (benchmarks/results/*timer_slack_ab*).


def cpu_quota(proc_cgroup: str | None = None, root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs this process may use by its cgroup's CFS quota, or None when unlimited or unknown:
    the smallest quota on the way from this process's own cgroup up to the root (a limit set on
    a parent binds its children too), read from cgroup v2's ``cpu.max`` or, on a v1 or hybrid
    host, from ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the cgroup /proc/self/cgroup names
    for the ``cpu`` controller (not the root's, which never has a quota).
    ``proc_cgroup`` and ``root`` stand in for /proc/self/cgroup and /sys/fs/cgroup (tests)."""
    try:
        if proc_cgroup is None:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        v1 = v2 = None
        for ln in proc_cgroup.splitlines():
            hid, ctrls, rel = (ln.split(":", 2) + ["", ""])[:3]
            if hid == "0" and ctrls == "":
                v2 = rel
            elif "cpu" in ctrls.split(","):
                v1 = (ctrls, rel)
        found = []

        def walk(base: Path, rel: str, read):
            parts = [p for p in rel.split("/") if p]
            for i in range(len(parts), -1, -1):
                q = read(base.joinpath(*parts[:i]))
                if q is not None:
                    found.append(q)

        def read_v2(d: Path):
            f = d / "cpu.max"
            if not f.exists():
                return None
            quota, period = f.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)

        def read_v1(d: Path):
            f = d / "cpu.cfs_quota_us"
            if not f.exists():
                return None
            quota = int(f.read_text())
            return None if quota <= 0 else quota / int((d / "cpu.cfs_period_us").read_text())

        if v1 is not None:
            # the v1 cpu hierarchy: mounted at cpu (often a link to cpu,cpuacct) or under its controllers' names
            base = next((root / n for n in ("cpu", v1[0]) if (root / n).is_dir()), None)
            if base is not None:
                walk(base, v1[1], read_v1)
        if v2 is not None:
            walk(root / "unified" if (root / "unified").is_dir() else root, v2, read_v2)
        return min(found) if found else None
    except (OSError, ValueError, IndexError):
        return None


def choose_wait(mode: str) -> str:
    """``auto``: block when this node's ranks outnumber its CPUs (cores, or the CPU quota)."""
    if mode not in WAIT_MODES:
        raise ValueError(f"--wait must be one of {', '.join(WAIT_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    if quota is not None and quota < cpus:
        return "block"
    return "block" if local_ranks() > cpus else "poll"


class Waiter:
    """Completes MPI requests in the chosen way (see the module's doc).

    ``block``: this rank sleeps between tests while it waits (its own choice, by ``--wait``).
    ``nonblocking``: the collectives are started in their nonblocking form (Iallreduce, Ibcast,
    ...). That form must be the same on every rank: MPI never matches a nonblocking collective
    with a blocking one, and ranks that chose differently (a CPU quota on one node only, more
    ranks than cores on one) would wait for each other forever. ``agree(comm)`` makes it the
    same: nonblocking everywhere as soon as one rank blocks; the polling ranks then ``Wait()``
    on their requests, which polls as the blocking form does."""

    def __init__(self, mode: str):
        self.mode = choose_wait(mode)
        self.block = self.mode == "block"
        self.nonblocking = self.block      # this rank's wish until agree()

    def agree(self, comm: MPI.Comm) -> "Waiter":
        """Collective: the collectives' form, the same on every rank of ``comm``."""
        if comm.Get_size() > 1:
            self.nonblocking = bool(comm.allreduce(self.block, op=MPI.LOR))
        return self

    def describe(self) -> str:
        return self.mode + (" (nonblocking collectives: a rank blocks)" if self.nonblocking and not self.block else "")

    def wait(self, req: MPI.Request) -> None:
        if not self.block:
            req.Wait()
            return
        t_spin = time.perf_counter() + SPIN_S
        while not req.Test():
            if time.perf_counter() > t_spin:
                time.sleep(SLEEP_S)

    def waitall(self, reqs: list) -> None:
        if not self.block:
            MPI.Request.Waitall(reqs)
            return
        t_spin = time.perf_counter() + SPIN_S
        while not MPI.Request.Testall(reqs):
            if time.perf_counter() > t_spin:
                time.sleep(SLEEP_S)


class Sync:
    """Sums (T, dim) partials over ``comm`` for up to ``max_rows`` rows."""

    def __init__(self, comm: MPI.Comm, buffer_type: str, max_rows: int, dim: int, algorithm: str = "auto",
                 wait: str | Waiter = "auto", table: dict | None = None, hosts: int | None = None):
        if buffer_type not in BUFFER_TYPES:
            raise ValueError(f"--buffer-type must be one of {', '.join(BUFFER_TYPES)}, got {buffer_type!r}")
        choose_algorithm(algorithm, 1, 0)   # validates the name
        self.comm, self.size, self.rank = comm, comm.Get_size(), comm.Get_rank()
        self.buffer_type, self.algorithm, self.table, self.dim = buffer_type, algorithm, table, dim
        self.hosts = hosts   # how many hosts the ranks span (the same on every rank: the choice must agree)
        # a Waiter passed in is already agreed (the engine's); one made here is agreed here, by
        # every rank of comm, as constructing a Sync is
        self.waiter = wait if isinstance(wait, Waiter) else Waiter(wait).agree(comm)
        self.stats = CommStats()
        self._p2p: dict[tuple[int, int], list] = {}   # (T, message bytes) -> persistent requests
        B, D, P = max_rows, dim, self.size
        if P == 1:
            return
        # (ranks, message) in bytes: row r holds rank r's message of a step; this rank's own
        # message is built in place at its row (the p2p exchange sends it from there)
        self.parts = np.zeros(P * message_bytes(buffer_type, B, D), np.uint8)
        if buffer_type == "q8_0":
            self.quantize_q8_0 = kernels.get_path(kernels.active_path()).jit.quantize_q8_0
            self.own = np.zeros((B, D), np.float32)             # (T, dim) own partial, to quantize
            self.own_q = np.zeros((B, D), np.int8)              # (T, dim) its codes
            self.own_d = np.zeros((B, D // QK), np.float32)     # (T, dim / 32) its scales
            self.own_sum = np.zeros((B, D // QK), np.int32)     # (T, dim / 32) code sums (unused here)

    def describe(self, rows: int = 1) -> str:
        """The exchange a step of ``rows`` rows uses, for the plan line."""
        if self.size == 1:
            return "none (1 rank)"
        nbytes = message_bytes(self.buffer_type, rows, self.dim)
        algo = choose_algorithm(self.algorithm, self.size, nbytes, self.table, self.hosts)
        how = {"allreduce": "MPI_Allreduce" if self.buffer_type in ("f32", "f64") else "one MPI_Allgather",
               "p2p": f"one round of {self.size - 1} sends + receives"}[algo]
        return f"{self.buffer_type} {how} ({nbytes} B per rank), wait {self.waiter.describe()}"

    # -- the views of one step's messages ----------------------------------------------------
    def _parts(self, m: int) -> np.ndarray:
        return self.parts[:self.size * m].reshape(self.size, m)   # (ranks, message bytes)

    def __call__(self, buf: np.ndarray) -> None:
        """Sum a row-parallel partial result (T, dim) over all ranks, in place."""
        if self.size == 1:
            return
        t0 = time.perf_counter()
        T = buf.shape[0]
        bt = self.buffer_type
        if bt in ("f32", "f64"):   # f64 mode syncs the embedding in f32, the projections in f64
            bt = "f64" if buf.dtype == np.float64 else "f32"
        m = message_bytes(bt, T, self.dim)
        algo = choose_algorithm(self.algorithm, self.size, m, self.table, self.hosts)
        if algo == "allreduce" and bt in ("f32", "f64"):
            self._allreduce(buf)
        else:
            parts = self._parts(m)
            self._pack(bt, buf, parts[self.rank])
            if algo == "p2p":
                self._exchange_p2p(parts, m)
            else:
                self._exchange_allgather(parts, m)
            self._sum(bt, parts, buf)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.payload_bytes += m
        self.stats.calls += 1

    def _allreduce(self, buf: np.ndarray) -> None:
        if self.waiter.nonblocking:
            self.waiter.wait(self.comm.Iallreduce(MPI.IN_PLACE, buf))
        else:
            self.comm.Allreduce(MPI.IN_PLACE, buf)

    def _exchange_allgather(self, parts: np.ndarray, m: int) -> None:
        if self.waiter.nonblocking:
            self.waiter.wait(self.comm.Iallgather(MPI.IN_PLACE, parts))
        else:
            self.comm.Allgather(MPI.IN_PLACE, parts)

    def _exchange_p2p(self, parts: np.ndarray, m: int) -> None:
        """One round: send this rank's row to every peer, receive every peer's row."""
        reqs = self._p2p.get((parts.shape[0], m))
        if reqs is None:
            reqs = []
            for r in range(self.size):
                if r != self.rank:
                    reqs.append(self.comm.Recv_init(parts[r], source=r, tag=7))
                    reqs.append(self.comm.Send_init(parts[self.rank], dest=r, tag=7))
            self._p2p[(parts.shape[0], m)] = reqs
        MPI.Prequest.Startall(reqs)
        self.waiter.waitall(reqs)

    # -- building this rank's message and summing all of them, in rank order -------------------
    def _pack(self, bt: str, buf: np.ndarray, msg: np.ndarray) -> None:
        T, n = buf.shape[0], buf.size
        if bt in ("f32", "f64"):
            msg.view(buf.dtype).reshape(buf.shape)[...] = buf
        elif bt == "f16":
            np.copyto(msg.view(np.float16), buf.reshape(-1), casting="same_kind")
        else:
            self.own[:T] = buf
            self.quantize_q8_0(self.own[:T], self.own_q[:T], self.own_d[:T], self.own_sum[:T])
            msg[:n] = self.own_q[:T].reshape(-1).view(np.uint8)
            msg[n:].view(np.float32)[...] = self.own_d[:T].reshape(-1)

    def _sum(self, bt: str, parts: np.ndarray, buf: np.ndarray) -> None:
        P, (T, D) = self.size, buf.shape
        if bt in ("f32", "f64"):
            np.sum(parts.view(buf.dtype).reshape(P, T, D), axis=0, out=buf)
        elif bt == "f16":
            ops.sum_f16_parts(parts.view(np.uint16).reshape(P, T, D), buf)
        else:
            n = T * D
            ops.sum_q8_parts(parts[:, :n].view(np.int8).reshape(P, T, D),
                             parts[:, n:].view(np.float32).reshape(P, T, D // QK), buf)


__all__ = ["WAIT_MODES", "Sync", "Waiter", "choose_wait", "cpu_quota"]
