"""Shared pytest set-up.

- **MPI tests** (marked ``mpi``, in tests/mpi) run only inside ``mpirun -np N python -m pytest
  --with-mpi`` (tests/test_mpi_suite.py launches them at N = 1..4); a plain run does not collect
  tests/mpi at all, so its skip list holds only real skips. If one rank fails an MPI test it
  would move on and pair its next collective with another rank's current one, and the job would
  hang; so a failure under MPI aborts the whole job at once. With ``MPILLM_MPI_REPORT=DIR`` each
  rank writes ``DIR/rank{R}.json`` (passed, failed, skips with reasons) for the launcher to check.
- **Skips**: with ``MPILLM_FAIL_ON_SKIP=1`` (set by .ci/run) a skip whose reason or test id does
  not contain one of the lines of tests/allowed_skips.txt is reported as a failure.
- **Timeouts**: the pytest-timeout deadline of the running test is handed to tests/mpiutil.py,
  which keeps every job it launches inside it (inner limits fire first, and reap the job).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

import mpiutil

HERE = Path(__file__).resolve().parent
ALLOWED_SKIPS = HERE / "allowed_skips.txt"


def _with_mpi(config) -> bool:
    return bool(config.getoption("--with-mpi", False))


# -- collection ------------------------------------------------------------------------------
def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs only under --with-mpi (through tests/test_mpi_suite.py)."""
    if not _with_mpi(config) and collection_path == HERE / "mpi":
        return True
    return None


# -- skips -----------------------------------------------------------------------------------
def allowed_skip_patterns(path: Path = ALLOWED_SKIPS) -> list[str]:
    """The non-blank lines of tests/allowed_skips.txt, without ``#`` comments."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def skip_reason(report) -> str:
    lr = report.longrepr
    msg = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    return msg[len("Skipped: "):] if msg.startswith("Skipped: ") else msg


def skip_is_allowed(nodeid: str, reason: str, patterns: list[str] | None = None) -> bool:
    patterns = allowed_skip_patterns() if patterns is None else patterns
    return any(p in reason or p in nodeid for p in patterns)


def _fail_on_skip() -> bool:
    return os.environ.get("MPILLM_FAIL_ON_SKIP", "") not in ("", "0")


def _unexpected(report, nodeid: str) -> bool:
    return (report.skipped and not hasattr(report, "wasxfail") and _fail_on_skip()
            and not skip_is_allowed(nodeid, skip_reason(report)))


def _as_failure(report, nodeid: str) -> None:
    reason = skip_reason(report)
    report.outcome = "failed"
    report.longrepr = (f"unexpected skip (MPILLM_FAIL_ON_SKIP is set): {nodeid}: {reason}\n"
                       f"Install what the test needs (.ci/run), or, if CI cannot have it, add a line "
                       f"matching this reason to tests/allowed_skips.txt with a comment saying why.")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _unexpected(report, report.nodeid):
        _as_failure(report, report.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _unexpected(report, item.nodeid):
        _as_failure(report, item.nodeid)
    if report.failed and item.get_closest_marker("mpi") and _with_mpi(item.config):
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            import sys

            sys.stderr.write(f"\n[rank {MPI.COMM_WORLD.Get_rank()}] {item.nodeid} failed:\n{report.longreprtext}\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)


# -- per-rank report of an MPI run -----------------------------------------------------------
_outcomes: dict = {"passed": 0, "failed": 0, "skipped": []}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _outcomes["passed"] += 1
    elif report.failed:
        _outcomes["failed"] += 1
    elif report.skipped and not hasattr(report, "wasxfail"):
        _outcomes["skipped"].append({"nodeid": report.nodeid, "reason": skip_reason(report)})


# -- directories the MPI tests share (tests/mpi/test_tp_mpi.py's shared_tmpdir) ----------------
_remove_at_end: list[Path] = []


def remove_after_session(path: Path) -> None:
    """Remove ``path`` when this pytest session ends with every test passed (a failed MPI test
    aborts the job before that, which leaves the directory for a look)."""
    _remove_at_end.append(Path(path))


def _remove_shared_dirs(exitstatus) -> None:
    from mpi4py import MPI

    c = MPI.COMM_WORLD
    if c.Get_size() > 1:
        c.Barrier()       # every rank is done with the files (each reaches here, or the job was aborted)
    if exitstatus == 0:
        import shutil

        for d in _remove_at_end:
            shutil.rmtree(d, ignore_errors=True)
    elif _remove_at_end:
        sys.stderr.write(f"kept for a look (the session failed): {', '.join(map(str, _remove_at_end))}\n")
    _remove_at_end.clear()


def pytest_sessionfinish(session, exitstatus):
    if _with_mpi(session.config):
        _remove_shared_dirs(exitstatus)
    out = os.environ.get("MPILLM_MPI_REPORT")
    if not out or not _with_mpi(session.config):
        return
    from mpi4py import MPI

    c = MPI.COMM_WORLD
    rep = dict(_outcomes, rank=c.Get_rank(), size=c.Get_size(), exitstatus=int(exitstatus),
               collected=session.testscollected)
    Path(out, f"rank{c.Get_rank()}.json").write_text(json.dumps(rep))


# -- timeouts --------------------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    mpiutil.set_test_deadline(time.monotonic() + settings.timeout)
    return None   # pytest-timeout's own implementation arms the timer


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item):
    mpiutil.set_test_deadline(None)
    return None


# -- numba warm-up ---------------------------------------------------------------------------
def pytest_sessionstart(session):
    """Fill the numba cache once, in one process, before tests launch MPI jobs with short timeouts
    (a cold compile of every kernel takes tens of seconds on a small machine)."""
    if _with_mpi(session.config) or os.environ.get("MPILLM_NO_WARMUP"):
        return
    import subprocess
    import sys
    import tempfile

    code = (
        "import sys, numpy as np\n"
        "from convert.__main__ import convert\n"
        "from mpi4py import MPI\n"
        "from mpillm.runtime.engine import Engine\n"
        "for wt in ('f32', 'f16', 'q8_0', 'q4_0', 'q4_1'):\n"
        "    d = sys.argv[1] + '/' + wt\n"
        "    convert('tests/fixtures/llama', d, [1], wt, progress=False, tokenizer=False)\n"
        "    e = Engine(d, max_seq_len=8, max_batch=4, comm=MPI.COMM_SELF, verbose=False)\n"
        "    e.step([1, 2, 3], 0); e.step_greedy([4], 3)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", code, tmp], cwd=mpiutil.ROOT, env=mpiutil.mpi_env(),
                           capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        sys.stderr.write(f"numba warm-up failed:\n{r.stdout}\n{r.stderr}\n")
