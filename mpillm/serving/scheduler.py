"""The step plan: KV slots, continuous batching and prefix reuse, on rank 0. No MPI here.

A fixed set of slots (``--parallel``), each the KV cache of one sequence of up to ``ctx`` tokens
(llama.cpp's server does the same; a pool of pages would share memory between short and long
sequences, but fixed slots keep a row's cache contiguous for the attention kernel and make the
memory a slot needs known before loading). Each step carries, up to ``batch_tokens`` rows:

  1. every running sequence's next token (one row; with speculative drafts, the drafts too),
  2. then chunks of prompts still being prefilled, oldest first, in the budget that is left,

so a long prompt delays the others by at most one chunk. Sequences join when a slot is free
and leave when they finish; the queue waits for a slot, nothing is dropped.

Prefix reuse: a slot remembers the tokens whose keys and values it holds after its sequence
ends. A new sequence takes the free slot whose tokens share the longest prefix with its prompt
and prefills only the rest (the next turn of a chat). Positions are explicit in every row, and
attention reads a slot only up to the row's position, so stale entries past a sequence's own
tokens are never read: resetting a slot costs nothing.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from mpillm.runtime.steps import OUT_GREEDY, OUT_LOGITS


@dataclass(eq=False)  # identity: two requests with the same tokens are still two sequences
class Sequence:
    """One request's tokens as the scheduler sees them."""
    id: str
    tokens: list[int]                 # prompt + generated so far
    n_prompt: int
    wants_logits: bool = False        # sampling rows gather their logits; greedy rows do not
    owner: object = None              # the service's request state
    slot: "Slot | None" = None
    n_cached: int = 0                 # tokens[:n_cached] have keys and values in the slot
    n_reused: int = 0                 # of them, taken over from an earlier sequence (prefix reuse)
    draft: list[int] = field(default_factory=list)  # speculative tokens to verify after tokens[-1]
    draft_q: list | None = None       # the draft's distribution per draft token (None: deterministic)

    @property
    def pending(self) -> int:
        """Tokens still to run through the model (the prompt's rest, or the newest token)."""
        return len(self.tokens) - self.n_cached


@dataclass
class Slot:
    index: int
    cached: list[int] = field(default_factory=list)  # tokens in positions 0.. (for prefix reuse)
    seq: Sequence | None = None
    last_used: int = 0


@dataclass
class StepPlan:
    tokens: np.ndarray       # (T,) token ids
    positions: np.ndarray    # (T,)
    slots: np.ndarray        # (T,)
    out_rows: np.ndarray     # (R,) rows that need output, ascending
    kinds: np.ndarray        # (R,) OUT_GREEDY or OUT_LOGITS
    out_seqs: list[Sequence]  # (R,) whose row it is
    runs: list[tuple[Sequence, int, int]]  # (sequence, first row, rows) in the order of the batch

    @property
    def n_rows(self) -> int:
        return len(self.tokens)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    def __init__(self, n_slots: int, ctx: int, batch_tokens: int):
        if batch_tokens < n_slots:
            raise ValueError(f"--batch-tokens {batch_tokens} must be at least --parallel {n_slots} "
                             f"(every running sequence decodes one row per step)")
        self.ctx, self.batch_tokens = ctx, batch_tokens
        self.slots = [Slot(i) for i in range(n_slots)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []    # in admission order
        self._clock = 0

    # ---- membership ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not 0 < len(seq.tokens) < self.ctx:
            raise ValueError(f"the prompt has {len(seq.tokens)} tokens; a slot holds {self.ctx} "
                             f"(prompt and completion together)")
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Give free slots to waiting sequences, oldest first; returns the admitted ones."""
        admitted = []
        while self.waiting:
            free = [s for s in self.slots if s.seq is None]
            if not free:
                break
            seq = self.waiting.popleft()
            slot, reuse = self._choose_slot(free, seq.tokens)
            self._clock += 1
            slot.seq, slot.last_used = seq, self._clock
            del slot.cached[reuse:]
            seq.slot, seq.n_cached, seq.n_reused = slot, reuse, reuse
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _choose_slot(self, free: list[Slot], prompt: list[int]) -> tuple[Slot, int]:
        """The free slot with the longest cached prefix of the prompt (at most len - 1 tokens: the
        last one must run to give logits); otherwise the least recently used one."""
        best, reuse = None, 0
        for s in free:
            n = min(common_prefix(s.cached, prompt), len(prompt) - 1)
            if n > reuse:
                best, reuse = s, n
        if best is None:
            best = min(free, key=lambda s: (s.last_used, s.index))
        return best, reuse

    def remove(self, seq: Sequence) -> None:
        """A sequence ends (finished or cancelled): its slot is free and keeps what it cached."""
        if seq in self.running:
            self.running.remove(seq)
            slot = seq.slot
            slot.cached = seq.tokens[:seq.n_cached]
            slot.seq = None
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---- one step --------------------------------------------------------------------------------
    def plan(self) -> StepPlan | None:
        """The next step's rows, or None when nothing is running."""
        if not self.running:
            return None
        decoding = [s for s in self.running if s.pending == 1]
        prefilling = [s for s in self.running if s.pending > 1]
        budget = self.batch_tokens
        toks, pos, slots, out_rows, kinds, out_seqs, runs = [], [], [], [], [], [], []

        def add_run(seq: Sequence, n: int, extra: list[int]) -> None:
            start = len(toks)
            p0 = seq.n_cached
            new = seq.tokens[p0:p0 + n] + extra
            toks.extend(new)
            pos.extend(range(p0, p0 + len(new)))
            slots.extend([seq.slot.index] * len(new))
            # output rows: the sequence's last token (its next token's logits), and every draft
            first_out = len(seq.tokens) - 1 - p0
            for r in range(max(first_out, 0), len(new)):
                out_rows.append(start + r)
                kinds.append(OUT_LOGITS if seq.wants_logits else OUT_GREEDY)
                out_seqs.append(seq)
            runs.append((seq, start, len(new)))

        spare = budget - len(decoding)  # rows left for drafts once every running sequence has its row
        for seq in decoding:
            k = min(len(seq.draft), spare, self.ctx - len(seq.tokens))
            seq.draft = seq.draft[:k]
            add_run(seq, 1, seq.draft)
            spare -= k
            budget -= 1 + k
        for seq in prefilling:
            if budget <= 0:
                break
            n = min(seq.pending, budget)
            add_run(seq, n, [])
            budget -= n
        i64 = lambda v: np.asarray(v, np.int64)  # noqa: E731
        return StepPlan(i64(toks), i64(pos), i64(slots), i64(out_rows), i64(kinds), out_seqs, runs)

    def advance(self, plan: StepPlan) -> None:
        """After the engine ran the plan: the rows' tokens (not drafts) now have keys and values."""
        for seq, _, n in plan.runs:
            seq.n_cached += n - len(seq.draft)

    @property
    def busy(self) -> int:
        return sum(s.seq is not None for s in self.slots)
