"""Runs the pytest-mpi suite in tests/mpi under mpirun at 1, 2, 3 and 4 ranks, each with a timeout.

A failing test aborts its whole MPI job (tests/conftest.py), so a failure shows up as a non-zero
exit here rather than as a hang. A zero exit is not enough: every rank writes what it ran
(MPILLM_MPI_REPORT), and the run passes only if every rank finished, ran the same tests, passed
at least one, failed none, and skipped nothing that tests/allowed_skips.txt does not allow.

Timeouts, innermost first: one test inside the job (INNER_TEST_TIMEOUT), the whole job
(JOB_TIMEOUT, then every rank is killed), this test (pytest-timeout, JOB_TIMEOUT + 60 s).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import allowed_skip_patterns, skip_is_allowed
from mpiutil import ROOT, mpirun

# Measured on the shared 2-core machine: np 4 takes 90 s at a load average of 20, np 1 + np 2
# together up to 570 s at a load average of 20-25 with other suites running; a hang is caught first
# by INNER_TEST_TIMEOUT (the slowest single MPI test takes well under a minute).
JOB_TIMEOUT = 900
INNER_TEST_TIMEOUT = 240


def check_reports(reports: dict[int, dict], np_: int, allowed: list[str]) -> list[str]:
    """What is wrong with the per-rank reports of one run (empty when it passed)."""
    problems = []
    missing = sorted(set(range(np_)) - set(reports))
    if missing:
        problems.append(f"ranks {missing} wrote no report (did not finish the pytest session)")
    for r, rep in sorted(reports.items()):
        if rep["passed"] == 0:
            problems.append(f"rank {r}: no test passed ({rep['collected']} collected)")
        if rep["failed"]:
            problems.append(f"rank {r}: {rep['failed']} failed")
        bad = [s for s in rep["skipped"] if not skip_is_allowed(s["nodeid"], s["reason"], allowed)]
        problems += [f"rank {r}: unexpected skip {s['nodeid']}: {s['reason']}" for s in bad]
    if len({rep["passed"] for rep in reports.values()}) > 1:
        problems.append("ranks passed different numbers of tests: " +
                        ", ".join(f"rank {r} {rep['passed']}" for r, rep in sorted(reports.items())))
    return problems


@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("np_", [1, 2, 3, 4])
def test_mpi_suite(np_, tmp_path):
    shared = tmp_path / "shared"      # the ranks' converted models (shared_tmpdir): here, not loose in /tmp
    shared.mkdir()
    r = mpirun(np_, ["-m", "pytest", "-q", "-rs", "--color=no", "-p", "no:cacheprovider", "--with-mpi", "-m", "mpi",
                     f"--timeout={INNER_TEST_TIMEOUT}", "tests/mpi"], timeout=JOB_TIMEOUT,
               env={"MPILLM_MPI_REPORT": str(tmp_path), "MPILLM_TEST_TMPDIR": str(shared)})
    sys.stdout.write(r.stdout[-3000:])
    assert r.returncode == 0, f"mpirun -np {np_} pytest tests/mpi failed:\n{r.stdout[-6000:]}\n{r.stderr[-4000:]}"
    # a passing session removed what it made (a failing one leaves it here, in pytest's tmp_path)
    assert not list(shared.iterdir()), sorted(p.name for p in shared.iterdir())
    reports = {int(re.search(r"\d+", p.stem)[0]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    problems = check_reports(reports, np_, allowed_skip_patterns())
    assert not problems, f"mpirun -np {np_} pytest tests/mpi:\n" + "\n".join(problems) + f"\n{r.stdout[-3000:]}"
    print(f"np {np_}: every rank passed {reports[0]['passed']}, skipped {len(reports[0]['skipped'])}")


def test_check_reports_catches_what_an_exit_code_hides():
    """Negative controls for the launcher's judgement, one per way a zero exit can lie."""
    ok = {"passed": 5, "failed": 0, "skipped": [], "collected": 5}
    assert check_reports({0: ok, 1: ok}, 2, []) == []
    all_skipped = dict(ok, passed=0, skipped=[{"nodeid": "t::a", "reason": "need --with-mpi option to run"}])
    p = check_reports({0: all_skipped}, 1, [])
    assert any("no test passed" in x for x in p) and any("unexpected skip t::a" in x for x in p), p
    assert any("ranks [1] wrote no report" in x for x in check_reports({0: ok}, 2, []))
    assert any("different numbers" in x for x in check_reports({0: ok, 1: dict(ok, passed=4)}, 2, []))
    one_skip = dict(ok, skipped=[{"nodeid": "t::b", "reason": "host lacks AVX2"}])
    assert check_reports({0: one_skip}, 1, ["lacks AVX2"]) == []
    assert check_reports({0: one_skip}, 1, ["t::b"]) == []
    assert check_reports({0: one_skip}, 1, ["lacks AVX-512"]) != []


def _pytest(tmp_path, body: str, *args: str, env: dict | None = None):
    """A pytest run of one test file written into tmp_path, with this suite's conftest as a plugin."""
    (tmp_path / "test_probe.py").write_text(body)
    e = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), MPILLM_NO_WARMUP="1")
    e.pop("MPILLM_FAIL_ON_SKIP", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), "-c", os.devnull, *args, str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)


SKIPS = '''
import pytest
def test_runs(): pass
def test_unlisted(): pytest.skip("needs a widget CI does not have")
def test_listed(): pytest.skip("host lacks AVX2")
'''


def test_unexpected_skips_fail_when_asked(tmp_path):
    """MPILLM_FAIL_ON_SKIP=1 turns a skip whose reason tests/allowed_skips.txt does not list into a
    failure that says what to do; a listed reason stays a skip; without the variable nothing changes."""
    r = _pytest(tmp_path, SKIPS, env={"MPILLM_FAIL_ON_SKIP": "1"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 1 passed, 1 skipped" in r.stdout, r.stdout
    assert "unexpected skip (MPILLM_FAIL_ON_SKIP is set)" in r.stdout and "needs a widget" in r.stdout, r.stdout
    assert "tests/allowed_skips.txt" in r.stdout
    r = _pytest(tmp_path, SKIPS)
    assert r.returncode == 0 and "1 passed, 2 skipped" in r.stdout, r.stdout + r.stderr


def test_module_level_skip_fails_when_asked(tmp_path):
    body = "import pytest\npytest.importorskip('no_such_module_here')\ndef test_x(): pass\n"
    r = _pytest(tmp_path, body, env={"MPILLM_FAIL_ON_SKIP": "1"})
    assert r.returncode == 2 and "1 error" in r.stdout, r.stdout    # a collection error stops the run
    assert "unexpected skip" in r.stdout and "no_such_module_here" in r.stdout, r.stdout
    r = _pytest(tmp_path, body)
    assert r.returncode == 5 and "1 skipped" in r.stdout, r.stdout  # 5: no test ran, nothing failed


def test_plain_run_does_not_collect_tests_mpi():
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=ROOT, env=dict(os.environ, MPILLM_NO_WARMUP="1"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tests/test_mpi_suite.py::test_mpi_suite[4]" in r.stdout
    assert "tests/mpi/" not in r.stdout, r.stdout
