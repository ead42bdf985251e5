"""The vector elementwise kernels (mpillm.kernels.vmath) against float64 numpy."""
import numpy as np
import pytest
from numba import njit

from mpillm.runtime import ops
from mpillm.kernels import vmath


@njit(cache=True)
def _exp_sub_sum(a, n, mx):
    return vmath.exp_sub_sum(a.ctypes.data, n, mx)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 33, 576, 1000])
def test_silu_mul_matches_float64(n):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal((3, n)) * 6).astype(np.float32)
    g[0, 0] = -200.0  # beyond the clamp: silu -> -0
    u = rng.standard_normal((3, n)).astype(np.float32)
    out = np.full_like(g, np.nan)
    ops.silu_mul(g, u, out)
    g64 = g.astype(np.float64)
    ref = g64 / (1.0 + np.exp(-g64)) * u
    np.testing.assert_allclose(out, ref, rtol=5e-7, atol=1e-30)


def test_silu_mul_strided_rows_and_refusal():
    g = np.linspace(-5, 5, 2 * 40, dtype=np.float32).reshape(2, 40)
    u = np.ones((4, 40), np.float32)[::2]  # rows 0 and 2 of a larger buffer
    out = np.zeros((2, 64), np.float32)[:, :40]
    ops.silu_mul(g, u, out)
    np.testing.assert_allclose(out, g / (1 + np.exp(-g.astype(np.float64))), rtol=5e-7)
    with pytest.raises(ValueError, match="contiguous"):
        ops.silu_mul(g, np.ones((2, 80), np.float32)[:, ::2], out)


def test_exp_within_two_ulp_and_clamped():
    x = np.linspace(-87, 88, 200001).astype(np.float32)
    y = x.copy()
    _exp_sub_sum(y, len(y), np.float32(0.0))
    ref = np.exp(x.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(y - ref) / ulp) <= 2.0
    z = np.array([-1000.0, -88.0, 0.0, 89.0, 1000.0], np.float32)
    _exp_sub_sum(z, len(z), np.float32(0.0))
    assert np.all(np.isfinite(z)) and np.all(z > 0)
    assert z[0] < 2e-38 and z[2] == 1.0


@pytest.mark.parametrize("n", [1, 7, 16, 31, 100])
def test_exp_sub_sum_is_softmax_numerator(n):
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * 4).astype(np.float32)
    mx = np.float32(a.max())
    y = np.concatenate([a, np.full(5, 123.0, np.float32)])  # the tail beyond n is left alone
    s = _exp_sub_sum(y, n, mx)
    ref = np.exp((a - mx).astype(np.float64))  # the float32 difference, as the kernel forms it
    np.testing.assert_allclose(y[:n], ref, rtol=4e-7)  # 2 ulp
    assert np.all(y[n:] == 123.0)
    assert abs(s - ref.sum()) <= 1e-6 * ref.sum()
