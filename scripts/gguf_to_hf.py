#!/usr/bin/env python3
"""A GGUF (Llama architecture) as a Hugging Face checkpoint: model.safetensors + config.json +
tokenizer files, in transformers' Llama naming and layout.

    source scripts/env.sh && python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype f32|f16|bf16]

What it is for: other engines' converters read Hugging Face checkpoints (distributed-llama's
convert-hf.py, the cluster benchmarks' baseline), our models come as GGUF, and both sides must
run the same weights. Every tensor is dequantized with ``gguf.quants.dequantize`` (a Q4_0 block
becomes its 32 exact float values, so requantizing it to another 4-bit format with the same
block size and max/-8 scale gives back the same codes when the block's largest magnitude is
a -8 code) and written in the checkpoint's layout:

* llama.cpp's converter permutes the rows of attn_q / attn_k inside each head (pairs
  (i, i + hd/2) become neighbours, the interleaved RoPE its kernels use); this script undoes it
  (``unpermute``), so q_proj / k_proj are in the original (NeoX-RoPE) order a Hugging Face
  Llama has, and a converter that permutes them again for its own RoPE (as distributed-llama's
  does) gets what it expects.
* ``rope_freqs.weight`` (llama3 RoPE scaling as per-frequency divisors) is not a tensor in a
  Hugging Face checkpoint: the script recognizes which llama3 ``rope_scaling`` produced it
  (Llama 3.1 or 3.2 parameters) and writes that into config.json.
* ``rms_norm_eps`` is rounded to 6 significant digits (a GGUF stores float32: 1e-5 would
  come out as 9.99999974e-06, which some readers compare against 1e-05 exactly).
* the tokenizer: ``tokenizer.json`` (byte-level BPE) or ``tokenizer.model`` (SentencePiece)
  rebuilt from the GGUF's vocabulary by the project's converter (convert/tokenizer_export.py),
  with a transformers-style ``tokenizer_config.json`` (tokenizer_class, bos/eos, chat template).

The safetensors file is written one tensor at a time (header first, offsets computed from the
shapes), so memory holds one dequantized tensor at most. Only the ``llama`` architecture is
handled (the q/k permutation and the names are Llama's).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(os.environ.get("MPILLM_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

# GGUF name (per layer: {i}) -> Hugging Face name
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
SKIP = {"rope_freqs.weight"}   # becomes config.json's rope_scaling

# llama3 rope_scaling parameter sets of the released models: (factor, low_freq_factor,
# high_freq_factor, original_max_position_embeddings)
LLAMA3_SCALINGS = {"llama-3.1": (8.0, 1.0, 4.0, 8192), "llama-3.2": (32.0, 1.0, 4.0, 8192)}

ST_DTYPES = {"f32": ("F32", np.float32), "f16": ("F16", np.float16), "bf16": ("BF16", None)}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation. llama.cpp maps a head's rows [h0 | h1] (the two
    halves NeoX RoPE rotates together) to h0[0], h1[0], h0[1], h1[1], ...; read the rows as
    (head, pair index, which half) and swap the last two axes back."""
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (HF order -> GGUF order), for the round-trip check."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_divisors(theta: float, head_dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """What llama.cpp stores in rope_freqs.weight for a llama3 rope_scaling (per frequency)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    low_wl, high_wl = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < high_wl, 1.0, out)
    return np.where(wavelen > low_wl, factor, out)


def rope_scaling_of(divisors: np.ndarray, theta: float, head_dim: int) -> dict:
    for name, (f, lo, hi, orig) in LLAMA3_SCALINGS.items():
        if np.allclose(divisors, llama3_divisors(theta, head_dim, f, lo, hi, orig), rtol=1e-3, atol=1e-4):
            return {"rope_type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
                    "original_max_position_embeddings": orig}
    raise ValueError("rope_freqs.weight matches neither Llama 3.1's nor 3.2's llama3 rope_scaling; "
                     "add its parameters to LLAMA3_SCALINGS")


class Gguf:
    def __init__(self, path: Path):
        import gguf

        self.r = gguf.GGUFReader(str(path))
        self.arch = self.get("general.architecture")
        if self.arch != "llama":
            raise SystemExit(f"{path}: architecture {self.arch!r}; only 'llama' is handled")
        self.tensors = {t.name: t for t in self.r.tensors}

    def get(self, key: str, default=None):
        f = self.r.fields.get(key)
        return default if f is None else f.contents()

    def hp(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)

    def values(self, name: str) -> np.ndarray:
        """The tensor as float32 in row-major (rows, cols) order."""
        import gguf

        t = self.tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape))     # GGUF lists the fastest dim first
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            v = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type.name == "BF16" else np.asarray(t.data)
        else:
            v = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(v, np.float32).reshape(shape)


def hf_config(g: Gguf, dtype: str, tied: bool, tok: dict) -> dict:
    dim, heads = int(g.hp("embedding_length")), int(g.hp("attention.head_count"))
    kv = int(g.hp("attention.head_count_kv", heads))
    head_dim = int(g.hp("attention.key_length", dim // heads))
    theta = float(g.hp("rope.freq_base", 10000.0))
    n_vocab = int(g.hp("vocab_size") or len(g.r.fields["tokenizer.ggml.tokens"].data))
    eps = float(g.hp("attention.layer_norm_rms_epsilon", 1e-5))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": int(g.hp("feed_forward_length")),
        "num_hidden_layers": int(g.hp("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "vocab_size": n_vocab,
        "max_position_embeddings": int(g.hp("context_length", 2048)),
        "rms_norm_eps": float(f"{eps:.6g}"),
        "rope_theta": theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
        "bos_token_id": tok.get("bos_token_id"),
        "eos_token_id": tok.get("eos_token_id"),
    }
    if "rope_freqs.weight" in g.tensors:
        cfg["rope_scaling"] = rope_scaling_of(g.values("rope_freqs.weight").reshape(-1), theta, head_dim)
    elif g.hp("rope.scaling.type") not in (None, "none"):
        raise SystemExit(f"RoPE scaling {g.hp('rope.scaling.type')!r} without rope_freqs: not handled")
    return cfg


def plan(g: Gguf) -> list[tuple[str, str]]:
    """(gguf name, hf name) for every tensor, in checkpoint order."""
    n_layers = int(g.hp("block_count"))
    out = []
    for k, v in NAMES.items():
        if "{i}" not in k and k in g.tensors:
            out.append((k, v))
    for i in range(n_layers):
        out += [(k.format(i=i), v.format(i=i)) for k, v in NAMES.items() if "{i}" in k]
    known = {a for a, _ in out} | SKIP
    extra = sorted(set(g.tensors) - known)
    if extra:
        raise SystemExit(f"tensors this script does not map: {', '.join(extra[:8])}")
    missing = [a for a, _ in out if a not in g.tensors]
    if missing:
        raise SystemExit(f"tensors missing from the GGUF: {', '.join(missing[:8])}")
    return out


def to_dtype(v: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":   # round to nearest even on the upper 16 bits
        u = np.ascontiguousarray(v, np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(v, ST_DTYPES[dtype][1])


def write_safetensors(path: Path, g: Gguf, names: list[tuple[str, str]], dtype: str, transform) -> None:
    """Header from the shapes, then each tensor in turn (little-endian, C order)."""
    st_dtype, item = ST_DTYPES[dtype][0], (4 if dtype == "f32" else 2)
    header, off = {}, 0
    for gn, hn in names:
        shape = [int(s) for s in reversed(g.tensors[gn].shape)]
        size = int(np.prod(shape)) * item
        header[hn] = {"dtype": st_dtype, "shape": shape, "data_offsets": [off, off + size]}
        off += size
    header["__metadata__"] = {"format": "pt", "source": "gguf (scripts/gguf_to_hf.py)"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n, (gn, hn) in enumerate(names):
            v = to_dtype(transform(gn, g.values(gn)), dtype)
            assert v.nbytes == header[hn]["data_offsets"][1] - header[hn]["data_offsets"][0], hn
            f.write(v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes())
            if sys.stderr.isatty() or (n + 1) % max(1, len(names) // 10) == 0 or n + 1 == len(names):
                print(f"  {n + 1}/{len(names)} {hn} {list(v.shape)}", file=sys.stderr, flush=True)
    tmp.replace(path)


def write_tokenizer(g: Gguf, out: Path) -> dict:
    """tokenizer.json / tokenizer.model from the GGUF vocabulary, and transformers' tokenizer_config."""
    from convert.tokenizer_export import export_from_gguf

    with tempfile.TemporaryDirectory() as td:
        export_from_gguf(g.r, Path(td))
        ours = json.loads((Path(td) / "tokenizer_config.json").read_text())
        files = [f for f in ("tokenizer.json", "tokenizer.model") if (Path(td) / f).exists()]
        for f in files:
            (out / f).write_bytes((Path(td) / f).read_bytes())
    spm = "tokenizer.model" in files
    tc = {
        "tokenizer_class": "LlamaTokenizer" if spm else "PreTrainedTokenizerFast",
        "bos_token": ours.get("bos_token"),
        "eos_token": ours.get("eos_token"),
        "add_bos_token": bool(ours.get("add_bos_token")),
        "model_max_length": int(g.hp("context_length", 2048)),
    }
    if ours.get("chat_template"):
        tc["chat_template"] = ours["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    gen = {"bos_token_id": ours.get("bos_token_id"), "eos_token_id": ours.get("eos_token_ids") or ours.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return ours


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", choices=list(ST_DTYPES), default="f32",
                   help="safetensors dtype (default f32: dequantized blocks exactly; f16/bf16 round them)")
    p.add_argument("--check", action="store_true",
                   help="after writing, re-apply llama.cpp's permutation to q/k and compare with the GGUF")
    a = p.parse_args(argv)
    g = Gguf(a.gguf)
    a.out.mkdir(parents=True, exist_ok=True)
    heads = int(g.hp("attention.head_count"))
    kv = int(g.hp("attention.head_count_kv", heads))
    tok = write_tokenizer(g, a.out)
    tied = "output.weight" not in g.tensors
    cfg = hf_config(g, a.dtype, tied, tok)
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    def transform(gn: str, v: np.ndarray) -> np.ndarray:
        if gn.endswith(".attn_q.weight"):
            return unpermute(v, heads)
        if gn.endswith(".attn_k.weight"):
            return unpermute(v, kv)
        return v

    names = plan(g)
    write_safetensors(a.out / "model.safetensors", g, names, a.dtype, transform)
    print(f"gguf_to_hf: {a.out} ({len(names)} tensors, {a.dtype}, "
          f"{(a.out / 'model.safetensors').stat().st_size / 2**20:.0f} MiB; rope_scaling {cfg['rope_scaling']})")
    if a.check:
        check(g, a.out / "model.safetensors", heads, kv, a.dtype)
    return 0


def check(g: Gguf, st: Path, heads: int, kv: int, dtype: str) -> None:
    """Layer 0's q/k: permuted back they equal the GGUF's values; the others equal as they are."""
    from safetensors import safe_open

    with safe_open(str(st), framework="numpy") as f:
        for gn, hn, nh in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", heads),
                           ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", kv),
                           ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", None)):
            if dtype == "bf16":
                print("  --check: skipped for bf16", file=sys.stderr)
                return
            got = f.get_tensor(hn).astype(np.float32)
            back = permute(got, nh) if nh else got
            ref = g.values(gn)
            err = float(np.max(np.abs(back - ref)))
            print(f"  check {hn}: max |diff| {err:.3g}", file=sys.stderr)
            if err > (0 if dtype == "f32" else 1e-2 * float(np.max(np.abs(ref)))):
                raise SystemExit(f"check failed for {hn}")


if __name__ == "__main__":
    sys.exit(main())
