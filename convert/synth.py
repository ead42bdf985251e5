"""python -m convert synth --shape llama-3.2-1b OUT --world-size 2 [--weight-type q4_0]

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

from mpillm import format as fmt
from mpillm import quant
from mpillm.config import ModelConfig
from mpillm.partition import plan

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


def logical_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Full (unsplit) shape of an internal tensor."""
    p = N.pattern_of(name).split("/")[-1]
    D, hd, E = cfg.dim, cfg.head_dim, cfg.n_experts
    return {
        "tok_embd": (cfg.vocab_size, D), "output": (cfg.vocab_size, D), "output_norm": (D,), "rope_freqs": (hd // 2,),
        "attn_norm": (D,), "ffn_norm": (D,), "q_norm": (hd,), "k_norm": (hd,),
        "wq": (cfg.q_dim, D), "wk": (cfg.kv_dim, D), "wv": (cfg.kv_dim, D), "wo": (D, cfg.q_dim),
        "w_gate": (cfg.ffn_dim, D), "w_up": (cfg.ffn_dim, D), "w_down": (D, cfg.ffn_dim),
        "router": (E, D), "exp_gate": (E, cfg.expert_ffn_dim, D), "exp_up": (E, cfg.expert_ffn_dim, D),
        "exp_down": (E, D, cfg.expert_ffn_dim),
    }[p]


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


def synth(shape: str, out: Path, world_sizes: list[int], wtype: str, seed: int = 0, progress: bool = True) -> None:
    cfg = ModelConfig(**SHAPES[shape])
    names = N.model_tensors(cfg.arch, cfg.n_layers, cfg.tied_embeddings)
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
                        axis = -2 if rng_[0] == "rows" else -1
                        s[axis] = rng_[2] - rng_[1]
                    t = "f32" if len(s) == 1 or N.pattern_of(name) == "layers/{i}/router" else wtype
                    w.add(name, t, tuple(s), random_tensor(rng, t, tuple(s)))
                w.close()
            except BaseException:
                w.abort()
                raise
    fmt.write_manifest(out, cfg, world_sizes, source=f"synthetic:{shape}", extra={"weight_type": wtype})


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m convert synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("out", type=Path)
    p.add_argument("--world-size", type=int, nargs="+", required=True)
    p.add_argument("--weight-type", choices=("q4_0", "q4_1", "q8_0", "f16", "f32"), default="q4_0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        synth(a.shape, a.out, a.world_size, a.weight_type, a.seed, progress=not a.no_progress)
    except ValueError as e:
        print(f"convert synth: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({a.shape}, {a.weight_type}) for world sizes {a.world_size}")
    return 0
