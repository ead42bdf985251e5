"""Qwen2 pieces that need no MPI job: config mapping (safetensors and GGUF), the sliding-window
keys Qwen2 checkpoints carry, and the converter slicing the q/k/v biases with their heads."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.sources import GGUFSource, HFSource
from mpillm.formats import format as fmt
from mpillm.formats.partition import plan
from test_qwen3 import FIXTURES

QWEN2 = FIXTURES / "qwen2"


def test_hf_and_gguf_config_mapping():
    hf = HFSource(QWEN2).config
    assert (hf.arch, hf.qk_norm, hf.qkv_bias, hf.tied_embeddings, hf.n_heads, hf.n_kv_heads, hf.head_dim) == \
        ("qwen2", False, True, True, 4, 2, 32)
    assert hf.rope_theta == 1e6 and hf.norm_eps == 1e-6
    gg = GGUFSource(QWEN2 / "model.gguf")
    assert gg.config.norm_eps == pytest.approx(1e-6, rel=1e-6)  # GGUF stores it as float32
    assert dataclasses.replace(gg.config, norm_eps=hf.norm_eps) == hf
    assert {"layers/0/bq", "layers/1/bk", "layers/1/bv"} <= set(gg.names)
    assert "output" not in gg.names  # tied: the embedding is the output projection


def _with_config(tmp_path, **changes):
    d = json.loads((QWEN2 / "config.json").read_text())
    d.pop("layer_types")  # as in checkpoints written before transformers 5
    d.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(d))
    if not (tmp_path / "model.safetensors").exists():
        os.symlink(QWEN2 / "model.safetensors", tmp_path / "model.safetensors")
    return tmp_path


def test_sliding_window_keys(tmp_path):
    """Qwen2.5 configs carry a sliding_window that no layer uses: use_sliding_window false, or
    max_window_layers covering every layer. Only a window some layer really applies, shorter than
    the context, is refused."""
    for keys in (dict(use_sliding_window=False, sliding_window=64),
                 dict(use_sliding_window=True, sliding_window=64, max_window_layers=2),
                 dict(use_sliding_window=True, sliding_window=256, max_window_layers=0)):
        cfg = HFSource(_with_config(tmp_path, **keys)).config
        assert cfg.arch == "qwen2", keys
        # accepted because no layer slides: none listed, every layer's window 0 (full attention)
        assert cfg.sliding_layers == [] and [cfg.window(i) for i in range(cfg.n_layers)] == [0] * cfg.n_layers, \
            (keys, cfg.sliding_window, cfg.sliding_layers)
    with pytest.raises(ValueError, match="sliding-window attention .*window 64 tokens"):
        HFSource(_with_config(tmp_path, use_sliding_window=True, sliding_window=64, max_window_layers=1))


def test_llama_with_biases_refused(tmp_path):
    """A Llama config with attention_bias would have its biases ignored: refused by name."""
    d = json.loads((FIXTURES / "llama" / "config.json").read_text())
    d["attention_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(d))
    os.symlink(FIXTURES / "llama" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="attention_bias"):
        HFSource(tmp_path)


@pytest.mark.parametrize("ws,split", [(3, None), (4, None), (2, [3.0, 1.0]), (3, [1.0, 3.0, 2.0])])
def test_biases_sliced_with_their_heads(tmp_path, ws, split):
    """Each rank's bq holds its query heads' slice, bk / bv the KV heads it holds (replicated
    where ranks share a KV head), for even and uneven (--split) plans."""
    from convert.__main__ import convert

    convert(QWEN2, tmp_path / "m", [ws], "f32", progress=False, tokenizer=False, split=split)
    st = load_file(QWEN2 / "model.safetensors")
    cfg = HFSource(QWEN2).config
    hd = cfg.head_dim
    slices = plan(cfg, ws, split)
    if split:
        assert [s.heads for s in slices] != [s.heads for s in plan(cfg, ws)]
    for rs in slices:
        sh = fmt.Shard(tmp_path / "m" / fmt.shard_relpath(ws, rs.tp_rank), ws, rs.tp_rank)
        assert sh.slice["heads"] == list(rs.heads)
        for i in range(cfg.n_layers):
            for n, (h0, h1) in (("q", rs.heads), ("k", rs.kv_heads), ("v", rs.kv_heads)):
                got = np.asarray(sh.get(f"layers/{i}/b{n}").arrays["w"])
                want = st[f"model.layers.{i}.self_attn.{n}_proj.bias"][h0 * hd:h1 * hd]
                np.testing.assert_array_equal(got, want, err_msg=f"rank {rs.tp_rank} layer {i} b{n}")


def test_manifest_from_before_new_config_fields_keeps_its_world_sizes(tmp_path):
    """Converting another world size into a directory whose manifest predates config fields added
    since (qkv_bias, the gpt-oss ones) keeps the sizes converted before: the old config is compared
    as read back, with those fields at their defaults (it used to count as a different model)."""
    from convert.__main__ import convert

    d = tmp_path / "m"
    convert(FIXTURES / "llama", d, [1], "f32", progress=False, tokenizer=False)
    m = json.loads((d / "manifest.json").read_text())
    for k in ("qkv_bias", "o_bias", "attn_sinks", "sliding_window"):
        del m["config"][k]
    (d / "manifest.json").write_text(json.dumps(m))
    convert(FIXTURES / "llama", d, [2], "f32", progress=False, tokenizer=False)
    assert fmt.read_manifest(d)["world_sizes"] == [1, 2]
