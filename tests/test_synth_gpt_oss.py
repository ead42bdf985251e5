"""`python -m convert synth --shape gpt-oss-*`: every gpt-oss tensor in its shard with its split
shape and type (experts MXFP4 whatever --weight-type says), for several world sizes, and the
full shapes' sizes (gpt-oss-20b 12.1 GB of weights, as the released MXFP4 GGUF; -120b about 63 GB)."""
from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from convert import names as N
from convert.synth import SHAPES, logical_shape, tensor_type
from mpillm.formats import quant
from mpillm.formats.config import ModelConfig
from mpillm.formats.partition import plan
from mpiutil import ROOT, mpi_env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "gpt-oss-tiny"
    r = subprocess.run([sys.executable, "-m", "convert", "synth", "--shape", "gpt-oss-tiny", str(out),
                        "--world-size", "1", "2", "4", "--weight-type", "q4_0", "--no-progress"],
                       cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def planned(cfg: ModelConfig, rs, short: str) -> tuple[tuple[int, ...], str]:
    """(shape, type) rank rs must hold of one gpt-oss tensor, written out from gpt-oss's definition
    and the rank's planned slice (not from convert.synth): its query heads, the KV heads they read,
    its vocabulary rows and its slice of every expert's hidden size; replicated tensors whole.
    Types: vectors, the router and the expert bias tables float32, the experts MXFP4 (as gpt-oss
    ships them, whatever --weight-type says), every other matrix the --weight-type (q4_0 here)."""
    D, hd, E = cfg.dim, cfg.head_dim, cfg.n_experts
    q, kv = rs.n_heads_per_partition * hd, rs.n_kv_heads_per_partition * hd
    ef, V = rs.expert_ffn_per_partition, rs.vocab_per_partition
    shapes = {
        "tok_embd": (V, D), "output": (V, D), "output_norm": (D,), "attn_norm": (D,), "ffn_norm": (D,),
        "wq": (q, D), "wk": (kv, D), "wv": (kv, D), "wo": (D, q), "bq": (q,), "bk": (kv,), "bv": (kv,),
        "bo": (D,), "sinks": (rs.n_heads_per_partition,), "router": (E, D), "router_b": (E,),
        "exp_gate": (E, ef, D), "exp_up": (E, ef, D), "exp_down": (E, D, ef),
        "exp_gate_b": (E, ef), "exp_up_b": (E, ef), "exp_down_b": (E, D),
    }
    shape = shapes[short]
    if len(shape) == 1 or short in ("router", "exp_gate_b", "exp_up_b", "exp_down_b"):
        return shape, "f32"
    return shape, "mxfp4" if short in ("exp_gate", "exp_up", "exp_down") else "q4_0"


@pytest.mark.parametrize("ws", [1, 2, 4])
def test_every_tensor_with_its_split_and_type(tiny, ws):
    cfg = ModelConfig(**SHAPES["gpt-oss-tiny"])
    names = N.model_tensors("gpt-oss", cfg.n_layers, tied=False)
    assert "layers/0/bq" in names                    # q/k/v biases
    slices = plan(cfg, ws)
    if ws > 1:   # the slices really split: every rank holds fewer heads than the model has
        assert all(rs.n_heads_per_partition < cfg.n_heads for rs in slices)
    for rs in slices:
        with h5py.File(tiny / f"ws{ws}" / f"rank{rs.tp_rank}.h5", "r") as f:
            for name in names:
                g = f[name]
                pat = N.pattern_of(name)
                shape = tuple(int(x) for x in g.attrs["shape"])
                want_shape, want = planned(cfg, rs, pat.split("/")[-1])
                assert shape == want_shape, (ws, rs.tp_rank, name, shape, want_shape)
                assert g.attrs["type"] == want, (name, g.attrs["type"], want)
                assert tensor_type("gpt-oss-tiny", pat, len(logical_shape(cfg, name)), "q4_0") == want, name
                if pat in ("layers/{i}/exp_gate", "layers/{i}/exp_up", "layers/{i}/exp_down"):
                    assert want == "mxfp4"
                    w = quant.dequantize({k: g[k][...].reshape(-1, g[k].shape[-1]) for k in g}, "mxfp4")
                    assert np.isfinite(w).all() and 0.0 < np.abs(w).mean() < 1.0
    # the ranks' expert hidden slices add up to the whole expert FFN
    if ws > 1:
        total = 0
        for r in range(ws):
            with h5py.File(tiny / f"ws{ws}" / f"rank{r}.h5", "r") as f:
                total += int(f["layers/0/exp_gate"].attrs["shape"][1])
        assert total == cfg.expert_ffn_dim


@pytest.mark.parametrize("shape,gb", [("gpt-oss-20b", (11.9, 12.3)), ("gpt-oss-120b", (60.0, 66.0))])
def test_full_shapes_weigh_what_the_released_models_do(shape, gb):
    cfg = ModelConfig(**SHAPES[shape])
    total = 0
    for name in N.model_tensors("gpt-oss", cfg.n_layers, tied=False):
        full = logical_shape(cfg, name)
        t = tensor_type(shape, N.pattern_of(name), len(full), "q8_0")
        n = int(np.prod(full))
        total += n * {"f32": 4, "q8_0": 34 / 32, "mxfp4": 17 / 32}[t]
    assert gb[0] < total / 1e9 < gb[1], total / 1e9


def test_baseline_gguf_script_writes_the_gpt_oss_layout_llama_cpp_names(tmp_path):
    """scripts/make_baseline_ggufs.py --only gpt-oss-tiny: llama.cpp's gpt-oss tensor names and types
    (MXFP4 experts), the harmony control tokens at gpt-oss's ids, and mpillm's converter takes it."""
    import gguf

    r = subprocess.run([sys.executable, "scripts/make_baseline_ggufs.py", "--only", "gpt-oss-tiny", "--out-dir",
                        str(tmp_path)], cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    path = tmp_path / "gpt-oss-tiny-shape-mxfp4.gguf"
    rd = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in rd.tensors}
    cfg = ModelConfig(**SHAPES["gpt-oss-tiny"])
    for i in range(cfg.n_layers):
        for part in ("gate", "up", "down"):
            assert types[f"blk.{i}.ffn_{part}_exps.weight"] == "MXFP4"
            assert types[f"blk.{i}.ffn_{part}_exps.bias"] == "F32"
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            assert types[f"blk.{i}.{t}.weight"] == "Q8_0" and types[f"blk.{i}.{t}.bias"] == "F32"
        assert types[f"blk.{i}.attn_sinks.weight"] == "F32" and f"blk.{i}.post_attention_norm.weight" in types
    assert rd.fields["general.architecture"].contents() == "gpt-oss"
    assert rd.fields["gpt-oss.expert_count"].contents() == cfg.n_experts
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, "-m", "convert", str(path), str(out), "--world-size", "1", "2",
                        "--no-progress"], cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with h5py.File(out / "ws2" / "rank0.h5", "r") as f:
        assert f["layers/0/exp_gate"].attrs["type"] == "mxfp4" and f["layers/1/wq"].attrs["type"] == "q8_0"


def test_full_gguf_shapes_match_the_synth_shapes():
    """The GGUF script's gpt-oss-20b / -120b tensors hold as many weights as the synth shards."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_baseline_ggufs as M

    for shape in ("gpt-oss-20b", "gpt-oss-120b"):
        cfg = ModelConfig(**SHAPES[shape])
        gg = sum(int(np.prod(s)) for _, s, _, _ in M.gpt_oss_tensors(cfg))
        ours = sum(int(np.prod(logical_shape(cfg, n))) for n in N.model_tensors("gpt-oss", cfg.n_layers, False))
        assert gg == ours, (shape, gg, ours)
