"""python -m convert synth --shape llama-3.2-1b OUT --world-size 2 [--weight-type q4_0]
python -m convert synth --shape gpt-oss-20b OUT --world-size 2      (MXFP4 experts, q8_0 elsewhere)

Random weights in the exact shapes of a real model, written straight into each rank's
shard tensor by tensor (never a float copy of the whole model), so speed and memory can
be measured at real sizes without downloading weights. Quantized tensors get random
codes and small random fp16 scales, so activations stay finite through every layer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from mpillm.formats import format as fmt
from mpillm.formats import quant
from mpillm.formats.config import ModelConfig
from mpillm.formats.partition import plan

from . import names as N
from .shards import _ranges

SHAPES = {
    # for tests and the kernel warm-up: every tensor kind of a dense llama, a few KiB each
    "tiny": dict(arch="llama", dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                 vocab_size=256, rope_theta=10000.0, context_length=512, tied_embeddings=False),
    "llama-3.2-1b": dict(arch="llama", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
                         vocab_size=128256, rope_theta=500000.0, context_length=131072, tied_embeddings=True),
    "llama-3.1-8b": dict(arch="llama", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                         vocab_size=128256, rope_theta=500000.0, context_length=131072, tied_embeddings=False),
    "qwen3-30b-a3b": dict(arch="qwen3moe", dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, ffn_dim=0,
                          vocab_size=151936, rope_theta=1e7, norm_eps=1e-6, context_length=40960,
                          tied_embeddings=False, qk_norm=True, n_experts=128, n_experts_used=8,
                          expert_ffn_dim=768),
}


def _gpt_oss(n_layers: int, n_experts: int) -> dict:
    """gpt-oss-20b / -120b: the released config.json's numbers."""
    return dict(arch="gpt-oss", dim=2880, n_layers=n_layers, n_heads=64, n_kv_heads=8, head_dim=64, ffn_dim=0,
                vocab_size=201088, rope_theta=150000.0, norm_eps=1e-5, context_length=131072,
                tied_embeddings=False, n_experts=n_experts, n_experts_used=4, expert_ffn_dim=2880,
                o_bias=True, attn_sinks=True, sliding_window=128, sliding_layers=list(range(0, n_layers, 2)),
                rope_scaling="yarn", rope_factor=32.0, rope_orig_context=4096, yarn_beta_fast=32.0,
                yarn_beta_slow=1.0, yarn_truncate=False, expert_bias=True, ffn_act="swiglu_oai",
                qkv_bias=True)


SHAPES["gpt-oss-20b"] = _gpt_oss(24, 32)
# every tensor kind of gpt-oss at a few KiB (tests): 2 layers (one sliding), 4 experts, vocab 512
SHAPES["gpt-oss-tiny"] = {**_gpt_oss(2, 4), "dim": 128, "n_heads": 4, "n_kv_heads": 2, "n_experts_used": 2,
                          "expert_ffn_dim": 128, "vocab_size": 512, "context_length": 4096, "sliding_window": 8,
                          "rope_orig_context": 128}
SHAPES["gpt-oss-120b"] = _gpt_oss(36, 128)


def _deepseek(n_heads: int, n_dense: int, n_experts: int, n_groups: int, groups_used: int, vocab: int,
              **over) -> dict:
    """DeepSeek-V3/R1 (671B) and Kimi-K2 (1T): MLA with q_lora 1536, kv_lora 512, qk_nope 128,
    qk_rope 64, v 128; 61 layers, the first n_dense dense (FFN 18432), the rest 1 shared + routed
    experts of 2048, top-8, the sigmoid router with its correction bias. DeepSeek-V3's RoPE and router
    constants unless ``over`` says otherwise. (The multi-token-prediction layer is not part of the shape.)"""
    return dict(arch="deepseek2", dim=7168, n_layers=61, n_heads=n_heads, n_kv_heads=n_heads, head_dim=192,
                ffn_dim=18432, vocab_size=vocab, rope_theta=10000.0, norm_eps=1e-6, context_length=163840,
                tied_embeddings=False, n_experts=n_experts, n_experts_used=8, expert_ffn_dim=2048,
                norm_topk_prob=True, rope_scaling="yarn", rope_factor=40.0, rope_orig_context=4096,
                yarn_beta_fast=32.0, yarn_beta_slow=1.0,
                q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128,
                yarn_mscale=1.0, yarn_mscale_all_dim=1.0, n_dense_layers=n_dense, n_shared_experts=1,
                router_func="sigmoid", router_scale=2.5, n_expert_groups=n_groups, n_groups_used=groups_used,
                router_bias=True) | over


# DeepSeek-V3 (and R1, the same config): deepseek-ai/DeepSeek-V3's config.json -- hidden_size 7168,
# num_hidden_layers 61, num_attention_heads 128, q_lora_rank 1536, kv_lora_rank 512, qk_nope_head_dim 128,
# qk_rope_head_dim 64, v_head_dim 128, intermediate_size 18432, moe_intermediate_size 2048,
# n_routed_experts 256, num_experts_per_tok 8, n_shared_experts 1, first_k_dense_replace 3, n_group 8,
# topk_group 4, routed_scaling_factor 2.5, rope_theta 10000, rope_scaling yarn (factor 40,
# original_max_position_embeddings 4096, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1.0),
# max_position_embeddings 163840, rms_norm_eps 1e-6, vocab_size 129280.
SHAPES["deepseek-v3"] = _deepseek(128, 3, 256, 8, 4, 129280)
# Kimi-K2: moonshotai/Kimi-K2-Instruct's config.json (DeepseekV3ForCausalLM, model_type kimi_k2) -- the
# same MLA and expert sizes with num_attention_heads 64, n_routed_experts 384 in one group (n_group =
# topk_group = 1), first_k_dense_replace 1, routed_scaling_factor 2.827, rope_theta 50000, rope_scaling
# yarn (factor 32, original_max_position_embeddings 4096, beta_fast 1.0, beta_slow 1.0, mscale =
# mscale_all_dim = 1.0), max_position_embeddings 131072, vocab_size 163840 (values as in NVIDIA
# Megatron-Bridge's KimiK2Provider and hyper-accel/tiny-random-kimi-k2's copy of the config;
# Kimi-K2-Instruct-0905 has YaRN factor 64 and max_position_embeddings 262144, the weights' shapes alike).
SHAPES["kimi-k2"] = _deepseek(64, 1, 384, 1, 1, 163840, rope_theta=50000.0, rope_factor=32.0, yarn_beta_fast=1.0,
                              yarn_beta_slow=1.0, context_length=131072, router_scale=2.827)
# every tensor kind of deepseek2 at a few KiB (tests): one dense layer (FFN 256), then MoE (experts of 128);
# 4 groups of 2 experts
SHAPES["deepseek-tiny"] = {**_deepseek(4, 1, 8, 4, 2, 512), "dim": 128, "n_layers": 2, "head_dim": 48,
                           "ffn_dim": 256, "expert_ffn_dim": 128, "n_experts_used": 3, "q_lora_rank": 64,
                           "kv_lora_rank": 64, "qk_nope_dim": 32, "qk_rope_dim": 16, "v_head_dim": 32,
                           "context_length": 4096}
# Types that a shape fixes whatever --weight-type says (gpt-oss ships its experts as MXFP4), and the
# --weight-type default of a shape (the released gpt-oss GGUFs keep attention and embeddings in q8_0).
EXPERT_TYPE = dict.fromkeys(("gpt-oss-20b", "gpt-oss-120b", "gpt-oss-tiny"), "mxfp4")
DEFAULT_TYPE = dict.fromkeys(EXPERT_TYPE, "q8_0")
_EXPERT_MATRICES = ("layers/{i}/exp_gate", "layers/{i}/exp_up", "layers/{i}/exp_down")
_NORMS = ("output_norm", "layers/{i}/attn_norm", "layers/{i}/ffn_norm", "layers/{i}/q_norm", "layers/{i}/k_norm",
          "layers/{i}/q_a_norm", "layers/{i}/kv_a_norm")


def logical_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Full (unsplit) shape of an internal tensor."""
    p = N.pattern_of(name).split("/")[-1]
    D, hd, E = cfg.dim, cfg.head_dim, cfg.n_experts
    if p == "wo":
        return (D, cfg.n_heads * cfg.o_head_dim)
    return {
        "tok_embd": (cfg.vocab_size, D), "output": (cfg.vocab_size, D), "output_norm": (D,), "rope_freqs": (hd // 2,),
        "attn_norm": (D,), "ffn_norm": (D,), "q_norm": (hd,), "k_norm": (hd,),
        "bq": (cfg.q_dim,), "bk": (cfg.kv_dim,), "bv": (cfg.kv_dim,),
        "wq": (cfg.q_dim, D), "wk": (cfg.kv_dim, D), "wv": (cfg.kv_dim, D), "wo": (D, cfg.q_dim),
        "w_gate": (cfg.ffn_dim, D), "w_up": (cfg.ffn_dim, D), "w_down": (D, cfg.ffn_dim),
        "router": (E, D), "exp_gate": (E, cfg.expert_ffn_dim, D), "exp_up": (E, cfg.expert_ffn_dim, D),
        "exp_down": (E, D, cfg.expert_ffn_dim),
        "bo": (D,), "sinks": (cfg.n_heads,),
        # deepseek2 (wo above is (D, q_dim) elsewhere: its columns are v_head_dim per head)
        "wq_a": (cfg.q_lora_rank, D), "q_a_norm": (cfg.q_lora_rank,), "wq_b": (cfg.q_dim, cfg.q_lora_rank),
        "wkv_a": (cfg.kv_lora_rank + cfg.qk_rope_dim, D), "kv_a_norm": (cfg.kv_lora_rank,),
        "wk_b": (cfg.n_heads, cfg.kv_lora_rank, cfg.qk_nope_dim), "wv_b": (cfg.n_heads, cfg.v_head_dim, cfg.kv_lora_rank),
        "router_corr": (E,), "shexp_gate": (cfg.n_shared_experts, cfg.expert_ffn_dim, D),
        "shexp_up": (cfg.n_shared_experts, cfg.expert_ffn_dim, D),
        "shexp_down": (cfg.n_shared_experts, D, cfg.expert_ffn_dim),
        "router_b": (E,), "exp_gate_b": (E, cfg.expert_ffn_dim), "exp_up_b": (E, cfg.expert_ffn_dim),
        "exp_down_b": (E, D),
    }[p]


def tensor_type(shape: str, pattern: str, ndim: int, wtype: str) -> str:
    """The stored type of one tensor of a synthetic model."""
    if ndim == 1 or pattern == "layers/{i}/router" or pattern in N.VECTOR_TABLES:
        return "f32"
    if pattern in _EXPERT_MATRICES and shape in EXPERT_TYPE:
        return EXPERT_TYPE[shape]
    return wtype


def random_tensor(rng: np.random.Generator, wtype: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Random split-layout arrays; values ~ N(0, 1/cols) so each matmul keeps the activations' scale."""
    if len(shape) == 1:
        return {"w": np.ones(shape, np.float32)}
    cols = shape[-1]
    scale = 1.0 / np.sqrt(cols)
    if wtype not in ("q4_0", "q4_1", "q8_0", "f16", "f32"):  # 5-bit, K-quant, MXFP4: random valid blocks
        rows = int(np.prod(shape[:-1]))
        a = quant.random_arrays(wtype, rows, cols, rng, scale=2.0 * scale)
        return {k: v.reshape(*shape[:-1], v.shape[-1]) for k, v in a.items()}
    out = {}
    for key, (s, dt) in fmt.expected_arrays(wtype, shape).items():
        if key == "w":
            out[key] = (rng.standard_normal(s, dtype=np.float32) * scale).astype(dt)
        elif key == "qs":
            out[key] = rng.integers(0, 256, s, dtype=np.uint8).view(dt)
        elif key == "d":  # q4: nibble-8 has std ~4.6; q8: codes std ~73
            out[key] = np.full(s, scale / (4.6 if wtype != "q8_0" else 73.0), np.float16)
        else:  # q4_1 minimum: centre the nibbles
            out[key] = np.full(s, -7.5 * scale / 4.6, np.float16)
    return out


def cut(cfg: ModelConfig, n_layers: int | None) -> ModelConfig:
    """The first ``n_layers`` layers of a shape (the full width). A deepseek2 cut keeps at least one
    MoE layer when it has two or more layers (its dense layers come first)."""
    if n_layers is None:
        return cfg
    if not 1 <= n_layers <= cfg.n_layers:
        raise ValueError(f"--layers {n_layers} not in [1, {cfg.n_layers}]")
    dense = min(cfg.n_dense_layers, n_layers - 1 if n_layers > 1 else 1)
    return dataclasses.replace(cfg, n_layers=n_layers, n_dense_layers=dense if cfg.is_mla else cfg.n_dense_layers,
                               sliding_layers=[i for i in cfg.sliding_layers if i < n_layers])


def synth(shape: str, out: Path, world_sizes: list[int], wtype: str | None = None, seed: int = 0,
          progress: bool = True, n_layers: int | None = None) -> None:
    wtype = wtype or DEFAULT_TYPE.get(shape, "q4_0")
    cfg = cut(ModelConfig(**SHAPES[shape]), n_layers)
    names = N.model_tensors(cfg.arch, cfg.n_layers, cfg.tied_embeddings, cfg=cfg)
    for ws in world_sizes:
        for rs in plan(cfg, ws):
            w = fmt.ShardWriter(out / fmt.shard_relpath(ws, rs.tp_rank), cfg, ws, rs.tp_rank,
                                json.dumps(dataclasses.asdict(rs)))
            it = names
            if progress:
                from tqdm import tqdm

                it = tqdm(names, desc=f"{shape} ws{ws} rank {rs.tp_rank}", unit="tensor")
            try:
                rng = np.random.default_rng([seed, rs.tp_rank])
                for name in it:
                    full = logical_shape(cfg, name)
                    rng_ = _ranges(N.SPLIT[N.pattern_of(name)], rs, cfg)
                    s = list(full)
                    if rng_ is not None:
                        axis = {"rows": -2 if len(s) > 1 else -1, "lead": 0}.get(rng_[0], -1)  # 1-D rows: a bias
                        s[axis] = rng_[2] - rng_[1]
                    pat = N.pattern_of(name)
                    t = tensor_type(shape, pat, len(s), wtype)
                    if t == "f32" and pat not in _NORMS:   # biases, sinks, bias tables: small values
                        arrays = {"w": (rng.standard_normal(s, dtype=np.float32) * 0.02)}
                    else:
                        arrays = random_tensor(rng, t, tuple(s))
                    w.add(name, t, tuple(s), arrays)
                    del arrays
                w.close()
            except BaseException:
                w.abort()
                raise
    extra = {"weight_type": wtype}
    if shape in EXPERT_TYPE:
        extra["expert_weight_type"] = EXPERT_TYPE[shape]
    fmt.write_manifest(out, cfg, world_sizes, source=f"synthetic:{shape}", extra=extra)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m convert synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("out", type=Path)
    p.add_argument("--world-size", type=int, nargs="+", required=True)
    p.add_argument("--weight-type", choices=("q4_0", "q4_1", "q8_0", "f16", "f32"), default=None,
                   help="type of the weight matrices (default: q8_0 for gpt-oss, whose experts are always "
                        "MXFP4; q4_0 for the others)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None,
                   help="write only the first N layers at full width (so a cut of a large model fits)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        synth(a.shape, a.out, a.world_size, a.weight_type, a.seed, progress=not a.no_progress, n_layers=a.layers)
    except ValueError as e:
        print(f"convert synth: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({a.shape}, {a.weight_type or DEFAULT_TYPE.get(a.shape, 'q4_0')}"
          f"{', experts ' + EXPERT_TYPE[a.shape] if a.shape in EXPERT_TYPE else ''}) for world sizes {a.world_size}")
    return 0
