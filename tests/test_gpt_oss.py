"""gpt-oss without MPI: the converter's three sources of the fixture (float safetensors, MXFP4
safetensors, GGUF) read the same model, the MXFP4 experts are imported bit for bit, and the
clamped SwiGLU. The forward at 1-4 ranks: tests/mpi/test_gpt_oss_mpi.py."""
from pathlib import Path

import numpy as np
import pytest

from convert.sources import open_source
from mpillm.runtime import ops
from mpillm.formats import quant

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt_oss"


def test_three_sources_one_config():
    f, m, g = (open_source(p).config for p in (FIXTURE, FIXTURE / "mxfp4", FIXTURE / "model.gguf"))
    assert f == m
    assert g.norm_eps == pytest.approx(f.norm_eps, rel=1e-6)  # GGUF keeps it as float32
    g.norm_eps = f.norm_eps
    assert g == f
    assert (f.arch, f.n_experts, f.n_experts_used, f.expert_ffn_dim, f.ffn_dim) == ("gpt-oss", 8, 4, 128, 0)
    assert (f.sliding_window, f.sliding_layers, f.window(0), f.window(1)) == (4, [0], 4, 0)
    assert (f.rope_scaling, f.rope_factor, f.rope_orig_context, f.yarn_truncate) == ("yarn", 32.0, 4096, False)
    assert f.o_bias and f.attn_sinks and f.expert_bias and f.ffn_act == "swiglu_oai"


def test_mxfp4_experts_copied_bit_for_bit():
    """HF blocks/scales -> our mxfp4 arrays equal the GGUF's (llama.cpp's repacking), and their
    values are the float checkpoint's experts exactly (no re-quantization anywhere)."""
    m, g, f = (open_source(p) for p in (FIXTURE / "mxfp4", FIXTURE / "model.gguf", FIXTURE))
    for name in ("layers/0/exp_gate", "layers/0/exp_up", "layers/1/exp_down"):
        a, b = m.load(name), g.load(name)
        assert a.wtype == b.wtype == "mxfp4"
        for k in ("qs", "e"):
            np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=f"{name}/{k}")
        want = f.load(name).arrays["w"]
        flat = {k: v.reshape(-1, v.shape[-1]) for k, v in a.arrays.items()}
        np.testing.assert_array_equal(quant.dequantize(flat, "mxfp4").reshape(want.shape), want)
    # gate/up biases: the even / odd halves of the fused bias, as the GGUF splits it
    for name in ("layers/1/exp_gate_b", "layers/1/exp_up_b"):
        np.testing.assert_array_equal(m.load(name).values, g.load(name).arrays["w"])


def test_swiglu_oai_clamps():
    g = np.array([[-9.0, -1.0, 0.0, 0.5, 6.9, 7.0, 12.0]], np.float32)
    u = np.array([[-12.0, -7.5, 0.3, -0.2, 8.0, 1.0, -3.0]], np.float32)
    out = np.zeros_like(g)
    ops.swiglu_oai(g, u, 1.702, 7.0, out)
    gc, uc = np.minimum(g.astype(np.float64), 7.0), np.clip(u.astype(np.float64), -7.0, 7.0)
    want = (uc + 1) * gc / (1 + np.exp(-1.702 * gc))
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    assert out[0, 6] == pytest.approx(-2 * 7 / (1 + np.exp(-1.702 * 7)), rel=1e-6)  # gate 12 -> 7, up -3


def test_weight_type_leaves_mxfp4_experts_alone(tmp_path):
    """--weight-type q8_0 on the MXFP4 checkpoint: attention and embeddings become q8_0, the experts
    stay the checkpoint's MXFP4 blocks (as the released gpt-oss GGUFs are)."""
    from convert.__main__ import convert
    from mpillm.formats import format as fmt

    convert(FIXTURE / "mxfp4", tmp_path / "m", [1], "q8_0", progress=False, tokenizer=False)
    sh = fmt.Shard(tmp_path / "m" / fmt.shard_relpath(1, 0), 1, 0)
    assert sh.get("layers/0/wq").wtype == sh.get("tok_embd").wtype == "q8_0"
    assert sh.get("layers/0/exp_up").wtype == "mxfp4" and sh.get("layers/0/router").wtype == "f32"
    want = open_source(FIXTURE / "mxfp4").load("layers/0/exp_up").arrays
    for k in ("qs", "e"):
        np.testing.assert_array_equal(sh.get("layers/0/exp_up").arrays[k], want[k])
