"""Runs the pytest-mpi suite in tests/mpi under mpirun at 1, 2, 3 and 4 ranks, each with a timeout.

A failing test aborts its whole MPI job (tests/conftest.py), so a failure shows up
as a non-zero exit here rather than as a hang.
"""
import sys

import pytest

from mpiutil import mpirun


@pytest.mark.parametrize("np_", [1, 2, 3, 4])
def test_mpi_suite(np_):
    r = mpirun(np_, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--with-mpi", "-m", "mpi",
                     "tests/mpi"], timeout=900)
    sys.stdout.write(r.stdout[-3000:])
    assert r.returncode == 0, f"mpirun -np {np_} pytest tests/mpi failed:\n{r.stdout[-6000:]}\n{r.stderr[-4000:]}"
