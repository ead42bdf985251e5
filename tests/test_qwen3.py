"""Qwen3 / Qwen3-MoE pieces that need no MPI job: config mapping, MoE partition errors, routing ops."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from convert.sources import GGUFSource, HFSource
from mpillm.runtime import ops
from mpillm.formats.config import ModelConfig
from mpillm.formats.partition import plan, valid_world_sizes

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_hf_and_gguf_config_mapping():
    hf = HFSource(FIXTURES / "qwen3_moe").config
    assert (hf.arch, hf.qk_norm, hf.n_experts, hf.n_experts_used, hf.expert_ffn_dim, hf.ffn_dim) == \
        ("qwen3moe", True, 8, 2, 128, 0)
    assert hf.norm_eps == 1e-6 and hf.rope_theta == 1e6 and hf.norm_topk_prob and not hf.tied_embeddings
    gg = GGUFSource(FIXTURES / "qwen3_moe" / "model.gguf").config
    assert gg.norm_eps == pytest.approx(1e-6, rel=1e-6)  # GGUF stores it as float32
    assert dataclasses.replace(gg, norm_eps=hf.norm_eps, context_length=hf.context_length) == hf
    dense = HFSource(FIXTURES / "qwen3").config
    assert (dense.arch, dense.qk_norm, dense.tied_embeddings, dense.n_experts, dense.ffn_dim) == \
        ("qwen3", True, True, 0, 384)


def test_transformers5_only_config_keys(tmp_path):
    """A config.json with only transformers 5's rope_parameters / num_local_experts reads the same."""
    src = FIXTURES / "qwen3_moe"
    d = json.loads((src / "config.json").read_text())
    del d["rope_theta"], d["num_experts"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    os.symlink(src / "model.safetensors", tmp_path / "model.safetensors")
    assert HFSource(tmp_path).config == HFSource(src).config
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="RoPE scaling"):
        HFSource(tmp_path)


def _moe_cfg(expert_ffn: int, n_heads: int = 8) -> ModelConfig:
    return ModelConfig(arch="qwen3moe", dim=256, n_layers=1, n_heads=n_heads, n_kv_heads=2, head_dim=32,
                       ffn_dim=0, vocab_size=64, qk_norm=True, n_experts=4, n_experts_used=2,
                       expert_ffn_dim=expert_ffn)


@pytest.mark.parametrize("expert_ffn,bad,works", [(96, 4, "1, 2, 3"), (100, 2, "1"), (160, 6, "1, 2, 3, 4, 5")])
def test_expert_split_error_lists_world_sizes(expert_ffn, bad, works):
    cfg = _moe_cfg(expert_ffn)
    with pytest.raises(ValueError, match=f"expert FFN size {expert_ffn} .*world sizes that work: {works}$"):
        plan(cfg, bad)
    assert valid_world_sizes(cfg) == [int(n) for n in works.split(", ")]


def test_convert_rejects_unsplittable_experts(tmp_path):
    from convert.__main__ import convert

    # qwen3_moe: 6 heads, experts 128 wide = 4 blocks of 32 -> 5 ranks cannot split them
    with pytest.raises(ValueError, match="world sizes that work: 1, 2, 3, 4$"):
        convert(FIXTURES / "qwen3_moe", tmp_path / "m", [5], "f32", progress=False, tokenizer=False)


def test_route_topk_and_grouping():
    rng = np.random.default_rng(0)
    T, E, K = 13, 16, 4
    logits = rng.standard_normal((T, E)).astype(np.float32)
    for renorm in (True, False):
        idx, w = np.zeros((T, K), np.int64), np.zeros((T, K), np.float32)
        ops.route_topk(logits, renorm, idx, w)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = np.argsort(-p, -1, kind="stable")[:, :K]
        np.testing.assert_array_equal(idx, ref)
        rw = np.take_along_axis(p, ref, -1)
        np.testing.assert_allclose(w, rw / rw.sum(-1, keepdims=True) if renorm else rw, rtol=1e-6)
    slots, starts, active = np.zeros(E + 1, np.int64), np.zeros(E + 1, np.int64), np.zeros(E, np.int64)
    rows, wts = np.zeros(T * K, np.int64), np.zeros(T * K, np.float32)
    n = ops.group_by_expert(idx, w, slots, starts, rows, wts, active)
    assert list(active[:n]) == sorted(set(idx.ravel()))
    assert starts[n] == T * K
    for a in range(n):
        e, r = active[a], rows[starts[a]:starts[a + 1]]
        want = [t for t in range(T) if e in idx[t]]
        assert list(r) == want
        np.testing.assert_array_equal(wts[starts[a]:starts[a + 1]], [w[t][list(idx[t]).index(e)] for t in want])


def test_exact_buffers_refused_for_moe(tmp_path):
    """--buffer-type f64 promises exact sums, which the MoE block does not do: refused by name."""
    from mpi4py import MPI

    from convert.__main__ import convert
    from mpillm.runtime.errors import FatalError
    from mpillm.runtime.engine import Engine

    convert(FIXTURES / "qwen3_moe", tmp_path / "m", [1], "f32", progress=False, tokenizer=False)
    with pytest.raises(FatalError, match=r"rank 0: .*--buffer-type f64 .* dense models only, not for qwen3moe"):
        Engine(tmp_path / "m", max_seq_len=16, max_batch=4, comm=MPI.COMM_SELF, verbose=False, buffer_type="f64")
