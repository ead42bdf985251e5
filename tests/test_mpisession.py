"""A killed mpirun's session directory (mpillm/mpisession.py).

The failure it prevents, reproduced: an mpirun killed with SIGKILL leaves ``$TMPDIR/ompi.<pid>``,
and a later mpirun given the same pid exits with 213 ("The PMIx server's listener thread failed
to start"). A pid namespace of our own (``unshare --pid``) gives the second mpirun the first
one's pid at once, instead of after the ~32768 processes it took in CI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mpillm.runtime.mpisession import clear_stale
from mpiutil import mpi_env, mpirun_cmd


def _free_pid() -> int:
    for pid in range(32767, 300, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    pytest.skip("no free pid below 32768")


def _old_dir(base: Path, name: str) -> Path:
    d = base / name
    (d / "0").mkdir(parents=True)
    (d / "pmix.tool").write_text("")
    os.utime(d, (time.time() - 60, time.time() - 60))
    return d


def test_removes_dead_pids_and_keeps_running_launchers_and_others(tmp_path):
    dead = _old_dir(tmp_path, f"ompi.{_free_pid()}")
    young = tmp_path / f"ompi.{_free_pid() - 1}"
    young.mkdir()
    not_ours = _old_dir(tmp_path, "ompi.notapid")
    other = _old_dir(tmp_path, "prterun-keep")
    # a running process named like the launcher owns its directory
    fake = tmp_path / "bin" / "prterun"
    fake.parent.mkdir()
    shutil.copy(shutil.which("sleep"), fake)
    p = subprocess.Popen([str(fake), "30"])
    try:
        time.sleep(0.2)
        live = _old_dir(tmp_path, f"ompi.{p.pid}")
        # a running process that is not a launcher (this one) has taken over a dead job's pid
        reused = _old_dir(tmp_path, f"ompi.{os.getpid()}")
        removed = clear_stale(tmp_path)
    finally:
        p.kill()
        p.wait()
    assert sorted(removed) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert live.exists() and young.exists() and not_ours.exists() and other.exists()


PIDNS = ["unshare", "--pid", "--fork", "--mount-proc"]   # a pid namespace of its own: pids start again at 1


def _in_pid_namespace(argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(PIDNS + argv, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_an_mpirun_given_a_killed_ones_pid_starts():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a pid namespace of our own needs root and unshare")
    # short: the PMIx socket path inside must stay under the 108-byte limit of Unix sockets
    base = Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))
    try:
        env = mpi_env({"TMPDIR": str(base)})
        ok = mpirun_cmd(1) + [sys.executable, "-c", "print('started')"]

        def killed_job() -> list[Path]:
            """An mpirun killed with SIGKILL (to its pid namespace) once its session directory exists."""
            job = mpirun_cmd(1) + [sys.executable, "-c", "import time; time.sleep(60)"]
            first = subprocess.Popen(PIDNS + job, env=env, start_new_session=True)
            t0 = time.time()
            while not list(base.glob("ompi.*/pmix*")) and time.time() - t0 < 60:
                time.sleep(0.2)
            os.killpg(first.pid, 9)
            first.wait()
            left = list(base.glob("ompi.*"))
            assert left, "the killed mpirun left no session directory: Open MPI behaves differently now"
            return left

        # without the clean-up the next mpirun fails (and removes the directory as it exits)
        killed_job()
        bad = _in_pid_namespace(ok, env, 60)
        assert bad.returncode != 0 and "listener thread failed to start" in bad.stderr, (
            f"the stale directory did not stop the next mpirun (rc {bad.returncode}): {bad.stderr[-2000:]}")
        # with it, the next one starts
        left = killed_job()
        assert clear_stale(base, min_age=0) == left
        good = _in_pid_namespace(ok, env, 60)
        assert good.returncode == 0 and "started" in good.stdout, good.stderr[-2000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)
