"""A test module's AVX2-path tests run again with the kernels compiled for an AVX2-only CPU.

On an AVX-512 host LLVM may lower the AVX2 path's IR with AVX-512 / VNNI instructions (the i16
word sums, vpmaddwd, byte shuffles and bit-mask expansions all lower differently without them), so
the AVX2 tests there do not show that the path works on a real AVX2-only machine. A subprocess with
numba's target set to Haswell compiles and runs them as such a machine would.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mpillm import kernels

AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx2,+fma,+f16c,+bmi2,+popcnt"}

_already_there = pytest.mark.skipif(os.environ.get("NUMBA_CPU_NAME") == "haswell",
                                    reason="already on the AVX2-only target")


def not_on_avx2_only(test):
    """Marks the outer test, the one that starts the Haswell subprocess: skipped inside that
    subprocess (already on the target there), and marked ``avx2only``, so CI can run these
    single-process compiles in its second lane beside the main suite (.ci/run)."""
    return pytest.mark.avx2only(_already_there(test))


def run_on_avx2_only(test_file: str, selection: str, timeout: float = 900) -> str:
    """pytest -k ``selection`` of ``test_file`` on the Haswell target; its output, after asserting
    it passed. Skips where the host lacks AVX2 (the path does not exist there)."""
    if "avx2" not in kernels.available_paths():
        pytest.skip("host lacks AVX2")
    # MPILLM_NO_WARMUP: conftest's engine warm-up would compile whole models for Haswell
    env = dict(os.environ, **AVX2_ONLY, MPILLM_NO_WARMUP="1")
    env.pop(kernels.ENV, None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout
