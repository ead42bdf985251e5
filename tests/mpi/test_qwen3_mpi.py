"""Qwen3 and Qwen3-MoE under tensor parallelism, run inside ``mpirun -np N python -m pytest --with-mpi``
for N = 1..4 (tests/test_mpi_suite.py launches them).

Oracles: the transformers logits and routing committed in tests/fixtures/qwen3{,_moe}; a float64
numpy forward of the same weights rounded to the stored type (tests/reference_qwen3.py); the
single-rank result on rank 0 (COMM_SELF); and the GGUF copy of the same weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpillm.runtime.engine import Engine
from test_tp_mpi import CROSS_RANK, FAKE_QUANT, TOLERANCE, convert_on_rank0, rel_rms, shared_tmpdir

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES.parent))
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
MODELS = ["qwen3", "qwen3_moe"]

# Engine (q8_0 activations, float32 arithmetic) against the float64 forward of the same rounded
# weights (FAKE_QUANT, from test_tp_mpi), over the tokens the engine routes like the reference (MoE:
# the activation noise can flip a close router call; q4_0 flips 1 of 24 token-layers here, a 0.0012
# probability gap, and that token then differs by ~24%). Measured at np 1-4: q8_0 2.2e-2 dense /
# 1.4e-2 MoE, q4_0 2.3e-2 / 1.5e-2, q4_1 2.3e-2 / 1.6e-2.


@pytest.fixture(scope="module")
def tmp() -> Path:
    return shared_tmpdir()


_converted: set = set()


def converted(tmp: Path, name: str, wtype: str, gguf: bool = False) -> Path:
    """The fixture converted for world sizes 1 and this job's, once per module."""
    out = tmp / f"{name}-{wtype}{'-gguf' if gguf else ''}"
    if out not in _converted:
        src = FIXTURES / name / "model.gguf" if gguf else FIXTURES / name
        convert_on_rank0(src, out, sorted({1, size}), wtype)
        _converted.add(out)
    return out


def run(model: Path, tokens: np.ndarray, c: MPI.Comm = comm, max_batch: int = 16, log_routes: bool = False,
        one_by_one: bool = False):
    """(logits (T, vocab) on rank 0 else None, this rank's route log or None).

    The whole prompt goes in one batch (max_batch >= T), or token by token with ``one_by_one``."""
    eng = Engine(model, max_seq_len=len(tokens) + 4, max_batch=max_batch, comm=c, verbose=False,
                 kv_type="f32")  # the oracle tolerances are an f32 cache's
    if log_routes:
        eng.model.route_log = []
    out = None
    if c.Get_rank() == 0:
        if one_by_one:
            out = np.concatenate([eng.step(tokens[t:t + 1], t, all_logits=True) for t in range(len(tokens))])
        else:
            out = eng.step(tokens, 0, all_logits=True)
        eng.stop()
    else:
        eng.serve()
    return out, eng.model.route_log


@pytest.mark.mpi
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("wtype", ["f32", "q8_0", "q4_0", "q4_1"])
def test_qwen_fixture_logits(tmp, name, wtype):
    exp = np.load(FIXTURES / name / "expected.npz")
    out = converted(tmp, name, wtype)
    logits, routes = run(out, exp["tokens"], log_routes=True)
    single = run(out, exp["tokens"], MPI.COMM_SELF)[0] if rank == 0 else None
    if rank != 0:
        return
    err, d = rel_rms(logits, exp["logits"]), rel_rms(logits, single)
    msg = f"{name} {wtype} np={size}: rel RMS vs transformers {err:.2e}, vs np=1 {d:.2e}"
    if wtype == "f32":
        assert err < TOLERANCE[wtype], msg
        assert (logits.argmax(-1) == exp["logits"].argmax(-1)).all(), msg
    else:
        from reference_qwen3 import qwen3_forward

        ref, ref_topk = qwen3_forward(FIXTURES / name, exp["tokens"], wtype)
        same = np.ones(len(ref), bool)  # tokens routed like the reference in every layer
        if ref_topk is not None:
            ours = np.sort(np.stack([idx for idx, _ in routes]), -1)
            same = (ours == np.sort(ref_topk, -1)).all(-1).all(0)
        fq = rel_rms(logits[same], ref[same])
        msg += f", vs fake-quant float64 {fq:.2e} over {same.sum()}/{len(same)} tokens routed alike"
        assert fq < FAKE_QUANT[wtype], msg
        assert same.mean() >= 0.75, msg
        assert err < TOLERANCE[wtype], msg
    assert d < CROSS_RANK[wtype], msg
    print("\n" + msg)


@pytest.mark.mpi
def test_moe_routing_and_batching(tmp):
    """Experts picked (and their weights) for a 12-token batch equal transformers' on every rank; the
    same tokens fed one by one give the same routing and logits as the batch."""
    exp = np.load(FIXTURES / "qwen3_moe" / "expected.npz")
    tokens, n_layers = exp["tokens"], exp["router_topk"].shape[0]
    out = converted(tmp, "qwen3_moe", "f32")
    batch, log = run(out, tokens, log_routes=True)
    assert len(log) == n_layers
    for li, (idx, w) in enumerate(log):
        np.testing.assert_array_equal(idx, exp["router_topk"][li], err_msg=f"rank {rank} layer {li}")
        np.testing.assert_allclose(w, exp["router_weights"][li], atol=1e-5, err_msg=f"rank {rank} layer {li}")
    steps, log1 = run(out, tokens, log_routes=True, one_by_one=True)
    assert len(log1) == n_layers * len(tokens)
    for t in range(len(tokens)):
        for li in range(n_layers):
            idx, _ = log1[t * n_layers + li]
            np.testing.assert_array_equal(idx[0], exp["router_topk"][li, t], err_msg=f"token {t} layer {li}")
    if rank == 0:
        d = rel_rms(steps, batch)
        assert d < 1e-5, f"np={size}: batched prompt vs token by token: rel RMS {d:.2e}"


@pytest.mark.mpi
@pytest.mark.parametrize("name", MODELS)
def test_qwen_gguf_matches_safetensors(tmp, name):
    """The GGUF copy (arch qwen3/qwen3moe, not permuted, no norm_topk_prob key) gives the same logits."""
    exp = np.load(FIXTURES / name / "expected.npz")
    st, _ = run(converted(tmp, name, "f32"), exp["tokens"])
    gg, _ = run(converted(tmp, name, "auto", gguf=True), exp["tokens"])
    if rank == 0:
        assert rel_rms(gg, st) < 1e-5, f"{name} np={size}: GGUF vs safetensors {rel_rms(gg, st):.2e}"
        assert rel_rms(gg, exp["logits"]) < 1e-4
