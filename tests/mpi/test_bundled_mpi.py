"""The bundled SmolLM2-135M-Instruct (Q4_1 GGUF, converted bit-exactly) at every rank count
against one rank (computed in the same job on rank 0 with COMM_SELF).

With ``--buffer-type f64`` (exact float64 sums in the row-parallel layers) the greedy tokens
are the same at every rank count. With the default f32: rank counts change the order in which the row-parallel partial sums are added (Allreduce),
which can flip a q8_0 activation rounding and so move logits by the activation-quantization
noise (~1e-2 relative); greedy decoding then follows the other branch wherever the top two
logits are closer than that. So the check is teacher-forced on the single-rank greedy
sequence: same argmax wherever the single-rank top-2 margin exceeds MARGIN, logits close.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpillm.runtime.engine import Engine
from mpillm.startup import resolve_model

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
]
N_TOKENS = 32
# logits: np=N moves the gap between np=1's top two logits by up to 1.0 on these prompts
# (measured at np 2 and 3, f32 and f16 KV caches: p99 0.17-0.80), from q8_0 activation
# roundings that the Allreduce order flips; argmax must agree wherever the gap is larger
MARGIN = 1.25
REL_RMS = 6e-2   # the q8_0 activation noise level: np=1 vs np=3 measured 3.0e-2


def open_engine(c: MPI.Comm, buffer_type: str = "f32") -> Engine:
    return Engine(resolve_model(None, c), max_seq_len=128, max_batch=64, comm=c, verbose=False,
                  buffer_type=buffer_type)


def greedy(eng: Engine, ids: list[int]) -> list[int]:
    out = [eng.step_greedy(ids, 0)]
    while len(out) < N_TOKENS:
        out.append(eng.step_greedy([out[-1]], len(ids) + len(out) - 1))
    return out


@pytest.mark.mpi
def test_bundled_exact_greedy_same_at_every_rank_count():
    """--buffer-type f64: the same 32 greedy tokens for each prompt as on one rank."""
    from mpillm.formats.tokenizer import load_tokenizer

    ids, single = None, None
    if rank == 0:
        tok = load_tokenizer(Path(resolve_model(None, MPI.COMM_SELF)))
        ids = [tok.encode(p) for p in PROMPTS]
        eng = open_engine(MPI.COMM_SELF, "f64")
        single = [greedy(eng, i) for i in ids]
        assert "Paris" in tok.decode(single[0]), tok.decode(single[0])
    ids = comm.bcast(ids, root=0)
    eng = open_engine(comm, "f64")
    if rank != 0:
        eng.serve()
        return
    for p, i, ref in zip(PROMPTS, ids, single):
        got = greedy(eng, i)
        assert got == ref, f"np={comm.Get_size()} {p!r}:\n{tok.decode(got)!r}\nnp=1:\n{tok.decode(ref)!r}"
    eng.stop()


@pytest.mark.mpi
def test_bundled_greedy_at_every_rank_count():
    """Default f32 sums: teacher-forced agreement with one rank."""
    from mpillm.formats.tokenizer import load_tokenizer

    seqs, ref = None, None
    if rank == 0:
        tok = load_tokenizer(Path(resolve_model(None, MPI.COMM_SELF)))
        eng = open_engine(MPI.COMM_SELF)
        seqs, ref = [], []
        for p in PROMPTS:
            ids = tok.encode(p)
            logits, out = eng.step(ids, 0), []
            for _ in range(N_TOKENS):
                out.append(int(logits[0].argmax()))
                logits = eng.step([out[-1]], len(ids) + len(out) - 1)
            seqs.append((ids, out))
            ref.append(eng.step(ids + out, 0, all_logits=True)[len(ids) - 1:-1])
        assert "Paris" in tok.decode(seqs[0][1]), tok.decode(seqs[0][1])
    seqs = comm.bcast(seqs, root=0)
    eng = open_engine(comm)
    if rank != 0:
        eng.serve()
        return
    for p, (ids, out), r in zip(PROMPTS, seqs, ref):
        got = eng.step(ids + out, 0, all_logits=True)[len(ids) - 1:-1]  # (N_TOKENS, vocab)
        top2 = np.sort(r, axis=1)[:, -2:]
        sure = (top2[:, 1] - top2[:, 0]) > MARGIN
        agree = got.argmax(1) == np.asarray(out)
        rel = float(np.sqrt(np.mean((got - r) ** 2) / np.mean(r ** 2)))
        print(f"\nnp={comm.Get_size()} {p[:20]!r}: argmax agrees at {agree.sum()}/{N_TOKENS} "
              f"({sure.sum()} with margin > {MARGIN}), rel RMS {rel:.2e}")
        assert agree[sure].all(), f"{p!r}: argmax differs where np=1 was sure: {np.nonzero(sure & ~agree)[0]}"
        assert rel < REL_RMS, f"{p!r}: logits differ from np=1 by {rel:.2e}"
    eng.stop()
