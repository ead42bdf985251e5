"""Readers for the converter's inputs: a GGUF file, a Hugging Face directory.

Each source exposes ``config`` (ModelConfig), ``names`` (internal tensor names
present) and ``load(name) -> SrcTensor``: either the split-layout arrays of a
supported quantized/float GGUF tensor (bit-exact), or float32 values.
"""
from __future__ import annotations

import dataclasses
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


def _deinterleave_rope(a: np.ndarray, n_head: int, nope: int) -> np.ndarray:
    """Rows (n_head * (nope + rope), ...): each head's RoPE rows from interleaved pairs (2i, 2i+1)
    (DeepSeek's layout, llama.cpp's deepseek2) to halves (i, i + rope/2), so the engine's NeoX RoPE
    rotates the same pairs. Queries and keys move alike, so their dot products are unchanged."""
    per = a.reshape(n_head, a.shape[0] // n_head, *a.shape[1:])
    rope = per[:, nope:]
    out = per.copy()
    out[:, nope:] = np.concatenate([rope[:, 0::2], rope[:, 1::2]], axis=1)
    return out.reshape(a.shape)


def _mla_fix(cfg: ModelConfig, name: str, src: SrcTensor) -> SrcTensor:
    """deepseek2 tensors as the engine stores them: RoPE rows de-interleaved (wq / wq_b per head,
    the shared RoPE key rows of wkv_a), shared experts stacked (n_shared, rows, cols)."""
    pat = N.pattern_of(name)

    def apply(fn):
        if src.arrays is not None:
            src.arrays = {k: fn(v) for k, v in src.arrays.items()}
        else:
            src.values = fn(src.values)

    if pat in N.MLA_ROPE_ROWS and cfg.rope_interleave:
        heads, nope = (1, cfg.kv_lora_rank) if pat == "layers/{i}/wkv_a" else (cfg.n_heads, cfg.qk_nope_dim)
        apply(lambda a: _deinterleave_rope(np.asarray(a), heads, nope))
    elif pat in N.SHARED_EXPERTS:
        ns = cfg.n_shared_experts
        if pat == "layers/{i}/shexp_down":   # (dim, ns * I): the columns of each shared expert
            if src.arrays is not None and set(src.arrays) != {"w"} and ns > 1:
                # quantized (llama.cpp's Q8_0 / Q4_K_M files): every array's columns split into ns
                # equal parts, a K-quant re-encoded per 32 columns first (losslessly) if its
                # super-blocks straddle two experts; below 32-column experts, float32 values.
                # (ns = 1, DeepSeek-V3 and Kimi-K2: the blocks as they are.)
                per = _as_values(src).shape[-1] // ns
                if src.wtype in quant.K_TYPES and per % quant.QK_K:
                    src.arrays, src.wtype = quant.to_per32(src.arrays, src.wtype)
                if per % quant.block_cols(src.wtype):
                    vals = _as_values(src)
                    src = SrcTensor("f32", {"w": vals}, None, src.src_type)
            apply(lambda a: np.ascontiguousarray(np.asarray(a).reshape(a.shape[0], ns, -1).transpose(1, 0, 2)))
        else:
            apply(lambda a: np.asarray(a).reshape(ns, a.shape[0] // ns, *a.shape[1:]))
    return src


def _as_values(src: SrcTensor) -> np.ndarray:
    """A source tensor's float32 values (dequantized if need be)."""
    if src.values is not None:
        return np.asarray(src.values, np.float32)
    if set(src.arrays) == {"w"}:
        return np.asarray(src.arrays["w"], np.float32)
    first = next(iter(src.arrays.values()))
    flat = {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in src.arrays.items()}
    vals = quant.dequantize(flat, src.wtype)
    return vals.reshape(*first.shape[:-1], vals.shape[-1]).astype(np.float32)


def _f32(v) -> float:
    """A GGUF float32 key as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(repr(np.float32(v)).removeprefix("np.float32(").rstrip(")"))


def _derived(vals: np.ndarray, src_type: str) -> SrcTensor:
    """A tensor the converter re-laid out from a source tensor of type ``src_type``: float32 / fp16
    exactly, anything quantized as q8_0 (the transposed key half cannot keep the source's blocks)."""
    if src_type in ("F32", "F16"):
        return SrcTensor(src_type.lower(), {"w": vals.astype(np.float32 if src_type == "F32" else np.float16)},
                         None, src_type)
    q = quant.quantize(vals.reshape(-1, vals.shape[-1]), "q8_0")
    return SrcTensor("q8_0", {k: v.reshape(*vals.shape[:-1], v.shape[-1]) for k, v in q.items()}, None, src_type)


def _split_kv_b(kv_b: np.ndarray, cfg: ModelConfig, which: str, where: str) -> np.ndarray:
    """kv_b_proj (n_heads * (nope + v), kv_lora) -> wk_b (n_heads, kv_lora, nope) (each head's key
    rows, transposed: the absorbed query is q_nope @ wk_b^T) or wv_b (n_heads, v, kv_lora)."""
    H, dn, dv, r = cfg.n_heads, cfg.qk_nope_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if kv_b.shape != (H * (dn + dv), r):
        raise ValueError(f"{where}: kv_b has shape {kv_b.shape}, expected ({H * (dn + dv)}, {r}) = "
                         f"(n_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank)")
    per = np.asarray(kv_b, np.float32).reshape(H, dn + dv, r)
    return np.ascontiguousarray(per[:, :dn].transpose(0, 2, 1) if which == "k" else per[:, dn:])


def _mla_fields(q_lora, kv_lora, nope, rope, v, interleave, dense, shared, scale, groups, groups_used,
                norm_eps, mscale=0.0, mscale_all=0.0, where="") -> dict:
    for key, val in (("kv_lora_rank", kv_lora), ("qk_nope_head_dim", nope), ("qk_rope_head_dim", rope),
                     ("v_head_dim", v)):
        if not val or int(val) < 1:
            raise ValueError(f"{where}: {key} must be >= 1, got {val!r}")
    return dict(q_lora_rank=int(q_lora or 0), kv_lora_rank=int(kv_lora), qk_nope_dim=int(nope),
                qk_rope_dim=int(rope), v_head_dim=int(v), rope_interleave=bool(interleave),
                n_dense_layers=int(dense), n_shared_experts=int(shared), router_func="sigmoid",
                router_scale=float(scale), n_expert_groups=int(groups or 1), n_groups_used=int(groups_used or 1),
                router_bias=True, lora_norm_eps=float(norm_eps), yarn_mscale=float(mscale or 0.0),
                yarn_mscale_all_dim=float(mscale_all or 0.0))


# ----------------------------------------------------------------------------------------------
class GGUFSource:
    _TYPES = {"F32": "f32", "F16": "f16", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0", "Q5_0": "q5_0",
              "Q5_1": "q5_1", "Q4_K": "q4_K", "Q5_K": "q5_K", "Q6_K": "q6_K", "MXFP4": "mxfp4",
              "Q2_K": "q2_K", "Q3_K": "q3_K"}
    _TYPES = {**_TYPES, "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs"}  # the IQ4 types

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
        if arch == "deepseek2":
            self._init_deepseek(g, dim, heads, int(n_vocab))
            return
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

    def _init_deepseek(self, g, dim: int, heads: int, n_vocab: int) -> None:
        """deepseek2 (llama.cpp's keys): MLA sizes from attention.*_lora_rank, key/value_length_mla
        (the per-head sizes; older files put them in key/value_length), rope.dimension_count; the
        router from expert_* keys (sigmoid gating only); YaRN's mscale from yarn_log_multiplier
        (= 0.1 mscale_all_dim; llama.cpp's graph leaves cos/sin unscaled, i.e. mscale = mscale_all_dim)."""
        where = str(self.path)
        gating = g("expert_gating_func")
        if gating is None and int(g("expert_count", 0) or 0):
            # llama.cpp reads such a file as DeepSeek-V2's softmax router (its converter writes the key
            # only from the checkpoint's scoring_func): running it as sigmoid would not be that model
            raise ValueError(f"{where}: deepseek2.expert_gating_func is missing, which llama.cpp reads as the "
                             f"softmax router of DeepSeek-V2 (not supported); a DeepSeek-V3/R1 or Kimi-K2 file "
                             f"has 2 (sigmoid)")
        if gating is not None and int(gating) != 2:
            raise ValueError(f"{where}: deepseek2.expert_gating_func {int(gating)} (softmax: DeepSeek-V2) is not "
                             f"supported; only the sigmoid router of DeepSeek-V3/R1 and Kimi-K2 (2)")
        rope = int(g("rope.dimension_count", 0))
        key = int(g("attention.key_length_mla", 0) or g("attention.key_length", 0))
        val = int(g("attention.value_length_mla", 0) or g("attention.value_length", 0))
        if not rope or key <= rope:
            raise ValueError(f"{where}: deepseek2.attention.key_length_mla {key} must exceed "
                             f"deepseek2.rope.dimension_count {rope}")
        # the multi-token-prediction layers, when a converter kept them, are the last blocks: not read
        n_layers = int(g("block_count")) - int(g("nextn_predict_layers", 0) or 0)
        scaling = g("rope.scaling.type")
        yarn, mscale = {}, 0.0
        if scaling == "yarn":
            yarn = _yarn_fields({"factor": g("rope.scaling.factor"),
                                 "original_max_position_embeddings": g("rope.scaling.original_context_length"),
                                 "beta_fast": g("rope.scaling.yarn_beta_fast"), "beta_slow": g("rope.scaling.yarn_beta_slow")})
            mscale = _f32(g("rope.scaling.yarn_log_multiplier", 0.0) or 0.0) / 0.1
        elif scaling not in (None, "none"):
            raise ValueError(f"{where}: deepseek2.rope.scaling.type {scaling!r} is not supported (yarn or none)")
        n_exp = int(g("expert_count", 0))
        eps = _f32(g("attention.layer_norm_rms_epsilon", 1e-6))
        self.config = ModelConfig(
            arch="deepseek2", dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=heads, head_dim=key,
            ffn_dim=int(g("feed_forward_length", 0)) if int(g("leading_dense_block_count", 0)) else 0,
            vocab_size=n_vocab, rope_theta=float(g("rope.freq_base", 10000.0)), norm_eps=eps,
            context_length=int(g("context_length", 2048)), tied_embeddings="output.weight" not in self.tensors,
            n_experts=n_exp, n_experts_used=int(g("expert_used_count", 0)) if n_exp else 0,
            expert_ffn_dim=int(g("expert_feed_forward_length", 0)) if n_exp else 0,
            norm_topk_prob=bool(g("expert_weights_norm", False)), **yarn,
            **_mla_fields(g("attention.q_lora_rank", 0), g("attention.kv_lora_rank"), key - rope, rope, val, True,
                          min(int(g("leading_dense_block_count", 0)), n_layers), g("expert_shared_count", 0),
                          g("expert_weights_scale", 1.0), g("expert_group_count", 1), g("expert_group_used_count", 1),
                          eps, mscale, mscale, where))
        self.config = dataclasses.replace(self.config, router_bias=any(
            t.endswith("exp_probs_b.bias") for t in self.tensors))
        self.names = N.model_tensors("deepseek2", n_layers, self.config.tied_embeddings, cfg=self.config)
        missing = []
        for n in self.names:
            gn = self._gguf_name(n)
            if gn in self.tensors:
                continue
            if N.pattern_of(n) in ("layers/{i}/wk_b", "layers/{i}/wv_b") and \
                    N.GGUF_KV_B.format(i=N.layer_of(n)) in self.tensors:
                continue   # the older files: derived from attn_kv_b
            missing.append(gn)
        if missing:
            raise ValueError(f"{where}: tensors missing for architecture deepseek2: {', '.join(missing[:5])}")

    def _get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _gguf_name(self, name: str) -> str:
        return N.gguf_name(self.config.arch, N.pattern_of(name)).format(i=N.layer_of(name))

    def load(self, name: str) -> SrcTensor:
        pat = N.pattern_of(name)
        if self.config.arch == "deepseek2" and pat in ("layers/{i}/wk_b", "layers/{i}/wv_b") \
                and self._gguf_name(name) not in self.tensors:
            kv_b = self.tensors[N.GGUF_KV_B.format(i=N.layer_of(name))]
            vals = _as_values(self._load_tensor(kv_b.name))
            per = _split_kv_b(vals, self.config, pat.split("/")[-1][1], f"{self.path}: {kv_b.name}")
            return _derived(per, kv_b.tensor_type.name)
        src = self._load_tensor(self._gguf_name(name))
        if self.config.arch == "deepseek2":
            src = _mla_fix(self.config, name, src)
        elif self.config.arch == "llama" and pat in ("layers/{i}/wq", "layers/{i}/wk"):
            nh = self.config.n_heads if name.endswith("wq") else self.config.n_kv_heads
            if src.arrays is not None:
                src.arrays = {k: _unpermute_rows(v, nh) for k, v in src.arrays.items()}
            else:
                src.values = _unpermute_rows(src.values, nh)
        return src

    def _load_tensor(self, gname: str) -> SrcTensor:
        import gguf

        t = self.tensors[gname]
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
        yarn_ok = gpt_oss or arch == "deepseek2"
        if scaling and not (yarn_ok and scaling.get("rope_type", scaling.get("type")) == "yarn"):
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
        if arch == "deepseek2":
            self._init_deepseek(hf, scaling, rope)
            return
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

    def _init_deepseek(self, hf: dict, scaling: dict, rope: dict) -> None:
        """DeepseekV3ForCausalLM (DeepSeek-V3/R1, Kimi-K2): MLA sizes, the sigmoid group-limited
        router (noaux_tc), shared experts, first_k_dense_replace dense layers; the
        multi-token-prediction layers (num_nextn_predict_layers, stored after the last layer) are
        not read."""
        where = str(self.path)
        for key, ok in (("scoring_func", ("sigmoid",)), ("topk_method", ("noaux_tc",)), ("moe_layer_freq", (1,))):
            if hf.get(key) is not None and hf[key] not in ok:
                raise ValueError(f"{where}: config {key} = {hf[key]!r} is not supported (expected {ok[0]!r})")
        if hf.get("attention_bias"):
            raise ValueError(f"{where}: a DeepseekV3 with attention_bias is not supported (its biases would be ignored)")
        n_layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        nope, rdim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
        n_exp = hf.get("n_routed_experts") or 0
        dense = min(int(hf.get("first_k_dense_replace") or 0), n_layers) if n_exp else n_layers
        eps = float(hf.get("rms_norm_eps", 1e-6))
        tied = bool(hf.get("tie_word_embeddings", False)) or "lm_head.weight" not in self.index
        self.config = ModelConfig(
            arch="deepseek2", dim=hf["hidden_size"], n_layers=n_layers, n_heads=heads, n_kv_heads=heads,
            head_dim=nope + rdim, ffn_dim=hf["intermediate_size"] if dense else 0, vocab_size=hf["vocab_size"],
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0), norm_eps=eps,
            context_length=int(hf.get("max_position_embeddings", 2048)), tied_embeddings=tied,
            n_experts=n_exp, n_experts_used=hf.get("num_experts_per_tok", 0) if n_exp else 0,
            expert_ffn_dim=hf.get("moe_intermediate_size", 0) if n_exp else 0,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            **(_yarn_fields(scaling) if scaling else {}),
            **_mla_fields(hf.get("q_lora_rank"), hf.get("kv_lora_rank"), nope, rdim, hf.get("v_head_dim"),
                          hf.get("rope_interleave", True), dense, hf.get("n_shared_experts") or 0,
                          hf.get("routed_scaling_factor", 1.0), hf.get("n_group"), hf.get("topk_group"), 1e-6,
                          (scaling or {}).get("mscale"), (scaling or {}).get("mscale_all_dim"), where))
        self.names = N.model_tensors("deepseek2", n_layers, tied, cfg=self.config)
        self.mxfp4 = False
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
        if self.config.arch == "deepseek2":
            pat = N.pattern_of(name)
            if pat in ("layers/{i}/wk_b", "layers/{i}/wv_b"):
                hn = self._hf_names(name)[0]
                vals, dt = self._read(hn)
                w = _split_kv_b(vals, self.config, pat.split("/")[-1][1], f"{self.path}: {hn}")
                return _derived(w, dt) if dt in ("F32", "F16") else SrcTensor(None, None, w, dt)
            return _mla_fix(self.config, name, self._load_plain(name))
        return self._load_plain(name)

    def _load_plain(self, name: str) -> SrcTensor:
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
