"""A harmony (gpt-oss) tokenizer and a small model that answers in harmony, for the tests.

    python tests/harmony_fixture.py OUT_DIR          # writes a Hugging Face model directory

gpt-oss's real tokenizer (o200k_harmony) cannot be had offline, so this builds a byte-level BPE
tokenizer with the ``tokenizers`` library that carries the harmony control tokens at their real
gpt-oss ids (``<|return|>`` 200002, ``<|channel|>`` 200005, ``<|start|>`` 200006, ``<|end|>``
200007, ``<|message|>`` 200008, ``<|call|>`` 200012, vocabulary 201088), with a harmony-style chat
template of our own in ``tokenizer_config.json``.

The model is a real one-layer Llama (safetensors, converted and run by the engine like any other)
whose weights are set by hand so that greedy decoding writes a two-message harmony answer:

    <|channel|>analysis<|message|>Hmm yes<|end|><|start|>assistant<|channel|>final<|message|>Paris!<|return|>

How: each token of that chain has a one-hot embedding and the output matrix maps it to its
successor (logit ``BIG``).  Two tokens occur twice with different successors (``<|channel|>`` is
followed by ``analysis``, later by ``final``; ``<|message|>`` by ``Hmm``, later by ``Paris``):
attention with zero queries averages the values of every position so far, and only ``Hmm``
has a value, so once it has been written a "flag" dimension of the residual is positive, and
the rows of ``final`` and ``Paris`` read that flag (weight ``FLAG``) while starting ``DELTA``
below their rivals.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from mpillm.serving.harmony import GPT_OSS_FIRST_SPECIAL as FIRST_SPECIAL
from mpillm.serving.harmony import GPT_OSS_SPECIAL_TOKENS as NAMED
from mpillm.serving.harmony import GPT_OSS_VOCAB as VOCAB
WORDS = ["assistant", "analysis", "final", "commentary", "system", "developer", "user", "Hmm", "Ġyes", "Paris"]

TEMPLATE = (
    '{%- set effort = reasoning_effort if reasoning_effort is defined else "medium" -%}'
    '{%- set date = current_date if current_date is defined else strftime_now("%Y-%m-%d") -%}'
    '{{- "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n" -}}'
    '{{- "Knowledge cutoff: 2024-06\\nCurrent date: " + date + "\\n\\nReasoning: " + effort + "\\n\\n" -}}'
    '{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>" -}}'
    '{%- for m in messages -%}'
    '{%- if loop.first and m.role in ["system", "developer"] -%}'
    '{{- "<|start|>developer<|message|># Instructions\\n\\n" + m.content + "<|end|>" -}}'
    '{%- elif m.role == "user" -%}'
    '{{- "<|start|>user<|message|>" + m.content + "<|end|>" -}}'
    '{%- elif m.role == "assistant" -%}'
    '{{- "<|start|>assistant<|channel|>final<|message|>" + m.content + "<|end|>" -}}'
    '{%- else -%}'
    '{{- raise_exception("only the first message may be a system or developer message") -}}'
    '{%- endif -%}'
    '{%- endfor -%}'
    '{%- if add_generation_prompt -%}{{- "<|start|>assistant" -}}{%- endif -%}'
)


def special_tokens() -> list[str]:
    """The added tokens in id order from 199998: named ones and ``<|reserved_N|>`` between them."""
    return [NAMED.get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL, VOCAB)]


def build_tokenizer():
    """The tokenizers.Tokenizer (byte-level BPE; the words above merge into single tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    merges = []
    for w in WORDS:                       # merge left to right: "a"+"s" -> "as", "as"+"s" -> "ass", ...
        for k in range(2, len(w) + 1):
            left, right = w[:k - 1], w[k - 1]
            if w[:k] not in vocab:
                merges.append((left, right))
                vocab[w[:k]] = len(vocab)
    n = len(vocab)
    for i in range(n, FIRST_SPECIAL):     # unused filler entries up to gpt-oss's first special id
        vocab[f"<|filler_{i}|>"] = i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()])
    assert tk.get_vocab_size(with_added_tokens=True) == VOCAB
    for i, t in NAMED.items():
        assert tk.token_to_id(t) == i, (t, tk.token_to_id(t), i)
    return tk


def chain(tk) -> list[int]:
    """The answer the model writes, as ids (the prompt's last token, 'assistant', first)."""
    ids = [tk.token_to_id(t) for t in ["assistant", "<|channel|>", "analysis", "<|message|>", "Hmm", "Ġyes",
                                         "<|end|>", "<|start|>", "assistant", "<|channel|>", "final",
                                         "<|message|>", "Paris", "!", "<|return|>"]]
    assert None not in ids
    return ids


EXPECTED_REASONING, EXPECTED_FINAL = "Hmm yes", "Paris!"
DIM, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 2, 2, 32, 64
BIG, DELTA, FLAG, VALUE_GAIN = 100.0, 1.0, 100.0, 10.0


def build_weights(tk) -> dict[str, np.ndarray]:
    seq = chain(tk)
    succ: dict[int, list[int]] = {}
    for a, b in zip(seq, seq[1:]):
        if b not in succ.setdefault(a, []):
            succ[a].append(b)
    dims = {t: k for k, t in enumerate(succ)}          # one-hot dimension of each chain token
    flag_dim = DIM - 1
    assert len(dims) < flag_dim - 1
    rng = np.random.default_rng(7)
    emb = np.zeros((VOCAB, DIM), np.float32)
    emb[:, len(dims):flag_dim] = rng.standard_normal((VOCAB, flag_dim - len(dims)), dtype=np.float32) * 0.01
    out = np.zeros((VOCAB, DIM), np.float32)
    hmm = tk.token_to_id("Hmm")
    for t, k in dims.items():
        emb[t] = 0.0
        emb[t, k] = 1.0
        nexts = succ[t]
        out[nexts[0], k] = BIG
        if len(nexts) == 2:                            # the second successor once the flag is up
            out[nexts[1], k] = BIG - DELTA
            out[nexts[1], flag_dim] = FLAG
    wv = np.zeros((KV_HEADS * HEAD_DIM, DIM), np.float32)
    wv[0, dims[hmm]] = 1.0                             # only 'Hmm' has a value
    wo = np.zeros((DIM, HEADS * HEAD_DIM), np.float32)
    wo[flag_dim, 0] = VALUE_GAIN                       # head 0 (reads kv head 0) writes the flag
    L = "model.layers.0."
    return {
        "model.embed_tokens.weight": emb, "lm_head.weight": out, "model.norm.weight": np.ones(DIM, np.float32),
        L + "input_layernorm.weight": np.ones(DIM, np.float32),
        L + "post_attention_layernorm.weight": np.ones(DIM, np.float32),
        L + "self_attn.q_proj.weight": np.zeros((HEADS * HEAD_DIM, DIM), np.float32),
        L + "self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, DIM), dtype=np.float32) * 0.1,
        L + "self_attn.v_proj.weight": wv, L + "self_attn.o_proj.weight": wo,
        L + "mlp.gate_proj.weight": rng.standard_normal((FFN, DIM), dtype=np.float32) * 0.1,
        L + "mlp.up_proj.weight": rng.standard_normal((FFN, DIM), dtype=np.float32) * 0.1,
        L + "mlp.down_proj.weight": np.zeros((DIM, FFN), np.float32),
    }


def write(out_dir: Path, model: bool = True) -> Path:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and, with ``model``,
    config.json, generation_config.json and model.safetensors into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tk = build_tokenizer()
    tk.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": TEMPLATE}, indent=1))
    if model:
        from safetensors.numpy import save_file

        (out_dir / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
            "intermediate_size": FFN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM, "num_hidden_layers": 1, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": False,
            "hidden_act": "silu", "bos_token_id": 199998, "eos_token_id": [200002, 200012],
            "torch_dtype": "float32"}, indent=1))
        (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [200002, 200012]}))
        save_file(build_weights(tk), str(out_dir / "model.safetensors"))
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(f"wrote {write(Path(sys.argv[1]))}")
