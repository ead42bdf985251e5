"""ops.attention (kernels/attention.py) against a float64 softmax(QK^T)V, for every head-size
path (64 and 128 specialised, any other size generic), both KV cache types, GQA ratios 1 to 8,
and batches whose rows belong to different sequence slots at different positions or to one
sequence (verification rows, prompt chunks); a row's result is bit for bit the same alone."""
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
    scores = ops.attention_scratch(nh, hd, T)
    slots, positions = np.ones(T, np.int64), np.arange(pos0, pos0 + T)
    ops.attention(q, ops.tile_keys(kc_arg), vc_arg, slots, positions, hd, kv_of_head, scores, out)
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
    ops.attention(q, ops.tile_keys(kc_arg), vc_arg, slots, positions, hd, kv_of_head,
                  ops.attention_scratch(nh, hd, len(slots)), out)
    want = reference(q, kc, vc, slots, positions, hd, kv_of_head)
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-6)
    # a row's result depends on its slot: the same query over another slot differs
    assert np.abs(out[0] - reference(q[:1], kc, vc, [0], [17], hd, kv_of_head)[0]).max() > 1e-2


def test_attention_refuses_mixed_caches():
    q = np.zeros((1, 64), np.float32)
    kc = np.zeros(ops.key_cache_shape(1, 1, 16, 64), np.float32)
    vc = np.zeros((1, 1, 16, 64), np.uint16)
    with pytest.raises(ValueError, match="K, V alike"):
        ops.attention(q, kc, vc, np.zeros(1, np.int64), np.zeros(1, np.int64), 64, np.zeros(1, np.int64),
                      ops.attention_scratch(1, 64, 1), np.zeros((1, 64), np.float32))


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
    ops.attention_ext(q, ops.tile_keys(kc_arg), vc_arg, slots, positions, hd, kv_of_head,
                      ops.attention_scratch(nh, hd, len(slots)), out, sinks, window)
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
    ops.attention(q, ops.tile_keys(kc), vc, slots, positions, hd, kv_of_head,
                  ops.attention_scratch(q.shape[1] // hd, hd, len(slots)), out)
    return out


def _caches(rng, n_slots, nkv, S, hd, kv):
    """Float caches with fp16-exact values (the float64 reference reads these) and the arguments
    ops.attention takes (keys tiled; fp16 bits for kv == "f16")."""
    kc = (rng.standard_normal((n_slots, nkv, S, hd)) * 1.5).astype(np.float16).astype(np.float32)
    vc = rng.standard_normal((n_slots, nkv, S, hd)).astype(np.float16).astype(np.float32)
    if kv == "f16":
        return kc, vc, ops.tile_keys(kc.astype(np.float16).view(np.uint16)), vc.astype(np.float16).view(np.uint16)
    return kc, vc, ops.tile_keys(kc), vc


def _run(q, kt, vc, slots, positions, hd, kv_of_head):
    out = np.full(q.shape, np.nan, np.float32)
    ops.attention(q, kt, vc, np.asarray(slots, np.int64), np.asarray(positions, np.int64), hd, kv_of_head,
                  ops.attention_scratch(q.shape[1] // hd, hd, len(slots)), out)
    return out


# (slots, positions): rows of one sequence (a prompt chunk crossing tile boundaries, then verification
# rows), and rows of several sequences at mixed causal limits, a prompt chunk of one among them
STEPS = {"one sequence": ([1] * 11, list(range(9, 20))),
         "verification": ([0] * 5, [45, 46, 47, 48, 49]),
         "several sequences": ([2, 0, 3, 1, 1, 1, 0, 2], [17, 0, 47, 5, 6, 7, 1, 18])}


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("hd,kv", [(64, "f16"), (128, "f32"), (24, "f16")])
@pytest.mark.parametrize("step", list(STEPS))
def test_attention_gqa_rows_batch_independent(group, hd, kv, step):
    """GQA ratio ``group`` (query heads per KV head, 2 KV heads): every row against the float64
    reference, and bit for bit what the row gives alone and in the reversed batch."""
    rng = np.random.default_rng(group * 100 + hd)
    nkv, S = 2, 64
    nh = group * nkv
    kc, vc, kt, vc_arg = _caches(rng, 4, nkv, S, hd, kv)
    slots, positions = STEPS[step]
    kv_of_head = np.arange(nh, dtype=np.int64) // group
    q = rng.standard_normal((len(slots), nh * hd)).astype(np.float32)
    out = _run(q, kt, vc_arg, slots, positions, hd, kv_of_head)
    np.testing.assert_allclose(out, reference(q, kc, vc, slots, positions, hd, kv_of_head), rtol=0, atol=2e-6)
    for t in range(len(slots)):
        np.testing.assert_array_equal(out[t], _run(q[t:t + 1], kt, vc_arg, slots[t:t + 1], positions[t:t + 1], hd,
                                                   kv_of_head)[0], err_msg=f"row {t} alone")
    rev = _run(q[::-1].copy(), kt, vc_arg, slots[::-1], positions[::-1], hd, kv_of_head)
    np.testing.assert_array_equal(out, rev[::-1], err_msg="reversed batch")


def test_attention_latent_matches_float64():
    """MLA's driver: one cache of rows read as keys and values, all query heads on one latent,
    rows of one sequence and of others; float64 reference, and each row alone bit for bit."""
    rng = np.random.default_rng(5)
    W, nh = 40, 5
    cache = rng.standard_normal((3, 1, 48, W)).astype(np.float16)
    lat = cache.astype(np.float32)
    slots = np.array([0, 0, 0, 2, 1], np.int64)
    positions = np.array([30, 31, 32, 3, 47], np.int64)
    q = rng.standard_normal((5, nh * W)).astype(np.float32)
    kv_of_head = np.zeros(nh, np.int64)
    want = reference(q, lat, lat, slots, positions, W, kv_of_head)
    for c in (lat, cache.view(np.uint16)):
        out = np.full(q.shape, np.nan, np.float32)
        ops.attention_latent(q, c, slots, positions, W, kv_of_head, ops.attention_scratch(nh, W, 5), out)
        np.testing.assert_allclose(out, want, rtol=0, atol=2e-6)
        for t in range(5):
            one = np.zeros((1, nh * W), np.float32)
            ops.attention_latent(q[t:t + 1], c, slots[t:t + 1], positions[t:t + 1], W, kv_of_head,
                                 ops.attention_scratch(nh, W, 1), one)
            np.testing.assert_array_equal(out[t], one[0])


def test_store_kv_tiles_keys():
    """store_kv puts key (slot, head, position) where tile_keys puts it, values in rows."""
    rng = np.random.default_rng(2)
    hd, nkv = 8, 2
    kt = np.zeros(ops.key_cache_shape(2, nkv, 40, hd), np.float32)
    vc = np.zeros((2, nkv, ops.kv_positions(40), hd), np.float32)
    k, v = rng.standard_normal((3, nkv * hd)).astype(np.float32), rng.standard_normal((3, nkv * hd)).astype(np.float32)
    slots, positions = np.array([1, 0, 1], np.int64), np.array([0, 17, 39], np.int64)
    ops.store_kv(k, v, kt, vc, slots, positions, hd)
    rows = ops.untile_keys(kt)
    assert rows.shape == (2, nkv, 48, hd) and np.array_equal(ops.tile_keys(rows), kt)
    for t in range(3):
        np.testing.assert_array_equal(rows[slots[t], :, positions[t]], k[t].reshape(nkv, hd))
        np.testing.assert_array_equal(vc[slots[t], :, positions[t]], v[t].reshape(nkv, hd))
    assert np.count_nonzero(rows) == k.size


def test_attention_refuses_bad_arguments():
    q = np.zeros((1, 128), np.float32)
    kt = np.zeros(ops.key_cache_shape(1, 1, 16, 64), np.float32)
    vc = np.zeros((1, 1, 16, 64), np.float32)
    args = (np.zeros(1, np.int64), np.zeros(1, np.int64), 64)
    with pytest.raises(ValueError, match="KV head the cache does not have"):
        ops.attention(q, kt, vc, *args, np.array([0, 1], np.int64), ops.attention_scratch(2, 64, 1), np.zeros_like(q))
    with pytest.raises(ValueError, match="scratch"):
        ops.attention(q, kt, vc, *args, np.zeros(2, np.int64), np.zeros(8, np.float32), np.zeros_like(q))
    with pytest.raises(ValueError, match="outside the cache"):
        ops.attention(q, kt, vc, np.zeros(1, np.int64), np.array([16]), 64, np.zeros(2, np.int64),
                      ops.attention_scratch(2, 64, 1), np.zeros_like(q))
