"""Model configuration: one dataclass, built from the shard/manifest attributes."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

ARCHITECTURES = ("llama", "qwen3", "qwen3moe")


@dataclass
class ModelConfig:
    arch: str                 # one of ARCHITECTURES
    dim: int                  # residual width
    n_layers: int
    n_heads: int              # query heads
    n_kv_heads: int
    head_dim: int
    ffn_dim: int              # dense FFN hidden size (0 for MoE-only models)
    vocab_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    context_length: int = 2048
    tied_embeddings: bool = False
    qk_norm: bool = False     # per-head RMSNorm on q and k (Qwen3)
    n_experts: int = 0        # MoE: experts per layer (0 = dense)
    n_experts_used: int = 0   # MoE: top-k
    expert_ffn_dim: int = 0   # MoE: hidden size of one expert
    norm_topk_prob: bool = True
    # derived in __post_init__
    q_dim: int = dataclasses.field(init=False)
    kv_dim: int = dataclasses.field(init=False)
    group_size: int = dataclasses.field(init=False)  # query heads per KV head

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"config: {self.n_heads} query heads do not group evenly over {self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.is_moe and not (0 < self.n_experts_used <= self.n_experts and self.expert_ffn_dim > 0):
            raise ValueError("config: a MoE model needs 0 < n_experts_used <= n_experts and expert_ffn_dim > 0")
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.n_kv_heads * self.head_dim
        self.group_size = self.n_heads // self.n_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))
