"""``python -m mpillm.warmup`` (what scripts/setup.sh, and so the README's scripts/run.sh, runs on a
fresh clone) compiles once and returns, under mpirun, with ranks taking turns at the node lock.

It once hung for good: the Engine its compile step builds took the node's file lock a second time
and waited on itself (a module-global "compiling" flag was meant to stop it, but run as
``__main__`` the module is a second copy whose flag the Engine never saw; the compile step now
tells its Engine not to take a turn). The marker of a warm cache hides that path, so this
test runs with a numba cache of its own: a copy of this session's (loaded, not recompiled) without
the markers.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from mpiutil import ROOT, mpirun

MODEL = ROOT / "tests" / "fixtures" / "llama" / "model.gguf"


@pytest.mark.timeout(400)
def test_warmup_module_compiles_once_and_returns(tmp_path):
    mine = Path(os.environ["NUMBA_CACHE_DIR"])          # .../src-<hash of the sources> (mpillm/__init__.py)
    numba_cache = tmp_path / "numba"
    shutil.copytree(mine, numba_cache / mine.name, ignore=shutil.ignore_patterns("warm", "*.lock"))
    env = {"NUMBA_CACHE_DIR": str(numba_cache), "MPILLM_CACHE": str(tmp_path / "models")}
    r = mpirun(2, ["-m", "mpillm.warmup", "--model", str(MODEL)], timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kernels compiled in" in r.stdout, r.stdout
    assert list((numba_cache / mine.name / "warm").glob("*.json")), "no marker of a warm cache was written"
    # the second time the marker is there: nothing compiles, nothing waits
    r = mpirun(2, ["-m", "mpillm.warmup", "--model", str(MODEL)], timeout=120, env=env)
    assert r.returncode == 0 and "already compiled (cache warm)" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
