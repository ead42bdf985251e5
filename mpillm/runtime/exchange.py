"""Which exchange a sync uses, and what it sends: the message sizes and the choice rule.

No MPI and no numba here: the planner (mpillm.planner) models the same choice the engine makes
(mpillm.runtime.collectives), from the same function.
"""
from __future__ import annotations

from mpillm.formats.quant import QK

BUFFER_TYPES = ("f32", "f16", "q8_0", "f64")
SYNC_ALGORITHMS = ("auto", "allreduce", "p2p")
P2P_MAX_BYTES = 64 * 1024   # auto: the one-round exchange for messages up to this size (P >= 3)


VALUE_BYTES = {"f32": 4, "f64": 8, "f16": 2}   # q8_0: one byte per value plus a float32 scale per 32


def message_bytes(buffer_type: str, rows: int, dim: int) -> int:
    """Bytes one rank sends per sync of ``rows`` rows (the same on every rank). Called by every
    sync: no allocation."""
    n = rows * dim
    return n + 4 * (n // QK) if buffer_type == "q8_0" else VALUE_BYTES[buffer_type] * n


def choose_algorithm(algorithm: str, P: int, nbytes: int, table: dict | None = None, hosts: int | None = None) -> str:
    """The exchange for a message of ``nbytes`` among P ranks on ``hosts`` hosts (None: one rank per
    host, as the planner models a cluster). ``table``: measured choices ({"P": [[max_bytes,
    algorithm], ...]} from the cluster file) override the rule.

    The rule: the one-round p2p exchange from 3 ranks, for small messages, when the ranks span
    more than one host. Within one host (shared memory) MPI's own Allreduce takes 1-2 us where the
    p2p exchange's Python side alone costs ~6 us (measured with `mpillm.check` here: 2 ranks,
    2304 B: 2.3 vs 8.3 us); across a link each round costs the link's latency (~150 us on 1 GbE)
    and the round saved is what counts."""
    if algorithm not in SYNC_ALGORITHMS:
        raise ValueError(f"--sync must be one of {', '.join(SYNC_ALGORITHMS)}, got {algorithm!r}")
    if algorithm != "auto":
        return algorithm
    rows = (table or {}).get(str(P))
    if rows:
        for max_bytes, algo in sorted(rows):
            if nbytes <= max_bytes:
                return algo
        return sorted(rows)[-1][1]
    hosts = P if hosts is None else hosts
    return "p2p" if P >= 3 and hosts > 1 and nbytes <= P2P_MAX_BYTES else "allreduce"


__all__ = ["BUFFER_TYPES", "SYNC_ALGORITHMS", "P2P_MAX_BYTES", "message_bytes", "choose_algorithm"]
