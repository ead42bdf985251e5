"""Model configuration: one dataclass, built from the shard/manifest attributes."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gpt-oss")
ROPE_SCALINGS = ("none", "yarn")
FFN_ACTS = ("silu", "swiglu_oai")


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
    qkv_bias: bool = False    # q/k/v projection biases (layers/{i}/bq, bk, bv): qwen2, gpt-oss
    # gpt-oss (defaults: off, so older manifests read unchanged)
    o_bias: bool = False      # o_proj bias (layers/{i}/bo), added once after Allreduce #1
    attn_sinks: bool = False  # learned per-head sink logit joining each softmax (layers/{i}/sinks)
    sliding_window: int = 0   # keys a sliding layer sees, itself included (0: no sliding layers)
    sliding_layers: list = dataclasses.field(default_factory=list)  # layer indices that use the window
    rope_scaling: str = "none"    # one of ROPE_SCALINGS
    rope_factor: float = 1.0      # YaRN: context extension factor
    rope_orig_context: int = 0    # YaRN: original_max_position_embeddings
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_truncate: bool = True    # YaRN: floor/ceil the correction range (gpt-oss: False)
    expert_bias: bool = False     # router bias and expert gate/up/down biases (layers/{i}/router_b, exp_*_b)
    ffn_act: str = "silu"         # one of FFN_ACTS; swiglu_oai: (clamp(up, -l, l) + 1) * g * sigmoid(alpha g), g = min(gate, l)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
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
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"config: unknown rope_scaling {self.rope_scaling!r}; supported: {', '.join(ROPE_SCALINGS)}")
        if self.ffn_act not in FFN_ACTS:
            raise ValueError(f"config: unknown ffn_act {self.ffn_act!r}; supported: {', '.join(FFN_ACTS)}")
        if self.rope_scaling == "yarn" and not (self.rope_factor > 0 and self.rope_orig_context > 0):
            raise ValueError("config: YaRN needs rope_factor > 0 and rope_orig_context > 0")
        if self.sliding_window < 0 or any(not 0 <= i < self.n_layers for i in self.sliding_layers):
            raise ValueError(f"config: bad sliding window {self.sliding_window} / layers {self.sliding_layers}")
        self.sliding_layers = [int(i) for i in self.sliding_layers]
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.n_kv_heads * self.head_dim
        self.group_size = self.n_heads // self.n_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def window(self, layer: int) -> int:
        """Keys layer ``layer`` attends to (itself included); 0 = all (full causal attention)."""
        return self.sliding_window if layer in self.sliding_layers else 0

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
