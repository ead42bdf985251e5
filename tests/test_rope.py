"""RoPE tables, including Llama 3.x per-frequency divisors (GGUF rope_freqs)."""
import numpy as np

from mpillm.runtime import ops


def test_rope_tables_plain_and_with_freq_factors():
    hd, theta = 8, 500000.0
    cos, sin = ops.rope_tables(16, hd, theta)
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    assert np.allclose(cos[5], np.cos(5 * inv)) and np.allclose(sin[5], np.sin(5 * inv))
    f = np.array([1.0, 2.0, 8.0, 32.0])
    cos2, sin2 = ops.rope_tables(16, hd, theta, f)
    assert np.allclose(cos2[7], np.cos(7 * inv / f)) and np.allclose(sin2[7], np.sin(7 * inv / f))


def test_rope_neox_rotates_pairs_half_apart():
    hd = 4
    cos, sin = ops.rope_tables(4, hd, 10000.0)
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    y = x.copy()
    ops.rope_neox(y, np.array([3]), hd, cos, sin)
    c, s = cos[3], sin[3]
    want = [x[0, 0] * c[0] - x[0, 2] * s[0], x[0, 1] * c[1] - x[0, 3] * s[1],
            x[0, 2] * c[0] + x[0, 0] * s[0], x[0, 3] * c[1] + x[0, 1] * s[1]]
    assert np.allclose(y[0], want, atol=1e-6)


def test_yarn_keeps_fast_frequencies_scales_slow_ones_and_the_attention():
    """gpt-oss's YaRN (head 64, theta 150000, factor 32 from 4096, untruncated): the frequencies
    that turn more than beta_fast=32 times over 4096 positions are kept, those under beta_slow=1
    divided by 32, a ramp between (transformers' correction range: dims 8.09 .. 17.40 here); cos and
    sin carry the attention factor 0.1 ln 32 + 1. The end-to-end check is the gpt_oss fixture."""
    hd, theta = 64, 150000.0
    plain = theta ** (-np.arange(0, hd, 2) / hd)
    inv, m = ops.yarn_inv_freq(hd, theta, 32.0, 4096, 32.0, 1.0, False)
    assert np.isclose(m, 0.1 * np.log(32) + 1)
    np.testing.assert_allclose(inv[:9], plain[:9], rtol=1e-12)            # i <= 8.09: kept
    np.testing.assert_allclose(inv[18:], plain[18:] / 32, rtol=1e-12)     # i >= 17.40: interpolated
    r = (12 - 8.0896) / (17.4030 - 8.0896)                                # inside the ramp
    assert np.isclose(inv[12], plain[12] / 32 * r + plain[12] * (1 - r), rtol=1e-3)
    inv_t, _ = ops.yarn_inv_freq(hd, theta, 32.0, 4096, 32.0, 1.0, True)  # truncated: range 8 .. 18
    assert np.isclose(inv_t[12], plain[12] / 32 * 0.4 + plain[12] * 0.6) and not np.isclose(inv_t[12], inv[12])
    cos, sin = ops.rope_tables(8, hd, theta, yarn=(32.0, 4096, 32.0, 1.0, False))
    np.testing.assert_allclose(cos[5], np.cos(5 * inv) * m, atol=1e-6)
    np.testing.assert_allclose(sin[5], np.sin(5 * inv) * m, atol=1e-6)
