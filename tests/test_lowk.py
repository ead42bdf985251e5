"""Q2_K and Q3_K: layouts and kernels (mpillm.formats.quant "Q2_K and Q3_K", mpillm.kernels.lowk).

- split_ggml / join_ggml are lossless on random GGML blocks, and our dequantization is
  bit-identical to gguf.quants' (so to GGML's); the ``_32`` variants hold the same values;
- every kernel path this CPU runs (forced one by one, as test_kquant.py) against a float64 sum of
  the dequantized weights on the kernel's own q8_0 activations; the ``_32`` variants at 11
  sub-blocks per row (the x86 main loop plus its tails of 2 and 1);
- a row's result does not depend on its batch (decode tiles, multi-token tiles, single rows);
- the AVX2 kernels compiled for an AVX2-only CPU (Haswell) pass the same two checks;
- the float64-output kernels (--buffer-type f64) against the same reference, tightly;
- the reference check is sensitive to the rules it guards: references built with Q3_K's high-bit
  sense inverted, with Q2_K's mins dropped, or with the two per-16 scales of a sub-block swapped
  fail it (negative controls).
"""
from __future__ import annotations

import numpy as np
import pytest

from avx2only import not_on_avx2_only, run_on_avx2_only
from mpillm import kernels
from mpillm.formats import quant

TYPES = ["q2_K", "q3_K"]
ALL = TYPES + ["q2_K_32", "q3_K_32"]
TOL = 2e-6  # relative to sum |terms|, as test_kquant.py


def _gguf_type(t):
    import gguf

    return getattr(gguf.GGMLQuantizationType, t.upper())


def _path(name):
    try:
        return kernels.get_path(name)
    except RuntimeError as e:
        pytest.skip(str(e))


def _arrays(wtype, N, K, rng):
    """Random arrays; a ``_32`` type with K % 256 (a column slice of a K-quant cut inside a
    super-block, as the converter stores it) is sliced from a wider matrix."""
    if wtype.endswith("_32") and K % quant.QK_K:
        full = quant.random_arrays(wtype, N, K + quant.QK_K - K % quant.QK_K, rng)
        nb = K // quant.QK
        return {k: np.ascontiguousarray(v[:, :nb * (v.shape[1] // (full["qs"].shape[1] // 8))])
                for k, v in full.items()}
    return quant.random_arrays(wtype, N, K, rng)


def _case(wtype, T, N, K, seed=0):
    rng = np.random.default_rng(seed)
    a = _arrays(wtype, N, K, rng)
    x = rng.standard_normal((T, K)).astype(np.float32)
    nb = K // 32
    xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, nb), np.float32), np.empty((T, nb), np.int32)
    kernels.get_path("portable").quantize_q8_0(x, xq, xd, xs)
    xf = (xq.reshape(T, nb, 32).astype(np.float64) * xd[..., None]).reshape(T, K)
    return a, (xq, xd, xs), xf


def _ref(W, xf):
    W = W.astype(np.float64)
    return xf @ W.T, np.abs(xf) @ np.abs(W).T


def _close(out, ref, mag, tol=TOL):
    return bool((np.abs(out - ref) <= tol * mag + 1e-30).all())


@pytest.mark.parametrize("wtype", TYPES)
def test_ggml_round_trip_and_dequantize(wtype):
    import gguf

    rng = np.random.default_rng(1)
    rows, cols = 6, 768
    raw = quant.random_ggml(wtype, rows, cols, rng)
    a = quant.split_ggml(raw, wtype, rows, cols)
    for k, (shape, dt) in quant.array_shapes(wtype, rows, cols).items():
        assert a[k].shape == shape and a[k].dtype == np.dtype(dt), k
    assert np.array_equal(quant.join_ggml(a, wtype), raw)
    assert quant.nbytes(wtype, rows, cols) == {"q2_K": 84, "q3_K": 114}[wtype] * rows * cols // 256
    ref = gguf.quants.dequantize(raw, _gguf_type(wtype)).reshape(rows, cols).astype(np.float32)
    ours = quant.dequantize(a, wtype)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    b, t32 = quant.to_per32(a, wtype)
    assert t32 == wtype + "_32"
    assert np.array_equal(quant.dequantize(b, t32).view(np.uint32), ours.view(np.uint32))
    # a column slice of the _32 variant at a 32-block boundary holds those columns' values
    cut = {k: v[:, 3 * v.shape[1] // 24:17 * v.shape[1] // 24] for k, v in b.items()}
    assert np.array_equal(quant.dequantize(cut, t32), ours[:, 96:544])


def _path_cases():
    # 352: 11 sub-blocks, _32 types only; 4608: 18 super-blocks, d converted in two chunks (lowk.DCHUNK)
    shapes = [(1, 7, 512), (3, 9, 768), (5, 6, 352), (1, 5, 4608)]
    return [(w, T, N, K) for w in ALL for T, N, K in shapes if w.endswith("_32") or K % 256 == 0]


@pytest.mark.parametrize("path_name", kernels.PATHS)
@pytest.mark.parametrize("wtype,T,N,K", _path_cases())
def test_matmul(path_name, wtype, T, N, K):
    path = _path(path_name)
    a, (xq, xd, xs), xf = _case(wtype, T, N, K)
    ref, mag = _ref(quant.dequantize(a, wtype), xf)
    out = np.full((T, N), np.nan, np.float32)
    path.matmul(wtype, a, xq, xd, xs, None, out)
    assert _close(out, ref, mag), np.abs(out - ref).max()
    # the raw jitted kernel the fused blocks call: same numbers from uint16 views of fp16
    out2 = np.full((T, N), np.nan, np.float32)
    fn = getattr(path.jit, f"matmul_{quant.base_type(wtype)}_q8_0")
    fn(*(v.view(np.uint16) if v.dtype == np.float16 else v for v in (a[k] for k, _ in quant.ARRAYS[wtype])),
       xq, xd, xs, out2)
    assert np.array_equal(out, out2)


@pytest.mark.parametrize("path_name", kernels.PATHS)
@pytest.mark.parametrize("wtype", ALL)
def test_row_does_not_depend_on_its_batch(path_name, wtype):
    """A token's output row is bit-identical alone (T = 1, the decode tiles) and in batches of
    any size; N = 11: full row tiles and single-row leftovers; the _32 rows have tails."""
    path = _path(path_name)
    K = 352 if wtype.endswith("_32") else 768
    a, (xq, xd, xs), _ = _case(wtype, 9, 11, K, seed=5)
    alone = np.empty((9, 11), np.float32)
    for t in range(9):
        path.matmul(wtype, a, xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], None, alone[t:t + 1])
    for T in (2, 3, 5, 9):
        out = np.full((T, 11), np.nan, np.float32)
        path.matmul(wtype, a, xq[:T], xd[:T], xs[:T], None, out)
        np.testing.assert_array_equal(out, alone[:T], err_msg=f"{path_name} {wtype}: batch of {T}")


@not_on_avx2_only
def test_avx2_path_compiled_for_an_avx2_only_cpu():
    """The AVX2 kernels compiled for a Haswell target (tests/avx2only.py), against the reference and
    for batch independence."""
    out = run_on_avx2_only(__file__, "avx2 and (test_matmul or test_row_does_not)")
    assert "18 passed" in out   # test_matmul and test_row_does_not at avx2: every case ran


@pytest.mark.parametrize("wtype", ALL)
def test_f64_kernels(wtype):
    from mpillm.kernels import exact

    T, N, K = 3, 9, (352 if wtype.endswith("_32") else 768)
    a, (xq, xd, xs), xf = _case(wtype, T, N, K, seed=3)
    ref, mag = _ref(quant.dequantize(a, wtype), xf)
    out = np.zeros((T, N), np.float64)
    exact.KERNELS[wtype](*(v.view(np.uint16) if v.dtype == np.float16 else v
                           for v in (a[k] for k, _ in quant.ARRAYS[wtype])), xq, xd, xs, out)
    assert _close(out, ref, mag, 1e-12)


def _mutated(a, wtype, how):
    """The weights as a kernel that broke one rule would see them (float32 values)."""
    rows, nb = a["qs"].shape[0], a["qs"].shape[1] // 8
    if how == "scales swapped":  # the two per-16 scale bytes of each sub-block exchanged
        sc = np.asarray(a["sc"]).reshape(rows, nb, 2)[..., ::-1]
        return quant.dequantize(dict(a, sc=np.ascontiguousarray(sc.reshape(rows, -1))), wtype)
    if how == "high bit inverted":
        return quant.dequantize(dict(a, qh=np.bitwise_not(a["qh"])), wtype)
    if how == "min dropped":
        return quant.dequantize(dict(a, sc=np.asarray(a["sc"]) & np.uint8(0x0F)), wtype)
    raise ValueError(how)


@pytest.mark.parametrize("wtype,how", [("q2_K", "min dropped"), ("q2_K", "scales swapped"),
                                       ("q3_K", "high bit inverted"), ("q3_K", "scales swapped")])
def test_reference_check_catches_broken_rules(wtype, how):
    """Negative controls: the active path's output passes against the true reference and fails
    against one built with a rule broken (what a kernel with that bug would compute)."""
    T, N, K = 3, 9, 768
    a, (xq, xd, xs), xf = _case(wtype, T, N, K, seed=7)
    out = np.full((T, N), np.nan, np.float32)
    kernels.matmul(wtype, a, xq, xd, xs, None, out)
    ref, mag = _ref(quant.dequantize(a, wtype), xf)
    assert _close(out, ref, mag)
    bad, bmag = _ref(_mutated(a, wtype, how), xf)
    assert not _close(out, bad, np.maximum(mag, bmag)), how


def test_shape_errors():
    p = kernels.get_path("portable")
    for wtype in TYPES:
        a, (xq, xd, xs), _ = _case(wtype, 2, 4, 512)
        out = np.zeros((2, 4), np.float32)
        with pytest.raises(ValueError, match="do not match"):
            p.matmul(wtype, dict(a, sc=a["sc"][:, :-1]), xq, xd, xs, None, out)
        with pytest.raises(ValueError, match="do not match"):
            p.matmul(wtype, dict(a, qs=a["qs"][:, :-8]), xq, xd, xs, None, out)
        with pytest.raises(ValueError, match="out must be"):
            p.matmul(wtype, a, xq, xd, xs, None, np.zeros((2, 5), np.float32))
