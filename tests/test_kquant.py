"""The 5-bit, K-quant and MXFP4 weight types: layouts, kernels, converter.

- split_ggml / join_ggml are lossless on random GGML blocks (bit-exact round trip), and our
  dequantization is bit-identical to gguf.quants' (so to GGML's);
- every kernel path (the ones this CPU runs, forced one by one through kernels.get_path, as in
  test_kernels.py) against two float64 references of the same sum: one built from our
  dequantization, one from gguf.quants', on the kernel's own q8_0 activations;
- the float64-output kernels (--buffer-type f64) against the same reference, tightly;
- the converter on a synthetic GGUF of these types: every tensor at world size 1 joins back
  to the GGUF's bytes; at 3 ranks the super-blocks the split cuts are stored as the ``_32``
  variants with the same values, and the notes say so.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from avx2only import not_on_avx2_only, run_on_avx2_only
from mpillm import kernels
from mpillm.formats import quant

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kquant_gguf  # noqa: E402

NEW = ["q5_0", "q5_1", "q4_K", "q5_K", "q6_K", "mxfp4"]
ALL = NEW + ["q4_K_32", "q5_K_32", "q6_K_32"]
# (T, N, K): N not a multiple of the tiles; 11 sub-blocks = 8 + a pair + 1; T = 11: the x86 2 x 8 tile, then 4 x 3
# (1, 5, 4608): 18 super-blocks, more than any other case (lowk's tiles read d in chunks of 16)
SHAPES = [(1, 7, 512), (3, 9, 768), (5, 6, 352), (11, 9, 512), (1, 5, 4608)]


def _gguf_type(t):
    import gguf

    return getattr(gguf.GGMLQuantizationType, t.upper())


def _path(name):
    try:
        return kernels.get_path(name)
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("wtype", NEW)
def test_ggml_round_trip_and_dequantize(wtype):
    import gguf

    rng = np.random.default_rng(1)
    rows, cols = 6, 768
    raw = quant.random_ggml(wtype, rows, cols, rng)
    a = quant.split_ggml(raw, wtype, rows, cols)
    for k, (shape, dt) in quant.array_shapes(wtype, rows, cols).items():
        assert a[k].shape == shape and a[k].dtype == np.dtype(dt), k
    assert np.array_equal(quant.join_ggml(a, wtype), raw)
    ref = gguf.quants.dequantize(raw, _gguf_type(wtype)).reshape(rows, cols)
    ours = quant.dequantize(a, wtype)
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))
    if wtype in quant.K_TYPES:  # the per-32 variant holds the same values
        b, t32 = quant.to_per32(a, wtype)
        assert t32 == wtype + "_32"
        assert np.array_equal(quant.dequantize(b, t32).view(np.uint32), ours.view(np.uint32))


@pytest.mark.parametrize("wtype", ["q5_0", "q5_1", "mxfp4"])
def test_quantize_matches_gguf(wtype):
    import gguf

    w = np.random.default_rng(2).standard_normal((5, 320)).astype(np.float32)
    a = quant.quantize(w, wtype)
    assert np.array_equal(quant.join_ggml(a, wtype), gguf.quants.quantize(w, _gguf_type(wtype)))


def test_k_quants_have_no_quantizer():
    with pytest.raises(ValueError, match="no quantizer for q4_K"):
        quant.quantize(np.zeros((2, 256), np.float32), "q4_K")


def _case(wtype, T, N, K, seed=0):
    rng = np.random.default_rng(seed)
    a = quant.random_arrays(wtype, N, K, rng)
    x = rng.standard_normal((T, K)).astype(np.float32)
    nb = K // 32
    xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, nb), np.float32), np.empty((T, nb), np.int32)
    kernels.get_path("portable").quantize_q8_0(x, xq, xd, xs)
    xf = (xq.reshape(T, nb, 32).astype(np.float64) * xd[..., None]).reshape(T, K)
    return a, (xq, xd, xs), xf


def _refs(a, wtype, xf):
    """float64 sums with our dequantized weights and with gguf's, and sum |terms| for the tolerance."""
    import gguf

    W = quant.dequantize(a, wtype).astype(np.float64)
    bt = quant.base_type(wtype)
    base = a if bt == wtype else {**a, **{k: a[k][:, ::8] for k in ("d", "dmin") if k in a}}  # _32: undo the repeat
    raw = quant.join_ggml(base, bt)
    Wg = gguf.quants.dequantize(raw, _gguf_type(bt)).reshape(W.shape).astype(np.float64)
    return xf @ W.T, xf @ Wg.T, np.abs(xf) @ np.abs(W).T


def _is_k(wtype):
    return wtype in quant.K_TYPES or wtype.endswith("_32")


# K-quant super-blocks need 256 | K: the K = 352 shape (11 sub-blocks) is left out for them, not skipped
MATMUL_CASES = [(w, T, N, K) for w in ALL for T, N, K in SHAPES if not (_is_k(w) and K % 256)]


@pytest.mark.parametrize("path_name", kernels.PATHS)
@pytest.mark.parametrize("wtype,T,N,K", MATMUL_CASES)
def test_matmul(path_name, wtype, T, N, K):
    path = _path(path_name)
    a, (xq, xd, xs), xf = _case(wtype, T, N, K)
    ref, ref_gguf, mag = _refs(a, wtype, xf)
    out = np.full((T, N), np.nan, np.float32)
    path.matmul(wtype, a, xq, xd, xs, None, out)
    assert (np.abs(out - ref) <= 2e-6 * mag + 1e-30).all(), np.abs(out - ref).max()
    assert (np.abs(out - ref_gguf) <= 2e-6 * mag + 1e-30).all()
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
    any size (the multi-token tiles and their 1-token tails), at any position in the batch; with
    N = 11, rows run in full row tiles and in the single-row leftovers."""
    path = _path(path_name)
    K = 768 if wtype in quant.K_TYPES or wtype.endswith("_32") else 352
    a, (xq, xd, xs), _ = _case(wtype, 20, 11, K, seed=5)
    alone = np.empty((20, 11), np.float32)
    for t in range(20):
        path.matmul(wtype, a, xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], None, alone[t:t + 1])
    # the x86 tiles: 4 x 4 and its tails of 1, 2, 3 tokens, alone and after a whole tile; 2 x 8 for
    # each whole 8 tokens, alone (8), with 4 x 1 (9), 4 x 4 and 4 x 1 (13), twice with 4 x 4 (20)
    for T in (2, 3, 5, 6, 7, 8, 9, 13, 20):
        out = np.full((T, 11), np.nan, np.float32)
        path.matmul(wtype, a, xq[:T], xd[:T], xs[:T], None, out)
        np.testing.assert_array_equal(out, alone[:T], err_msg=f"{path_name} {wtype}: batch of {T}")


def _cut32(wtype, N, K, seed):
    """A ``_32`` K-quant matrix of K columns (K a multiple of 32, not of 256: a row-parallel slice),
    cut from a 256-multiple one, with the q8_0 activations of 9 tokens and the float64 reference."""
    rng = np.random.default_rng(seed)
    full = quant.random_arrays(wtype, N, -(-K // 256) * 256, rng)
    nb = K // 32
    per = {k: full[k].shape[1] // (full["qs"].shape[1] // 16) for k in full}  # bytes or values per sub-block
    a = {k: np.ascontiguousarray(v[:, :nb * per[k]]) for k, v in full.items()}
    T = 9
    x = rng.standard_normal((T, K)).astype(np.float32)
    xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, nb), np.float32), np.empty((T, nb), np.int32)
    kernels.get_path("portable").quantize_q8_0(x, xq, xd, xs)
    xf = (xq.reshape(T, nb, 32).astype(np.float64) * xd[..., None]).reshape(T, K)
    W = quant.dequantize(a, wtype).astype(np.float64)
    return a, (xq, xd, xs), xf @ W.T, np.abs(xf) @ np.abs(W).T


@pytest.mark.parametrize("path_name", kernels.PATHS)
@pytest.mark.parametrize("wtype", ["q4_K_32", "q5_K_32", "q6_K_32"])
@pytest.mark.parametrize("K", [608, 384, 192])
def test_k32_tail(path_name, wtype, K):
    """A ``_32`` slice whose sub-block count is not a multiple of 8, so the main loop leaves a tail
    (K = 608: 2 x 8 + 3, one at a time; 384: 8 + 4, the half group of 4 alone, as Qwen3-30B-A3B's
    expert down-projection at 2 ranks; 192: 4 + 2, the half group then single sub-blocks): against the
    float64 reference, and each token's row bit-identical alone and in batches (every tile: N = 11
    is two 4-row tiles and 3 single rows)."""
    path = _path(path_name)
    N = 11
    a, (xq, xd, xs), ref, mag = _cut32(wtype, N, K, seed=6)
    alone = np.empty((9, N), np.float32)
    for t in range(9):
        path.matmul(wtype, a, xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], None, alone[t:t + 1])
    assert (np.abs(alone - ref) <= 2e-6 * mag + 1e-30).all(), np.abs(alone - ref).max()
    for T in (3, 6, 9):
        out = np.full((T, N), np.nan, np.float32)
        path.matmul(wtype, a, xq[:T], xd[:T], xs[:T], None, out)
        np.testing.assert_array_equal(out, alone[:T], err_msg=f"{path_name} {wtype}: batch of {T}")


@pytest.mark.parametrize("wtype", ALL)
def test_f64_kernels(wtype):
    from mpillm.kernels import exact

    T, N, K = 3, 9, 768
    a, (xq, xd, xs), xf = _case(wtype, T, N, K, seed=3)
    ref, _, mag = _refs(a, wtype, xf)
    out = np.zeros((T, N), np.float64)
    exact.KERNELS[wtype](*(v.view(np.uint16) if v.dtype == np.float16 else v
                           for v in (a[k] for k, _ in quant.ARRAYS[wtype])), xq, xd, xs, out)
    assert (np.abs(out - ref) <= 1e-12 * mag).all()


def _strided_threads_outputs(path, a, xq, xd, xs, N):
    """The q4_K matmul on row-strided activations at 1 and at 2 numba threads."""
    T, K = xq.shape
    big = np.zeros((T, K + 64), np.int8)
    big[:, :K] = xq
    outs = {}
    try:
        for threads in (1, 2):
            kernels.set_threads(threads)   # no silent skip: 2 threads must be available
            out = np.full((T, N), np.nan, np.float32)
            path.matmul("q4_K", a, big[:, :K], xd, xs, None, out)
            outs[threads] = out
    finally:
        kernels.set_threads(1)
    return outs


def _check_strided_threads(outs, ref, mag):
    for threads, out in outs.items():
        err = np.abs(out - ref)
        assert (err <= 2e-6 * mag + 1e-30).all(), f"{threads} thread(s): {err.max():.3g} from the float64 reference"
    assert np.array_equal(outs[1], outs[2]), "1 and 2 threads differ"


@pytest.mark.parametrize("path_name", kernels.PATHS)
def test_readonly_strided_and_threads(path_name):
    """Read-only memmap-like weights, row-strided activations, 1 and 2 threads: each against the
    float64 reference (as test_matmul), and bit-identical to each other."""
    path = _path(path_name)
    T, N, K = 4, 13, 512
    a, (xq, xd, xs), xf = _case("q4_K", T, N, K, seed=4)
    ref, _, mag = _refs(a, "q4_K", xf)
    for v in a.values():
        v.flags.writeable = False
    _check_strided_threads(_strided_threads_outputs(path, a, xq, xd, xs, N), ref, mag)


def test_strided_threads_check_catches_a_wrong_stride():
    """Negative control: a kernel that reads the strided activations as if they were contiguous
    (the row pitch ignored) gives the same wrong answer at 1 and 2 threads; only the reference sees it."""
    path = kernels.get_path("portable")
    T, N, K = 4, 13, 512
    a, (xq, xd, xs), xf = _case("q4_K", T, N, K, seed=4)
    ref, _, mag = _refs(a, "q4_K", xf)
    big = np.zeros((T, K + 64), np.int8)
    big[:, :K] = xq
    wrong = np.ascontiguousarray(big.ravel()[:T * K].reshape(T, K))    # row t read from t * K, not t * (K + 64)
    outs = _strided_threads_outputs(path, a, wrong, xd, xs, N)
    assert np.array_equal(outs[1], outs[2])          # what the old test compared: it passed
    with pytest.raises(AssertionError, match="from the float64 reference"):
        _check_strided_threads(outs, ref, mag)


def test_shape_errors():
    p = kernels.get_path("portable")
    a, (xq, xd, xs), _ = _case("q6_K", 2, 4, 512)
    out = np.zeros((2, 4), np.float32)
    bad = dict(a, sc=a["sc"][:, :-1])
    with pytest.raises(ValueError, match="do not match"):
        p.matmul("q6_K", bad, xq, xd, xs, None, out)
    with pytest.raises(ValueError, match="out must be"):
        p.matmul("q6_K", a, xq, xd, xs, None, np.zeros((2, 5), np.float32))


def test_converter_bit_exact_and_cut_super_blocks(tmp_path):
    from convert.__main__ import convert
    from mpillm.formats import format as fmt

    mats = kquant_gguf.make(tmp_path / "k.gguf")
    convert(tmp_path / "k.gguf", tmp_path / "out", [1, 3], progress=False, tokenizer=False)
    s1 = fmt.Shard(tmp_path / "out" / fmt.shard_relpath(1, 0), 1, 0)
    names = {"token_embd.weight": "tok_embd", "output.weight": "output"}
    for i in range(kquant_gguf.N_LAYERS):
        for g, n in (("attn_output", "wo"), ("ffn_down", "w_down"), ("ffn_gate", "w_gate"), ("ffn_up", "w_up"),
                     ("attn_v", "wv")):
            names[f"blk.{i}.{g}.weight"] = f"layers/{i}/{n}"
    for g, n in names.items():
        wtype, raw = mats[g]
        t = s1.get(n)
        assert t.wtype == wtype
        assert np.array_equal(quant.join_ggml(t.arrays, wtype), raw), n
    assert s1.notes == []
    # 3 ranks: wo splits at 96 / 192 columns and w_down at 192 / 352, inside 256-blocks
    full = {n: quant.dequantize(s1.get(n).arrays, s1.get(n).wtype) for n in ("layers/0/wo", "layers/0/w_down")}
    notes = []
    parts = {n: [] for n in full}
    for r in range(3):
        s = fmt.Shard(tmp_path / "out" / fmt.shard_relpath(3, r), 3, r)
        notes += s.notes
        for n in full:
            t = s.get(n)
            parts[n].append(quant.dequantize(t.arrays, t.wtype))
            if n == "layers/0/wo" and r > 0:
                assert t.wtype == "q4_K_32"
    for n in full:
        assert np.array_equal(np.concatenate(parts[n], axis=1), full[n])
    assert any("layers/0/wo: q4_K stored as q4_K_32" in x and "super-blocks" in x for x in notes)
    assert any("layers/1/w_down: q5_K stored as q5_K_32" in x for x in notes)


@not_on_avx2_only
def test_avx2_path_compiled_for_an_avx2_only_cpu():
    """The AVX2 kernels compiled for a Haswell target (tests/avx2only.py)."""
    assert " passed" in run_on_avx2_only(__file__, "avx2 and test_matmul")
