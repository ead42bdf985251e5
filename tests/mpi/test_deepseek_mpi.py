"""DeepSeek-V3 (deepseek2) under tensor parallelism, run inside ``mpirun -np N python -m pytest
--with-mpi`` for N = 1..4 (tests/test_mpi_suite.py launches them).

The fixtures (tests/fixtures/deepseek_v3{,_qproj}, made by make_fixtures.py from transformers'
DeepseekV3ForCausalLM): 4 heads of MLA (q_lora 32 / plain q_proj, kv_lora 32, nope 32, rope 16,
v 32), YaRN x40 with mscale 1, one dense layer then a MoE layer of 8 experts in 4 groups (top-3
from the best 2 groups, sigmoid scores, a correction bias), one shared expert, scale 2.5. At 3 ranks
the heads split 2/1/1; the expert FFN (128) splits in 32-blocks.

Oracles: transformers' logits and routing; the single-rank result (COMM_SELF); the GGUF copies
(llama.cpp's names; attn_k_b/attn_v_b and the older attn_kv_b); the prompt fed token by token
(absorbed decoding over the latent cache) against the prompt in one batch. Negative controls
switch one feature off in the running engine and the logits must leave the tolerance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpillm.formats import format as fmt
from mpillm.runtime.engine import Engine
from test_tp_mpi import CROSS_RANK, TOLERANCE, convert_on_rank0, rel_rms, shared_tmpdir

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
MODELS = ["deepseek_v3", "deepseek_v3_qproj"]
# the uneven split against the even one at the same rank count (f32 weights): only float32
# summation order differs
SPLIT_VS_EVEN = 1e-5
# a feature switched off must move the logits by at least this (relative RMS): 100x the f32 tolerance
CONTROL_MIN = 1e-2


@pytest.fixture(scope="module")
def tmp() -> Path:
    return shared_tmpdir()


_done: set = set()


def converted(tmp: Path, name: str, wtype: str = "f32", gguf: str | None = None, split: list[float] | None = None) -> Path:
    """``gguf``: a GGUF file of the fixture's directory to convert instead of its safetensors."""
    out = tmp / f"{name}-{wtype}{'-' + gguf if gguf else ''}{'-split' if split else ''}"
    if out not in _done:
        src = FIXTURES / name / gguf if gguf else FIXTURES / name
        if split:
            err = None
            if rank == 0:
                from convert.__main__ import convert

                try:
                    convert(src, out, [], wtype, progress=False, tokenizer=False, split=split)
                except Exception as e:  # noqa: BLE001
                    err = repr(e)
            assert comm.bcast(err, root=0) is None
        else:
            convert_on_rank0(src, out, sorted({1, size}), wtype)
        _done.add(out)
    return out


def run(model: Path, tokens: np.ndarray, c: MPI.Comm = comm, one_by_one: bool = False, patch=None,
        log_routes: bool = False, kv_type: str = "f32"):
    """(logits (T, vocab) on rank 0 else None, this rank's route log). ``patch(model)`` changes the
    engine's model on every rank before the step (negative controls)."""
    eng = Engine(model, max_seq_len=len(tokens) + 4, max_batch=16, comm=c, verbose=False, kv_type=kv_type)
    if patch is not None:
        patch(eng.model)
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
@pytest.mark.parametrize("name,wtype", [(m, "f32") for m in MODELS] + [("deepseek_v3", "q8_0")])
def test_deepseek_fixture_logits(tmp, name, wtype):
    """transformers' logits at np=N, and (f32 weights) its routing: the experts picked and their
    weights on every rank; np=N against np=1."""
    exp = np.load(FIXTURES / name / "expected.npz")
    out = converted(tmp, name, wtype)
    logits, routes = run(out, exp["tokens"], log_routes=True)
    if wtype == "f32":
        np.testing.assert_array_equal(np.sort(routes[0][0], -1), np.sort(exp["router_topk"][0], -1),
                                      err_msg=f"rank {rank}: experts picked")
        np.testing.assert_allclose(np.sort(routes[0][1], -1), np.sort(exp["router_weights"][0], -1), atol=1e-5)
    single = run(out, exp["tokens"], MPI.COMM_SELF)[0] if rank == 0 else None
    if rank != 0:
        return
    err, d = rel_rms(logits, exp["logits"]), rel_rms(logits, single)
    msg = f"{name} {wtype} np={size}: rel RMS vs transformers {err:.2e}, vs np=1 {d:.2e}"
    print("\n" + msg)
    assert err < TOLERANCE[wtype], msg
    if wtype == "f32":
        assert (logits.argmax(-1) == exp["logits"].argmax(-1)).all(), msg
    assert d < CROSS_RANK[wtype], msg


@pytest.mark.mpi
def test_deepseek_decode_matches_prompt(tmp):
    """The prompt token by token (each step attends over the latent cache the earlier steps
    wrote) gives the logits of the whole prompt in one batch, with an f32 and an f16 latent cache."""
    exp = np.load(FIXTURES / "deepseek_v3" / "expected.npz")
    out = converted(tmp, "deepseek_v3")
    batch, _ = run(out, exp["tokens"])
    steps, _ = run(out, exp["tokens"], one_by_one=True)
    steps16, _ = run(out, exp["tokens"], one_by_one=True, kv_type="f16")
    if rank == 0:
        d, d16 = rel_rms(steps, batch), rel_rms(steps16, exp["logits"])
        print(f"\ndeepseek_v3 np={size}: token by token vs batch {d:.2e}; fp16 latent cache vs transformers {d16:.2e}")
        assert d < 1e-5, f"np={size}: token by token vs batch rel RMS {d:.2e}"
        assert d16 < TOLERANCE["f16"], f"np={size}: fp16 latent cache rel RMS {d16:.2e}"


@pytest.mark.mpi
@pytest.mark.parametrize("name,gguf,wtype", [(m, "model.gguf", "f32") for m in MODELS] +
                         [("deepseek_v3", "llamacpp-f32.gguf", "f32"), ("deepseek_v3", "llamacpp-q8_0.gguf", "q8_0")])
def test_deepseek_gguf_matches_safetensors(tmp, name, gguf, wtype):
    """deepseek2 GGUFs in llama.cpp's naming give the safetensors import's logits: our writer's
    (attn_k_b/attn_v_b, or attn_kv_b for the q_proj variant), and the files llama.cpp's own converter
    wrote (f32, and q8_0 against the safetensors quantized to q8_0 by us: the same blocks)."""
    exp = np.load(FIXTURES / name / "expected.npz")
    st, _ = run(converted(tmp, name, wtype), exp["tokens"])
    gg, _ = run(converted(tmp, name, "auto", gguf=gguf), exp["tokens"])
    if rank == 0:
        d = rel_rms(gg, st)
        print(f"\n{name} {gguf} np={size}: GGUF vs safetensors ({wtype}) {d:.2e}")
        assert d < 1e-6, f"{name} {gguf} np={size}: GGUF vs safetensors {d:.2e}"


@pytest.mark.mpi
@pytest.mark.skipif(size < 2, reason="an uneven split needs at least 2 ranks")
def test_deepseek_uneven_split(tmp):
    """--split ..,1,3 (the last rank three times the others' share): uneven heads (1/3 at 2 ranks,
    1/1/2 at 3, where the even split is 2/1/1) and uneven expert, shared-expert and dense-FFN blocks;
    transformers' logits, and the even split's to float32 rounding. (At 4 ranks every rank must
    hold one head and one of the 4 expert blocks: the split is the even one.)"""
    exp = np.load(FIXTURES / "deepseek_v3" / "expected.npz")
    out = converted(tmp, "deepseek_v3", split=[1.0] * (size - 1) + [3.0])
    assert fmt.split_of(fmt.read_manifest(out), size) is not None
    logits, _ = run(out, exp["tokens"])
    even, _ = run(converted(tmp, "deepseek_v3"), exp["tokens"])
    if rank == 0:
        err, d = rel_rms(logits, exp["logits"]), rel_rms(logits, even)
        print(f"\ndeepseek_v3 np={size} split ..1:3: rel RMS vs transformers {err:.2e}, vs the even split {d:.2e}")
        assert err < TOLERANCE["f32"] and d < SPLIT_VS_EVEN


def _no_corr(m):
    for L in m.layers:
        if L.moe:
            L.router_corr = None


def _no_groups(m):
    m.cfg = type(m.cfg).from_dict({**m.cfg.to_dict(), "n_expert_groups": 1, "n_groups_used": 1})


def _no_shared(m):
    for L in m.layers:
        if L.moe:
            L.shexp_gate, L.shexp_up, L.shexp_down = [], [], []


def _no_mscale(m):
    m.mla_q_scale /= (0.1 * m.cfg.yarn_mscale_all_dim * np.log(m.cfg.rope_factor) + 1.0) ** 2


@pytest.mark.mpi
@pytest.mark.parametrize("what,patch", [("correction bias", _no_corr), ("group limit", _no_groups),
                                        ("shared expert", _no_shared), ("YaRN mscale", _no_mscale)])
def test_deepseek_negative_controls(tmp, what, patch):
    """Each feature matters: without it the engine's logits leave transformers' by far more than
    the tolerance the real run meets."""
    exp = np.load(FIXTURES / "deepseek_v3" / "expected.npz")
    out = converted(tmp, "deepseek_v3")
    bad, _ = run(out, exp["tokens"], patch=patch)
    if rank == 0:
        err = rel_rms(bad, exp["logits"])
        print(f"\ndeepseek_v3 np={size} without the {what}: rel RMS vs transformers {err:.2e}")
        assert err > CONTROL_MIN, f"without the {what}: only {err:.2e}"
