"""The syncs (mpillm.runtime.collectives) at every rank count (tests/test_mpi_suite.py runs this file
under mpirun -np 1..4 with a timeout).

Oracles: the exact float64 sum of every rank's partial, in rank order (each rank draws its own
seeded partial, so every rank can compute every other's); the other exchanges of the same type
(a sum made locally in rank order must be bit-identical whichever way the parts travelled); the
same greedy text whichever sync and wait mode the engine uses, at --buffer-type f64.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpillm.runtime import exchange
from mpillm.runtime.collectives import Sync

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
D = 576          # the bundled model's width (a multiple of 32: q8_0 blocks)
T = 3            # rows of one step

# Relative RMS error of a sync against the exact sum: f32 rounding; fp16 rounding of each part;
# q8_0's 8-bit codes (half a step of 1/127 of each block's largest value, per part).
TOLERANCE = {"f64": 1e-15, "f32": 1e-6, "f16": 1e-3, "q8_0": 1e-2}
needs_ranks = pytest.mark.skipif(size == 1, reason="one rank: nothing is exchanged (the sync is a no-op)")


def partial(r: int, dtype) -> np.ndarray:
    """Rank r's partial result: seeded by r, so every rank can compute every rank's."""
    rng = np.random.default_rng(1000 + r)
    return (rng.standard_normal((T, D)) * (1 + r)).astype(dtype)


def exact_sum() -> np.ndarray:
    return sum(partial(r, np.float64) for r in range(size))


def rel(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def run_sync(bt: str, algo: str, wait: str) -> np.ndarray:
    s = Sync(comm, bt, 8, D, algo, wait)
    buf = partial(rank, np.float64 if bt == "f64" else np.float32)
    s(buf)
    return buf


@needs_ranks
@pytest.mark.parametrize("bt", ["f64", "f32", "f16", "q8_0"])
@pytest.mark.parametrize("algo,wait", [("allreduce", "poll"), ("p2p", "poll"), ("allreduce", "block"),
                                       ("p2p", "block")])
def test_every_exchange_sums_every_rank_partial(bt, algo, wait):
    out = run_sync(bt, algo, wait)
    ref = exact_sum()
    assert rel(out, ref) < TOLERANCE[bt], (bt, algo, wait, rel(out, ref))
    # a sync that dropped or doubled one rank's part would be far off: the parts differ in scale
    assert rel(ref - partial(size - 1, np.float64), ref) > 10 * max(TOLERANCE[bt], 1e-2)
    # every rank holds the same bits (sums in the same order everywhere)
    every = comm.allgather(out.tobytes())
    assert all(b == every[0] for b in every)


@needs_ranks
@pytest.mark.parametrize("bt", ["f16", "q8_0", "f64"])
def test_local_sums_are_bit_identical_whichever_way_the_parts_travel(bt):
    """f16 / q8_0 always sum locally in rank order; f64 too with p2p. The p2p result is
    bit-identical to the Allgather one (f16, q8_0), and at f64 the p2p sum in rank order is the
    exact sum rounded once per add: identical text across --sync (test below)."""
    a = run_sync(bt, "allreduce", "poll")
    b = run_sync(bt, "p2p", "block")
    if bt == "f64":
        assert rel(a, b) < 1e-15
    else:
        assert a.tobytes() == b.tobytes()


class Counting:
    """COMM_WORLD with a count of the MPI calls made through it."""

    def __init__(self, c):
        self.c, self.calls = c, Counter()

    def __getattr__(self, name):
        self.calls[name] += 1
        return getattr(self.c, name)


@needs_ranks
@pytest.mark.parametrize("bt", ["f16", "q8_0"])
def test_a_compressed_sync_is_one_message(bt):
    """q8_0 used to send two Allgathers per sync (codes, then scales): one collective now, and the
    p2p exchange one message to each peer."""
    c = Counting(comm)
    s = Sync(c, bt, 8, D, "allreduce", "poll")
    c.calls.clear()
    buf = partial(rank, np.float32)
    s(buf)
    collective = {k: v for k, v in c.calls.items() if k[0].isupper() and k not in ("Get_size", "Get_rank")}
    assert collective == {"Allgather": 1}, c.calls
    c = Counting(comm)
    s = Sync(c, bt, 8, D, "p2p", "poll")
    s(partial(rank, np.float32))
    assert c.calls["Send_init"] == size - 1 and c.calls["Recv_init"] == size - 1, c.calls
    s(partial(rank, np.float32))        # persistent requests: the second sync sets up nothing new
    assert c.calls["Send_init"] == size - 1, c.calls


def test_auto_picks_one_round_from_three_ranks():
    choose = exchange.choose_algorithm
    assert choose("auto", 2, 2304) == "allreduce"
    assert choose("auto", 3, 2304) == "p2p" and choose("auto", 8, 2304) == "p2p"
    assert choose("auto", 4, 10 ** 7) == "allreduce"             # large messages: MPI's own
    assert choose("p2p", 2, 10 ** 7) == "p2p"                    # the flag wins
    table = {"4": [[4096, "allreduce"], [65536, "p2p"]]}         # a calibrated cluster file wins
    assert choose("auto", 4, 2304, table) == "allreduce" and choose("auto", 4, 9000, table) == "p2p"
    with pytest.raises(ValueError, match="--sync"):
        choose("ring", 4, 1)


def _greedy(model: Path, sync: str, wait: str) -> list[int] | None:
    from mpillm.runtime.engine import Engine

    eng = Engine(model, max_seq_len=40, max_batch=8, comm=comm, verbose=False, buffer_type="f64", sync=sync,
                 wait=wait)
    box = {}

    def rank0():
        toks, pos, out = [1, 5, 9, 13, 2], 0, []
        for _ in range(16):
            t = eng.step_greedy(toks, pos)
            pos += len(toks)
            toks = [t]
            out.append(t)
        box["out"] = out
        return 0

    eng.drive(rank0)
    return box.get("out")


@needs_ranks
@pytest.mark.parametrize("bt", ["f32", "q8_0"])
def test_ranks_that_wait_differently_still_meet(bt):
    """--wait auto is each rank's own choice (a CPU quota, or more ranks than cores, on one node
    only). A rank that blocks starts the nonblocking form of every collective, and MPI never
    matches a nonblocking collective with a blocking one: scripts/split_bench.py's throttled
    rank tested its Iallreduce while rank 0 polled in MPI_Allreduce, both forever. Waiter.agree
    makes the form the same on every rank. Control: without the agreement this test hangs until
    the suite's per-test timeout fails it."""
    from mpillm.runtime.collectives import Waiter

    w = Waiter("poll" if rank == 0 else "block").agree(comm)
    assert w.nonblocking and w.block == (rank != 0)
    for algo in ("allreduce", "p2p"):
        s = Sync(comm, bt, 8, D, algo, w)
        for _ in range(3):
            buf = partial(rank, np.float32)
            s(buf)
            assert rel(buf, exact_sum()) < TOLERANCE[bt], (algo, bt)


@needs_ranks
def test_greedy_text_identical_across_sync_and_wait():
    from test_tp_mpi import convert_on_rank0, shared_tmpdir

    model = shared_tmpdir() / "llama-f32"
    convert_on_rank0(FIXTURES / "llama", model, [size], "f32")
    runs = {(s, w): _greedy(model, s, w) for s in ("allreduce", "p2p") for w in ("poll", "block")}
    # the ranks choosing differently (--wait auto under a CPU quota on one node only): see below
    runs.update({(s, "mixed"): _greedy(model, s, "poll" if rank == 0 else "block") for s in ("allreduce", "p2p")})
    if rank == 0:
        first = runs[("allreduce", "poll")]
        assert len(first) == 16 and len(set(first)) > 1
        assert all(r == first for r in runs.values()), runs


@needs_ranks
@pytest.mark.parametrize("rows,broadcasts", [(1, 1), (16, 1), (17, 2)])
def test_a_decode_step_is_one_broadcast(rows, broadcasts):
    """The step's header and plan travel together (mpillm.runtime.steps.first_len): a decode step of
    up to 16 sequences costs one broadcast, a longer one two; before, every step cost two."""
    from test_tp_mpi import convert_on_rank0, shared_tmpdir

    from mpillm.runtime.engine import Engine
    from mpillm.runtime.steps import OUT_GREEDY

    model = shared_tmpdir() / "llama-f32"
    convert_on_rank0(FIXTURES / "llama", model, [size], "f32")
    c = Counting(comm)
    eng = Engine(model, max_seq_len=40, max_batch=24, n_slots=3, comm=c, verbose=False, wait="poll")

    box = {}

    def rank0():
        c.calls.clear()
        # a decode step of ``rows`` sequences: every row needs its token (T = R = rows)
        eng.run(np.arange(rows) % 7 + 1, np.zeros(rows, np.int64), np.arange(rows) % 3, np.arange(rows),
                np.full(rows, OUT_GREEDY))
        box["seen"] = c.calls["Bcast"]
        return 0

    if rank == 0:
        eng.drive(rank0)
        seen = box["seen"]
    else:
        c.calls.clear()
        eng.serve()
        seen = c.calls["Bcast"] - 1          # the STOP that ends serve()
    assert seen == broadcasts, (rows, c.calls)


def test_auto_wait_blocks_when_ranks_outnumber_cpus(monkeypatch):
    from mpillm.runtime import collectives as C

    cpus = len(__import__("os").sched_getaffinity(0))
    monkeypatch.setattr(C, "cpu_quota", lambda: None)
    monkeypatch.setattr(C, "local_ranks", lambda: cpus)
    assert C.choose_wait("auto") == "poll"
    monkeypatch.setattr(C, "local_ranks", lambda: cpus + 1)
    assert C.choose_wait("auto") == "block"
    monkeypatch.setattr(C, "local_ranks", lambda: 1)
    monkeypatch.setattr(C, "cpu_quota", lambda: 0.5)       # a CFS quota of half a core
    assert C.choose_wait("auto") == "block"
    assert C.choose_wait("poll") == "poll" and C.choose_wait("block") == "block"
    with pytest.raises(ValueError, match="--wait"):
        C.choose_wait("spin")
