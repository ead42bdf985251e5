"""Multi-host runs over an emulated network: 2 and 4 hosts in network namespaces joined by a
rate-limited bridge (tests/cluster/netns.py). Needs root and `ip netns`; skips otherwise.

Rank kill: after ``kill -9`` of rank 1 the job ends on every host in well under a second.
Who reports it is a race inside Open MPI: usually rank 0's TCP link notices first and the
message is "An MPI communication peer process has unexpectedly disconnected ... Peer host:
h1" followed by "prterun has exited due to process rank 0 ... calling abort"; sometimes
prterun's "process rank 1 ... on node h1 exited on signal 9"; and now and then rank 0's TCP
BTL aborts first with "An error occurred in Socket closed ... on a NULL communicator", which
names neither host nor rank (seen once in ~20 runs here). Only the second names the rank
number. Naming the rank always needs the engine's help (mpirun --with-ft ulfm and
MPI.Comm.Get_failed), which it does not have yet.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cluster"))

import netns  # noqa: E402
from common import GEN_ARGS, single_host_text, text_of  # noqa: E402
from mpiutil import kill_session, run_killing_on_timeout  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_reason = netns.have_netns()
if _reason:
    pytestmark.append(pytest.mark.skip(reason=_reason))

PROFILE = {2: "1gbe", 4: "2.5gbe"}


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    made: dict[int, netns.Cluster] = {}

    def get(n: int) -> netns.Cluster:
        if n not in made:
            made[n] = netns.Cluster(n, PROFILE[n]).up()
        return made[n]

    yield get
    for c in made.values():
        c.down()
    left = [ns for ns in netns.list_namespaces() if any(ns == h for c in made.values() for h in c.hosts)]
    assert not left, f"namespaces left behind: {left}"


def run_on(c: netns.Cluster, tmp: Path, np_: int, args: list[str], timeout: float = 240,
           env: dict | None = None) -> subprocess.CompletedProcess:
    hf = c.write_hostfile(tmp / f"hostfile{c.n}", slots=-(-np_ // c.n))
    argv = c.mpirun_argv(np_, hf, [sys.executable] + args)
    return run_killing_on_timeout(argv, c.env(yield_env(np_, env)), timeout, f"mpirun across {c.n} hosts")


def yield_env(np_: int, env: dict | None) -> dict:
    """Every emulated host claims its own core, so Open MPI does not know the ranks share two:
    tell it to yield while polling, or spinning ranks starve the one doing the work."""
    e = dict(env or {})
    if np_ > (os.cpu_count() or 1):
        e.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    return e


def test_hosts_are_distinct(clusters, tmp_path):
    c = clusters(2)
    r = run_on(c, tmp_path, 2, ["-c", "from mpi4py import MPI; c = MPI.COMM_WORLD; "
                                      "print(c.Get_rank(), MPI.Get_processor_name(), c.allreduce(1))"], timeout=60)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.split("\n"))[-2:]
    assert lines == ["0 h0 2", "1 h1 2"], r.stdout


def test_check_across_hosts(clusters, tmp_path):
    c = clusters(2)
    r = run_on(c, tmp_path, 2, ["-m", "mpillm.check", "--comm-iters", "0.3"], timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rank(s) on 2 host(s)" in r.stdout and "mpillm.check: OK" in r.stdout, r.stdout


@pytest.mark.parametrize("n", [2, 4])
def test_generate_matches_single_host(clusters, tmp_path, n):
    c = clusters(n)
    r = run_on(c, tmp_path, n, GEN_ARGS, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ranks {n}]" in r.stdout
    # --sync auto across hosts: the Allreduce at 2 ranks, the one-round p2p exchange from 3 (each
    # sums in its own order, so the f32 text of the two differs here at 4 ranks: the reference
    # with the other exchange would fail this)
    sync = "p2p" if n >= 3 else "allreduce"
    assert text_of(r.stdout) == single_host_text(n, sync=sync), \
        f"{n} hosts:\n{text_of(r.stdout)!r}\nsingle host, {n} ranks:\n{single_host_text(n, sync=sync)!r}"


def rank_pids(c: netns.Cluster, host: int) -> list[int]:
    """The python rank processes running mpillm.generate in one emulated host."""
    out = []
    for p in c.pids(host):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mpillm.generate" in cmd and b"python" in os.path.basename(cmd[0]):
            out.append(p)
    return out


@pytest.mark.parametrize("sync", [[], ["--sync", "p2p", "--wait", "block"]], ids=["default", "p2p-block"])
def test_rank_kill_ends_job_everywhere(clusters, tmp_path, sync):
    """Also during the one-round exchange with sleeping waiters (mpillm.runtime.collectives): the
    survivors are inside Test loops on point-to-point requests, not in a blocking collective."""
    c = clusters(2)
    hf = c.write_hostfile(tmp_path / "hostfile", slots=1)
    argv = c.mpirun_argv(2, hf, [sys.executable, "-m", "mpillm.generate", "--prompt", "Once upon a time",
                                 "--max-tokens", "4000", "--max-seq-len", "4096", *sync])
    out_f, err_f = open(tmp_path / "out", "w+"), open(tmp_path / "err", "w+")
    proc = subprocess.Popen(argv, stdout=out_f, stderr=err_f, env=c.env(yield_env(2, None)),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "start-up" not in (tmp_path / "out").read_text():       # generation has begun
            assert proc.poll() is None, (tmp_path / "out").read_text() + (tmp_path / "err").read_text()
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.2)
        time.sleep(1.0)
        victims = rank_pids(c, 1)
        assert len(victims) == 1, f"expected one rank process on h1, found {victims}"
        os.kill(victims[0], 9)
        t_kill = time.monotonic()
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the job did not end within 30 s of killing rank 1")
        ended = time.monotonic() - t_kill
        # every host is empty: no rank, prted or launcher left anywhere
        deadline = time.monotonic() + 5
        while c.all_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = c.all_pids()
    finally:
        kill_session(proc, grace=0.0)   # leader and every rank in its session, whatever is left
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    print(f"killed rank 1 (pid {victims[0]} on h1): job ended in {ended:.2f} s, exit code {rc}")
    assert rc != 0
    assert ended < 10, f"job took {ended:.1f} s to end after the kill"
    assert not orphans, f"processes left in the emulated hosts: {orphans}"
    msg = out + err
    # Open MPI names the lost process: either prterun's "process rank 1 ... on node h1 exited on
    # signal 9", or (when rank 0's TCP link notices first, the usual case) the peer-disconnect
    # report with "Peer host: h1". Only the first names the rank number; see the module notes.
    named = ("rank 1" in msg and "signal 9" in msg) or "Peer host:  h1" in msg or "Peer host: h1" in msg
    # the third report of the race (module notes) names nothing; it must still be Open MPI's
    # own report of the lost socket and the abort it caused, not a hang or a silent exit
    anonymous = "Socket closed" in msg and "process rank 0" in msg and "abort" in msg
    assert named or anonymous, msg[-3000:]
    # and the cluster is usable again at once
    r = run_on(c, tmp_path, 2, GEN_ARGS[:-3] + ["--max-tokens", "4", "--quiet"], timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
