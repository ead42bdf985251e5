"""gpt-oss under tensor parallelism, run inside ``mpirun -np N python -m pytest --with-mpi`` for
N = 1..4 (tests/test_mpi_suite.py launches them).

The fixture (tests/fixtures/gpt_oss, see its README section) has every gpt-oss feature switched on
so that dropping any one of them moves the logits by > 1: q/k/v/o biases, a sink per head, a
4-token sliding window on layer 0 (12 tokens), YaRN, 8 experts top-4 with router and expert
biases, SwiGLU clamps that bite. Its experts are MXFP4-representable, stored three ways: float
(model.safetensors), MXFP4 blocks (mxfp4/, the released checkpoints' form) and GGUF MXFP4.

Oracles: transformers' logits; the single-rank result (COMM_SELF); the GGUF against the
safetensors MXFP4 import (bit-identical expert shards); the batch against token by token.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpillm import format as fmt
from mpillm.engine import Engine
from test_tp_mpi import convert_on_rank0, rel_rms, shared_tmpdir

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gpt_oss"
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

# float experts (f32 kernels throughout): float32 rounding only
F32_TOL = 1e-4
# MXFP4 experts: the weights are exactly the fixture's, the experts' q8_0 activations add the
# error (measured at np 1-4: see the assertion message in the test log)
MXFP4_TOL = 3e-2


@pytest.fixture(scope="module")
def tmp() -> Path:
    return shared_tmpdir()


_done: set = set()


def converted(tmp: Path, form: str, split: list[float] | None = None) -> Path:
    """form: "float" (model.safetensors), "mxfp4" (mxfp4/), "gguf" (model.gguf); once per module."""
    out = tmp / (form + ("-split" if split else ""))
    if out not in _done:
        src = {"float": FIXTURE, "mxfp4": FIXTURE / "mxfp4", "gguf": FIXTURE / "model.gguf"}[form]
        if split:
            err = None
            if rank == 0:
                from convert.__main__ import convert

                try:
                    convert(src, out, [], "auto", progress=False, tokenizer=False, split=split)
                except Exception as e:  # noqa: BLE001
                    err = repr(e)
            assert comm.bcast(err, root=0) is None
        else:
            convert_on_rank0(src, out, sorted({1, size}), "auto")
        _done.add(out)
    return out


def run(model: Path, tokens: np.ndarray, c: MPI.Comm = comm, one_by_one: bool = False, kv_type: str = "f32"):
    eng = Engine(model, max_seq_len=len(tokens) + 4, max_batch=16, comm=c, verbose=False, kv_type=kv_type)
    out = None
    if c.Get_rank() == 0:
        if one_by_one:
            out = np.concatenate([eng.step(tokens[t:t + 1], t, all_logits=True) for t in range(len(tokens))])
        else:
            out = eng.step(tokens, 0, all_logits=True)
        eng.stop()
    else:
        eng.serve()
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("form", ["float", "mxfp4"])
def test_gpt_oss_logits(tmp, form):
    """Against transformers at this rank count, and against the single-rank result."""
    exp = np.load(FIXTURE / "expected.npz")
    out = converted(tmp, form)
    logits = run(out, exp["tokens"])
    single = run(out, exp["tokens"], MPI.COMM_SELF) if rank == 0 else None
    if rank != 0:
        return
    err, d = rel_rms(logits, exp["logits"]), rel_rms(logits, single)
    agree = float((logits.argmax(-1) == exp["logits"].argmax(-1)).mean())
    msg = f"gpt_oss {form} np={size}: rel RMS vs transformers {err:.2e}, vs np=1 {d:.2e}, argmax agree {agree:.2f}"
    print("\n" + msg)
    if form == "float":
        assert err < F32_TOL and agree == 1.0 and d < 1e-5, msg
    else:
        shard = fmt.Shard(out / fmt.shard_relpath(size, rank), size, rank)
        assert shard.get("layers/0/exp_gate").wtype == "mxfp4" and shard.get("layers/1/exp_down").wtype == "mxfp4"
        assert err < MXFP4_TOL and agree >= 0.9 and d < MXFP4_TOL, msg


@pytest.mark.mpi
def test_gpt_oss_gguf_equals_safetensors(tmp):
    """The GGUF and the HF MXFP4 checkpoint give bit-identical expert shards and the same logits
    (the GGUF stores the RMS epsilon as float32: the only difference)."""
    exp = np.load(FIXTURE / "expected.npz")
    gg, st = converted(tmp, "gguf"), converted(tmp, "mxfp4")
    a = fmt.Shard(gg / fmt.shard_relpath(size, rank), size, rank)
    b = fmt.Shard(st / fmt.shard_relpath(size, rank), size, rank)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        ta, tb = a.get(name), b.get(name)
        assert (ta.wtype, ta.shape) == (tb.wtype, tb.shape), name
        for k in ta.arrays:
            np.testing.assert_array_equal(ta.arrays[k], tb.arrays[k], err_msg=f"rank {rank} {name}/{k}")
    lg, ls = run(gg, exp["tokens"]), run(st, exp["tokens"])
    if rank == 0:
        assert rel_rms(lg, ls) < 1e-5, f"np={size}: GGUF vs safetensors {rel_rms(lg, ls):.2e}"


@pytest.mark.mpi
def test_gpt_oss_token_by_token_and_fp16_cache(tmp):
    """Fed one token at a time (each step reads the KV cache; layer 0's window drops old keys
    from position 4 on) the logits equal the one-batch prompt's; the default fp16 cache stays close."""
    exp = np.load(FIXTURE / "expected.npz")
    out = converted(tmp, "float")
    batch = run(out, exp["tokens"])
    steps = run(out, exp["tokens"], one_by_one=True)
    f16 = run(out, exp["tokens"], kv_type="f16")
    if rank == 0:
        assert rel_rms(steps, batch) < 1e-5, f"np={size}: token by token vs batch {rel_rms(steps, batch):.2e}"
        assert rel_rms(f16, exp["logits"]) < 5e-3, f"np={size}: fp16 KV cache {rel_rms(f16, exp['logits']):.2e}"


@pytest.mark.mpi
@pytest.mark.skipif(size < 2, reason="an uneven split needs at least 2 ranks")
def test_gpt_oss_uneven_split(tmp):
    """An uneven --split (rank 0 three times the others' share: uneven heads, sinks and expert
    rows) gives transformers' logits."""
    exp = np.load(FIXTURE / "expected.npz")
    out = converted(tmp, "mxfp4", split=[3.0] + [1.0] * (size - 1))
    m = fmt.read_manifest(out)
    assert fmt.split_of(m, size) is not None
    logits = run(out, exp["tokens"])
    if rank == 0:
        err = rel_rms(logits, exp["logits"])
        assert err < MXFP4_TOL, f"np={size} split 3:1..: rel RMS vs transformers {err:.2e}"
