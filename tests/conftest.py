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
