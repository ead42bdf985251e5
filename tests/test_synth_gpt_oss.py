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
from mpillm import quant
from mpillm.config import ModelConfig
from mpillm.partition import plan
from mpiutil import ROOT, mpi_env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "gpt-oss-tiny"
    r = subprocess.run([sys.executable, "-m", "convert", "synth", "--shape", "gpt-oss-tiny", str(out),
                        "--world-size", "1", "2", "4", "--weight-type", "q4_0", "--no-progress"],
                       cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("ws", [1, 2, 4])
def test_every_tensor_with_its_split_and_type(tiny, ws):
    cfg = ModelConfig(**SHAPES["gpt-oss-tiny"])
    names = N.model_tensors("gpt-oss", cfg.n_layers, tied=False)
    for rs in plan(cfg, ws):
        with h5py.File(tiny / f"ws{ws}" / f"rank{rs.tp_rank}.h5", "r") as f:
            for name in names:
                g = f[name]
                pat = N.pattern_of(name)
                full = logical_shape(cfg, name)
                shape = tuple(int(x) for x in g.attrs["shape"])
                assert len(shape) == len(full) and all(a <= b for a, b in zip(shape, full)), (name, shape, full)
                want = tensor_type("gpt-oss-tiny", pat, len(full), "q4_0")
                assert g.attrs["type"] == want, (name, g.attrs["type"], want)
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
