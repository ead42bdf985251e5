"""Continuous batching against one sequence at a time, at every rank count (tests/test_mpi_suite.py
runs this file under mpirun -np 1..4 with a timeout).

Oracles: the same request run alone through the same engine (greedy, --buffer-type f64 so the
partial sums are exact and a row's result cannot depend on the Allreduce order or its batch);
the transformers logits committed in tests/fixtures for rows of a mixed batch (f32 buffers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpillm.runtime.engine import Engine
from mpillm.runtime.steps import OUT_LOGITS
from mpillm.startup import resolve_model
from mpillm.serving.sampling import SamplingParams
from mpillm.serving.service import Service

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
    "The three laws of thermodynamics are",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to",
    "Hello",
]


@pytest.fixture(scope="module")
def bundled():
    """(engine with 4 slots and 16 rows per step, tokenizer on rank 0) on the bundled model."""
    from mpillm.formats.tokenizer import load_tokenizer

    model = resolve_model(None, comm)
    eng = Engine(model, max_seq_len=160, max_batch=16, n_slots=4, comm=comm, verbose=False, buffer_type="f64")
    tok = load_tokenizer(Path(model)) if rank == 0 else None
    return eng, tok


def on_rank0(eng: Engine, fn):
    """Run fn() on rank 0 while the other ranks follow its steps; returns fn's result on rank 0."""
    box = {}
    eng.drive(lambda: box.setdefault("r", fn()) and 0)
    return box.get("r")


def run_alone(svc: Service, ids: list[int], params: SamplingParams) -> list[int]:
    return [t for o in svc.stream(ids, params) for t in o.token_ids]


def collect(handles) -> dict:
    """Drain finished handles' queues: request id -> (token ids, finish reason, text)."""
    out = {}
    for h in handles:
        toks, text, reason = [], "", None
        while not h.outputs.empty():
            o = h.outputs.get()
            toks += o.token_ids
            text += o.text
            reason = o.finish_reason or reason
        out[h.request_id] = (toks, reason, text)
    return out


@pytest.mark.mpi
def test_batched_greedy_equals_alone(bundled):
    """8 sequences of different prompt lengths, arriving at different steps into 4 slots (so
    some wait, and long prompts are prefilled in chunks beside running decodes), each give
    exactly the tokens they give alone."""
    eng, tok = bundled

    def fn():
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        ids = [tok.encode(p) for p in PROMPTS]
        svc = Service(eng, tok)
        alone = [run_alone(svc, i, params) for i in ids]
        svc = Service(eng, tok)  # fresh slots: no prefix left from the runs alone
        handles, waited, steps = [], 0, 0
        for k, i in enumerate(ids):
            handles.append(svc.submit(i, params))
            for _ in range(k % 3):  # staggered arrivals: 0, 1 or 2 steps between submissions
                svc.step()
                steps += 1
            waited = max(waited, svc.metrics()["queue_len"])
        while not all(h.finished for h in handles):
            assert svc.step()
            steps += 1
        got = collect(handles)
        m = svc.metrics()
        assert waited > 0, "more requests than slots must queue"
        assert m["requests_finished"] == len(ids) and m["slots_busy"] == 0 and m["queue_len"] == 0
        for h, want, p in zip(handles, alone, PROMPTS):
            toks, reason, _ = got[h.request_id]
            assert toks == want, f"np={size} {p!r}: batched {toks} != alone {want}"
            assert reason == "length"
        # fewer steps than the runs alone needed: decode rows of several sequences share a step
        assert steps < sum(len(a) for a in alone)
        return True

    assert on_rank0(eng, fn) or rank != 0


@pytest.mark.mpi
def test_sampled_sequence_same_alone_and_in_batch(bundled):
    eng, tok = bundled

    def fn():
        ids = tok.encode(PROMPTS[3])
        params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                                repetition_penalty=1.1, ignore_eos=True)
        alone = run_alone(Service(eng, tok), ids, params)
        svc = Service(eng, tok)
        others = [svc.submit(tok.encode(p), SamplingParams(max_tokens=10, ignore_eos=True)) for p in PROMPTS[:2]]
        others.append(svc.submit(tok.encode(PROMPTS[5]), SamplingParams(max_tokens=10, temperature=1.0, seed=9)))
        h = svc.submit(ids, params)
        while not h.finished:
            svc.step()
        toks = collect([h])[h.request_id][0]
        assert toks == alone, f"np={size}: sampled in a batch {toks} != alone {alone}"
        # a different seed gives a different sequence (the seed is used)
        other = run_alone(Service(eng, tok), ids, SamplingParams(**{**params.__dict__, "seed": 99}))
        assert other != alone
        while svc.step():
            pass
        return True

    assert on_rank0(eng, fn) or rank != 0


@pytest.mark.mpi
def test_prefix_reuse_equals_cold_prefill(bundled):
    """The next turn of a chat prefills only its new part, and gives the cold-prefill tokens."""
    eng, tok = bundled

    def fn():
        params = SamplingParams(max_tokens=10, ignore_eos=True)
        turn1 = tok.encode(PROMPTS[2])
        svc = Service(eng, tok)
        reply = run_alone(svc, turn1, params)
        turn2 = turn1 + reply + tok.encode("<|im_end|>\n<|im_start|>user\nAnd three more?<|im_end|>\n"
                                           "<|im_start|>assistant\n", add_bos=False)
        outs = list(svc.stream(turn2, params))
        warm = [t for o in outs for t in o.token_ids]
        # the slot held turn1 and the reply except the reply's last token (never run through the model)
        assert outs[-1].cached_tokens == len(turn1) + len(reply) - 1
        assert svc.metrics()["cached_tokens_total"] == outs[-1].cached_tokens
        cold_svc = Service(eng, tok)
        cold = list(cold_svc.stream(turn2, params))
        assert cold[-1].cached_tokens == 0
        assert warm == [t for o in cold for t in o.token_ids]
        return True

    assert on_rank0(eng, fn) or rank != 0


@pytest.mark.mpi
def test_slot_reuse_leaks_nothing(bundled):
    """A long sequence, then an unrelated short one in the same slot, gives what the short one gives
    over a cache full of NaN: nothing past a sequence's own positions is ever read."""
    eng, tok = bundled
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    def after_long():
        svc = Service(eng, tok, parallel=1)
        run_alone(svc, tok.encode(PROMPTS[6] * 3), SamplingParams(max_tokens=30, ignore_eos=True))
        return run_alone(svc, tok.encode(PROMPTS[4]), params)

    got = on_rank0(eng, after_long)
    m = eng.model
    nan = np.float16(np.nan).view(np.uint16) if m.k_cache.dtype == np.uint16 else np.nan
    m.k_cache[...] = nan  # every rank poisons its own cache
    m.v_cache[...] = nan
    ref = on_rank0(eng, lambda: run_alone(Service(eng, tok, parallel=1), tok.encode(PROMPTS[4]), params))
    m.k_cache[...] = 0
    m.v_cache[...] = 0
    if rank == 0:
        assert got == ref, f"np={size}: after another sequence {got} != over a poisoned cache {ref}"


@pytest.mark.mpi
def test_poisoning_a_live_position_changes_the_output(bundled):
    """Positive control for the test above: the same poisoning, but at a position the sequence does
    read (its cached prefix, reused by the second run of the same prompt), does change the tokens;
    so an equality over a poisoned cache means the poisoned positions were never read."""
    eng, tok = bundled
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ids = tok.encode(PROMPTS[3]) if rank == 0 else None
    box = {}

    def first():
        box["svc"] = Service(eng, tok, parallel=1)
        return run_alone(box["svc"], ids, params)

    clean = on_rank0(eng, first)
    m = eng.model
    bad = np.float16(8.0).view(np.uint16) if m.k_cache.dtype == np.uint16 else np.float32(8.0)
    m.k_cache[:, 0, :, 1:4] = bad      # every rank: positions 1-3 of slot 0, inside the cached prompt
    m.v_cache[:, 0, :, 1:4] = bad
    again = on_rank0(eng, lambda: run_alone(box["svc"], ids, params))   # reuses the cached prefix
    m.k_cache[...] = 0
    m.v_cache[...] = 0
    if rank == 0:
        assert box["svc"].metrics()["cached_tokens_total"] > 3     # the second run read the cache
        assert again != clean, f"np={size}: poisoning positions 1-3 of the live prefix changed nothing"


@pytest.mark.mpi
def test_queue_cancel_and_bad_prompts(bundled):
    eng, tok = bundled

    def fn():
        svc = Service(eng, tok, parallel=1)
        with pytest.raises(ValueError, match=r"prompt has 200 tokens but --ctx-size 160"):
            svc.submit([1] * 200, SamplingParams())
        with pytest.raises(ValueError, match="max_tokens"):
            svc.submit([1, 2], SamplingParams(max_tokens=0))
        with pytest.raises(ValueError, match="empty"):
            svc.submit([], SamplingParams())
        a = svc.submit(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=50, ignore_eos=True))
        b = svc.submit(tok.encode(PROMPTS[1]), SamplingParams(max_tokens=3, ignore_eos=True))
        for _ in range(3):
            svc.step()
        assert svc.metrics()["queue_len"] == 1 and svc.metrics()["slots_busy"] == 1  # b waits, not dropped
        svc.cancel(a.request_id)
        svc.step()  # a ends and frees its slot; b is admitted in the same step
        assert a.finished and svc.metrics()["queue_len"] == 0
        while not b.finished:
            svc.step()
        got = collect([a, b])
        ra, rb = got[a.request_id], got[b.request_id]
        assert ra[1] == "cancelled" and 0 < len(ra[0]) < 50
        assert rb[1] == "length" and len(rb[0]) == 3
        svc.cancel("no-such-request")  # unknown ids are ignored
        assert not svc.step()
        return True

    assert on_rank0(eng, fn) or rank != 0


@pytest.mark.mpi
def test_stop_strings_and_eos(bundled):
    eng, tok = bundled

    def fn():
        svc = Service(eng, tok)
        ids = tok.encode(PROMPTS[0])
        full = "".join(o.text for o in svc.stream(ids, SamplingParams(max_tokens=20, ignore_eos=True)))
        assert "Paris" in full
        cut = full.index("Paris")
        outs = list(svc.stream(ids, SamplingParams(max_tokens=20, stop=("aris",), ignore_eos=True)))
        assert "".join(o.text for o in outs) == full[:cut + 1]
        assert outs[-1].finish_reason == "stop"
        # a stop token id ends the sequence without its text
        first = run_alone(svc, ids, SamplingParams(max_tokens=20, ignore_eos=True))
        outs = list(svc.stream(ids, SamplingParams(max_tokens=20, stop_token_ids=(first[2],), ignore_eos=True)))
        cut = first.index(first[2])
        assert [t for o in outs for t in o.token_ids] == first[:cut + 1]
        assert outs[-1].finish_reason == "stop"
        assert "".join(o.text for o in outs) == tok.decode(first[:cut]), "the stop token's text must be left out"
        assert tok.decode(first[:cut + 1]) != tok.decode(first[:cut])      # (it has text to leave out)
        # end of sequence: the chat prompt's answer ends on an EOS id, alone and in a batch beside
        # sequences that do not end, and the EOS token's text is not in the output
        chat = tok.encode(PROMPTS[2])
        eos_params = SamplingParams(max_tokens=100)
        alone = list(Service(eng, tok).stream(chat, eos_params))
        toks = [t for o in alone for t in o.token_ids]
        assert alone[-1].finish_reason == "stop" and toks[-1] in tok.eos_ids and len(toks) < 100, toks
        assert "".join(o.text for o in alone) == tok.decode(toks[:-1])
        svc = Service(eng, tok)
        hs = [svc.submit(tok.encode(p), SamplingParams(max_tokens=30, ignore_eos=True)) for p in PROMPTS[:2]]
        h = svc.submit(chat, eos_params)
        while not all(x.finished for x in hs + [h]):
            svc.step()
        got = collect(hs + [h])
        assert got[h.request_id] == (toks, "stop", "".join(o.text for o in alone)), got[h.request_id]
        assert all(got[x.request_id][1] == "length" and len(got[x.request_id][0]) == 30 for x in hs)
        return True

    assert on_rank0(eng, fn) or rank != 0


@pytest.mark.mpi
def test_mixed_batch_rows_match_transformers(tmp_path_factory):
    """One step mixing a decode row, prompt chunks of two slots and rows that need no output:
    every output row's logits match the transformers fixture at its position (f32 buffers)."""
    from test_tp_mpi import convert_on_rank0, rel_rms, shared_tmpdir

    exp = np.load(FIXTURES / "llama" / "expected.npz")
    toks = np.asarray(exp["tokens"], np.int64)
    out = shared_tmpdir() / "llama-f32-batch"
    convert_on_rank0(FIXTURES / "llama", out, [size], "f32")
    eng = Engine(out, max_seq_len=len(toks) + 4, max_batch=32, n_slots=3, comm=comm, verbose=False, kv_type="f32")

    def fn():
        n = len(toks)
        h = n // 2
        # step 1: slot 0 takes the first half; slot 2 the first 3 tokens
        eng.run(np.r_[toks[:h], toks[:3]], np.r_[np.arange(h), np.arange(3)], np.r_[np.zeros(h), np.full(3, 2)])
        # step 2: slot 2 decodes token 3; slot 0 the second half; slot 1 the whole sequence; all output
        t = np.r_[toks[3], toks[h:], toks]
        p = np.r_[3, np.arange(h, n), np.arange(n)]
        s = np.r_[2, np.zeros(n - h), np.ones(n)]
        rows = np.arange(len(t))
        ids, logits = eng.run(t, p, s, rows, np.full(len(rows), OUT_LOGITS))
        ref = exp["logits"]
        assert ids is None and logits.shape == (len(t), ref.shape[1])
        assert rel_rms(logits[:1], ref[3:4]) < 1e-4
        assert rel_rms(logits[1:1 + n - h], ref[h:]) < 1e-4
        assert rel_rms(logits[1 + n - h:], ref) < 1e-4
        # the greedy path of the same rows gives the same tokens as the argmax of the logits
        ids2, none = eng.run(t[:1], p[:1], s[:1], np.array([0]), np.array([0]))
        assert none is None and ids2[0] == int(np.argmax(ref[3]))
        return True

    assert on_rank0(eng, fn) or rank != 0
