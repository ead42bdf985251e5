"""Launch mpirun (and other jobs) from tests with a hard timeout, so no test can hang or leak.

Timeouts fire from the inside out: a job's own limit is clipped to what is left of the
running test's pytest-timeout (minus ``KILL_MARGIN`` to end the job and report), so the job is
always killed and reported by us before pytest-timeout's thread method ends the whole pytest
process (which would leave the job running and print no report). Give a test that needs long
jobs a ``@pytest.mark.timeout(N)`` above the sum of its jobs' timeouts (module fixtures count
toward the first test that uses them).

Reaping: Open MPI puts every rank in a process group of its own, so killing mpirun's process
group misses the ranks. A job here runs in a session of its own; on a timeout mpirun gets
SIGTERM (it ends its ranks), then every process left in the session gets SIGKILL. If pytest
itself dies, mpirun gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mpillm.runtime.mpisession import clear_stale

ROOT = Path(__file__).resolve().parents[1]
KILL_MARGIN = 20.0   # seconds kept back from the test's pytest-timeout to kill the job and report
_deadline: float | None = None   # time.monotonic() at which pytest-timeout ends the running test


def set_test_deadline(deadline: float | None) -> None:
    """Called by tests/conftest.py when pytest-timeout arms (a number) and cancels (None) its timer."""
    global _deadline
    _deadline = deadline


def budget(timeout: float) -> tuple[float, str]:
    """``timeout`` clipped to the running test's pytest-timeout, and a note when it was clipped."""
    if _deadline is None:
        return timeout, ""
    left = _deadline - time.monotonic() - KILL_MARGIN
    if left >= timeout:
        return timeout, ""
    left = max(left, 1.0)
    return left, (f" (clipped from {timeout:.0f}s to what is left of this test's pytest timeout; "
                  f"raise it with @pytest.mark.timeout)")


def mpi_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")  # more ranks than cores: do not busy-poll
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if extra:
        env.update(extra)
    return env


def mpirun_cmd(np: int) -> list[str]:
    clear_stale()   # a killed job's session directory fails the mpirun later given its pid
    bindir = Path(sys.executable).parent
    mpirun = bindir / "mpirun"
    return [str(mpirun) if mpirun.exists() else "mpirun", "-np", str(np), "--bind-to", "none"]


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (Linux /proc; empty elsewhere)."""
    pids = []
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()   # after "pid (comm) ": state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(d))
    return pids


def kill_session(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End a job started with ``start_new_session=True``: SIGTERM to its leader, then SIGKILL to
    every process still in its session (ranks included), until none is left."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    for _ in range(50):
        left = [p for p in session_pids(proc.pid) if p != os.getpid()]
        if not left:
            break
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()


_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover
    _prctl = None


def term_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started us (pytest) dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def popen_job(cmd: list[str], env: dict | None = None, cwd: Path | None = None, **kw) -> subprocess.Popen:
    """Start a job in its own session (reap it with ``kill_session``); it gets SIGTERM if pytest dies."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    return subprocess.Popen(cmd, env=env, cwd=cwd or ROOT, start_new_session=True,
                            preexec_fn=term_with_parent, **kw)


def run_killing_on_timeout(cmd: list[str], env: dict, timeout: float, what: str,
                           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a job in its own session; on a hang kill all of its processes and fail the test.

    The limit is ``timeout`` or less: never past the running test's own pytest timeout."""
    limit, note = budget(timeout)
    proc = popen_job(cmd, env, cwd)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{what} hung for {limit:.0f}s{note}; killed\n{out}\n{err}") from None
    except BaseException:
        kill_session(proc)
        raise
    kill_session(proc, grace=0)   # anything the job left behind in its session
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def mpirun(np: int, args: list[str], timeout: float = 120, env: dict | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python args...`` on ``np`` ranks; a hang kills the job and fails the test."""
    return run_killing_on_timeout(mpirun_cmd(np) + [sys.executable] + args, mpi_env(env), timeout,
                                  f"mpirun -np {np} {' '.join(args)}", cwd)
