"""The step plan: the contract between rank 0's scheduler and every rank's engine.

A step is T rows. Row t is token ``tokens[t]`` of the sequence in KV slot ``slots[t]`` at
position ``positions[t]``; the rows ``out_rows`` (ascending, R of them) need output, and
``per_row[r]`` says which (``OUT_GREEDY``: the greedy token, ``OUT_LOGITS``: the full logits; with
``CMD_SCORE`` it is the target token whose -log p the row returns). The scheduler
(mpillm.serving.scheduler) makes plans; the engine (mpillm.runtime.engine) broadcasts them and
runs them on every rank.

On the wire a step is one int64 buffer, the header followed by the packed plan:

    header (4,)      [command, T, R, rows of kind OUT_LOGITS]   (CMD_STOP: [0, exit code, 0, 0])
    plan   (3T+2R,)  tokens (T) | positions (T) | slots (T) | out_rows (R) | per_row (R)

Rank 0 broadcasts a fixed first part of it, the header and ``INLINE_WORDS`` words of plan, in one
collective: a decode step of up to 16 sequences (80 words) fits, so it costs one broadcast. Only a
longer plan (prompt chunks, large batches) sends the rest in a second broadcast.

No MPI and no numba here: the scheduler imports this module without pulling in either.
"""
from __future__ import annotations

import numpy as np

# commands: stop; a step (output rows get the greedy token or their logits); a scoring step
# (output rows get -log p(target), vocabulary-parallel: no logits are gathered)
CMD_STOP, CMD_STEP, CMD_SCORE = 0, 1, 2
OUT_GREEDY, OUT_LOGITS = 0, 1  # what an output row of a CMD_STEP needs
HEADER_LEN = 4
INLINE_WORDS = 80   # plan words sent with the header: T = R = 16 rows


def first_len(max_batch: int) -> int:
    """Words of the first broadcast of every step: the header and the inline part of the plan."""
    return HEADER_LEN + min(INLINE_WORDS, plan_len(max_batch, max_batch))


def plan_len(T: int, R: int) -> int:
    """int64 words of a packed plan of T rows, R of them with output."""
    return 3 * T + 2 * R


def pack(plan: np.ndarray, tokens, positions, slots, out_rows, per_row) -> tuple[int, int]:
    """Write one step into the preallocated ``plan`` buffer; returns (T, R)."""
    T, R = len(tokens), len(out_rows)
    plan[:T], plan[T:2 * T], plan[2 * T:3 * T] = tokens, positions, slots
    plan[3 * T:3 * T + R], plan[3 * T + R:3 * T + 2 * R] = out_rows, per_row
    return T, R


def unpack(plan: np.ndarray, T: int, R: int):
    """Views of a packed plan: (tokens, positions, slots, out_rows, per_row)."""
    return (plan[:T], plan[T:2 * T], plan[2 * T:3 * T], plan[3 * T:3 * T + R], plan[3 * T + R:3 * T + 2 * R])


__all__ = ["CMD_STOP", "CMD_STEP", "CMD_SCORE", "OUT_GREEDY", "OUT_LOGITS", "HEADER_LEN", "INLINE_WORDS",
           "first_len", "plan_len", "pack", "unpack"]
