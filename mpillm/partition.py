"""Tensor-parallel partitioning for any world size.

Column-parallel weights (wq, wk, wv, w_gate, w_up, output) split their output
rows; row-parallel weights (wo, w_down) split their input columns and are
followed by an Allreduce. Query heads are dealt out with divmod (the first
``n_heads % tp_size`` ranks get one more); each rank holds the KV heads its
query heads read, so a KV head is replicated on every rank that needs it.
FFN and expert hidden sizes split in whole 32-blocks, the vocabulary in rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .quant import QK


def block_range(n: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of n items for tp_rank, the first n % tp_size ranks one larger."""
    q, r = divmod(n, tp_size)
    start = tp_rank * q + min(tp_rank, r)
    return start, start + q + (1 if tp_rank < r else 0)


@dataclass(frozen=True)
class RankSlice:
    tp_rank: int
    tp_size: int
    heads: tuple[int, int]        # query heads [start, stop)
    kv_heads: tuple[int, int]     # KV heads held (replicated where shared)
    ffn: tuple[int, int]          # dense FFN hidden rows
    expert_ffn: tuple[int, int]   # hidden rows of every expert (MoE)
    vocab: tuple[int, int]        # embedding / output rows

    @property
    def n_heads_per_partition(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads_per_partition(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def ffn_per_partition(self) -> int:
        return self.ffn[1] - self.ffn[0]

    @property
    def expert_ffn_per_partition(self) -> int:
        return self.expert_ffn[1] - self.expert_ffn[0]

    @property
    def vocab_per_partition(self) -> int:
        return self.vocab[1] - self.vocab[0]


def valid_world_sizes(cfg: ModelConfig) -> list[int]:
    ok = []
    for n in range(1, cfg.n_heads + 1):
        try:
            check_world_size(cfg, n)
        except ValueError:
            continue
        ok.append(n)
    return ok


def check_world_size(cfg: ModelConfig, tp_size: int) -> None:
    if tp_size < 1:
        raise ValueError(f"world size must be >= 1, got {tp_size}")
    if tp_size > cfg.n_heads:
        raise ValueError(f"world size {tp_size} exceeds the model's {cfg.n_heads} query heads "
                         f"(tensor parallelism splits whole heads; use at most {cfg.n_heads} ranks)")
    if tp_size > 1 and cfg.head_dim % QK:
        # wo's input columns split per head; quantized blocks must not straddle ranks
        raise ValueError(f"head_dim {cfg.head_dim} is not a multiple of {QK}; only world size 1 works")
    if tp_size > 1 and cfg.ffn_dim % QK:
        raise ValueError(f"FFN size {cfg.ffn_dim} is not a multiple of {QK}; only world size 1 works")
    if cfg.is_moe:
        # every rank holds whole 32-blocks of every expert's hidden size: at most `blocks` ranks
        blocks = cfg.expert_ffn_dim // QK if cfg.expert_ffn_dim % QK == 0 else 1
        if tp_size > blocks:
            # sizes <= blocks pass this check, so asking check_world_size about them cannot recurse here
            ok = []
            for n in range(1, min(blocks, cfg.n_heads) + 1):
                try:
                    check_world_size(cfg, n)
                    ok.append(n)
                except ValueError:
                    pass
            why = (f"is not a multiple of {QK}" if cfg.expert_ffn_dim % QK else
                   f"has only {blocks} blocks of {QK}")
            raise ValueError(f"expert FFN size {cfg.expert_ffn_dim} {why}, so it cannot be split over {tp_size} "
                             f"ranks (each rank takes whole {QK}-blocks of every expert); world sizes that work: "
                             f"{', '.join(map(str, ok)) or 'none'}")


def plan(cfg: ModelConfig, tp_size: int) -> list[RankSlice]:
    """The partition of every rank for a world size (raises ValueError when it cannot split)."""
    check_world_size(cfg, tp_size)
    out = []
    for r in range(tp_size):
        h0, h1 = block_range(cfg.n_heads, r, tp_size)
        kv0, kv1 = h0 // cfg.group_size, (h1 - 1) // cfg.group_size + 1
        f0, f1 = block_range(cfg.ffn_dim // QK, r, tp_size) if cfg.ffn_dim % QK == 0 else (0, 0)
        ffn = (f0 * QK, f1 * QK) if cfg.ffn_dim % QK == 0 else (0, cfg.ffn_dim)
        e0, e1 = block_range(cfg.expert_ffn_dim // QK, r, tp_size) if cfg.is_moe else (0, 0)
        exp = (e0 * QK, e1 * QK) if cfg.expert_ffn_dim % QK == 0 else (0, cfg.expert_ffn_dim)
        out.append(RankSlice(r, tp_size, (h0, h1), (kv0, kv1), ffn, exp,
                             block_range(cfg.vocab_size, r, tp_size)))
    return out
