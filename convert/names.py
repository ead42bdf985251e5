"""Name maps, as data: internal tensor name -> Hugging Face name, GGUF name, and how it splits.

``{i}`` is the layer index and ``{e}`` the expert index (Hugging Face stores experts
one by one; GGUF stacks them into one 3-D tensor).

Split kinds (see mpillm.formats.partition):
  replicated  every rank holds all of it
  vocab_rows  rows of the vocabulary
  q_rows      rows of this rank's query heads         (column-parallel)
  kv_rows     rows of the KV heads this rank holds    (column-parallel, replicated where shared)
  q_cols      columns of this rank's query heads      (row-parallel, then Allreduce)
  ffn_rows / ffn_cols          dense FFN hidden slice
  exp_rows / exp_cols          every expert's hidden slice
Vectors and (experts, n) bias tables split along their last axis:
  q_vec / kv_vec  elements of this rank's query / KV heads (head_dim per head)
  q_heads         one element per query head of this rank (gpt-oss sinks)
  exp_vec         every expert's hidden slice (gpt-oss gate/up biases)
  q_lead          (heads, rows, cols) per-head matrices: this rank's query heads (deepseek2's wk_b, wv_b)
For deepseek2, q_rows / q_cols count head_dim (qk_nope + qk_rope) rows and v_head_dim columns per head
(ModelConfig.o_head_dim); its shared experts are stacked (n_shared, rows, cols) and split like experts.
"""
from __future__ import annotations

# internal name, split kind, Hugging Face name, GGUF name
TENSORS: tuple[tuple[str, str, str, str], ...] = (
    ("tok_embd", "vocab_rows", "model.embed_tokens.weight", "token_embd.weight"),
    ("output", "vocab_rows", "lm_head.weight", "output.weight"),
    ("output_norm", "replicated", "model.norm.weight", "output_norm.weight"),
    ("rope_freqs", "replicated", "", "rope_freqs.weight"),  # GGUF only: Llama 3.x RoPE scaling
    ("layers/{i}/attn_norm", "replicated", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("layers/{i}/wq", "q_rows", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("layers/{i}/wk", "kv_rows", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("layers/{i}/wv", "kv_rows", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("layers/{i}/wo", "q_cols", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers/{i}/bq", "q_vec", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    ("layers/{i}/bk", "kv_vec", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    ("layers/{i}/bv", "kv_vec", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    ("layers/{i}/q_norm", "replicated", "model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("layers/{i}/k_norm", "replicated", "model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    ("layers/{i}/ffn_norm", "replicated", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers/{i}/w_gate", "ffn_rows", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers/{i}/w_up", "ffn_rows", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers/{i}/w_down", "ffn_cols", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("layers/{i}/router", "replicated", "model.layers.{i}.mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight"),
    ("layers/{i}/exp_gate", "exp_rows", "model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "blk.{i}.ffn_gate_exps.weight"),
    ("layers/{i}/exp_up", "exp_rows", "model.layers.{i}.mlp.experts.{e}.up_proj.weight", "blk.{i}.ffn_up_exps.weight"),
    ("layers/{i}/exp_down", "exp_cols", "model.layers.{i}.mlp.experts.{e}.down_proj.weight", "blk.{i}.ffn_down_exps.weight"),
    # gpt-oss (its Hugging Face experts are fused, see HF_GPT_OSS)
    ("layers/{i}/bo", "replicated", "model.layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias"),
    ("layers/{i}/sinks", "q_heads", "model.layers.{i}.self_attn.sinks", "blk.{i}.attn_sinks.weight"),
    ("layers/{i}/router_b", "replicated", "model.layers.{i}.mlp.router.bias", "blk.{i}.ffn_gate_inp.bias"),
    ("layers/{i}/exp_gate_b", "exp_vec", "", "blk.{i}.ffn_gate_exps.bias"),
    ("layers/{i}/exp_up_b", "exp_vec", "", "blk.{i}.ffn_up_exps.bias"),
    ("layers/{i}/exp_down_b", "replicated", "model.layers.{i}.mlp.experts.down_proj_bias", "blk.{i}.ffn_down_exps.bias"),
    # deepseek2 (kv_b_proj is split into wk_b / wv_b by convert.sources; GGUF: attn_k_b / attn_v_b, or
    # the older combined attn_kv_b, see GGUF_KV_B)
    ("layers/{i}/wq_a", "replicated", "model.layers.{i}.self_attn.q_a_proj.weight", "blk.{i}.attn_q_a.weight"),
    ("layers/{i}/q_a_norm", "replicated", "model.layers.{i}.self_attn.q_a_layernorm.weight", "blk.{i}.attn_q_a_norm.weight"),
    ("layers/{i}/wq_b", "q_rows", "model.layers.{i}.self_attn.q_b_proj.weight", "blk.{i}.attn_q_b.weight"),
    ("layers/{i}/wkv_a", "replicated", "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight", "blk.{i}.attn_kv_a_mqa.weight"),
    ("layers/{i}/kv_a_norm", "replicated", "model.layers.{i}.self_attn.kv_a_layernorm.weight", "blk.{i}.attn_kv_a_norm.weight"),
    ("layers/{i}/wk_b", "q_lead", "model.layers.{i}.self_attn.kv_b_proj.weight", "blk.{i}.attn_k_b.weight"),
    ("layers/{i}/wv_b", "q_lead", "model.layers.{i}.self_attn.kv_b_proj.weight", "blk.{i}.attn_v_b.weight"),
    ("layers/{i}/router_corr", "replicated", "model.layers.{i}.mlp.gate.e_score_correction_bias", "blk.{i}.exp_probs_b.bias"),
    ("layers/{i}/shexp_gate", "exp_rows", "model.layers.{i}.mlp.shared_experts.gate_proj.weight", "blk.{i}.ffn_gate_shexp.weight"),
    ("layers/{i}/shexp_up", "exp_rows", "model.layers.{i}.mlp.shared_experts.up_proj.weight", "blk.{i}.ffn_up_shexp.weight"),
    ("layers/{i}/shexp_down", "exp_cols", "model.layers.{i}.mlp.shared_experts.down_proj.weight", "blk.{i}.ffn_down_shexp.weight"),
)
# the older deepseek2 GGUFs: kv_b_proj whole, as in the checkpoint
GGUF_KV_B = "blk.{i}.attn_kv_b.weight"
# the shared experts, stored (n_shared, rows, cols) from the checkpoint's (n_shared * rows, cols) form
SHARED_EXPERTS = ("layers/{i}/shexp_gate", "layers/{i}/shexp_up", "layers/{i}/shexp_down")
# rows whose RoPE part the converter de-interleaves (interleaved pairs -> halves; see convert.sources)
MLA_ROPE_ROWS = ("layers/{i}/wq", "layers/{i}/wq_b", "layers/{i}/wkv_a")

SPLIT = {name: kind for name, kind, _, _ in TENSORS}
HF = {name: hf for name, _, hf, _ in TENSORS}
GGUF = {name: gg for name, _, _, gg in TENSORS}

# which internal tensors each architecture has (per layer names use {i})
_ATTN = ["layers/{i}/attn_norm", "layers/{i}/wq", "layers/{i}/wk", "layers/{i}/wv", "layers/{i}/wo", "layers/{i}/ffn_norm"]
_DENSE = ["layers/{i}/w_gate", "layers/{i}/w_up", "layers/{i}/w_down"]
_MOE = ["layers/{i}/router", "layers/{i}/exp_gate", "layers/{i}/exp_up", "layers/{i}/exp_down"]
_QK = ["layers/{i}/q_norm", "layers/{i}/k_norm"]
_QKV_BIAS = ["layers/{i}/bq", "layers/{i}/bk", "layers/{i}/bv"]
_MLA_Q_LORA = ["layers/{i}/wq_a", "layers/{i}/q_a_norm", "layers/{i}/wq_b"]
_MLA = ["layers/{i}/attn_norm", "layers/{i}/wkv_a", "layers/{i}/kv_a_norm", "layers/{i}/wk_b", "layers/{i}/wv_b",
        "layers/{i}/wo", "layers/{i}/ffn_norm"]
_DEEPSEEK_MOE = _MOE + ["layers/{i}/router_corr"] + list(SHARED_EXPERTS)
LAYER_TENSORS = {
    "llama": _ATTN + _DENSE,
    "qwen2": _ATTN + _QKV_BIAS + _DENSE,
    "qwen3": _ATTN + _QK + _DENSE,
    "qwen3moe": _ATTN + _QK + _MOE,
    "gpt-oss": _ATTN + _QKV_BIAS + ["layers/{i}/bo", "layers/{i}/sinks"] + _MOE
               + ["layers/{i}/router_b", "layers/{i}/exp_gate_b", "layers/{i}/exp_up_b", "layers/{i}/exp_down_b"],
}

# 2-D tensors that are tables of vectors (one per expert), stored f32 like vectors, never quantized
VECTOR_TABLES = ("layers/{i}/exp_gate_b", "layers/{i}/exp_up_b", "layers/{i}/exp_down_b")

# Per-architecture name overrides (internal -> source name) where the table's default differs.
HF_OVERRIDE = {
    "gpt-oss": {"layers/{i}/router": "model.layers.{i}.mlp.router.weight"},
}
GGUF_OVERRIDE = {
    "gpt-oss": {"layers/{i}/ffn_norm": "blk.{i}.post_attention_norm.weight"},
}
# gpt-oss's Hugging Face experts: gate and up fused with their rows interleaved (gate = even
# rows, up = odd rows of the 2 * expert_ffn), either as MXFP4 blocks/scales (the released
# checkpoints: blocks (E, rows, cols/32, 16) u8 with element 2j in the low and 2j+1 in the high
# nibble of byte j, scales (E, rows, cols/32) u8 E8M0) or dequantized and transposed
# (transformers' own save: gate_up_proj (E, dim, 2 * ffn), down_proj (E, ffn, dim)).
HF_GPT_OSS = {
    "gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",     # + "" | "_blocks" | "_scales"
    "gate_up_bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
    "down": "model.layers.{i}.mlp.experts.down_proj",           # + "" | "_blocks" | "_scales"
}

# Hugging Face architectures -> internal architecture
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "GptOssForCausalLM": "gpt-oss",
    "DeepseekV3ForCausalLM": "deepseek2",   # DeepSeek-V3/R1, Kimi-K2
}
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gpt-oss", "deepseek2")


def deepseek_layer(i: int, q_lora: bool, dense_layers: int, router_bias: bool = True,
                   shared: bool = True) -> list[str]:
    """deepseek2's tensors of layer i: MLA (wq, or wq_a/q_a_norm/wq_b), then a dense FFN for the
    first ``dense_layers`` layers, else the router (with its correction bias), routed and shared experts."""
    attn = _MLA[:1] + (_MLA_Q_LORA if q_lora else ["layers/{i}/wq"]) + _MLA[1:]
    ffn = _DENSE if i < dense_layers else [n for n in _DEEPSEEK_MOE if (router_bias or not n.endswith("router_corr"))
                                           and (shared or n not in SHARED_EXPERTS)]
    return [n.format(i=i) for n in attn + ffn]


def model_tensors(arch: str, n_layers: int, tied: bool, rope_freqs: bool = False, cfg=None) -> list[str]:
    """Every internal tensor name a model of this architecture has, in file order (``cfg``, a
    ModelConfig, is needed for deepseek2, whose layers differ)."""
    names = ["tok_embd"] + (["rope_freqs"] if rope_freqs else [])
    for i in range(n_layers):
        if arch == "deepseek2":
            names += deepseek_layer(i, cfg.q_lora_rank > 0, cfg.n_dense_layers, cfg.router_bias,
                                    cfg.n_shared_experts > 0)
            continue
        names += [n.format(i=i) for n in LAYER_TENSORS[arch]]
    names.append("output_norm")
    if not tied:
        names.append("output")
    return names


def hf_name(arch: str, pattern: str) -> str:
    return HF_OVERRIDE.get(arch, {}).get(pattern, HF[pattern])


def gguf_name(arch: str, pattern: str) -> str:
    return GGUF_OVERRIDE.get(arch, {}).get(pattern, GGUF[pattern])


def pattern_of(name: str) -> str:
    """'layers/7/wq' -> 'layers/{i}/wq'."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "layers":
        return f"layers/{{i}}/{parts[2]}"
    return name


def layer_of(name: str) -> int | None:
    parts = name.split("/")
    return int(parts[1]) if len(parts) == 3 else None
