"""The interleaved layout (mpillm.kernels.interleaved): 16 weight rows per register, which the runtime
repacks q4_0 / q4_1 / q8_0 / q4_K / q6_K / q2_K / q3_K (and the K-quants' _32 variants) into on the VNNI path.

- the repacking is lossless (``unpack`` gives the split arrays back bit for bit, stacks of
  experts too) and pads the last group;
- the kernels compute the quantized product (float64 reference of the exact integers), every
  row bit-identical alone, in any batch (tiles of 8, 4, 2, 1 tokens), at one and two threads and
  one group further on in the matrix, and write nothing past the matrix's N columns;
- a model on the VNNI path runs its matmuls on the interleaved weights, and its logits match the
  split layout's (MPILLM_REPACK=0) to float rounding (a K-quant GGUF mix too).
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

from mpillm import kernels
from mpillm.formats import quant
from mpillm.kernels import interleaved
from test_kernels import ref_matmul_quant


def _vnni():
    try:
        return kernels.get_path("vnni")
    except RuntimeError as e:
        pytest.skip(str(e))


def _cols(kind, K):
    """K-quant rows are whole super-blocks: K rounded up to 256 (the _32 variants take any K, as cut slices)."""
    return -(-K // 256) * 256 if kind in quant.K_TYPES else K


def _weights(kind, N, K, seed=0):
    rng = np.random.default_rng(seed)
    if kind.endswith("_32"):  # a row-parallel slice of K columns cut from whole super-blocks
        full = quant.random_arrays(kind, N, _cols(quant.base_type(kind), K), rng)
        per = {k: v.shape[1] // (full["qs"].shape[1] // quant.QS_BYTES[kind]) for k, v in full.items()}
        return {k: np.ascontiguousarray(v[:, :K // 32 * per[k]]) for k, v in full.items()}
    if kind in quant.K_TYPES:
        return quant.random_arrays(kind, N, K, rng)
    return quant.quantize((rng.standard_normal((N, K)) * 0.02).astype(np.float32), kind)


def _reference(kind, w, xq, xd, xs):
    """(float64 product, sum of |terms|) on the q8_0 activations."""
    if kind in ("q4_0", "q4_1", "q8_0"):
        return ref_matmul_quant(w, kind, xq, xd, xs)
    T, K = xq.shape
    xf = (xq.reshape(T, K // 32, 32).astype(np.float64) * xd[..., None]).reshape(T, K)
    W = quant.dequantize(w, kind).astype(np.float64)
    return xf @ W.T, np.abs(xf) @ np.abs(W).T


def _acts(path, T, K, seed=1):
    x = np.random.default_rng(seed).standard_normal((T, K)).astype(np.float32)
    xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, K // 32), np.float32), np.empty((T, K // 32), np.int32)
    path.quantize_q8_0(x, xq, xd, xs)
    return xq, xd, xs


def _vnni_active():
    _vnni()
    if kernels.active_path() != "vnni":
        pytest.skip(f"the active kernel path is {kernels.active_path()}")


def _each_layout(monkeypatch, model_dir):
    """(repack, fused, engine) with MPILLM_REPACK and MPILLM_FUSED each on and off."""
    from mpi4py import MPI

    from mpillm.runtime.engine import Engine

    for repack in ("1", "0"):
        for fused in ("1", "0"):
            monkeypatch.setenv("MPILLM_REPACK", repack)
            monkeypatch.setenv("MPILLM_FUSED", fused)
            yield repack, fused, Engine(model_dir, max_seq_len=32, max_batch=8, comm=MPI.COMM_SELF, verbose=False)


def _call(kind, r, xq, xd, xs, out):
    rtype = interleaved.RTYPE[kind]
    fn = getattr(interleaved, f"vnni_matmul_{interleaved.BASE[rtype]}_r16_q8_0")
    fn(*(np.asarray(r[k]).view(np.uint16) if dt == "float16" else r[k] for k, dt in interleaved.ARRAYS[rtype]),
       xq, xd, xs, out)


@pytest.mark.parametrize("kind", interleaved.KINDS)
def test_repack_is_lossless(kind):
    K = _cols(kind, 96)
    w = _weights(kind, 37, K)
    rtype, r = interleaved.repack(kind, w)
    assert rtype == interleaved.RTYPE[kind]
    assert r["qs"].shape == (3, K // 32, interleaved.GBYTES[interleaved.BASE[rtype]])
    if "qh" in r and quant.base_type(kind) == "q6_K":  # q6_K's high bits: two registers per (group, block), byte 4 row + k
        assert r["qh"].shape == (3, K // 32, 128) and not r["qh"].reshape(3, -1, 2, 16, 4)[2, :, :, 5:].any()
    if "qh" in r and quant.base_type(kind) == "q3_K":  # q3_K's: one register, byte 4 row + k
        assert r["qh"].shape == (3, K // 32, 64) and not r["qh"].reshape(3, -1, 16, 4)[2, :, 5:].any()
    for k, _ in interleaved.ARRAYS[rtype][1:]:  # every scale array: (G, its per-row count, 16)
        if k == "qh":
            continue
        assert r[k].shape == (3, w[k].shape[1], 16), k
        assert not np.asarray(r[k]).view(np.uint8).reshape(3, -1, 16, r[k].itemsize)[2, :, 5:].any()  # padding rows: 0
    back_type, back = interleaved.unpack(rtype, r, 37)
    assert back_type == kind and set(back) == set(w)
    for k in w:
        np.testing.assert_array_equal(np.asarray(back[k]).view(np.uint8), np.asarray(w[k]).view(np.uint8))
    # a stack of experts: each expert's slice is that expert repacked alone
    stack = {k: np.stack([v, v[::-1].copy()]) for k, v in w.items()}
    _, rs = interleaved.repack(kind, stack)
    _, alone = interleaved.repack(kind, {k: v[::-1].copy() for k, v in w.items()})
    for k in rs:
        np.testing.assert_array_equal(np.asarray(rs[k][1]).view(np.uint8), np.asarray(alone[k]).view(np.uint8))


def test_q3_K_repack_in_chunks_equals_one_pass():
    """q3_K's codes are unpacked a few million at a time (a stack of experts' codes at once would
    take GBs): chunks that cut the rows anywhere give the same bytes as one pass."""
    w = _weights("q3_K", 37, 512)
    nb = 512 // 32
    one = interleaved._q3_parts(w["qs"], w["qh"], nb)
    for codes in (32 * nb, 5 * 32 * nb, 16 * 32 * nb):  # 1, 5 and 16 rows per chunk
        for a, b in zip(one, interleaved._q3_parts(w["qs"], w["qh"], nb, codes=codes)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", interleaved.KINDS)
@pytest.mark.parametrize("N,K", [(37, 96), (48, 576), (21, 1088), (5, 32), (7, 4096)])
def test_matches_reference_in_any_batch(kind, N, K):
    """Every row against the float64 reference; each token's row bit-identical to the token
    alone for T = 1..17 (tiles 8, 4, 2, 1 and their mixes), to the rows computed one group further
    on in the matrix, and at one and two threads; the columns past N are left alone. (q4_K: K
    rounded up to whole super-blocks; the _32 variants at K itself, d (and dmin) once per block.
    K = 4096: rows long enough for q2_K's one-token prefetching tile, interleaved.PF1_BLOCKS.)"""
    path = _vnni()
    K = _cols(kind, K)
    w = _weights(kind, N + 16, K)
    xq, xd, xs = _acts(path, 17, K)
    _, r = interleaved.repack(kind, {k: v[16:] for k, v in w.items()})
    _, shifted = interleaved.repack(kind, w)  # the same rows, one group further on
    ref, bound = _reference(kind, {k: v[16:] for k, v in w.items()}, xq, xd, xs)
    alone = np.empty((17, N), np.float32)
    for t in range(17):
        _call(kind, r, xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], alone[t:t + 1])
    assert np.all(np.abs(alone - ref) <= 1e-5 * (np.abs(ref) + bound)), kind
    for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        kernels.set_threads(threads)
        try:
            for T in (1, 2, 3, 5, 8, 11, 16, 17):
                out = np.full((T, N + 5), np.nan, np.float32)
                _call(kind, r, xq[:T], xd[:T], xs[:T], out[:, :N])
                np.testing.assert_array_equal(out[:, :N], alone[:T], err_msg=f"{kind} T = {T}, {threads} threads")
                assert np.isnan(out[:, N:]).all(), "wrote past the matrix's rows"
                out2 = np.empty((T, N + 16), np.float32)
                _call(kind, shifted, xq[:T], xd[:T], xs[:T], out2)
                np.testing.assert_array_equal(out2[:, 16:], alone[:T], err_msg=f"{kind} T = {T}, shifted")
        finally:
            kernels.set_threads(numba.config.NUMBA_NUM_THREADS)


def test_rejects_mismatched_arrays():
    path = _vnni()
    _, r = interleaved.repack("q4_0", _weights("q4_0", 40, 64))
    xq, xd, xs = _acts(path, 2, 64)
    with pytest.raises(ValueError, match="rows do not match"):
        _call("q4_0", r, xq, xd, xs, np.empty((2, 49), np.float32))  # 3 groups hold 33..48 rows
    xq2, xd2, xs2 = _acts(path, 2, 96)
    with pytest.raises(ValueError, match="do not match K"):
        _call("q4_0", r, xq2, xd2, xs2, np.empty((2, 40), np.float32))
    # the low-bit types' own arrays: q3_K's high bits, q2_K's dmin
    xq3, xd3, xs3 = _acts(path, 2, 256)
    _, r3 = interleaved.repack("q3_K", _weights("q3_K", 40, 256))
    with pytest.raises(ValueError, match="high bits do not match"):
        _call("q3_K", dict(r3, qh=np.ascontiguousarray(r3["qh"][:, :, :32])), xq3, xd3, xs3, np.empty((2, 40), np.float32))
    _, r2 = interleaved.repack("q2_K", _weights("q2_K", 40, 256))
    with pytest.raises(ValueError, match="scales do not match"):
        _call("q2_K", dict(r2, dmin=np.ascontiguousarray(r2["dmin"][:2])), xq3, xd3, xs3, np.empty((2, 40), np.float32))


@pytest.mark.parametrize("wtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_model_runs_interleaved(tmp_path, monkeypatch, wtype, name):
    """On VNNI the engine repacks the model's matmul weights (dense and stacked experts) and its
    logits, fused and per kernel, agree with the split layout's (only the order of the float
    additions across a row's blocks differs)."""
    from convert.__main__ import convert
    from mpiutil import ROOT

    _vnni_active()
    fix = ROOT / "tests" / "fixtures" / name
    convert(fix, tmp_path / "m", [1], wtype, progress=False, tokenizer=False)
    toks = np.load(fix / "expected.npz")["tokens"]
    out = {}
    for repack, fused, eng in _each_layout(monkeypatch, tmp_path / "m"):
        L = eng.model.layers[0]
        mats = [L.wq, L.wo] + (L.exp_gate[:1] if name == "qwen3_moe" else [L.w_down])
        want = interleaved.RTYPE[wtype] if repack == "1" else wtype
        assert eng.model.repacked == (repack == "1") and all(m.wtype == want for m in mats)
        if name == "qwen3_moe":
            assert L.exp_types["exp_down"] == want
        out[repack, fused] = (eng.step(toks, 0, all_logits=True), eng.step(toks[:1], len(toks)))
    # The layouts round differently in the last bits, which can flip an activation's q8_0 rounding
    # or (qwen3_moe) a near-tied expert choice, and move the later rows' logits by a step of the
    # quantization. So: both layouts are as close to the transformers reference as each other, and
    # without routing most rows agree to float rounding.
    ref = np.load(fix / "expected.npz")["logits"].reshape(len(toks), -1)
    err = {k: np.abs(o[0] - ref).max() for k, o in out.items()}
    assert err["1", "1"] <= 1.25 * min(err["0", "1"], err["0", "0"]), err
    if name == "llama":
        for key in (("1", "0"), ("0", "1"), ("0", "0")):
            a, b = (np.concatenate([o[0], o[1]]) for o in (out["1", "1"], out[key]))
            per_row = np.abs(a - b).max(axis=1)
            assert np.median(per_row) <= 1e-4 and per_row.max() <= 0.05 * err["0", "1"], (key, per_row)


def test_k_quant_gguf_runs_interleaved(tmp_path, monkeypatch):
    """A llama GGUF whose matrices mix the K-quant, 5-bit, IQ4 and MXFP4 types (tests/kquant_gguf.py):
    on VNNI the engine repacks its q4_K, q6_K, q2_K and q3_K matrices (and leaves the others as stored), and its logits,
    fused and per kernel, agree with the split layout's to float rounding."""
    import kquant_gguf
    from convert.__main__ import convert
    from mpiutil import ROOT

    _vnni_active()
    kquant_gguf.make(tmp_path / "k.gguf")
    convert(tmp_path / "k.gguf", tmp_path / "m", [1], progress=False, tokenizer=False)
    toks = np.load(ROOT / "tests" / "fixtures" / "llama" / "expected.npz")["tokens"]
    out = {}
    for repack, fused, eng in _each_layout(monkeypatch, tmp_path / "m"):
        L0, L1 = eng.model.layers
        r16 = "_r16" if repack == "1" else ""
        assert (L0.wo.wtype, L1.w_gate.wtype, L0.wv.wtype, L0.w_gate.wtype, L0.w_down.wtype) == \
            ("q4_K" + r16, "q4_K" + r16, "q6_K" + r16, "q2_K" + r16, "q3_K" + r16)
        assert L1.w_down.wtype == "q5_K" and L0.wk.wtype == "q5_K"  # not repacked
        out[repack, fused] = np.concatenate([eng.step(toks, 0, all_logits=True), eng.step(toks[:1], len(toks))])
    scale = np.abs(out["0", "0"]).max()
    for key in (("1", "0"), ("0", "1"), ("0", "0")):
        per_row = np.abs(out["1", "1"] - out[key]).max(axis=1) / scale
        assert np.median(per_row) <= 1e-5 and per_row.max() <= 1e-3, (key, per_row)


def _q4_0_llama(tmp_path, monkeypatch):
    """The llama fixture as q4_0 at tmp_path/m (on VNNI), its shard and the bytes a repack would copy;
    the node's memory is then whatever MPILLM_MEMORY_LIMIT says, shared by no other rank."""
    from convert.__main__ import convert
    from mpillm.formats import format as fmt
    from mpiutil import ROOT

    _vnni_active()
    convert(ROOT / "tests" / "fixtures" / "llama", tmp_path / "m", [1], "q4_0", progress=False, tokenizer=False)
    shard = fmt.Shard(tmp_path / "m" / fmt.shard_relpath(1, 0), 1, 0)
    size = sum(v.nbytes for t in shard.tensors.values() if t.wtype == "q4_0" for v in t.arrays.values())
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    monkeypatch.delenv("MPILLM_REPACK", raising=False)
    return shard, size


def test_repacks_only_what_fits(tmp_path, monkeypatch):
    """The repacked copy is the rank's own memory: when the weights it would copy exceed half of what
    the node can still give (MPILLM_MEMORY_LIMIT stands in for it), the model keeps the memory-mapped
    layout, so a model larger than the memory still pages, and the plan line says why; with room
    for the copy the same model is repacked."""
    from mpi4py import MPI

    from mpillm.runtime.engine import Engine

    from mpillm.runtime import warm

    shard, size = _q4_0_llama(tmp_path, monkeypatch)
    turns = []  # the engine's compile turn warms the layout it decided on, not one decided again
    ensure = warm.ensure_shard
    monkeypatch.setattr(warm, "ensure_shard", lambda *a, **k: turns.append(k.get("repack")) or ensure(*a, **k))
    for limit, repacked in ((1.9, False), (2.1, True)):  # the copy may take half of the limit
        monkeypatch.setenv("MPILLM_MEMORY_LIMIT", str(int(limit * size)))
        eng = Engine(tmp_path / "m", max_seq_len=16, max_batch=2, comm=MPI.COMM_SELF, verbose=False)
        assert eng.model.repacked == repacked and turns[-1] is repacked
        assert eng.model.layers[0].wq.wtype == ("q4_0_r16" if repacked else "q4_0")
        assert ("not repacked" in eng.model.repack_note) != repacked, eng.model.repack_note


def test_warm_up_compiles_the_layout_the_model_will_run(tmp_path, monkeypatch):
    """The warm-up's tiny twin is repacked exactly when the real model will be: a model too large to
    repack runs the stored layout's kernels, so those are the ones to compile ahead (the tiny twin
    itself always fits), and the compile marker's signature says which."""
    from mpillm.runtime import engine, warm

    shard, size = _q4_0_llama(tmp_path, monkeypatch)
    seen = []

    class Recording(engine.Engine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self.model.repacked)

    monkeypatch.setattr(engine, "Engine", Recording)
    sigs = []
    for limit, repacked in ((1.9, False), (2.1, True)):
        monkeypatch.setenv("MPILLM_MEMORY_LIMIT", str(int(limit * size)))
        sig = warm.signature(shard, "f16", "f32")
        assert sig["repack"] == repacked
        warm.compile_for(shard, "f16", "f32", engine.compile_tiny, repack=sig["repack"])
        assert seen[-1] == repacked
        sigs.append(warm.marker(sig))
    assert sigs[0] != sigs[1]
