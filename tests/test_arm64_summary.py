"""The judgement of tests/test_arm64.py's emulated kernel-test run, on recorded pytest summary lines
(the run itself needs an emulated arm64 root and minutes of compile; this needs neither)."""
from __future__ import annotations

import pytest

from test_arm64 import kernel_run_problems, pytest_counts  # noqa: E402


def test_counts_of_recorded_summary_lines():
    assert pytest_counts("....\n27 passed, 760 deselected in 41.20s\n") == {"passed": 27, "deselected": 760}
    framed = "===== 25 passed, 2 skipped, 760 deselected in 39.02s ====="
    assert pytest_counts("x\n" + framed) == {"passed": 25, "skipped": 2, "deselected": 760}
    assert pytest_counts("1 failed, 26 passed, 1 error in 3.00s") == {"failed": 1, "passed": 26, "error": 1}
    assert pytest_counts("no summary here") == {}


def test_problems_catch_what_the_old_check_let_through():
    """The old check (\" passed\" in the tail and no \"failed\") passed all three of these runs."""
    assert kernel_run_problems(pytest_counts("27 passed, 760 deselected in 41.20s"), 27) == []
    skipped = "===== 25 passed, 2 skipped, 760 deselected in 39.02s ====="
    assert kernel_run_problems(pytest_counts(skipped), 27) == ["2 skipped", "25 passed, the selection has 27 tests"]
    few = "3 passed, 784 deselected in 2.00s"           # a -k that matched almost nothing
    assert kernel_run_problems(pytest_counts(few), 27) == ["3 passed, the selection has 27 tests"]
    for old_ok in (skipped, few):
        assert " passed" in old_ok and "failed" not in old_ok
