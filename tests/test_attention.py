"""ops.attention (kernels/attention.py) against a float64 softmax(QK^T)V, for every head-size
path (64 and 128 specialised, any other size generic), both KV cache types, and batches whose
rows belong to different sequence slots at different positions."""
import numpy as np
import pytest
from numba import njit

from mpillm.runtime import ops
from mpillm.kernels.vmath import f2h


def reference(q, kc, vc, slots, positions, hd, kv_of_head, sinks=None, window=0):
    """kc, vc (n_slots, n_kv, S, hd); row t reads slot slots[t] up to positions[t] (the last
    ``window`` positions when window > 0); a sink logit per head joins the softmax without a value."""
    T, nh = q.shape[0], q.shape[1] // hd
    out = np.zeros((T, nh * hd))
    for h in range(nh):
        for t in range(T):
            n = positions[t] + 1
            a = max(0, n - window) if window > 0 else 0
            K = kc[slots[t], kv_of_head[h], a:n].astype(np.float64)
            V = vc[slots[t], kv_of_head[h], a:n].astype(np.float64)
            s = K @ q[t, h * hd:(h + 1) * hd].astype(np.float64) / np.sqrt(hd)
            sink = -np.inf if sinks is None else float(sinks[h])
            m = max(s.max(), sink)
            w = np.exp(s - m)
            out[t, h * hd:(h + 1) * hd] = (w / (w.sum() + np.exp(sink - m))) @ V
    return out


@pytest.mark.parametrize("hd", [8, 20, 32, 64, 128])
@pytest.mark.parametrize("T,pos0", [(1, 0), (1, 6), (3, 2), (9, 40), (1, 63)])
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_attention_matches_float64(hd, T, pos0, kv):
    rng = np.random.default_rng(hd * 1000 + T * 100 + pos0)
    nh, nkv, S = 3, 2, 64
    kc = (rng.standard_normal((3, nkv, S, hd)) * 2).astype(np.float32)  # 3 slots; the sequence is in slot 1
    vc = rng.standard_normal((3, nkv, S, hd)).astype(np.float32)
    if kv == "f16":
        kc, vc = kc.astype(np.float16).astype(np.float32), vc.astype(np.float16).astype(np.float32)
        kc_arg, vc_arg = kc.astype(np.float16).view(np.uint16), vc.astype(np.float16).view(np.uint16)
    else:
        kc_arg, vc_arg = kc, vc
    kv_of_head = np.array([0, 1, 1], np.int64)
    q = rng.standard_normal((T, nh * hd)).astype(np.float32)
    out = np.full((T, nh * hd), np.nan, np.float32)
    scores = np.zeros((nh, S), np.float32)
    slots, positions = np.ones(T, np.int64), np.arange(pos0, pos0 + T)
    ops.attention(q, kc_arg, vc_arg, slots, positions, hd, kv_of_head, scores, out)
    np.testing.assert_allclose(out, reference(q, kc, vc, slots, positions, hd, kv_of_head), rtol=0, atol=2e-6)


@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_attention_rows_of_many_slots(kv):
    """A continuous-batching step: decode rows of three sequences and a prompt chunk of a fourth,
    each row reading only its own slot up to its own position."""
    rng = np.random.default_rng(7)
    hd, nh, nkv, S = 64, 2, 1, 32
    kc = rng.standard_normal((4, nkv, S, hd)).astype(np.float32)
    vc = rng.standard_normal((4, nkv, S, hd)).astype(np.float32)
    kc, vc = kc.astype(np.float16).astype(np.float32), vc.astype(np.float16).astype(np.float32)
    kc_arg, vc_arg = (kc, vc) if kv == "f32" else (kc.astype(np.float16).view(np.uint16),
                                                    vc.astype(np.float16).view(np.uint16))
    slots = np.array([2, 0, 3, 1, 1, 1], np.int64)
    positions = np.array([17, 3, 30, 5, 6, 7], np.int64)
    q = rng.standard_normal((len(slots), nh * hd)).astype(np.float32)
    out = np.zeros((len(slots), nh * hd), np.float32)
    kv_of_head = np.zeros(nh, np.int64)
    ops.attention(q, kc_arg, vc_arg, slots, positions, hd, kv_of_head, np.zeros((nh, S), np.float32), out)
    want = reference(q, kc, vc, slots, positions, hd, kv_of_head)
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-6)
    # a row's result depends on its slot: the same query over another slot differs
    assert np.abs(out[0] - reference(q[:1], kc, vc, [0], [17], hd, kv_of_head)[0]).max() > 1e-2


def test_attention_refuses_mixed_caches():
    q = np.zeros((1, 64), np.float32)
    kc = np.zeros((1, 1, 8, 64), np.float32)
    vc = np.zeros((1, 1, 8, 64), np.uint16)
    with pytest.raises(ValueError, match="K, V alike"):
        ops.attention(q, kc, vc, np.zeros(1, np.int64), np.zeros(1, np.int64), 64, np.zeros(1, np.int64),
                      np.zeros((1, 8), np.float32), np.zeros((1, 64), np.float32))


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


@pytest.mark.parametrize("hd", [20, 64])
@pytest.mark.parametrize("window", [0, 1, 5, 64])
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_attention_sinks_and_window(hd, window, kv):
    """gpt-oss attention: a sink logit per head (one head's sink far above its scores takes nearly
    all the mass, one at -inf is no sink) and a sliding window, rows at positions before, at and
    past the window's length, against the float64 reference; without them the result differs."""
    rng = np.random.default_rng(hd + window)
    nh, nkv, S = 3, 1, 64
    kc = rng.standard_normal((2, nkv, S, hd)).astype(np.float16).astype(np.float32)
    vc = rng.standard_normal((2, nkv, S, hd)).astype(np.float16).astype(np.float32)
    kc_arg, vc_arg = (kc, vc) if kv == "f32" else (kc.astype(np.float16).view(np.uint16),
                                                    vc.astype(np.float16).view(np.uint16))
    sinks = np.array([0.7, 30.0, -np.inf], np.float32)
    positions = np.array([0, 3, 4, 5, 20, 63], np.int64)
    slots = np.array([0, 1, 1, 1, 0, 1], np.int64)
    q = rng.standard_normal((len(positions), nh * hd)).astype(np.float32)
    kv_of_head = np.zeros(nh, np.int64)
    out = np.full((len(positions), nh * hd), np.nan, np.float32)
    ops.attention_ext(q, kc_arg, vc_arg, slots, positions, hd, kv_of_head, np.zeros((nh, S), np.float32), out,
                      sinks, window)
    want = reference(q, kc, vc, slots, positions, hd, kv_of_head, sinks, window)
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-6)
    assert np.abs(out[:, hd:2 * hd]).max() < 1e-6 * 30  # head 1: the sink took (almost) everything
    plain = reference(q, kc, vc, slots, positions, hd, kv_of_head)
    assert np.abs(want[:, :hd] - plain[:, :hd]).max() > 1e-2  # head 0: its sink matters
    if 0 < window < 20:  # rows past the window see fewer keys than plain causal attention
        assert np.abs(want[4:, 2 * hd:] - plain[4:, 2 * hd:]).max() > 1e-2
    # head 2 (no sink), rows the window does not cut: bit for bit what plain attention gives
    uncut = positions < window if window else np.ones(len(positions), bool)
    np.testing.assert_array_equal(out[uncut, 2 * hd:],
                                  ops_plain(q, kc_arg, vc_arg, slots, positions, hd, kv_of_head)[uncut, 2 * hd:])


def ops_plain(q, kc, vc, slots, positions, hd, kv_of_head):
    out = np.zeros(q.shape, np.float32)
    ops.attention(q, kc, vc, slots, positions, hd, kv_of_head, np.zeros((q.shape[1] // hd, kc.shape[2]), np.float32), out)
    return out
