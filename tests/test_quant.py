"""Bit-exactness with GGML: the converter's copies of the bundled GGUF's Q4_1/Q8_0 tensors, and
our quantizers' rounding against the gguf package's reference implementation."""
from __future__ import annotations

import numpy as np
import pytest

from mpillm.formats import format as fmt
from mpillm.formats import quant

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    from convert.sources import open_source
    from convert.shards import convert_model
    from mpillm.startup import bundled_gguf

    src = open_source(bundled_gguf())
    out = tmp_path_factory.mktemp("bundled")
    convert_model(src, out, [1], progress=False)
    return src, fmt.Shard(out / fmt.shard_relpath(1, 0), 1, 0)


@pytest.mark.parametrize("gname,name", [("token_embd.weight", "tok_embd"),          # Q8_0
                                        ("blk.3.ffn_down.weight", "layers/3/w_down"),  # Q4_1
                                        ("blk.7.attn_v.weight", "layers/7/wv")])       # Q4_1
def test_converted_tensors_dequantize_like_gguf(bundled, gname, name):
    src, shard = bundled
    t = src.tensors[gname]
    ours = shard.get(name)
    assert ours.wtype == {"Q8_0": "q8_0", "Q4_1": "q4_1"}[t.tensor_type.name]
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.array_equal(quant.dequantize(ours.arrays, ours.wtype), ref)
    # and the bytes are GGML's blocks, untouched
    assert np.array_equal(quant.join_ggml(ours.arrays, ours.wtype), np.asarray(t.data))


def test_unpermuted_q_rows_are_whole_ggml_rows(bundled):
    """wq/wk rows are moved (llama.cpp's RoPE permutation undone), never requantized."""
    src, shard = bundled
    t = src.tensors["blk.0.attn_q.weight"]
    ours = quant.join_ggml(shard.get("layers/0/wq").arrays, "q4_1")
    raw = np.asarray(t.data)
    assert sorted(map(bytes, ours)) == sorted(map(bytes, raw))
    assert not np.array_equal(ours, raw)


FIXED = np.array([[0.0, 1.0, -1.0, 0.5, -0.5, 2.5, -2.5, 7.0, -8.0, 0.25, 3.75, -3.75, 1e-3, -1e-3, 100.0, -99.0] * 2,
                  np.linspace(-1, 1, 32), np.sin(np.arange(32)) * 3, np.zeros(32),
                  [1e-8] * 16 + [-1e-8] * 16, np.arange(32) - 15.5], np.float32)


@pytest.mark.parametrize("wtype,gtype", [("q4_0", T.Q4_0), ("q8_0", T.Q8_0), ("q4_1", T.Q4_1)])
def test_quantizers_round_like_ggml(wtype, gtype):
    rng = np.random.default_rng(3)
    for w in (FIXED, rng.standard_normal((64, 256)).astype(np.float32) * 3):
        ours = quant.join_ggml(quant.quantize(w, wtype), wtype)
        ref = gguf.quants.quantize(w, gtype)
        assert np.array_equal(ours, ref.view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("wtype", quant.QUANTIZABLE)  # the K-quants: tests/test_kquant.py
def test_split_join_round_trip(wtype):
    w = np.random.default_rng(4).standard_normal((8, 96)).astype(np.float32)
    a = quant.quantize(w, wtype)
    rows, cols = w.shape
    back = quant.split_ggml(quant.join_ggml(a, wtype).reshape(-1), wtype, rows, cols)
    for k in a:
        assert np.array_equal(a[k], back[k])


@pytest.mark.parametrize("wtype", ["q4_0", "q8_0", "q5_1", "mxfp4", "q4_K", "q5_K", "q6_K", "q2_K", "q3_K",
                                   "iq4_nl", "iq4_xs"])
def test_split_in_row_chunks_is_the_whole_split(wtype, monkeypatch):
    """A tensor of more rows than SPLIT_ROWS is unpacked a chunk at a time (bounded temporaries for
    the experts tensors); the arrays are the ones one split of the whole tensor gives."""
    rows, cols = 11, 512
    raw = quant.random_ggml(wtype, rows, cols, np.random.default_rng(7))
    whole = quant.split_ggml(raw, wtype, rows, cols)
    monkeypatch.setattr(quant, "SPLIT_ROWS", 4)   # chunks of 4, 4 and 3 rows
    chunked = quant.split_ggml(raw, wtype, rows, cols)
    assert set(chunked) == set(whole)
    for k in whole:
        assert chunked[k].dtype == whole[k].dtype and np.array_equal(chunked[k], whole[k]), k
