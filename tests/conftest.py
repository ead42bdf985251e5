"""Shared pytest set-up.

MPI tests (marked ``mpi``) run inside ``mpirun -np N python -m pytest --with-mpi``.
If one rank fails an MPI test it would move on and pair its next collective with
another rank's current one, and the job would hang; so a failure under MPI aborts
the whole job at once.
"""
import pytest


def _world_size() -> int:
    try:
        from mpi4py import MPI
    except ImportError:  # pragma: no cover
        return 1
    return MPI.COMM_WORLD.Get_size()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("mpi") and item.config.getoption("--with-mpi", False):
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            import sys

            sys.stderr.write(f"\n[rank {MPI.COMM_WORLD.Get_rank()}] {item.nodeid} failed:\n{report.longreprtext}\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)


def pytest_sessionstart(session):
    """Fill the numba cache once, in one process, before tests launch MPI jobs with short timeouts
    (a cold compile of every kernel takes tens of seconds on a small machine)."""
    if session.config.getoption("--with-mpi", False):
        return
    import subprocess
    import sys
    import tempfile

    from mpiutil import ROOT, mpi_env

    code = (
        "import sys, numpy as np\n"
        "from convert.__main__ import convert\n"
        "from mpi4py import MPI\n"
        "from mpillm.engine import Engine\n"
        "for wt in ('f32', 'f16', 'q8_0', 'q4_0', 'q4_1'):\n"
        "    d = sys.argv[1] + '/' + wt\n"
        "    convert('tests/fixtures/llama', d, [1], wt, progress=False, tokenizer=False)\n"
        "    e = Engine(d, max_seq_len=8, max_batch=4, comm=MPI.COMM_SELF, verbose=False)\n"
        "    e.step([1, 2, 3], 0); e.step_greedy([4], 3)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", code, tmp], cwd=ROOT, env=mpi_env(), capture_output=True,
                           text=True, timeout=1200)
    if r.returncode != 0:
        sys.stderr.write(f"numba warm-up failed:\n{r.stdout}\n{r.stderr}\n")
