#!/usr/bin/env python3
"""A GGUF (llama or qwen3moe architecture) as a Hugging Face checkpoint: model.safetensors +
config.json + tokenizer files, in transformers' Llama / Qwen3-MoE naming and layout.

    source scripts/env.sh && python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype f32|f16|bf16]

What it is for: other engines' converters read Hugging Face checkpoints (distributed-llama's
convert-hf.py, the cluster benchmarks' baseline), our models come as GGUF, and both sides must
run the same weights. Every tensor is dequantized with ``gguf.quants.dequantize`` (a Q4_0 block
becomes its 32 exact float values, so requantizing it to another 4-bit format with the same
block size and max/-8 scale gives back the same codes when the block's largest magnitude is
a -8 code) and written in the checkpoint's layout:

* the names come from the project converter's table (convert/names.py, the same map it reads
  checkpoints with); GGUF's stacked experts ``blk.L.ffn_{gate,up,down}_exps`` (experts, rows, cols)
  become one tensor per expert, ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``, each
  dequantized from its own slice of blocks.
* llama.cpp's converter permutes the rows of attn_q / attn_k inside each head (pairs
  (i, i + hd/2) become neighbours, the interleaved RoPE its kernels use); this script undoes it
  (``unpermute``), so q_proj / k_proj are in the original (NeoX-RoPE) order a Hugging Face
  Llama has, and a converter that permutes them again for its own RoPE (as distributed-llama's
  does) gets what it expects. Only llama's: llama.cpp's Qwen3 / Qwen3-MoE converter writes q/k in
  the checkpoint's order (NeoX RoPE on the halves), and distributed-llama permutes only LLAMA.
* ``rope_freqs.weight`` (llama3 RoPE scaling as per-frequency divisors) is not a tensor in a
  Hugging Face checkpoint: the script recognizes which llama3 ``rope_scaling`` produced it
  (Llama 3.1 or 3.2 parameters) and writes that into config.json.
* ``rms_norm_eps`` is rounded to 6 significant digits (a GGUF stores float32: 1e-5 would
  come out as 9.99999974e-06, which some readers compare against 1e-05 exactly).
* the tokenizer: ``tokenizer.json`` (byte-level BPE) or ``tokenizer.model`` (SentencePiece)
  rebuilt from the GGUF's vocabulary by the project's converter (convert/tokenizer_export.py),
  with a transformers-style ``tokenizer_config.json`` (tokenizer_class, bos/eos, chat template).

The safetensors file is written one tensor at a time (header first, offsets computed from the
shapes), so memory holds one dequantized tensor (one expert's) at most.

``--check`` reads the export back with the project converter's own readers (convert.sources: the
HF reader where it takes the config, else the same names straight from the safetensors) and
compares every internal tensor of the first and the last layer and the global ones (``--check-all``:
every layer) with what the converter reads from the GGUF: in f32 they must be equal, in f16 / bf16
within the dtype's rounding (exact when the values fit it, as the baseline's random Q4_0 do).
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

from convert import names as N  # noqa: E402  (the converter's name table)

ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe")}
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
        if self.arch not in ARCHS:
            raise SystemExit(f"{path}: architecture {self.arch!r}; handled: {', '.join(ARCHS)}")
        self.tensors = {t.name: t for t in self.r.tensors}

    def get(self, key: str, default=None):
        f = self.r.fields.get(key)
        return default if f is None else f.contents()

    def hp(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)

    def shape(self, name: str, expert: int | None = None) -> tuple:
        shape = tuple(int(s) for s in reversed(self.tensors[name].shape))   # GGUF lists the fastest dim first
        return shape if expert is None else shape[1:]

    def values(self, name: str, expert: int | None = None) -> np.ndarray:
        """The tensor (or one expert of a stacked (experts, rows, cols) tensor) as float32 in
        row-major order."""
        import gguf

        t = self.tensors[name]
        data = t.data
        if expert is not None:
            if data.shape[0] != int(t.shape[-1]):
                raise ValueError(f"{name}: {data.shape} is not led by its {int(t.shape[-1])} experts")
            data = data[expert]
        if t.tensor_type.name in ("F32", "F16"):
            v = np.asarray(data)
        else:
            v = gguf.quants.dequantize(data, t.tensor_type)
        return np.asarray(v, np.float32).reshape(self.shape(name, expert))


def hf_config(g: Gguf, dtype: str, tied: bool, tok: dict) -> dict:
    dim, heads = int(g.hp("embedding_length")), int(g.hp("attention.head_count"))
    kv = int(g.hp("attention.head_count_kv", heads))
    head_dim = int(g.hp("attention.key_length", dim // heads))
    theta = float(g.hp("rope.freq_base", 10000.0))
    n_vocab = int(g.hp("vocab_size") or len(g.r.fields["tokenizer.ggml.tokens"].data))
    eps = float(g.hp("attention.layer_norm_rms_epsilon", 1e-5))
    cfg = {
        "architectures": [ARCHS[g.arch][0]],
        "model_type": ARCHS[g.arch][1],
        "hidden_size": dim,
        "intermediate_size": int(g.hp("feed_forward_length", 0) or g.hp("expert_feed_forward_length")),
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
    if g.arch == "qwen3moe":   # the fields transformers' Qwen3MoeConfig and distributed-llama's converter read
        cfg.update({
            "num_experts": int(g.hp("expert_count")),
            "num_experts_per_tok": int(g.hp("expert_used_count")),
            "moe_intermediate_size": int(g.hp("expert_feed_forward_length")),
            "norm_topk_prob": bool(g.hp("expert_weights_norm", True)),   # llama.cpp's qwen3moe always renormalizes
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": False,
            "sliding_window": None,
        })
        del cfg["mlp_bias"]
    if "rope_freqs.weight" in g.tensors:
        cfg["rope_scaling"] = rope_scaling_of(g.values("rope_freqs.weight").reshape(-1), theta, head_dim)
    elif g.hp("rope.scaling.type") not in (None, "none"):
        raise SystemExit(f"RoPE scaling {g.hp('rope.scaling.type')!r} without rope_freqs: not handled")
    return cfg


def plan(g: Gguf) -> list[tuple[str, str, int | None]]:
    """(hf name, gguf name, expert index or None) for every checkpoint tensor, in the converter's
    order (convert.names.model_tensors), the stacked experts one tensor per expert."""
    n_layers = int(g.hp("block_count"))
    tied = "output.weight" not in g.tensors
    out, used = [], set()
    for name in N.model_tensors(g.arch, n_layers, tied, rope_freqs="rope_freqs.weight" in g.tensors):
        pat, i = N.pattern_of(name), N.layer_of(name)
        gn = N.gguf_name(g.arch, pat).format(i=i)
        used.add(gn)
        if gn in SKIP:
            continue
        if gn not in g.tensors:
            raise SystemExit(f"tensor missing from the GGUF: {gn}")
        hn = N.hf_name(g.arch, pat)
        if "{e}" in hn:
            out += [(hn.format(i=i, e=e), gn, e) for e in range(g.shape(gn)[0])]
        else:
            out.append((hn.format(i=i), gn, None))
    extra = sorted(set(g.tensors) - used)
    if extra:
        raise SystemExit(f"tensors this script does not map: {', '.join(extra[:8])}")
    return out


def to_dtype(v: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":   # round to nearest even on the upper 16 bits
        u = np.ascontiguousarray(v, np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(v, ST_DTYPES[dtype][1])


def tensor_dtype(g: Gguf, gn: str, dtype: str) -> str:
    """The export's dtype for one tensor: ``dtype``, except that the GGUF's F32 tensors (norms, the
    MoE router: small, and the router's float32 logits pick the experts) stay f32."""
    return "f32" if g.tensors[gn].tensor_type.name == "F32" else dtype


def write_safetensors(path: Path, g: Gguf, names: list[tuple[str, str, int | None]], dtype: str, transform) -> None:
    """Header from the shapes, then each tensor in turn (little-endian, C order)."""
    header, off = {}, 0
    for hn, gn, e in names:
        shape = list(g.shape(gn, e))
        dt = tensor_dtype(g, gn, dtype)
        size = int(np.prod(shape)) * (4 if dt == "f32" else 2)
        header[hn] = {"dtype": ST_DTYPES[dt][0], "shape": shape, "data_offsets": [off, off + size]}
        off += size
    header["__metadata__"] = {"format": "pt", "source": "gguf (scripts/gguf_to_hf.py)"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n, (hn, gn, e) in enumerate(names):
            v = to_dtype(transform(gn, g.values(gn, e)), tensor_dtype(g, gn, dtype))
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
                   help="safetensors dtype of the quantized tensors (default f32: dequantized blocks exactly; f16/bf16 "
                        "round them unless their values fit); the GGUF's F32 tensors stay f32")
    p.add_argument("--check", action="store_true",
                   help="after writing, read the export back with the project converter's readers and compare the "
                        "first and last layers' and the global tensors with what it reads from the GGUF")
    p.add_argument("--check-all", action="store_true", help="--check on every layer")
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
        if g.arch == "llama" and gn.endswith(".attn_q.weight"):
            return unpermute(v, heads)
        if g.arch == "llama" and gn.endswith(".attn_k.weight"):
            return unpermute(v, kv)
        return v

    names = plan(g)
    write_safetensors(a.out / "model.safetensors", g, names, a.dtype, transform)
    print(f"gguf_to_hf: {a.out} ({len(names)} tensors, {a.dtype}, "
          f"{(a.out / 'model.safetensors').stat().st_size / 2**20:.0f} MiB; rope_scaling {cfg['rope_scaling']})")
    if a.check or a.check_all:
        check(a.gguf, a.out, a.dtype, every_layer=a.check_all)
    return 0


# the rounding a float16 / bfloat16 export may leave, relative to the tensor's largest magnitude
CHECK_TOL = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}
CONFIG_FIELDS = ("arch", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                 "rope_theta", "context_length", "tied_embeddings", "qk_norm", "n_experts", "n_experts_used",
                 "expert_ffn_dim", "norm_topk_prob")


def check(gguf_path: Path, out: Path, dtype: str, every_layer: bool = False) -> dict:
    """The converter's readers on both: its GGUF reader (convert.sources.GGUFSource: llama's q/k
    unpermuted, experts stacked) and its Hugging Face reader on the export (HFSource, with its config;
    where that refuses the config, e.g. llama3 rope_scaling, which it does not run, the same per-expert
    names read from the safetensors). Internal tensors of layer 0, the last layer and the global ones
    (every layer with every_layer) must be equal in f32 and within CHECK_TOL in f16 / bf16."""
    from convert.sources import GGUFSource, HFSource, _as_values, _read_safetensors_index

    src = GGUFSource(gguf_path)
    cfg = src.config
    try:
        hf = HFSource(out)
    except ValueError as e:
        hf = None
        print(f"  --check: the converter's HF reader refuses the export ({e}); reading its tensors by name",
              file=sys.stderr)
    if hf is not None:
        diff = {f: (getattr(cfg, f), getattr(hf.config, f)) for f in CONFIG_FIELDS
                if getattr(cfg, f) != getattr(hf.config, f)}
        if abs(hf.config.norm_eps - cfg.norm_eps) > 1e-6 * cfg.norm_eps:
            diff["norm_eps"] = (cfg.norm_eps, hf.config.norm_eps)
        if diff:
            raise SystemExit(f"check failed: the export's config reads differently: {diff}")
    index = {}
    for fp in sorted(out.glob("*.safetensors")):
        index.update(_read_safetensors_index(fp))

    def read_hf(name: str) -> np.ndarray:
        if hf is not None:
            return _as_values(hf.load(name))
        pat, i = N.pattern_of(name), N.layer_of(name)
        hn = N.hf_name(cfg.arch, pat)
        parts = [hn.format(i=i, e=e) for e in range(cfg.n_experts)] if "{e}" in hn else [hn.format(i=i)]
        vals = []
        for h in parts:
            path, dt, shape, b, e = index[h]
            raw = np.memmap(path, dtype={"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dt], mode="r",
                            offset=b, shape=tuple(shape))
            vals.append((raw.astype(np.uint32) << 16).view(np.float32) if dt == "BF16" else np.asarray(raw, np.float32))
        return np.stack(vals) if len(vals) > 1 else vals[0]

    layers = set(range(cfg.n_layers)) if every_layer else {0, cfg.n_layers - 1}
    report = {}
    for name in src.names:
        i = N.layer_of(name)
        if (i is not None and i not in layers) or N.gguf_name(cfg.arch, N.pattern_of(name)) in SKIP:
            continue
        ref = _as_values(src.load(name))
        got = read_hf(name)
        if got.shape != ref.shape:
            raise SystemExit(f"check failed for {name}: shape {got.shape}, the GGUF's {ref.shape}")
        err = max((float(np.max(np.abs(np.asarray(a, np.float32) - b))) for a, b in zip(got, ref)), default=0.0)
        report[name] = err
        if err > CHECK_TOL[dtype] * float(np.max(np.abs(ref))):
            raise SystemExit(f"check failed for {name}: max |diff| {err:.3g}")
    worst = max(report, key=report.get)
    print(f"  check: {len(report)} tensors ({'every layer' if every_layer else 'layers ' + str(sorted(layers))} and the "
          f"global ones) read the same through the converter from the GGUF and from the export: "
          f"{'all equal' if report[worst] == 0 else f'max |diff| {report[worst]:.3g} ({worst})'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(main())
