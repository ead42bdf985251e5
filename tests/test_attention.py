"""ops.attention (kernels/attention.py) against a float64 softmax(QK^T)V, for every head-size
path (64 and 128 specialised, any other size generic) and both KV cache types."""
import numpy as np
import pytest
from numba import njit

from mpillm import ops
from mpillm.kernels.vmath import f2h


def reference(q, kc, vc, pos0, hd, kv_of_head):
    T, nh = q.shape[0], q.shape[1] // hd
    out = np.zeros((T, nh * hd))
    for h in range(nh):
        for t in range(T):
            n = pos0 + t + 1
            K, V = kc[kv_of_head[h], :n].astype(np.float64), vc[kv_of_head[h], :n].astype(np.float64)
            s = K @ q[t, h * hd:(h + 1) * hd].astype(np.float64) / np.sqrt(hd)
            w = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = (w / w.sum()) @ V
    return out


@pytest.mark.parametrize("hd", [8, 20, 32, 64, 128])
@pytest.mark.parametrize("T,pos0", [(1, 0), (1, 6), (3, 2), (9, 40), (1, 63)])
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_attention_matches_float64(hd, T, pos0, kv):
    rng = np.random.default_rng(hd * 1000 + T * 100 + pos0)
    nh, nkv, S = 3, 2, 64
    kc = (rng.standard_normal((nkv, S, hd)) * 2).astype(np.float32)
    vc = rng.standard_normal((nkv, S, hd)).astype(np.float32)
    if kv == "f16":
        kc, vc = kc.astype(np.float16).astype(np.float32), vc.astype(np.float16).astype(np.float32)
        kc_arg, vc_arg = kc.astype(np.float16).view(np.uint16), vc.astype(np.float16).view(np.uint16)
    else:
        kc_arg, vc_arg = kc, vc
    kv_of_head = np.array([0, 1, 1], np.int64)
    q = rng.standard_normal((T, nh * hd)).astype(np.float32)
    out = np.full((T, nh * hd), np.nan, np.float32)
    scores = np.zeros((nh, S), np.float32)
    ops.attention(q, kc_arg, vc_arg, pos0, hd, kv_of_head, scores, out)
    np.testing.assert_allclose(out, reference(q, kc, vc, pos0, hd, kv_of_head), rtol=0, atol=2e-6)


def test_attention_refuses_mixed_caches():
    q = np.zeros((1, 64), np.float32)
    kc = np.zeros((1, 8, 64), np.float32)
    vc = np.zeros((1, 8, 64), np.uint16)
    with pytest.raises(ValueError, match="K, V alike"):
        ops.attention(q, kc, vc, 0, 64, np.zeros(1, np.int64), np.zeros((1, 8), np.float32),
                      np.zeros((1, 64), np.float32))


@njit(cache=True)
def _to_half_bits(x, out):
    for i in range(x.shape[0]):
        out[i] = f2h(x[i])


def test_f2h_rounds_like_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10 ** rng.uniform(-8, 5, 10000),
                        np.array([0.0, -0.0, 65504.0, 65520.0, 1e9, -1e9, 6e-8, 2.98e-8], np.float32)])
    x = x.astype(np.float32)
    out = np.zeros(len(x), np.uint16)
    _to_half_bits(x, out)
    with np.errstate(over="ignore"):  # 1e9 -> inf on both sides
        np.testing.assert_array_equal(out, x.astype(np.float16).view(np.uint16))
