"""deepseek2 (DeepSeek-V3/R1, Kimi-K2) pieces that need no MPI job: the float64 reference's two MLA
forms, config mapping (safetensors and GGUF), the router op, RoPE/softmax-scale tables, malformed
input, the synthetic shapes and the planner. The engine at 1-4 ranks: tests/mpi/test_deepseek_mpi.py."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import reference_deepseek as R
from convert import names as N
from convert.sources import GGUFSource, HFSource
from convert.synth import SHAPES, cut, logical_shape, synth
from mpillm import planner
from mpillm.formats import format as fmt
from mpillm.formats import quant
from mpillm.formats.config import ModelConfig
from mpillm.formats.partition import plan, rank_elements
from mpillm.runtime import mla, ops

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODELS = ["deepseek_v3", "deepseek_v3_qproj"]


@pytest.mark.parametrize("name", MODELS)
def test_absorbed_mla_equals_expanded(name):
    """Decoding token by token over the latent cache with kv_b folded into the query and applied
    after attention (absorbed) gives the expanded per-head K/V forward's logits to float64
    rounding; both give transformers' (float32) logits; routing is transformers'."""
    c, W = R.load(FIXTURES / name)
    exp = np.load(FIXTURES / name / "expected.npz")
    full, r_full = R.forward(c, W, exp["tokens"], absorbed=False)
    dec, r_dec = R.forward(c, W, exp["tokens"], absorbed=True)
    d = float(np.abs(dec - full).max() / np.abs(full).max())
    assert d < 1e-12, f"absorbed vs expanded: {d:.2e}"
    for a, b in zip(r_full, r_dec):
        np.testing.assert_array_equal(a, b)
    assert float(np.abs(full - exp["logits"]).max()) < 1e-5
    np.testing.assert_array_equal(np.sort(np.stack(r_full), -1), np.sort(exp["router_topk"], -1))


def test_hf_and_gguf_config_mapping():
    for name in MODELS:
        hf = HFSource(FIXTURES / name).config
        gg = GGUFSource(FIXTURES / name / "model.gguf").config
        assert gg == hf, name
    hf = HFSource(FIXTURES / "deepseek_v3").config
    assert (hf.arch, hf.n_heads, hf.n_kv_heads, hf.head_dim, hf.o_head_dim, hf.q_lora_rank, hf.kv_lora_rank) == \
        ("deepseek2", 4, 4, 48, 32, 32, 32)
    assert (hf.n_dense_layers, hf.n_shared_experts, hf.n_expert_groups, hf.n_groups_used, hf.router_scale) == (1, 1, 4, 2, 2.5)
    assert (hf.rope_scaling, hf.rope_factor, hf.rope_orig_context, hf.yarn_mscale_all_dim) == ("yarn", 40.0, 4096, 1.0)
    assert hf.router_func == "sigmoid" and hf.router_bias and hf.rope_interleave
    assert HFSource(FIXTURES / "deepseek_v3_qproj").config.q_lora_rank == 0
    assert hf.kv_values_per_token(4) == 48  # the latent cache: kv_lora + rope per token and layer


def test_gguf_tensors_equal_safetensors():
    """Both GGUF forms (attn_k_b/attn_v_b, and attn_kv_b for the q_proj variant) read as the
    safetensors import does, tensor for tensor (RoPE rows de-interleaved, kv_b split per head)."""
    for name in MODELS:
        hf, gg = HFSource(FIXTURES / name), GGUFSource(FIXTURES / name / "model.gguf")
        assert hf.names == gg.names
        for n in hf.names:
            a, b = hf.load(n), gg.load(n)
            va = a.values if a.values is not None else a.arrays["w"]
            vb = b.values if b.values is not None else b.arrays["w"]
            np.testing.assert_array_equal(np.asarray(va, np.float32), np.asarray(vb, np.float32), err_msg=f"{name} {n}")


# the files llama.cpp's own converter writes from the deepseek_v3 checkpoint (convert_hf_to_gguf.py
# --outtype f32 / q8_0; scripts/llamacpp_gguf_fixture.py, which records the llama.cpp version in
# tests/fixtures/deepseek_v3/llamacpp.json)
LLAMACPP = {"f32": "llamacpp-f32.gguf", "q8_0": "llamacpp-q8_0.gguf"}


@pytest.mark.parametrize("wtype", sorted(LLAMACPP))
def test_llamacpp_converter_gguf_reads_as_safetensors(wtype):
    """llama.cpp's real output (attn_k_b / attn_v_b split and transposed by the converter, stacked
    experts, exp_probs_b, its gating-function, dense-lead and YaRN keys) gives the safetensors import's
    config, and tensor for tensor its values: bit-equal in f32; in q8_0 the converter's blocks equal
    our q8_0 quantization of the safetensors (the tensors it keeps F32, norms and router, equal)."""
    hf, gg = HFSource(FIXTURES / "deepseek_v3"), GGUFSource(FIXTURES / "deepseek_v3" / LLAMACPP[wtype])
    assert gg.config == hf.config and gg.names == hf.names
    assert {t.split(".", 2)[-1] for t in gg.tensors if t.startswith("blk.1.")} >= \
        {"attn_k_b.weight", "attn_v_b.weight", "exp_probs_b.bias", "ffn_gate_exps.weight"}
    n_quant = 0
    for n in hf.names:
        a, b = hf.load(n), gg.load(n)
        va = np.asarray(a.values if a.values is not None else a.arrays["w"], np.float32)
        if b.wtype in (None, "f32"):
            np.testing.assert_array_equal(va, b.values if b.values is not None else b.arrays["w"], err_msg=n)
            continue
        assert (b.wtype, b.src_type) == (wtype, "Q8_0"), n
        want = quant.quantize(va.reshape(-1, va.shape[-1]), "q8_0")
        for k, v in b.arrays.items():
            np.testing.assert_array_equal(v.reshape(-1, v.shape[-1]), want[k], err_msg=f"{n} {k}")
        n_quant += 1
    assert n_quant == (0 if wtype == "f32" else 23)   # every matrix but the router


def test_llamacpp_converter_gguf_logits(tmp_path):
    """The engine (1 rank) on llama.cpp's f32 and q8_0 files, through the ordinary GGUF convert path
    (--weight-type auto), gives the logits of the safetensors import (f32; q8_0 requantized by us)
    to 1e-6 of the largest logit, and transformers' logits (f32)."""
    from mpi4py import MPI

    from convert.__main__ import convert
    from mpillm.runtime.engine import Engine

    exp = np.load(FIXTURES / "deepseek_v3" / "expected.npz")

    def logits(src: Path, wtype: str, out: Path) -> np.ndarray:
        convert(src, out, [1], wtype, progress=False, tokenizer=False)
        eng = Engine(out, max_seq_len=16, max_batch=16, comm=MPI.COMM_SELF, verbose=False, kv_type="f32")
        lg = eng.step(exp["tokens"], 0, all_logits=True).copy()
        eng.stop()
        return lg

    for wtype in sorted(LLAMACPP):
        st = logits(FIXTURES / "deepseek_v3", wtype, tmp_path / f"st-{wtype}")
        gg = logits(FIXTURES / "deepseek_v3" / LLAMACPP[wtype], "auto", tmp_path / f"gg-{wtype}")
        d = float(np.abs(gg - st).max() / np.abs(st).max())
        print(f"\nllama.cpp {wtype} GGUF vs safetensors ({wtype}): max|dlogit|/max|logit| {d:.1e}")
        assert d <= 1e-6, f"llama.cpp {wtype} GGUF vs safetensors: {d:.2e}"
        if wtype == "f32":
            assert float(np.abs(gg - exp["logits"]).max()) < 1e-4
            assert (gg.argmax(-1) == exp["logits"].argmax(-1)).all()


@pytest.mark.parametrize("wtype", ["f32", "q8_0"])
def test_jitted_head_loops_equal_the_per_head_calls(tmp_path, wtype):
    """MLA's per-head loops (fold kv_b's key half into each head's query, its value half into each
    head's output) run as one jitted call each (mpillm.runtime.fused.mla_heads); the Python loop
    over the heads, kernel call by kernel call, is kept for MPILLM_FUSED=0. Both give the same
    logits bit for bit, for a prompt and for a decode step after it. Control (by hand): the jitted
    loop's query scale left out (put_cols(qlat, qabs, e * W, 1.0)) fails both types."""
    from mpi4py import MPI

    from convert.__main__ import convert
    from mpillm.runtime.engine import Engine

    exp = np.load(FIXTURES / "deepseek_v3" / "expected.npz")
    convert(FIXTURES / "deepseek_v3", tmp_path / "m", [1], wtype, progress=False, tokenizer=False)
    eng = Engine(tmp_path / "m", max_seq_len=32, max_batch=16, comm=MPI.COMM_SELF, verbose=False, kv_type="f32")
    try:
        assert eng.model.mla_heads is not None
        toks = exp["tokens"]
        runs = []
        for heads in (eng.model.mla_heads, None):
            eng.model.mla_heads = heads
            prompt = eng.step(toks, 0, all_logits=True).copy()
            step = eng.step(toks[:1], len(toks), all_logits=True).copy()
            runs.append((prompt, step))
        np.testing.assert_array_equal(runs[0][0], runs[1][0])
        np.testing.assert_array_equal(runs[0][1], runs[1][1])
        if wtype == "f32":
            assert float(np.abs(runs[0][0] - exp["logits"]).max()) < 1e-4
    finally:
        eng.stop()


@pytest.mark.parametrize("wtype,cols,ns,kept", [("q8_0", 64, 1, "q8_0"), ("q8_0", 128, 2, "q8_0"), ("q8_0", 64, 4, "f32"),
                                                 ("q6_K", 512, 2, "q6_K"), ("q6_K", 512, 4, "q6_K_32"),
                                                 ("q4_K", 256, 1, "q4_K")])
def test_quantized_shared_expert_down_split(wtype, cols, ns, kept):
    """A quantized ffn_down_shexp (dim, ns * I) becomes (ns, dim, I) with each shared expert's
    columns, bit-exactly: its blocks split (a K-quant whose super-blocks straddle two experts re-encoded
    per 32 columns), float32 values when an expert has fewer columns than a block."""
    from convert.sources import SrcTensor, _as_values, _mla_fix

    cfg = ModelConfig(**{**SHAPES["deepseek-tiny"], "n_shared_experts": ns})
    rng = np.random.default_rng(3)
    raw = quant.random_arrays(wtype, 8, cols, rng) if wtype != "q8_0" else \
        quant.quantize(rng.standard_normal((8, cols)).astype(np.float32), "q8_0")
    want = quant.dequantize(raw, wtype).reshape(8, ns, cols // ns).transpose(1, 0, 2)
    out = _mla_fix(cfg, "layers/1/shexp_down", SrcTensor(wtype, dict(raw), None, wtype.upper()))
    assert out.wtype == kept and next(iter(out.arrays.values())).shape[:2] == (ns, 8)
    np.testing.assert_array_equal(_as_values(out), want)


def test_gguf_without_gating_func_refused(tmp_path):
    """llama.cpp reads a deepseek2 file without expert_gating_func as DeepSeek-V2's softmax router (its
    converter writes the key only from scoring_func): refused naming the key, not run as sigmoid.
    The key is renamed in place (same length), so the copy is otherwise llama.cpp's file."""
    raw = (FIXTURES / "deepseek_v3" / LLAMACPP["f32"]).read_bytes()
    key = b"deepseek2.expert_gating_func"
    assert raw.count(key) == 1
    (tmp_path / "m.gguf").write_bytes(raw.replace(key, key[:-1] + b"X"))
    with pytest.raises(ValueError, match="expert_gating_func is missing, which llama.cpp reads as the softmax"):
        GGUFSource(tmp_path / "m.gguf")


def test_rope_rows_deinterleaved():
    """wq_b's RoPE rows: per head the nope rows unchanged, the rope rows (2i, 2i+1) -> (i, i + rope/2)."""
    src = HFSource(FIXTURES / "deepseek_v3")
    c, W = R.load(FIXTURES / "deepseek_v3")
    ours = np.asarray(src.load("layers/0/wq_b").arrays["w"]).reshape(4, 48, -1)
    raw = W["model.layers.0.self_attn.q_b_proj.weight"].reshape(4, 48, -1)
    np.testing.assert_array_equal(ours[:, :32], raw[:, :32])
    np.testing.assert_array_equal(ours[:, 32:40], raw[:, 32::2])
    np.testing.assert_array_equal(ours[:, 40:], raw[:, 33::2])


def test_rope_tables_and_softmax_scale():
    c, _ = R.load(FIXTURES / "deepseek_v3")
    cfg = HFSource(FIXTURES / "deepseek_v3").config
    cos, sin = mla.rope_tables(cfg, 64)
    rc, rs = R.rope_tables(c, 64)
    np.testing.assert_allclose(cos, rc, atol=1e-6)
    np.testing.assert_allclose(sin, rs, atol=1e-6)
    assert mla.softmax_scale(cfg) == pytest.approx(R.softmax_scale(c), rel=1e-12)
    assert mla.softmax_scale(cfg) == pytest.approx(48 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)


@pytest.mark.parametrize("groups,used,corr", [(4, 2, True), (4, 2, False), (1, 1, True), (4, 4, True)])
def test_router_op_matches_reference(groups, used, corr):
    rng = np.random.default_rng(7)
    T, E, k = 32, 8, 3
    logits = rng.standard_normal((T, E)).astype(np.float32)
    bias = (0.3 * rng.standard_normal(E)).astype(np.float32)
    c = {"n_routed_experts": E, "num_experts_per_tok": k, "n_group": groups, "topk_group": used,
         "routed_scaling_factor": 2.5, "norm_topk_prob": True}
    W = {"p.mlp.gate.weight": np.eye(E), "p.mlp.gate.e_score_correction_bias": bias.astype(np.float64)}
    drop = () if corr else ("bias",)
    idx_ref, w_ref = R.route(c, W, "p.", logits.astype(np.float64), drop)
    idx, w = np.zeros((T, k), np.int64), np.zeros((T, k), np.float32)
    ops.route_sigmoid_groups(logits, bias, corr, groups, used, True, 2.5, idx, w, np.zeros((2, E)), np.zeros((2, groups)))
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(idx_ref, -1))
    order = np.argsort(idx, -1)
    np.testing.assert_allclose(np.take_along_axis(w, order, -1),
                               np.take_along_axis(w_ref, np.argsort(idx_ref, -1), -1), rtol=1e-6)
    assert np.allclose(w.sum(-1), 2.5, rtol=1e-6)


def test_partition_mla():
    """Heads split unevenly with divmod; wo's columns count v_head_dim per head; every rank caches
    the whole latent; the replicated down-projections count on every rank."""
    cfg = ModelConfig(**SHAPES["deepseek-v3"])
    s = plan(cfg, 3)
    assert [x.heads for x in s] == [(0, 43), (43, 86), (86, 128)]
    assert cfg.o_head_dim == 128 and cfg.kv_values_per_token(43) == 576
    e = [rank_elements(cfg, x) for x in s]
    assert e[0]["attn"] > e[2]["attn"]
    down = (1536 + 576) * 7168 * 61
    per_head = (1536 * 192 + 512 * 128 + 128 * 512 + 128 * 7168) * 61
    assert e[0]["attn"] == down + 43 * per_head
    rs = plan(cfg, 8)[0]
    assert planner.kv_bytes(cfg, rs, 1000, "f16") == 61 * 576 * 1000 * 2


@pytest.mark.parametrize("shape,heads,experts,vocab,dense", [("deepseek-v3", 128, 256, 129280, 3),
                                                             ("kimi-k2", 64, 384, 163840, 1)])
def test_full_shapes_known_to_the_planner(shape, heads, experts, vocab, dense):
    cfg, _ = planner.model_config(shape)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_experts, cfg.vocab_size, cfg.n_dense_layers) == \
        (7168, 61, heads, experts, vocab, dense)
    total = sum(int(np.prod(logical_shape(cfg, n))) for n in N.model_tensors(cfg.arch, cfg.n_layers, False, cfg=cfg))
    # DeepSeek-V3: 671B (its 685B checkpoint adds the 14B multi-token-prediction layer); Kimi-K2: 1.03T ("1T")
    want = {"deepseek-v3": 671e9, "kimi-k2": 1026e9}[shape]
    assert abs(total - want) / want < 0.01, f"{shape}: {total / 1e9:.1f}B parameters"
    p = planner.predict(cfg, [20.0] * 8, planner.LINKS["10gbe"])
    assert p["ranks"] == 8 and p["ms_per_token"] > 0
    c4 = cut(cfg, 4)
    assert (c4.n_layers, c4.n_dense_layers) == (4, min(dense, 3))
    # the RoPE and router constants of each config.json (sources in convert/synth.py)
    assert (cfg.rope_theta, cfg.rope_factor, cfg.rope_orig_context, cfg.yarn_beta_fast, cfg.yarn_beta_slow,
            cfg.yarn_mscale, cfg.yarn_mscale_all_dim, cfg.router_scale, cfg.context_length,
            cfg.n_expert_groups, cfg.n_groups_used, cfg.n_shared_experts, cfg.n_experts_used) == {
        "deepseek-v3": (10000.0, 40.0, 4096, 32.0, 1.0, 1.0, 1.0, 2.5, 163840, 8, 4, 1, 8),
        "kimi-k2": (50000.0, 32.0, 4096, 1.0, 1.0, 1.0, 1.0, 2.827, 131072, 1, 1, 1, 8)}[shape]


def test_synth_tiny_matches_converter_layout(tmp_path):
    """convert synth writes every deepseek2 tensor in the shapes the converter's shards have."""
    synth("deepseek-tiny", tmp_path, [1, 3], progress=False)
    cfg = ModelConfig(**SHAPES["deepseek-tiny"])
    for ws in (1, 3):
        for rs in plan(cfg, ws):
            sh = fmt.Shard(tmp_path / fmt.shard_relpath(ws, rs.tp_rank), ws, rs.tp_rank)
            assert set(sh.tensors) == set(N.model_tensors("deepseek2", 2, False, cfg=cfg))
            h = rs.n_heads_per_partition
            assert sh.get("layers/1/wk_b").shape == (h, 64, 32)
            assert sh.get("layers/1/wv_b").shape == (h, 32, 64)
            assert sh.get("layers/1/wq_b").shape == (h * 48, 64)
            assert sh.get("layers/1/wo").shape == (128, h * 32)
            assert sh.get("layers/1/shexp_down").shape == (1, 128, rs.expert_ffn_per_partition)
            assert sh.get("layers/0/w_gate").shape == (rs.ffn_per_partition, 128) and rs.ffn_per_partition != \
                rs.expert_ffn_per_partition
            assert sh.get("layers/1/wkv_a").shape == (80, 128)
    # the engine runs it (the dense FFN wider than the experts: their own buffers), and the prompt
    # token by token over the latent cache gives the batch's logits
    from mpi4py import MPI

    from mpillm.runtime.engine import Engine

    eng = Engine(tmp_path, max_seq_len=16, max_batch=8, comm=MPI.COMM_SELF, verbose=False, kv_type="f32")
    toks = [1, 5, 9, 200, 3]
    batch = eng.step(toks, 0, all_logits=True).copy()
    steps = np.concatenate([eng.step(toks[t:t + 1], t, all_logits=True) for t in range(len(toks))])
    eng.stop()
    assert np.isfinite(batch).all() and batch.std() > 0
    np.testing.assert_allclose(steps, batch, rtol=1e-5, atol=1e-5 * np.abs(batch).max())


def _hf_copy(tmp_path: Path, **changes) -> Path:
    src = FIXTURES / "deepseek_v3"
    d = json.loads((src / "config.json").read_text())
    d.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(d))
    os.symlink(src / "model.safetensors", tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("changes,match", [
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"attention_bias": True}, "attention_bias"),
    ({"kv_lora_rank": None}, "kv_lora_rank"),
    ({"n_group": 3}, "groups"),
    ({"v_head_dim": 16}, "kv_b has shape"),
])
def test_malformed_checkpoints_name_the_key(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        src = HFSource(_hf_copy(tmp_path, **changes))
        for n in src.names:
            src.load(n)


def test_missing_tensor_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(FIXTURES / "deepseek_v3" / "model.safetensors"))
    del sd["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((FIXTURES / "deepseek_v3" / "config.json").read_text())
    with pytest.raises(ValueError, match="e_score_correction_bias is missing"):
        HFSource(tmp_path)


def test_config_checks():
    base = dict(SHAPES["deepseek-tiny"])
    with pytest.raises(ValueError, match="head_dim 40 must be qk_nope_dim"):
        ModelConfig(**{**base, "head_dim": 40})
    with pytest.raises(ValueError, match="n_kv_heads = n_heads"):
        ModelConfig(**{**base, "n_kv_heads": 1})
    with pytest.raises(ValueError, match="scores a group by its top two"):
        ModelConfig(**{**base, "n_expert_groups": 8, "n_groups_used": 2})
    cfg = ModelConfig(**base)
    assert dataclasses.replace(cfg, n_layers=2) == cfg
