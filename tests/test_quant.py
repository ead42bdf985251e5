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


def _format1_qh(a: dict, wtype: str) -> np.ndarray:
    """qh as shard format 1 stored it: per sub-block the bit-4 mask (bit e: element e), and for
    q6_K then the bit-5 mask."""
    q = quant.codes(a, wtype).astype(np.uint8)  # (rows, nb, 32)
    m = [np.packbits((q >> b) & 1, axis=-1, bitorder="little") for b in ((4, 5) if wtype == "q6_K" else (4,))]
    return np.stack(m, axis=-2).reshape(q.shape[0], -1)


@pytest.mark.parametrize("wtype", ["q5_K", "q6_K"])
def test_format1_shard_is_read_in_the_current_layout(tmp_path, wtype):
    """A format-1 shard's q5_K / q6_K high bits (element-order bit masks per sub-block) are
    re-encoded at load into the orders the kernels read (lossless: the same arrays as a split of
    the GGML blocks gives), in chunks; its checksum is still verified over the bytes as stored."""
    import h5py

    from mpillm.formats import format as fmt
    from mpillm.formats.config import ModelConfig

    rows, cols = 6, 768
    a = quant.random_arrays(wtype, rows, cols, np.random.default_rng(11))
    old = _format1_qh(a, wtype)
    assert not np.array_equal(old, a["qh"])
    assert np.array_equal(quant.qh_from_format1(old, wtype, chunk=5), a["qh"])  # 5: a partial last chunk
    cfg = ModelConfig(arch="llama", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                      vocab_size=49152)
    path = tmp_path / "s.h5"
    w = fmt.ShardWriter(path, cfg, 1, 0, "{}")
    w.add("output", wtype, (rows, cols), {**a, "qh": old})  # the bytes a format-1 converter wrote
    w.close()
    with h5py.File(path, "r+") as f:
        f.attrs[fmt.ATTR_VERSION] = 1
    sh = fmt.Shard(path, 1, 0)
    t = sh.get("output")
    for k in a:
        assert np.array_equal(t.arrays[k], a[k]), k
    assert sh.verify().status == "intact"
    assert sh.reencoded == {"output": a["qh"].nbytes}
    assert [n for n in sh.notes if "re-encoded into memory" in n and wtype in n], sh.notes   # the plan says so
    with h5py.File(path, "r+") as f:  # the same bytes as format 2 are read as they lie (control)
        f.attrs[fmt.ATTR_VERSION] = 2
    sh2 = fmt.Shard(path, 1, 0)
    assert np.array_equal(sh2.get("output").arrays["qh"], old)
    assert not sh2.reencoded and not [n for n in sh2.notes if "re-encoded" in n]


def _format2_q3_K(a: dict) -> tuple[np.ndarray, np.ndarray]:
    """q3_K's qs and qh as shard formats 1 and 2 stored them: byte 4h + m of a sub-block's 8 qs bytes
    holds q & 3 of element 16h + 4k + m at bits 2k; qh a 32-bit mask per sub-block, bit e = c >> 2
    of element e."""
    c = quant.lowk_codes(a, "q3_K").astype(np.uint8)  # (rows, nb, 32)
    g = (c & 3).reshape(c.shape[0], -1, 2, 4, 4)  # (rows, nb, h, k, m)
    qs = sum(g[:, :, :, k] << (2 * k) for k in range(4)).astype(np.uint8).reshape(c.shape[0], -1)
    return qs, np.packbits(c >> 2, axis=-1, bitorder="little").reshape(c.shape[0], -1)


@pytest.mark.parametrize("wtype,version", [("q3_K", 2), ("q3_K_32", 2), ("q3_K", 1)])
def test_format2_q3_K_shard_is_read_in_the_current_layout(tmp_path, wtype, version):
    """Shards before format 3 kept q3_K's low bits in q2_K's layout and its high bits as bit masks;
    their qs and qh are re-encoded at load into the 3-bit fields the kernels read (the same arrays
    as a split of the GGML blocks), in chunks; the checksum is still over the bytes as stored."""
    import h5py

    from mpillm.formats import format as fmt
    from mpillm.formats.config import ModelConfig

    rows, cols = 6, 768
    a = quant.random_arrays(wtype, rows, cols, np.random.default_rng(12))
    qs, qh = _format2_q3_K(a)
    assert not np.array_equal(qs, a["qs"]) and not np.array_equal(qh, a["qh"])
    for k, v in zip(("qs", "qh"), quant.q3_K_from_format2(qs, qh, chunk=5)):  # 5: a partial last chunk
        assert np.array_equal(v, a[k]), k
    cfg = ModelConfig(arch="llama", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                      vocab_size=49152)
    path = tmp_path / "s.h5"
    w = fmt.ShardWriter(path, cfg, 1, 0, "{}")
    w.add("output", wtype, (rows, cols), {**a, "qs": qs, "qh": qh})  # the bytes an older converter wrote
    w.close()
    with h5py.File(path, "r+") as f:
        f.attrs[fmt.ATTR_VERSION] = version
    sh = fmt.Shard(path, 1, 0)
    t = sh.get("output")
    for k in a:
        assert np.array_equal(t.arrays[k], a[k]), k
    assert np.array_equal(quant.dequantize(t.arrays, wtype), quant.dequantize(a, wtype))
    assert sh.verify().status == "intact"
    assert sh.reencoded == {"output": a["qs"].nbytes + a["qh"].nbytes}
    assert [n for n in sh.notes if "re-encoded into memory" in n], sh.notes
    with h5py.File(path, "r+") as f:  # the same bytes as format 3 are read as they lie (control)
        f.attrs[fmt.ATTR_VERSION] = 3
    sh3 = fmt.Shard(path, 1, 0)
    assert not sh3.reencoded
    t3 = sh3.get("output")
    assert np.array_equal(t3.arrays["qs"], qs) and np.array_equal(t3.arrays["qh"], qh)
