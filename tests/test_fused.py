"""The whole-block jitted path (mpillm.runtime.fused) computes what the per-kernel path does: the same
kernels in the same order; LLVM may contract a float operation differently once the small ops
are inlined into the block, so agreement is to float32 rounding, not bitwise."""
import numpy as np
import pytest
from mpi4py import MPI

from mpiutil import ROOT


@pytest.mark.parametrize("wtype", ["q4_1", "f16"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_fused_equals_unfused(tmp_path, monkeypatch, wtype, name):
    from convert.__main__ import convert
    from mpillm.runtime.engine import Engine

    fix = ROOT / "tests" / "fixtures" / name
    convert(fix, tmp_path / "m", [1], wtype, progress=False, tokenizer=False)
    toks = np.load(fix / "expected.npz")["tokens"]
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MPILLM_FUSED", flag)
        eng = Engine(tmp_path / "m", max_seq_len=32, max_batch=8, comm=MPI.COMM_SELF, verbose=False)
        assert (eng.model.fused is not None) == (flag == "1")
        prefill = eng.step(toks, 0, all_logits=True)  # two batches of up to 8
        step = eng.step(toks[:1], len(toks))
        out[flag] = (prefill, step)
    for a, b in zip(out["1"], out["0"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
