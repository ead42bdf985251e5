"""benchmarks.interleaved measures the interleaved kernels against the split layout's: its own checks
(rows bit-identical alone and in a batch, the difference from the split layout's result) must
hold on a small matrix, and they must be able to fail."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import interleaved
from mpillm import kernels


def _vnni():
    try:
        return kernels.get_path("vnni")
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("kind", interleaved.KINDS)
def test_benchmark_checks_its_kernels(kind, monkeypatch):
    _vnni()
    rng = np.random.default_rng(7)
    K = 256 if kind in ("q4_K", "q6_K", "q2_K", "q3_K") else 160  # whole super-blocks
    rows = interleaved.measure(kind, 48, K, [15], 1, rng, copies=2)
    assert rows[0]["rows_independent_of_batch"] and rows[0]["max_rel_diff"] < 1e-5
    assert rows[0]["us_interleaved"] > 0 and rows[0]["us_current"] > 0
    # control: a kernel whose rows depend on the batch is reported so
    real = getattr(interleaved.interleaved, f"vnni_matmul_{kind}_r16_q8_0")

    def batch_dependent(*a):
        real(*a)
        a[-1][:] += a[-1].shape[0]

    monkeypatch.setattr(interleaved.interleaved, f"vnni_matmul_{kind}_r16_q8_0", batch_dependent)
    rows = interleaved.measure(kind, 48, K, [15], 1, rng, copies=2)
    assert not rows[0]["rows_independent_of_batch"] and rows[0]["max_rel_diff"] > 1e-3
