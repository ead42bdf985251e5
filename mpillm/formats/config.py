"""Model configuration: one dataclass, built from the shard/manifest attributes."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gpt-oss", "deepseek2")
ROUTER_FUNCS = ("softmax", "sigmoid")
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
    # deepseek2 (DeepSeek-V2/V3/R1, Kimi-K2): multi-head latent attention. head_dim is the query/key
    # head size qk_nope_dim + qk_rope_dim; n_kv_heads = n_heads (each head's keys and values are
    # expanded from one latent shared by all heads, so no KV head is shared between query heads)
    q_lora_rank: int = 0          # 0: plain wq (q_lora_rank null); else wq_a -> q_a_norm -> wq_b
    kv_lora_rank: int = 0         # the latent's width (the latent KV cache: kv_lora_rank + qk_rope_dim per token)
    qk_nope_dim: int = 0          # per head: the key/query part without RoPE
    qk_rope_dim: int = 0          # the RoPE part (one key shared by all heads)
    v_head_dim: int = 0
    lora_norm_eps: float = 1e-6   # eps of q_a_norm / kv_a_norm (transformers: the RMSNorm default)
    rope_interleave: bool = True  # RoPE on interleaved pairs (2i, 2i+1) of the rope parts (DeepSeek's layout)
    yarn_mscale: float = 0.0      # YaRN's mscale / mscale_all_dim (0: absent); mscale_all_dim also
    yarn_mscale_all_dim: float = 0.0  # multiplies the softmax scale by (0.1 mscale_all_dim ln factor + 1)^2
    n_dense_layers: int = 0       # the first layers with a dense FFN (first_k_dense_replace), the rest MoE
    n_shared_experts: int = 0     # shared experts (each expert_ffn_dim wide) added to every MoE block
    router_func: str = "softmax"  # one of ROUTER_FUNCS; sigmoid: DeepSeek-V3's scores
    router_scale: float = 1.0     # routed_scaling_factor: multiplies the routed experts' weights
    n_expert_groups: int = 1      # group-limited routing: experts in n_expert_groups groups,
    n_groups_used: int = 1        # only the n_groups_used best (sum of their top two) compete
    router_bias: bool = False     # the sigmoid router's selection-only correction bias (layers/{i}/router_corr)
    # derived in __post_init__
    q_dim: int = dataclasses.field(init=False)
    kv_dim: int = dataclasses.field(init=False)
    group_size: int = dataclasses.field(init=False)  # query heads per KV head
    o_head_dim: int = dataclasses.field(init=False)  # per head columns of wo (v_head_dim for MLA, else head_dim)

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
        if self.router_func not in ROUTER_FUNCS:
            raise ValueError(f"config: unknown router_func {self.router_func!r}; supported: {', '.join(ROUTER_FUNCS)}")
        if self.is_mla:
            self._check_mla()
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.n_kv_heads * self.head_dim
        self.group_size = self.n_heads // self.n_kv_heads
        self.o_head_dim = self.v_head_dim if self.is_mla else self.head_dim

    def _check_mla(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"config: deepseek2 needs {name} >= 1, got {getattr(self, name)}")
        if self.qk_rope_dim % 2:
            raise ValueError(f"config: qk_rope_dim must be even for RoPE, got {self.qk_rope_dim}")
        if self.head_dim != self.qk_nope_dim + self.qk_rope_dim:
            raise ValueError(f"config: deepseek2 head_dim {self.head_dim} must be qk_nope_dim + qk_rope_dim "
                             f"= {self.qk_nope_dim + self.qk_rope_dim}")
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"config: deepseek2 has n_kv_heads = n_heads (got {self.n_kv_heads} / {self.n_heads})")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"config: n_dense_layers {self.n_dense_layers} not in [0, {self.n_layers}]")
        if self.n_dense_layers and self.ffn_dim < 1:
            raise ValueError("config: dense layers (n_dense_layers) need ffn_dim >= 1")
        if self.is_moe:
            G, used = self.n_expert_groups, self.n_groups_used
            if G < 1 or self.n_experts % G or not 1 <= used <= G:
                raise ValueError(f"config: {self.n_experts} experts do not form {G} groups with {used} used")
            if G > 1 and self.n_experts // G < 2:
                raise ValueError(f"config: group-limited routing scores a group by its top two experts; "
                                 f"{self.n_experts // G} expert(s) per group")
            if self.n_experts_used > used * (self.n_experts // G):
                raise ValueError(f"config: top-{self.n_experts_used} from {used} groups of {self.n_experts // G}")

    @property
    def is_mla(self) -> bool:
        return self.arch == "deepseek2"

    def layer_is_moe(self, layer: int) -> bool:
        return self.is_moe and layer >= self.n_dense_layers

    def kv_values_per_token(self, n_kv_heads_local: int) -> int:
        """Cache values a rank holds per token and layer: K and V of its KV heads, or (MLA) the
        latent, kv_lora_rank + qk_rope_dim, replicated on every rank."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_dim
        return 2 * n_kv_heads_local * self.head_dim

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
