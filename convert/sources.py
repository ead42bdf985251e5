"""Readers for the converter's inputs: a GGUF file, a Hugging Face directory.

Each source exposes ``config`` (ModelConfig), ``names`` (internal tensor names
present) and ``load(name) -> SrcTensor``: either the split-layout arrays of a
supported quantized/float GGUF tensor (bit-exact), or float32 values.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpillm.formats import quant
from mpillm.formats.config import ModelConfig

from . import names as N


@dataclass
class SrcTensor:
    wtype: str | None            # a type of ours when ``arrays`` holds it bit-exactly, else None
    arrays: dict | None          # split-layout arrays (leading expert axis allowed)
    values: np.ndarray | None    # float32 values when the source type is not one of ours
    src_type: str                # the source's own type name, for messages


def refuse_sliding_window(where, window, context_length: int) -> None:
    """Sliding-window attention is not implemented: a model whose window is shorter than the context
    it would run with would silently attend past the window and give wrong results, so refuse it.
    A window that covers the whole context is the same as full attention (Mistral-style configs)."""
    if window and 0 < int(window) < context_length:
        raise ValueError(f"{where}: sliding-window attention (window {int(window)} tokens) is not supported yet, "
                         f"and the window is shorter than the model's context length {context_length}: "
                         f"past {int(window)} tokens the results would be wrong")


def _hf_sliding_window(hf: dict) -> int | None:
    """The window a Hugging Face config applies to some layer, or None.

    ``layer_types`` (transformers 5) says per layer; otherwise ``sliding_window`` is used unless
    ``use_sliding_window`` (Qwen2/Qwen3 configs) is false."""
    window = hf.get("sliding_window")
    if not window:
        return None
    if hf.get("layer_types") is not None:
        return window if "sliding_attention" in hf["layer_types"] else None
    if not hf.get("use_sliding_window", True):
        return None
    # Qwen2: only layers from max_window_layers on slide
    if hf.get("max_window_layers") is not None and hf["max_window_layers"] >= hf["num_hidden_layers"]:
        return None
    return window


def _unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved-pair RoPE) -> Hugging Face (NeoX) order."""
    rows = a.shape[0]
    hd = rows // n_head
    return a.reshape(n_head, hd // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


# ----------------------------------------------------------------------------------------------
class GGUFSource:
    _TYPES = {"F32": "f32", "F16": "f16", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0", "Q5_0": "q5_0",
              "Q5_1": "q5_1", "Q4_K": "q4_K", "Q5_K": "q5_K", "Q6_K": "q6_K", "MXFP4": "mxfp4"}

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{self.path}: not a readable GGUF file ({e})") from None
        f = self.reader.fields
        arch = self._get("general.architecture")
        if arch not in N.GGUF_ARCHITECTURES:
            raise ValueError(f"{self.path}: unknown architecture {arch!r}; supported GGUF architectures: "
                             f"{', '.join(N.GGUF_ARCHITECTURES)}")
        self.tensors = {t.name: t for t in self.reader.tensors}
        g = lambda k, d=None: self._get(f"{arch}.{k}", d)  # noqa: E731
        dim, heads = int(g("embedding_length")), int(g("attention.head_count"))
        n_vocab = g("vocab_size") or len(f["tokenizer.ggml.tokens"].data)
        moe = arch in ("qwen3moe", "gpt-oss")
        self.config = ModelConfig(
            **(_gguf_gpt_oss(g, int(g("block_count"))) if arch == "gpt-oss" else {}),
            arch=arch, dim=dim, n_layers=int(g("block_count")), n_heads=heads,
            n_kv_heads=int(g("attention.head_count_kv", heads)),
            head_dim=int(g("attention.key_length", dim // heads)),
            ffn_dim=0 if moe else int(g("feed_forward_length")), vocab_size=int(n_vocab),
            rope_theta=float(g("rope.freq_base", 10000.0)),
            norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(g("context_length", 2048)),
            tied_embeddings="output.weight" not in self.tensors,
            qk_norm=arch in ("qwen3", "qwen3moe"), qkv_bias=arch in ("qwen2", "gpt-oss"),
            n_experts=int(g("expert_count", 0)) if moe else 0,
            n_experts_used=int(g("expert_used_count", 0)) if moe else 0,
            expert_ffn_dim=int(g("expert_feed_forward_length", 0)) if moe else 0,
            norm_topk_prob=bool(g("expert_weights_norm", True)),
        )
        if arch != "gpt-oss":  # gpt-oss: the window is in the config and attention applies it
            refuse_sliding_window(self.path, g("attention.sliding_window"), self.config.context_length)
        if g("rope.scaling.type") not in (None, "none") and not (arch == "gpt-oss" and g("rope.scaling.type") == "yarn"):
            raise ValueError(f"{self.path}: RoPE scaling {g('rope.scaling.type')!r} is not supported yet")
        self.names = N.model_tensors(arch, self.config.n_layers, self.config.tied_embeddings,
                                     rope_freqs="rope_freqs.weight" in self.tensors)
        missing = [self._gguf_name(n) for n in self.names if self._gguf_name(n) not in self.tensors]
        if missing:
            raise ValueError(f"{self.path}: tensors missing for architecture {arch}: {', '.join(missing[:5])}")

    def _get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _gguf_name(self, name: str) -> str:
        return N.gguf_name(self.config.arch, N.pattern_of(name)).format(i=N.layer_of(name))

    def load(self, name: str) -> SrcTensor:
        import gguf

        t = self.tensors[self._gguf_name(name)]
        tname = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        ours = self._TYPES.get(tname)
        if len(shape) == 1:
            vals = np.asarray(t.data).astype(np.float32) if ours else gguf.quants.dequantize(t.data, t.tensor_type)
            return SrcTensor(None, None, np.asarray(vals, np.float32).reshape(shape), tname)
        rows, cols = shape[-2:]
        if ours:
            flat = np.asarray(t.data).reshape(-1, np.asarray(t.data).shape[-1])
            if ours in ("f32", "f16"):
                arrays = {"w": flat.reshape(shape)}
            else:
                arrays = quant.split_ggml(flat, ours, flat.shape[0], cols)
                arrays = {k: v.reshape(*shape[:-2], rows, v.shape[-1]) for k, v in arrays.items()}
            src = SrcTensor(ours, arrays, None, tname)
        else:
            vals = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
            src = SrcTensor(None, None, vals, tname)
        if self.config.arch == "llama" and N.pattern_of(name) in ("layers/{i}/wq", "layers/{i}/wk"):
            nh = self.config.n_heads if name.endswith("wq") else self.config.n_kv_heads
            if src.arrays is not None:
                src.arrays = {k: _unpermute_rows(v, nh) for k, v in src.arrays.items()}
            else:
                src.values = _unpermute_rows(src.values, nh)
        return src


# ----------------------------------------------------------------------------------------------
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "U8": np.uint8}

# gpt-oss internal expert tensors -> (key of names.HF_GPT_OSS, rows of the fused tensor: 0 even,
# 1 odd, None all)
_GPT_OSS_FUSED = {"layers/{i}/exp_gate": ("gate_up", 0), "layers/{i}/exp_up": ("gate_up", 1),
                  "layers/{i}/exp_down": ("down", None), "layers/{i}/exp_gate_b": ("gate_up_bias", 0),
                  "layers/{i}/exp_up_b": ("gate_up_bias", 1)}


def _yarn_fields(scaling: dict) -> dict:
    return dict(rope_scaling="yarn", rope_factor=float(scaling["factor"]),
                rope_orig_context=int(scaling["original_max_position_embeddings"]),
                yarn_beta_fast=float(scaling.get("beta_fast") or 32.0),
                yarn_beta_slow=float(scaling.get("beta_slow") or 1.0),
                yarn_truncate=bool(scaling.get("truncate", True)))


def _hf_gpt_oss(hf: dict, scaling: dict) -> dict:
    """The gpt-oss ModelConfig fields of a Hugging Face config (the MoE sizes included)."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"gpt-oss config: layer_types {types} is not one of sliding/full per layer")
    window = int(hf.get("sliding_window") or 0)
    return dict(
        o_bias=True, attn_sinks=True, expert_bias=True,
        sliding_window=window, sliding_layers=[i for i, t in enumerate(types) if t == "sliding_attention" and window],
        ffn_act="swiglu_oai", swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)), **(_yarn_fields(scaling) if scaling else {}))


def _gguf_gpt_oss(g, n_layers: int) -> dict:
    """The gpt-oss ModelConfig fields of a GGUF (llama.cpp: even layers slide unless the file
    gives attention.sliding_window_pattern; YaRN with transformers' untruncated range)."""
    window = int(g("attention.sliding_window", 0) or 0)
    pat = g("attention.sliding_window_pattern", 2)
    if isinstance(pat, (list, tuple)):
        sliding = [i for i, on in enumerate(pat) if on]
    else:
        sliding = [i for i in range(n_layers) if int(pat) == 0 or i % int(pat) < int(pat) - 1]
    yarn = {}
    if g("rope.scaling.type") == "yarn":
        yarn = _yarn_fields({"factor": g("rope.scaling.factor"),
                             "original_max_position_embeddings": g("rope.scaling.original_context_length"),
                             "beta_fast": g("rope.scaling.yarn_beta_fast"), "beta_slow": g("rope.scaling.yarn_beta_slow"),
                             "truncate": False})
    return dict(o_bias=True, attn_sinks=True, expert_bias=True, sliding_window=window,
                sliding_layers=sliding if window else [], ffn_act="swiglu_oai", **yarn)


def _read_safetensors_index(path: Path) -> dict[str, tuple[Path, str, tuple, int, int]]:
    """Header of one .safetensors file: name -> (path, dtype, shape, begin, end) of its bytes."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    base = 8 + n
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        out[k] = (path, v["dtype"], tuple(v["shape"]), base + b, base + e)
    return out


class HFSource:
    def __init__(self, path: Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.exists():
            raise ValueError(f"{self.path}: no config.json (not a Hugging Face model directory)")
        hf = json.loads(cfg_path.read_text())
        archs = hf.get("architectures") or ["?"]
        arch = N.HF_ARCHITECTURES.get(archs[0])
        if arch is None:
            raise ValueError(f"{self.path}: unknown architecture {archs[0]!r}; supported: "
                             f"{', '.join(N.HF_ARCHITECTURES)}")
        gpt_oss = arch == "gpt-oss"
        rope = hf.get("rope_parameters") or {}  # transformers 5 form, next to or instead of rope_theta
        scaling = rope if rope.get("rope_type", "default") != "default" else (hf.get("rope_scaling") or {})
        if scaling and not (gpt_oss and scaling.get("rope_type", scaling.get("type")) == "yarn"):
            raise ValueError(f"{self.path}: RoPE scaling {scaling} is not supported yet")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.path}: no *.safetensors files")
        self.index = {}
        for fp in files:
            self.index.update(_read_safetensors_index(fp))
        if arch == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise ValueError(f"{self.path}: a {archs[0]} with attention_bias/mlp_bias is not supported "
                             f"(its biases would be ignored)")
        heads = hf["num_attention_heads"]
        moe = arch in ("qwen3moe", "gpt-oss")
        if moe and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1):
            raise ValueError(f"{self.path}: MoE models with dense layers (mlp_only_layers/decoder_sparse_step) are not supported")
        tied = bool(hf.get("tie_word_embeddings", False)) or "lm_head.weight" not in self.index
        self.config = ModelConfig(
            **(_hf_gpt_oss(hf, scaling) if gpt_oss else {}),
            arch=arch, dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            ffn_dim=0 if moe else hf["intermediate_size"], vocab_size=hf["vocab_size"],
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            context_length=int(hf.get("max_position_embeddings", 2048)), tied_embeddings=tied,
            qk_norm=arch in ("qwen3", "qwen3moe"), qkv_bias=arch in ("qwen2", "gpt-oss"),
            n_experts=(hf.get("num_experts") or hf.get("num_local_experts") or 0) if moe else 0,
            n_experts_used=hf.get("num_experts_per_tok", 0) if moe else 0,
            expert_ffn_dim=(hf["intermediate_size"] if gpt_oss else hf.get("moe_intermediate_size", 0)) if moe else 0,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        )
        if not gpt_oss:  # gpt-oss: the window is in the config and attention applies it
            refuse_sliding_window(self.path, _hf_sliding_window(hf), self.config.context_length)
        self.names = N.model_tensors(arch, self.config.n_layers, tied)
        self.mxfp4 = gpt_oss and N.HF_GPT_OSS["gate_up"].format(i=0) + "_blocks" in self.index
        for n in self.names:
            for hn in self._hf_names(n):
                if hn not in self.index:
                    raise ValueError(f"{self.path}: tensor {hn} is missing")

    def _hf_names(self, name: str) -> list[str]:
        pat, i = N.hf_name(self.config.arch, N.pattern_of(name)), N.layer_of(name)
        if self.config.arch == "gpt-oss" and N.pattern_of(name) in _GPT_OSS_FUSED:
            key = _GPT_OSS_FUSED[N.pattern_of(name)][0]
            base = N.HF_GPT_OSS[key].format(i=i)
            return [base + "_blocks", base + "_scales"] if self.mxfp4 and key != "gate_up_bias" else [base]
        if "{e}" in pat:
            return [pat.format(i=i, e=e) for e in range(self.config.n_experts)]
        return [pat.format(i=i)]

    def _load_gpt_oss_expert(self, name: str) -> SrcTensor:
        """gpt-oss's fused experts -> one of exp_gate / exp_up / exp_down (E, rows, cols) or the
        gate/up bias (E, rows). MXFP4 blocks are copied: only the nibbles move (HF puts element
        2j in the low nibble of byte j, GGML element j and j + 16), the E8M0 scales are the same
        bytes; gate/up take the even/odd rows of the fused tensor."""
        key, rows = _GPT_OSS_FUSED[N.pattern_of(name)]
        hn = self._hf_names(name)
        if self.mxfp4 and key != "gate_up_bias":
            blocks, bdt = self._read(hn[0])
            scales, sdt = self._read(hn[1])
            if (bdt, sdt) != ("U8", "U8") or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
                raise ValueError(f"{self.path}: {hn[0]} / {hn[1]} are not MXFP4 blocks/scales "
                                 f"({bdt} {blocks.shape}, {sdt} {scales.shape})")
            if rows is not None:
                blocks, scales = blocks[:, rows::2], scales[:, rows::2]
            codes = np.empty(blocks.shape[:-1] + (32,), np.uint8)   # element order
            codes[..., 0::2], codes[..., 1::2] = blocks & 0x0F, blocks >> 4
            qs = codes[..., :16] | (codes[..., 16:] << 4)          # GGML nibble order
            lead = blocks.shape[:-2]
            return SrcTensor("mxfp4", {"qs": np.ascontiguousarray(qs.reshape(*lead, -1)),
                                       "e": np.ascontiguousarray(scales)}, None, "MXFP4")
        vals, dt = self._read(hn[0])
        if key == "gate_up_bias":
            return SrcTensor(None, None, np.asarray(vals[..., rows::2], np.float32), dt)
        vals = np.swapaxes(vals, -1, -2)  # transformers' own layout is (E, in, out)
        if rows is not None:
            vals = vals[:, rows::2]
        if dt in ("F32", "F16"):
            return SrcTensor(dt.lower(), {"w": np.ascontiguousarray(vals)}, None, dt)
        return SrcTensor(None, None, np.ascontiguousarray(vals, dtype=np.float32), dt)

    def _read(self, hn: str) -> tuple[np.ndarray, str]:
        path, dt, shape, b, e = self.index[hn]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {hn} has unsupported dtype {dt}")
        raw = np.memmap(path, dtype=_ST_DTYPES[dt], mode="r", offset=b, shape=shape) if e > b else np.zeros(shape, _ST_DTYPES[dt])
        if dt == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32), dt
        return raw, dt

    def load(self, name: str) -> SrcTensor:
        if self.config.arch == "gpt-oss" and N.pattern_of(name) in _GPT_OSS_FUSED:
            return self._load_gpt_oss_expert(name)
        parts = [self._read(hn) for hn in self._hf_names(name)]
        dt = parts[0][1]
        vals = np.stack([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        if dt in ("F32", "F16") and vals.ndim >= 2:
            return SrcTensor(dt.lower(), {"w": vals}, None, dt)
        return SrcTensor(None, None, np.asarray(vals, dtype=np.float32), dt)


def open_source(path: Path):
    path = Path(path)
    if path.is_dir():
        return HFSource(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return GGUFSource(path)
    raise ValueError(f"{path}: neither a GGUF file nor a Hugging Face model directory")
