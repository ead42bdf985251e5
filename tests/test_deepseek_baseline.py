"""scripts/make_baseline_ggufs.py's DeepSeek-V3 files: the blocks are valid and zero-mean (a router
over random weights then spreads tokens over the experts), mpillm's GGUF reader finds the synth
shape's config in the metadata written in llama.cpp's naming, and (where llama.cpp's tools are
built) the per-tensor types are the ones llama-quantize picks."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_baseline_ggufs as M  # noqa: E402

LLAMA_BIN = Path(os.environ.get("LLAMA_BIN", ROOT / "cache" / "llamacpp" / "build" / "bin"))


@pytest.mark.parametrize("kind", ["q2_K", "q3_K", "q4_K", "q6_K"])
def test_random_blocks_are_valid_and_zero_mean(kind):
    rng = np.random.default_rng(3)
    std = 0.01
    blocks = M._random_blocks(kind, rng, 32, 2048, std)
    v = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind.upper()))
    assert v.shape == (32, 2048) and np.isfinite(v).all()
    assert abs(v.mean()) < 0.05 * v.std(), f"{kind}: mean {v.mean():.3g} against std {v.std():.3g}"
    assert 0.5 * std < v.std() < 1.5 * std


def test_the_gguf_reads_as_the_synth_shape(tmp_path):
    """A 3-layer cut (2 dense + 1 MoE) of a narrow deepseek2 with the full shape's structure: every
    MLA, router and YaRN field mpillm derives from llama.cpp's keys equals the config it was written
    from, and the tensor types are deepseek_type's."""
    from convert.sources import GGUFSource

    cfg = M.deepseek_cfg(3, **M.DEEPSEEK_CHECK)
    path = tmp_path / "ds.gguf"
    M.make_deepseek_gguf(path, "q4_k_m", 3, cfg=cfg)
    got = GGUFSource(path).config
    fields = ("arch", "dim", "n_layers", "n_heads", "head_dim", "ffn_dim", "vocab_size", "n_experts", "n_experts_used",
              "expert_ffn_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim",
              "n_dense_layers", "n_shared_experts", "router_func", "router_scale", "n_expert_groups", "n_groups_used",
              "router_bias", "norm_topk_prob", "rope_scaling", "rope_factor", "rope_orig_context", "yarn_beta_fast",
              "yarn_beta_slow", "yarn_mscale_all_dim", "rope_theta", "tied_embeddings")
    assert {f: getattr(got, f) for f in fields} == {f: getattr(cfg, f) for f in fields}
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    want = {n: M.deepseek_type("q4_k_m", n, shp[-1], cfg.n_layers).upper() for n, shp, _ in M.deepseek_tensors(cfg)}
    assert types == want
    assert types["blk.0.attn_k_b.weight"] == "Q5_0" and types["blk.2.ffn_down_exps.weight"] == "Q6_K"


def test_full_cut_sizes():
    """The 2-layer cut the benchmark runs: 1 dense + 1 MoE layer at full width, 9.06 / 5.46 GB of weights."""
    cfg = M.deepseek_cfg(2)
    assert (cfg.n_layers, cfg.n_dense_layers, cfg.dim, cfg.n_experts) == (2, 1, 7168, 256)
    for ftype, gb in (("q4_k_m", 9.06), ("q2_k", 5.46)):
        total = 0
        for name, shp, _ in M.deepseek_tensors(cfg):
            bb, bc = M.GGML_BLOCKS[M.deepseek_type(ftype, name, shp[-1], cfg.n_layers)]
            total += int(np.prod(shp[:-1])) * (shp[-1] // bc) * bb
        assert abs(total / 1e9 - gb) < 0.01, (ftype, total)


@pytest.mark.skipif(not (LLAMA_BIN / "llama-quantize").exists(), reason="llama.cpp's llama-quantize is not built")
def test_types_are_the_ones_llama_quantize_picks(tmp_path):
    rep = M.check_deepseek_types(tmp_path, LLAMA_BIN)
    assert all(r["tensors"] > 100 for r in rep.values())
    assert {f: r["differences"] for f, r in rep.items()} == {f: {} for f in M.DEEPSEEK_FTYPES}


def test_cut_keeps_a_moe_layer():
    cfg = M.deepseek_cfg(4)
    assert cfg.n_dense_layers == 3 and dataclasses.replace(cfg).n_layers == 4
    assert M.deepseek_cfg(2).n_dense_layers == 1


_USAGE_DRIVER = """
import json, subprocess, sys
from benchmarks.gpt_oss import run_child
code = "import numpy as np, sys; a = np.ones(600 * 2**20 // 8); print(a.sum() > 0); sys.exit(3)"
rc, out, _, big = run_child([sys.executable, "-c", code], timeout=60)
rc2, _, _, small = run_child([sys.executable, "-c", "pass"], timeout=60)
try:
    run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    timed_out = False
except subprocess.TimeoutExpired:
    timed_out = True
print(json.dumps(dict(rc=rc, out=out, big=big, rc2=rc2, small=small, timed_out=timed_out)))
"""


def test_bench_child_usage_is_the_childs_own():
    """benchmarks.gpt_oss.run_child: the exit code, the output, and the peak RSS of that child alone
    (wait4), which the DeepSeek results report beside each run with its major page faults.

    Driven from a small Python process, as the benchmark is: Linux carries a forked child's
    pre-exec peak (its parent's resident pages) into ru_maxrss, so run from inside this pytest
    process (gigabytes late in the suite) every child would report at least pytest's size."""
    import json
    import subprocess

    r = subprocess.run([sys.executable, "-c", _USAGE_DRIVER], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    u = json.loads(r.stdout.strip().splitlines()[-1])
    assert u["rc"] == 3 and u["out"].strip() == "True"
    assert u["big"]["max_rss_bytes"] > 600 * 2**20 and u["big"]["major_faults"] >= 0
    # not the earlier child's peak
    assert u["rc2"] == 0 and u["small"]["max_rss_bytes"] < u["big"]["max_rss_bytes"] - 300 * 2**20
    assert u["timed_out"]


def _matrix_means(path: Path) -> dict:
    """|mean| / std of every quantized matrix of a GGUF."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            v = gguf.quants.dequantize(t.data, t.tensor_type)
            out[t.name] = abs(float(v.mean())) / float(v.std())
    return out


def test_qwen3moe_q4_k_m_matrices_are_zero_mean(tmp_path, monkeypatch):
    """The Qwen3-MoE Q4_K_M baseline's matrices (Q4_K and Q6_K) have mean about zero, so its router
    spreads tokens over the experts as a trained model's does; control: the generator its first files
    were made with (random_ggml's Q4_K, mean about -0.9 of the spread) fails the same check."""
    from convert.synth import SHAPES
    from mpillm.formats.config import ModelConfig

    cfg = ModelConfig(**{**SHAPES["qwen3-30b-a3b"], "dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "head_dim": 64, "n_experts": 8, "n_experts_used": 2, "expert_ffn_dim": 256,
                         "vocab_size": 49152})
    M.make_qwen3_moe_gguf(tmp_path / "new.gguf", ftype="q4_k_m", cfg=cfg)
    means = _matrix_means(tmp_path / "new.gguf")
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "new.gguf")).tensors}
    assert {"Q4_K", "Q6_K"} <= kinds and len(means) >= 10
    assert max(means.values()) < 0.05, means
    monkeypatch.setitem(M._QWEN3_MOE_BLOCKS, "q4_k_m", lambda kind, *a: M.RANDOM_BLOCKS[kind][2](*a))
    M.make_qwen3_moe_gguf(tmp_path / "old.gguf", ftype="q4_k_m", cfg=cfg)
    assert max(_matrix_means(tmp_path / "old.gguf").values()) > 0.3
