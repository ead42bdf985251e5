"""Kernel tests: every path x every weight type against slow numpy references.

The tight reference uses the kernel's own quantized activations (exact integers
and scales) and accumulates in float64, so the tolerance is ~1e-5 relative to
the magnitude of the summed terms; a looser check compares with float64
products of the unquantized values. All paths this CPU can run are tested in
one process via ``kernels.get_path(name)``; a path the CPU lacks is skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from avx2only import not_on_avx2_only, run_on_avx2_only
from mpillm import kernels
from mpillm.formats import quant

PATHS = list(kernels.PATHS)
WTYPES = ["q4_0", "q4_1", "q8_0", "f16", "f32"]
N = 37  # not a multiple of any row tile


def _path(name):
    try:
        return kernels.get_path(name)
    except RuntimeError as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------
def ref_quantize_q8_0(x):
    T, K = x.shape
    b = x.reshape(T, K // 32, 32).astype(np.float32)
    amax = np.abs(b).max(axis=-1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idn = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = quant._roundf((b * idn[..., None]).astype(np.float32)).astype(np.int8)
    return q.reshape(T, K), d, q.astype(np.int32).sum(axis=-1).astype(np.int32)


def _int_weights(arrays, wtype):
    """Integer part of the weights (N, nb, 32) as int64, and d (and m) as float64."""
    d = np.asarray(arrays["d"], dtype=np.float64)
    Nr, nb = d.shape
    if wtype == "q8_0":
        w = np.asarray(arrays["qs"]).astype(np.int64).reshape(Nr, nb, 32)
    else:
        qs = np.asarray(arrays["qs"]).reshape(Nr, nb, 16)
        w = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int64)
        if wtype == "q4_0":
            w = w - 8
    return w, d


def ref_matmul_quant(arrays, wtype, xq, xd, xsum):
    """Exact-activation reference: (out, bound) with bound = sum of |terms| for the tolerance.

    A kernel may split a block's integer dot into partial sums with an offset c folded in
    (sum (w + c) x - c * xsum: c = 8 for q4_0 nibbles, 128 for q8_0 as unsigned bytes) and
    convert the partial sums to float separately, so the bound sums |(w + c) x| + c |xsum|.
    """
    w, d = _int_weights(arrays, wtype)
    T, K = xq.shape
    xi = xq.astype(np.int64).reshape(T, K // 32, 32)
    dot = np.einsum("nbi,tbi->tnb", w, xi).astype(np.float64)  # exact integers
    c = {"q4_0": 8, "q4_1": 0, "q8_0": 128}[wtype]
    mag = np.einsum("nbi,tbi->tnb", np.abs(w + c), np.abs(xi)) + c * np.abs(xsum)[:, None, :]
    sc = d[None] * xd.astype(np.float64)[:, None, :]
    terms = sc * dot
    bound = np.abs(sc) * mag
    if wtype == "q4_1":
        mt = np.asarray(arrays["m"], dtype=np.float64)[None] * (xd.astype(np.float64) * xsum)[:, None, :]
        terms = terms + mt
        bound = bound + np.abs(mt)
    return terms.sum(-1), bound.sum(-1)


def ref_matmul_float(w, x):
    w = np.asarray(w, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    return x @ w.T, np.abs(x) @ np.abs(w).T


# ---------------------------------------------------------------------------
# fixtures: weights as read-only memory maps (the runtime's case), not 64-byte aligned
# ---------------------------------------------------------------------------
_rng = np.random.default_rng(1234)
_float_w: dict = {}


def _float_weights(K):
    if K not in _float_w:
        w = _rng.standard_normal((N, K)).astype(np.float32)
        w[3, :32] = 0.0  # an all-zero block (d = 0)
        w[5] *= 50.0  # a large row
        _float_w[K] = w
    return _float_w[K]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    cache = {}

    def get(wtype, K, readonly=True):
        key = (wtype, K, readonly)
        if key not in cache:
            arrays = quant.quantize(_float_weights(K), wtype)
            if readonly:
                mm = {}
                fn = root / f"{wtype}_{K}.bin"
                off = 8  # itemsize-aligned but not 64-byte aligned
                with open(fn, "wb") as f:
                    layout = []
                    for name, a in arrays.items():
                        f.seek(off)
                        f.write(np.ascontiguousarray(a).tobytes())
                        layout.append((name, off, a.dtype, a.shape))
                        off = (off + a.nbytes + 63) // 64 * 64 + 8
                for name, o, dt, shape in layout:
                    mm[name] = np.memmap(fn, dtype=dt, mode="r", offset=o, shape=shape)
                    assert not mm[name].flags.writeable
                arrays = mm
            cache[key] = arrays
        return cache[key]

    return get


def _activations(T, K, seed=0):
    rng = np.random.default_rng(seed + 7 * T + K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[0, :32] *= 1e-3
    if K >= 64:
        x[-1, 32:64] = 0.0  # an all-zero activation block (xd = 0)
    return x


def _quantized(path, x):
    T, K = x.shape
    xq = np.empty((T, K), np.int8)
    xd = np.empty((T, K // 32), np.float32)
    xs = np.empty((T, K // 32), np.int32)
    path.quantize_q8_0(x, xq, xd, xs)
    return xq, xd, xs


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("T,K", [(1, 32), (3, 96), (64, 2048), (2, 576)])
def test_quantize_q8_0(path_name, T, K):
    path = _path(path_name)
    x = _activations(T, K)
    if K >= 64:  # amax 127 -> d = 1: exact halves, C roundf rounds them away from zero
        x[0, 32:64] = np.arange(32) - 15.5
        x[0, 32 + 5] = 127.0
    xq, xd, xs = _quantized(path, x)
    rq, rd, rs = ref_quantize_q8_0(x)
    np.testing.assert_array_equal(xd, rd)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(xs, rs)


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 17, 64])
@pytest.mark.parametrize("K", [32, 96, 2048])
def test_matmul(path_name, wtype, T, K, weights):
    path = _path(path_name)
    arrays = weights(wtype, K)
    x = _activations(T, K)
    out = np.full((T, N), np.nan, np.float32)  # must be overwritten, not accumulated
    if wtype in quant.QUANTIZED:
        xq, xd, xs = _quantized(path, x)
        path.matmul(wtype, arrays, xq, xd, xs, None, out)
        ref, bound = ref_matmul_quant(arrays, wtype, xq, xd, xs)
    else:
        path.matmul(wtype, arrays, None, None, None, x, out)
        ref, bound = ref_matmul_float(arrays["w"], x)
    err = np.abs(out.astype(np.float64) - ref)
    tol = 1e-5 * (np.abs(ref) + bound)
    bad = np.argwhere(err > tol)
    assert bad.size == 0, f"{len(bad)} wrong, first {bad[:3].tolist()}: {out[tuple(bad[0])]} vs {ref[tuple(bad[0])]}"

    # loose checks, scale-free by Cauchy-Schwarz: |out - ref| / (|x_t| |w_n|) bounds the
    # relative error of the activations (q8_0: < ~1%) and of the weights (q4: ~10%)
    deq = quant.dequantize(arrays, wtype).astype(np.float64)
    x64 = x.astype(np.float64)
    scale = np.linalg.norm(x64, axis=1)[:, None] * np.linalg.norm(deq, axis=1)[None, :] + 1e-30
    lim = 2e-2 if wtype in quant.QUANTIZED else 1e-5
    assert np.max(np.abs(out - x64 @ deq.T) / scale) < lim  # quantized activations only
    w64 = _float_weights(K).astype(np.float64)
    lim = {"q4_0": 0.2, "q4_1": 0.2, "q8_0": 3e-2, "f16": 1e-3, "f32": 1e-5}[wtype]
    assert np.max(np.abs(out - x64 @ w64.T) / scale) < lim  # against the unquantized weights


def _one_token_at_a_time(path, wtype, arrays, xq, xd, xs, x) -> np.ndarray:
    """Every token's output row computed alone (T = 1)."""
    alone = np.empty((len(x), N), np.float32)
    for t in range(len(x)):
        path.matmul(wtype, arrays, xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], x[t:t + 1], alone[t:t + 1])
    return alone


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("wtype", WTYPES)
def test_row_does_not_depend_on_its_batch(path_name, wtype, weights):
    """Continuous batching relies on it: a token's output row is bit-identical whether it is
    computed alone (T = 1, the streaming tiles), in a small batch (the prefetching decode tiles
    with their 2- and 1-token tails) or in a prompt-sized batch, at any position in it."""
    path = _path(path_name)
    K = 576
    arrays = weights(wtype, K)
    x = _activations(20, K, seed=11)
    xq, xd, xs = _quantized(path, x)
    alone = _one_token_at_a_time(path, wtype, arrays, xq, xd, xs, x)
    for T in (2, 4, 5, 8, 16, 20):
        out = np.full((T, N), np.nan, np.float32)
        path.matmul(wtype, arrays, xq[:T], xd[:T], xs[:T], x[:T], out)
        np.testing.assert_array_equal(out, alone[:T], err_msg=f"{path_name} {wtype}: batch of {T}")


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("wtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("K", [640, 800, 1088, 4160])
def test_long_row_does_not_depend_on_its_tile(path_name, wtype, K, weights):
    """As above for long rows (K = 640: 20 blocks, 16 and a 4-block tail group on VNNI, whose q8_0
    runs its 2-block tiles; K = 800: 25 blocks, 16 and a partial group of 9, which VNNI runs with
    its 4-block tiles; K = 1088: 34 blocks, two whole 16-block groups and a 2-block tail group;
    K = 4160: 130 blocks, the whole-block tiles with their tail), which T = 1 streams one row at a
    time, and a prefill-sized batch (T = 64): every token's row is right (the float64 reference),
    bit-identical to the token alone, and to the same rows computed one row further on in the
    matrix (another position in the row tiles)."""
    path = _path(path_name)
    arrays = weights(wtype, K)
    shifted = {k: v[1:] for k, v in arrays.items()}
    x = _activations(64, K, seed=13)
    xq, xd, xs = _quantized(path, x)
    alone = _one_token_at_a_time(path, wtype, arrays, xq, xd, xs, x)
    ref, bound = ref_matmul_quant(arrays, wtype, xq, xd, xs)
    assert np.all(np.abs(alone - ref) <= 1e-5 * (np.abs(ref) + bound)), f"{path_name} {wtype} K = {K}"
    for T in (1, 3, 8, 13, 16, 64):
        for arr, rows in ((arrays, slice(None)), (shifted, slice(1, None))):
            out = np.full((T, N - (rows.start or 0)), np.nan, np.float32)
            path.matmul(wtype, arr, xq[:T], xd[:T], xs[:T], x[:T], out)
            np.testing.assert_array_equal(out, alone[:T, rows], err_msg=f"{path_name} {wtype}: T = {T}, rows {rows}")


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("wtype", WTYPES)
def test_writable_and_threads(path_name, wtype, weights):
    """Writable (non-memmap) weights; one and two threads give identical results."""
    import numba

    path = _path(path_name)
    T, K = 5, 576
    arrays = weights(wtype, K, readonly=False)
    x = _activations(T, K, seed=3)
    xq, xd, xs = _quantized(path, x)
    outs = []
    for nt in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        kernels.set_threads(nt)
        out = np.full((T, N), np.nan, np.float32)
        path.matmul(wtype, arrays, xq, xd, xs, x, out)
        outs.append(out)
    kernels.set_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(outs[0], outs[-1])
    if wtype in quant.QUANTIZED:
        ref, bound = ref_matmul_quant(arrays, wtype, xq, xd, xs)
    else:
        ref, bound = ref_matmul_float(arrays["w"], x)
    assert np.all(np.abs(outs[0] - ref) <= 1e-5 * (np.abs(ref) + bound))


@pytest.mark.parametrize("path_name", PATHS)
def test_paths_agree_with_portable(path_name, weights):
    path, port = _path(path_name), kernels.get_path("portable")
    T, K = 4, 1536
    x = _activations(T, K, seed=5)
    xq, xd, xs = _quantized(port, x)
    for wtype in WTYPES:
        arrays = weights(wtype, K)
        a = np.empty((T, N), np.float32)
        b = np.empty((T, N), np.float32)
        path.matmul(wtype, arrays, xq, xd, xs, x, a)
        port.matmul(wtype, arrays, xq, xd, xs, x, b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_shape_errors():
    p = kernels.get_path("portable")
    xq = np.zeros((1, 64), np.int8)
    xd = np.zeros((1, 2), np.float32)
    xs = np.zeros((1, 2), np.int32)
    with pytest.raises(ValueError):
        p.matmul_q4_0_q8_0(np.zeros((4, 16), np.uint8), np.zeros((4, 2), np.float16), xq, xd, xs,
                           np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError):
        p.matmul_f32_f32(np.zeros((4, 64), np.float32), np.zeros((1, 64), np.float32), np.zeros((1, 5), np.float32))


def _run(env_value):
    env = dict(os.environ, MPILLM_KERNELS=env_value)
    code = "from mpillm import kernels; print(kernels.active_path())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_selects_path():
    r = _run("portable")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "portable"
    r = _run("bogus")
    assert r.returncode != 0 and "MPILLM_KERNELS" in r.stderr


def test_active_path_is_best_available():
    if os.environ.get(kernels.ENV):
        pytest.skip("path forced by MPILLM_KERNELS")
    assert kernels.active_path() == kernels.available_paths()[0]


@not_on_avx2_only
def test_avx2_path_compiled_for_an_avx2_only_cpu():
    """The AVX2 path compiled for a Haswell target (tests/avx2only.py) and its tests run there."""
    assert " passed" in run_on_avx2_only(__file__, "avx2 and (test_matmul or test_quantize or agree)", timeout=300)


@pytest.mark.parametrize("path_name", PATHS)
def test_strided_rows_and_noncontiguous(path_name, weights):
    """Row-strided views (every other row) work; non-contiguous rows raise ValueError."""
    path = _path(path_name)
    T, K = 3, 96
    x = _activations(T, K, seed=9)
    xq, xd, xs = _quantized(path, x)
    for wtype in WTYPES:
        full = weights(wtype, K, readonly=False)
        sub = {k: v[::2] for k, v in full.items()}
        out = np.full((T, (N + 1) // 2), np.nan, np.float32)
        path.matmul(wtype, sub, xq, xd, xs, x, out)
        ref = np.empty((T, N), np.float32)
        path.matmul(wtype, full, xq, xd, xs, x, ref)
        np.testing.assert_allclose(out, ref[:, ::2], rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    with pytest.raises(ValueError):
        w = weights("f32", K, readonly=False)["w"]
        path.matmul_f32_f32(w[:, ::2], x[:, ::2], np.empty((T, N), np.float32))
    with pytest.raises(ValueError):
        path.matmul_q4_0_q8_0(np.zeros((4, 96), np.uint8)[:, ::2], np.zeros((4, 3), np.float16), xq, xd, xs,
                              np.empty((T, 4), np.float32))
