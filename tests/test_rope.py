"""RoPE tables, including Llama 3.x per-frequency divisors (GGUF rope_freqs)."""
import numpy as np

from mpillm import ops


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
