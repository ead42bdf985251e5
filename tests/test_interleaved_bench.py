"""benchmarks.interleaved: the candidate layout's kernel (16 weight rows per register, activations
broadcast) is measured against the kernels in use, so it must compute the same product: here
against the float64 reference of the quantized product, every row bit-identical alone and in a
batch (tiles of 8, 4, 2 and 1 tokens), with and without its prefetch."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import interleaved
from mpillm import kernels
from mpillm.formats import quant
from test_kernels import ref_matmul_quant


def _vnni():
    try:
        return kernels.get_path("vnni")
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("kind", interleaved.KINDS)
@pytest.mark.parametrize("prefetch", [0, 4096])
def test_interleaved_kernel_matches_reference(kind, prefetch):
    path = _vnni()
    rng = np.random.default_rng(7)
    N, K, T = 48, 160, 15  # 3 groups of 16 rows, 5 blocks; tiles of 8, 4, 2 and 1 tokens
    arrays = quant.quantize((rng.standard_normal((N, K)) * 0.02).astype(np.float32), kind)
    x = rng.standard_normal((T, K)).astype(np.float32)
    xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, K // 32), np.float32), np.empty((T, K // 32), np.int32)
    path.quantize_q8_0(x, xq, xd, xs)
    out = np.full((T, N), np.nan, np.float32)
    interleaved.make_runner(kind, prefetch)(*interleaved.repack(kind, arrays), xq, xs, xd, out)
    ref, bound = ref_matmul_quant(arrays, kind, xq, xd, xs)
    assert np.all(np.abs(out - ref) <= 1e-5 * (np.abs(ref) + bound))
    rows = interleaved.measure(kind, N, K, [T], prefetch, 1, rng, copies=2)
    assert rows[0]["rows_independent_of_batch"] and rows[0]["max_rel_diff"] < 1e-5


def test_repack_refuses_partial_row_groups():
    arrays = quant.quantize(np.ones((20, 64), np.float32), "q4_0")
    with pytest.raises(ValueError, match="multiple of 16"):
        interleaved.repack("q4_0", arrays)
