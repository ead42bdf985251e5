"""The distributed-llama baseline's own parts that run without root or its binary: reading its
output (benchmarks/dllama.py) and the GGUF -> Hugging Face export (scripts/gguf_to_hf.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from benchmarks import dllama

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the root's stdout as v0.16.4 prints it (2 nodes, 3 prompt tokens, 3 generated)
OUT = """\
💿 Weights loaded
🚁 Network is in non-blocking mode
The capital
🔷️ Eval  281 ms Sync   12 ms | Sent   150 kB Recv   636 kB | (2 tokens)
🔶 Pred  100 ms Sync   81 ms | Sent    76 kB Recv   318 kB | River
🔶 Pred   98 ms Sync   90 ms | Sent    76 kB Recv   318 kB |  River
🔶 Pred   93 ms Sync   84 ms | Sent    77 kB Recv   318 kB | ~

Evaluation
   nBatches: 32
    nTokens: 2
   tokens/s: 6.84 (146.50 ms/tok)
Prediction
    nTokens: 3
   tokens/s: 5.47 (182.97 ms/tok)
"""


def test_parse_reads_its_summary_and_per_token_lines():
    r = dllama.parse(OUT)
    assert r["tok_s"] == 5.47 and r["ms_tok"] == 182.97 and r["n_tokens"] == 3
    assert r["comm_ms"] == pytest.approx(85.0) and r["compute_ms"] == pytest.approx(97.0)
    # its counters reset on every read: per token as printed, not differences
    assert r["kib_tok"] == pytest.approx(76.33, abs=0.01) and r["recv_kib_tok"] == 318.0
    assert r["prompt_tokens"] == 3


def test_parse_without_a_summary_is_a_failed_run():
    assert dllama.parse(OUT.split("Evaluation")[0]) is None
    assert dllama.parse("🚨 Critical error: Unsupported mode") is None


def test_commands_are_one_node_per_host_with_q80_sync():
    root = dllama.root_argv(Path("d"), Path("m.m"), Path("t.t"), ["10.213.57.2:9998"], "Hi", 40, turbo=False)
    assert root[:2] == ["d", "inference"]
    assert root[root.index("--buffer-float-type") + 1] == "q80" and root[root.index("--nthreads") + 1] == "1"
    assert root[root.index("--net-turbo") + 1] == "0" and root[-2:] == ["--workers", "10.213.57.2:9998"]
    w = dllama.worker_argv(Path("d"), "10.213.57.2")
    assert w[:2] == ["d", "worker"] and w[w.index("--host") + 1] == "10.213.57.2"
    assert dllama.steps_for("Hi", 32) == 35


def test_unpermute_undoes_llama_cpp_and_matches_our_converter():
    from convert.sources import _unpermute_rows

    g = _script("gguf_to_hf")
    rng = np.random.default_rng(0)
    for n_head, hd in ((4, 8), (3, 64)):
        w = rng.standard_normal((n_head * hd, 5)).astype(np.float32)
        assert np.array_equal(g.unpermute(g.permute(w, n_head), n_head), w)
        assert np.array_equal(g.unpermute(w, n_head), _unpermute_rows(w, n_head))
        assert not np.array_equal(g.permute(w, n_head), w)
    # one head of 4 rows [a0 a1 | b0 b1]: llama.cpp interleaves the halves
    h = np.arange(4.0).reshape(4, 1)
    assert g.permute(h, 1).ravel().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_rope_freqs_are_recognized_as_llama_3_2_scaling():
    """make_baseline_ggufs.py writes the 1B shape's rope_freqs with its own formula; the export
    must name the rope_scaling that produced it."""
    g = _script("gguf_to_hf")
    mk = _script("make_baseline_ggufs")
    c = mk.LLAMA_32_1B
    div = mk.llama3_rope_factors(c)
    sc = g.rope_scaling_of(np.asarray(div, np.float64), c["rope_theta"], c["head_dim"])
    assert sc == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
    with pytest.raises(ValueError):
        g.rope_scaling_of(np.ones(c["head_dim"] // 2), c["rope_theta"], c["head_dim"])


def test_bf16_rounds_to_nearest_even():
    g = _script("gguf_to_hf")
    x = np.array([1.0, -2.5, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.0e38], np.float32)
    got = (g.to_dtype(x, "bf16").astype(np.uint32) << 16).view(np.float32)
    assert got[:2].tolist() == [1.0, -2.5]
    assert got[2] == 1.0                    # a tie goes to the even mantissa
    assert got[3] == 1.0 + 4 * 2 ** -8      # 1 + 3/256 rounds up to 1 + 4/256
    assert np.isfinite(got[4])


# ---------------------------------------------------------------- the Qwen3-MoE cut (issue 25)

def _dllama_q40(values: np.ndarray) -> np.ndarray:
    """distributed-llama's q40 quantizer (converter/writer.py), restated: per 32 values the scale is
    the value of largest magnitude / -8 (a negative one when tied), codes int(x / scale + 8.5) in 0..15,
    fp16 scale then 16 bytes of nibbles (element j low, j + 16 high)."""
    x = values.reshape(-1, 32).astype(np.float32)
    gmax, gmin = x.max(1), x.min(1)
    scale = np.where(-gmin > gmax, gmin, gmax) / np.float32(-8)
    inv = np.where(scale != 0, 1 / scale, 0).astype(np.float32)
    q = np.clip(x * inv[:, None] + np.float32(8.5), 0, 15).astype(np.uint8)
    return np.concatenate([scale.astype(np.float16).view(np.uint8).reshape(-1, 2), q[:, :16] | (q[:, 16:] << 4)], 1)


def test_q4_0_blocks_are_zero_mean_and_requantize_to_the_same_bytes():
    """The MoE cut's Q4_0 blocks: mean zero (a router over them spreads tokens), exact in float16, and
    distributed-llama's q40 quantizer gives back the very same bytes from their values; the 1B shape's
    generator (uniform codes, positive scales) has none of the three, which shows the checks can fail."""
    import gguf

    mk = _script("make_baseline_ggufs")
    for gen, ok in ((mk.random_q4_0_centred, True), (mk.random_q4_0, False)):
        blocks = gen(np.random.default_rng(5), 64, 2048, 0.02)
        v = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
        assert 0.015 < v.std() < 0.025
        assert (abs(v.mean()) < 0.01 * v.std()) == ok
        assert np.array_equal(v.astype(np.float16).astype(np.float32), v) == ok
        for vals in (v, v.astype(np.float16)):
            assert np.array_equal(_dllama_q40(np.asarray(vals, np.float32)), blocks.reshape(-1, 18)) == ok


def _tiny_qwen3moe(path: Path) -> None:
    from convert.synth import SHAPES
    from mpillm.formats.config import ModelConfig

    mk = _script("make_baseline_ggufs")
    cfg = ModelConfig(**{**SHAPES["qwen3-30b-a3b"], "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "head_dim": 32, "n_experts": 8, "n_experts_used": 2, "expert_ffn_dim": 64,
                         "vocab_size": 49152})
    mk.make_qwen3_moe_gguf(path, ftype="q4_0", cfg=cfg)


def _shard_arrays(path: Path) -> dict:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
    return out


def test_qwen3moe_export_converts_to_the_same_shards(tmp_path):
    """A tiny qwen3moe Q4_0 GGUF exported (float16 matrices, f32 router/norms) and converted by our
    converter gives shards equal, dataset by dataset, to converting the GGUF itself (both as f32, ranks
    of world sizes 1 and 2); the export has the names and config fields distributed-llama's converter
    reads for QWEN3_MOE (convert-hf.py), q/k in the checkpoint's own order (no llama permutation)."""
    import json

    from convert.shards import convert_model
    from convert.sources import open_source
    from safetensors import safe_open

    g = _script("gguf_to_hf")
    src = tmp_path / "tiny.gguf"
    _tiny_qwen3moe(src)
    hf = tmp_path / "hf"
    assert g.main([str(src), str(hf), "--dtype", "f16", "--check-all"]) == 0
    for s, out in ((src, tmp_path / "from_gguf"), (hf, tmp_path / "from_hf")):
        convert_model(open_source(s), out, [1, 2], weight_type="f32", progress=False)
    shards = sorted(p.relative_to(tmp_path / "from_gguf") for p in (tmp_path / "from_gguf").rglob("*.h5"))
    assert len(shards) == 3
    for rel in shards:
        a, b = _shard_arrays(tmp_path / "from_gguf" / rel), _shard_arrays(tmp_path / "from_hf" / rel)
        assert a.keys() == b.keys() and any("exp_down" in k for k in a)
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (rel, k)

    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["hidden_act"] == "silu" and cfg["rms_norm_eps"] == 1e-06
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], cfg["head_dim"]) == (8, 2, 64, 32)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "vocab_size", "rope_theta"):
        assert isinstance(cfg[key], (int, float)), key
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        want |= {p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
        want |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "mlp.gate.weight"}
        want |= {p + f"mlp.experts.{e}.{n}_proj.weight" for e in range(8) for n in ("gate", "up", "down")}
    with safe_open(str(hf / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == want
        assert f.get_tensor("model.layers.0.mlp.experts.3.down_proj.weight").shape == (64, 64)
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == np.float32     # the router stays f32
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").astype(np.float32)
    import gguf

    t = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == "blk.0.attn_q.weight")
    assert np.array_equal(q, gguf.quants.dequantize(t.data, t.tensor_type).reshape(q.shape))   # not permuted
