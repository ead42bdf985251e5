"""Tensor-parallel partitioning for any world size.

Column-parallel weights (wq, wk, wv, w_gate, w_up, output) split their output
rows; row-parallel weights (wo, w_down) split their input columns and are
followed by an Allreduce. Query heads are dealt out with divmod (the first
``n_heads % tp_size`` ranks get one more); each rank holds the KV heads its
query heads read, so a KV head is replicated on every rank that needs it.
FFN and expert hidden sizes split in whole 32-blocks, the vocabulary in rows.

An uneven split (``plan(cfg, n, weights)``, weights = relative speeds, e.g. from
``mpillm.check --calibrate``) gives rank r query heads and vocabulary rows in proportion to
weights[r] (largest remainders, at least one each), then deals the FFN / expert blocks so
that each rank's weight elements read per token (attention + FFN + output rows) come as
close as whole blocks allow to its share: heads are coarse (9 heads over 3 ranks cannot be
2:1:1), and the fine-grained FFN rows absorb the difference. Equal weights give the even plan.
"""
from __future__ import annotations

from dataclasses import dataclass

from mpillm.formats.config import ModelConfig
from mpillm.formats.quant import QK


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
    if tp_size > 1 and cfg.o_head_dim % QK:
        # wo's input columns split per head; quantized blocks must not straddle ranks
        what = "v_head_dim" if cfg.is_mla else "head_dim"
        raise ValueError(f"{what} {cfg.o_head_dim} is not a multiple of {QK}; only world size 1 works")
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


def apportion(n: int, weights, minimum: int = 1) -> list[int]:
    """Split n items in proportion to weights, each part >= minimum (largest remainders)."""
    k = len(weights)
    if n < minimum * k:
        raise ValueError(f"cannot give each of {k} parts at least {minimum} of {n}")
    w = [max(0.0, float(x)) for x in weights]
    total = sum(w) or float(k)
    w = [x / total if sum(w) else 1.0 / k for x in w]
    free = n - minimum * k
    # the minimum counts toward a part's ideal share: only parts above it get more
    ideal = [max(0.0, x * n - minimum) for x in w]
    scale = free / sum(ideal) if sum(ideal) else 0.0
    exact = [x * scale for x in ideal] if sum(ideal) else [free / k] * k
    parts = [int(x) for x in exact]
    order = sorted(range(k), key=lambda i: (parts[i] - exact[i], i))
    for i in order[: free - sum(parts)]:
        parts[i] += 1
    return [p + minimum for p in parts]


def _ranges_of(counts: list[int], unit: int = 1) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start * unit, (start + c) * unit))
        start += c
    return out


def check_weights(cfg: ModelConfig, weights) -> list[float]:
    w = [float(x) for x in weights]
    if any(not x > 0 for x in w):
        raise ValueError(f"split weights must be positive, got {list(weights)}")
    check_world_size(cfg, len(w))
    return w


def rank_elements(cfg: ModelConfig, rs: RankSlice) -> dict[str, int]:
    """Weight elements a rank reads per generated token, by part: attention (q/k/v rows and
    o columns of every layer), FFN (dense, or the active experts' slices), output (its
    vocabulary rows of the output projection). The planner turns these into bytes and time."""
    d, hd, L = cfg.dim, cfg.head_dim, cfg.n_layers
    if cfg.is_mla:
        attn = L * mla_elements(cfg, rs.n_heads_per_partition)
        moe_layers = L - cfg.n_dense_layers if cfg.is_moe else 0
        ffn = (L - moe_layers) * 3 * d * rs.ffn_per_partition + moe_layers * 3 * d * rs.expert_ffn_per_partition * (
            cfg.n_experts_used + cfg.n_shared_experts)
        return {"attn": attn, "ffn": ffn, "output": rs.vocab_per_partition * d}
    attn = L * d * hd * (2 * rs.n_heads_per_partition + 2 * rs.n_kv_heads_per_partition)
    if cfg.is_moe:
        ffn = L * 3 * d * rs.expert_ffn_per_partition * cfg.n_experts_used
    else:
        ffn = L * 3 * d * rs.ffn_per_partition
    return {"attn": attn, "ffn": ffn, "output": rs.vocab_per_partition * d}


def mla_elements(cfg: ModelConfig, heads: int) -> int:
    """Weight elements of one MLA layer for a rank with ``heads`` query heads: the replicated
    down-projections (wq_a, wkv_a) and the per-head wq_b (or wq), wk_b, wv_b and wo columns."""
    d, r, rope = cfg.dim, cfg.kv_lora_rank, cfg.qk_rope_dim
    down = (cfg.q_lora_rank * d if cfg.q_lora_rank else 0) + (r + rope) * d
    per_head = ((cfg.q_lora_rank or d) * cfg.head_dim + r * cfg.qk_nope_dim + cfg.v_head_dim * r
                + cfg.v_head_dim * d)
    return down + heads * per_head


def plan(cfg: ModelConfig, tp_size: int, weights=None) -> list[RankSlice]:
    """The partition of every rank for a world size (raises ValueError when it cannot split);
    ``weights`` (one positive number per rank) asks for an uneven split."""
    check_world_size(cfg, tp_size)
    if weights is not None:
        w = check_weights(cfg, weights)
        if len(w) != tp_size:
            raise ValueError(f"{len(w)} split weights for world size {tp_size}")
        if len(set(w)) > 1:
            return _weighted_plan(cfg, w)
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


def _weighted_plan(cfg: ModelConfig, w: list[float]) -> list[RankSlice]:
    n = len(w)
    heads = _ranges_of(apportion(cfg.n_heads, w))
    vocab = _ranges_of(apportion(cfg.vocab_size, w))
    ffn_dim = cfg.expert_ffn_dim if cfg.is_moe else cfg.ffn_dim
    blocks = ffn_dim // QK
    slices = []
    for r in range(n):
        h0, h1 = heads[r]
        slices.append(RankSlice(r, n, (h0, h1), (h0 // cfg.group_size, (h1 - 1) // cfg.group_size + 1),
                                (0, 0), (0, 0), vocab[r]))
    # FFN blocks fill each rank up to its share of the elements read per token
    fixed = [rank_elements(cfg, rs) for rs in slices]
    per_block = cfg.n_layers * 3 * cfg.dim * QK * (cfg.n_experts_used if cfg.is_moe else 1)
    total = sum(f["attn"] + f["output"] for f in fixed) + blocks * per_block
    want = [max(0.0, total * x / sum(w) - f["attn"] - f["output"]) / per_block for x, f in zip(w, fixed)]
    ffn = _ranges_of(apportion(blocks, want if sum(want) else w), QK)
    # deepseek2's leading dense layers: their FFN blocks dealt in the same proportions
    both = cfg.is_moe and cfg.ffn_dim and cfg.ffn_dim % QK == 0
    dense_ffn = _ranges_of(apportion(cfg.ffn_dim // QK, [b - a for a, b in ffn]), QK) if both else None
    out = []
    for r, (rs, f) in enumerate(zip(slices, ffn)):
        dense = f if not cfg.is_moe else (dense_ffn[r] if both else (0, 0))
        experts = f if cfg.is_moe else (0, 0)
        out.append(RankSlice(rs.tp_rank, n, rs.heads, rs.kv_heads, dense, experts, rs.vocab))
    return out


def parse_split(text: str) -> list[float]:
    """'2,1,1' -> [2.0, 1.0, 1.0] (the --split option)."""
    try:
        w = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--split takes comma-separated positive numbers, one per rank, e.g. 2,1,1; got {text!r}")
    if not w or any(not x > 0 for x in w):
        raise ValueError(f"--split takes comma-separated positive numbers, one per rank, e.g. 2,1,1; got {text!r}")
    return w


def rank_stored_elements(cfg: ModelConfig, rs: RankSlice) -> int:
    """Weight elements of a rank's shard: every expert's slice, the embedding and output rows."""
    d, hd, L = cfg.dim, cfg.head_dim, cfg.n_layers
    if cfg.is_mla:
        moe_layers = L - cfg.n_dense_layers if cfg.is_moe else 0
        ffn = (L - moe_layers) * 3 * d * rs.ffn_per_partition + moe_layers * 3 * d * rs.expert_ffn_per_partition * (
            cfg.n_experts + cfg.n_shared_experts)
        return L * mla_elements(cfg, rs.n_heads_per_partition) + ffn + rs.vocab_per_partition * d * (
            1 if cfg.tied_embeddings else 2)
    attn = L * d * hd * (2 * rs.n_heads_per_partition + 2 * rs.n_kv_heads_per_partition)
    ffn = L * 3 * d * (rs.expert_ffn_per_partition * cfg.n_experts if cfg.is_moe else rs.ffn_per_partition)
    return attn + ffn + rs.vocab_per_partition * d * (1 if cfg.tied_embeddings else 2)


def share_notes(cfg: ModelConfig, slices: list[RankSlice], split: dict | None,
                shard_bytes: list[int] | None = None) -> list[str]:
    """Per rank for the printed plan: its share of the weights read per token and, when the
    split came from measured speeds (convert --cluster), the compute time per token expected
    (the shard's bytes read per token over the rank's measured weight-streaming speed)."""
    elems = [sum(rank_elements(cfg, rs).values()) for rs in slices]
    total = sum(elems)
    gbps = (split or {}).get("gbps")
    out = []
    for r, e in enumerate(elems):
        note = f"{100 * e / total:.1f}% of the work"
        if split:
            note += f" (split weight {split['weights'][r]:g})"
        if gbps and shard_bytes:
            read = shard_bytes[r] * e / max(1, rank_stored_elements(cfg, slices[r]))
            note += f", expected {read / (gbps[r] * 1e9) * 1e3:.2f} ms/token compute at {gbps[r]:.1f} GB/s"
        out.append(note)
    return out
