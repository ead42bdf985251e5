"""mpillm.serving.scheduler without MPI: what rows a step carries, chunked prefill under a token budget,
queueing, prefix reuse and draft rows."""
from __future__ import annotations

import pytest

from mpillm.runtime.steps import OUT_GREEDY, OUT_LOGITS
from mpillm.serving.scheduler import Scheduler, Sequence


def seq(i: int, n: int, logits: bool = False, first: int = 100) -> Sequence:
    return Sequence(f"s{i}", list(range(first, first + n)), n, wants_logits=logits)


def finish_step(s: Scheduler, plan, token: int = 7) -> None:
    """What the service does after a step: every sequence with an output row gets a token."""
    s.advance(plan)
    for q in {id(q): q for q in plan.out_seqs}.values():
        q.tokens.append(token)


def test_decode_rows_first_then_prompt_chunks_in_the_budget():
    s = Scheduler(n_slots=3, ctx=64, batch_tokens=8)
    a, b = seq(0, 3), seq(1, 20, logits=True)
    s.add(a)
    s.admit()
    p = s.plan()
    assert list(p.tokens) == [100, 101, 102] and list(p.positions) == [0, 1, 2]
    assert list(p.out_rows) == [2] and list(p.kinds) == [OUT_GREEDY]
    finish_step(s, p)
    s.add(b)
    assert s.admit() == [b]
    p = s.plan()  # a decodes one row; b's prompt gets the other 7
    assert p.n_rows == 8 and list(p.tokens[:1]) == [7] and list(p.positions[:1]) == [3]
    assert list(p.tokens[1:]) == list(range(100, 107)) and list(p.slots[1:]) == [b.slot.index] * 7
    assert list(p.out_rows) == [0]  # b's chunk does not reach its last token: no output row
    finish_step(s, p)
    assert b.n_cached == 7 and a.n_cached == 4
    while b.pending > 1:
        p = s.plan()
        finish_step(s, p)
    # b's last chunk ends with its last prompt token, which needs its logits
    assert p.kinds[-1] == OUT_LOGITS and p.out_seqs[-1] is b
    assert len(b.tokens) == 21 and b.n_cached == 20


def test_more_sequences_than_slots_wait_in_order():
    s = Scheduler(n_slots=2, ctx=64, batch_tokens=8)
    qs = [seq(i, 4, first=10 * i) for i in range(4)]
    for q in qs:
        s.add(q)
    assert s.admit() == qs[:2] and list(s.waiting) == qs[2:]
    s.remove(qs[0])  # finished
    assert s.admit() == [qs[2]] and list(s.waiting) == [qs[3]]
    assert qs[2].slot.index == 0 and s.busy == 2


def test_prompt_must_fit_the_context():
    s = Scheduler(n_slots=1, ctx=16, batch_tokens=4)
    with pytest.raises(ValueError, match="16 tokens; a slot holds 16"):
        s.add(seq(0, 16))
    with pytest.raises(ValueError, match="batch-tokens 2 must be at least --parallel 3"):
        Scheduler(n_slots=3, ctx=16, batch_tokens=2)


def test_prefix_reuse_takes_the_slot_with_the_longest_prefix():
    s = Scheduler(n_slots=3, ctx=64, batch_tokens=16)
    a, b = seq(0, 6, first=0), seq(1, 6, first=50)
    for q in (a, b):
        s.add(q)
    s.admit()
    finish_step(s, s.plan())
    s.remove(a)
    s.remove(b)
    assert s.slots[b.slot.index if b.slot else 1].cached == list(range(50, 56))
    turn2 = Sequence("t", list(range(50, 56)) + [7, 9, 9], 9)
    s.add(turn2)
    s.admit()
    # the slot holds 50..55; the reply's 7 was sampled but never run through the model
    assert turn2.slot.index == 1 and turn2.n_reused == turn2.n_cached == 6
    p = s.plan()
    assert list(p.tokens) == [7, 9, 9] and list(p.positions) == [6, 7, 8]
    # a prompt equal to the cached tokens still runs its last token (its logits are needed)
    same = Sequence("u", list(range(0, 6)), 6)
    s.add(same)
    s.admit()
    assert same.slot.index == 0 and same.n_cached == 5


def test_drafts_become_output_rows_and_are_trimmed_to_the_budget():
    s = Scheduler(n_slots=2, ctx=12, batch_tokens=6)
    a, b = seq(0, 4), seq(1, 4, first=200)
    for q in (a, b):
        s.add(q)
    s.admit()
    while a.pending > 1 or b.pending > 1:
        finish_step(s, s.plan())
    a.draft, b.draft = [1, 2, 3], [4, 5, 6]
    na, nb = len(a.tokens), len(b.tokens)
    p = s.plan()
    # a: its token and 3 drafts; b: its token and what is left of the budget (1 draft)
    assert list(p.tokens) == [7, 1, 2, 3, 7, 4]
    assert list(p.positions) == [na - 1, na, na + 1, na + 2, nb - 1, nb]
    assert list(p.out_rows) == [0, 1, 2, 3, 4, 5] and b.draft == [4]
    s.advance(p)
    assert (a.n_cached, b.n_cached) == (na, nb)  # drafts are not cached until the service accepts them
    a.tokens += [1] * (11 - na)
    a.n_cached = len(a.tokens) - 1
    a.draft = [1, 2, 3]
    assert s.plan().positions[:2].tolist() == [10, 11]  # only one draft fits the context of 12
