"""Qwen2 (q/k/v biases) under tensor parallelism, run inside ``mpirun -np N python -m pytest
--with-mpi`` for N = 1..4 (tests/test_mpi_suite.py); the fixture has 4 query heads, so these are
every world size it allows (3 and 4 ranks replicate a KV head, and its bias slices, on two ranks).

Oracles: the transformers logits committed in tests/fixtures/qwen2; the float64 numpy forward of
the same rounded weights (tests/reference_qwen3.py, biases included); the single-rank result on
rank 0 (COMM_SELF); the GGUF copy of the same weights; and an uneven --split against the even one.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
from mpi4py import MPI

from test_qwen3_mpi import converted, run
from test_split_mpi import SPLITS, convert_split_on_rank0
from test_tp_mpi import CROSS_RANK, FAKE_QUANT, FIXTURES, TOLERANCE, rel_rms, shared_tmpdir

sys.path.insert(0, str(FIXTURES.parent))
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
EXP = np.load(FIXTURES / "qwen2" / "expected.npz")


@pytest.fixture(scope="module")
def tmp():
    return shared_tmpdir()


@pytest.mark.mpi
@pytest.mark.parametrize("wtype", ["f32", "q8_0", "q4_0"])
def test_qwen2_fixture_logits(tmp, wtype):
    out = converted(tmp, "qwen2", wtype)
    logits, _ = run(out, EXP["tokens"])
    # at np 1 the single-rank result is this one: no self-comparison
    single = run(out, EXP["tokens"], MPI.COMM_SELF)[0] if rank == 0 and size > 1 else None
    if rank != 0:
        return
    err = rel_rms(logits, EXP["logits"])
    msg = f"qwen2 {wtype} np={size}: rel RMS vs transformers {err:.2e}"
    assert err < TOLERANCE[wtype], msg
    if size > 1:
        d = rel_rms(logits, single)
        msg += f", vs np=1 {d:.2e}"
        assert d < CROSS_RANK[wtype], msg
    if wtype == "f32":
        assert (logits.argmax(-1) == EXP["logits"].argmax(-1)).all(), msg
    else:
        from reference_qwen3 import qwen3_forward

        ref, _ = qwen3_forward(FIXTURES / "qwen2", EXP["tokens"], wtype)
        fq = rel_rms(logits, ref)
        msg += f", vs fake-quant float64 {fq:.2e}"
        assert fq < FAKE_QUANT[wtype], msg
    print("\n" + msg)


@pytest.mark.mpi
def test_qwen2_gguf_and_exact_sums(tmp):
    """The GGUF (arch qwen2, blk.N.attn_{q,k,v}.bias) gives the safetensors logits; token by token
    with --buffer-type f64 (the fused block's exact-sum variant) gives them too."""
    st, _ = run(converted(tmp, "qwen2", "f32"), EXP["tokens"])
    gg, _ = run(converted(tmp, "qwen2", "auto", gguf=True), EXP["tokens"])
    from mpillm.runtime.engine import Engine

    eng = Engine(converted(tmp, "qwen2", "f32"), max_seq_len=len(EXP["tokens"]) + 4, max_batch=4, comm=comm,
                 verbose=False, kv_type="f32", buffer_type="f64")
    if rank != 0:
        eng.serve()
        return
    toks = EXP["tokens"]
    ex = np.concatenate([eng.step(toks[t:t + 1], t, all_logits=True) for t in range(len(toks))])
    eng.stop()
    assert rel_rms(gg, st) < 1e-5, f"np={size}: GGUF vs safetensors {rel_rms(gg, st):.2e}"
    assert rel_rms(ex, st) < 1e-5, f"np={size}: f64 sums token by token vs f32 batch {rel_rms(ex, st):.2e}"
    assert rel_rms(gg, EXP["logits"]) < 1e-4


@pytest.mark.mpi
@pytest.mark.skipif(size < 2, reason="an uneven split needs at least 2 ranks")
def test_qwen2_uneven_split(tmp):
    """--split slices the biases with the heads: the same logits as the even split."""
    split = SPLITS[size][1]
    out = tmp / "qwen2-split"
    convert_split_on_rank0(FIXTURES / "qwen2", out, split, "f32")
    logits, _ = run(out, EXP["tokens"])
    even, _ = run(converted(tmp, "qwen2", "f32"), EXP["tokens"])
    if rank == 0:
        d, err = rel_rms(logits, even), rel_rms(logits, EXP["logits"])
        assert d < CROSS_RANK["f32"], f"np={size} split {split}: vs even {d:.2e}"
        assert err < TOLERANCE["f32"], f"np={size} split {split}: vs transformers {err:.2e}"
