"""mpillm.kernels.bench's vnni-r16 path times the layout the runtime runs on VNNI (the repacked
types interleaved, the others as stored) and checks each repacked product against the stored
layout's; the check must be able to fail."""
from __future__ import annotations

import numpy as np
import pytest

from mpillm import kernels
from mpillm.kernels import bench


@pytest.fixture
def tiny(monkeypatch):
    if "vnni" not in kernels.available_paths():
        pytest.skip("host lacks AVX-512 VNNI")
    monkeypatch.setitem(bench.SHAPES, "tiny 48x512", (48, 512, "cache"))
    return ["tiny 48x512"]


def test_r16_path_times_the_repacked_layout_and_checks_it(tiny):
    rows = bench.run(["vnni", bench.R16], ["q2_K", "q4_0", "q5_K"], [1], tiny, reps=1, decode_only=True)
    by = {(r["path"], r["wtype"]): r for r in rows}
    assert set(by) == {(p, t) for p in ("vnni", bench.R16) for t in ("q2_K", "q4_0", "q5_K")}
    assert all(r["GB/s"] > 0 for r in rows)
    for t in ("q2_K", "q4_0"):  # repacked: checked against the stored layout's product
        assert by[bench.R16, t]["max_rel_diff_vs_stored"] < 1e-5, by[bench.R16, t]
    assert "max_rel_diff_vs_stored" not in by[bench.R16, "q5_K"]  # not repacked: the stored kernel itself


def test_r16_check_catches_a_wrong_product(tiny, monkeypatch):
    real = bench._Repacked.matmul

    def off_by_a_row(self, wtype, arrays, xq, xd, xsum, x, out):
        real(self, wtype, arrays, xq, xd, xsum, x, out)
        out[:, 0] += 1.0

    monkeypatch.setattr(bench._Repacked, "matmul", off_by_a_row)
    rows = bench.run([bench.R16], ["q2_K"], [1], tiny, reps=1, decode_only=True)
    assert rows[0]["max_rel_diff_vs_stored"] > 1e-3
