"""A small llama-architecture GGUF whose matrices are in the 5-bit, K-quant and MXFP4 types
(random valid blocks: gguf has no K-quant quantizer), for the converter and engine tests.

Shapes are multiples of 256 (K-quant rows), with 8 query heads of 32 so that 3 ranks cut
the row-parallel layers' super-blocks (wo: 96/96/64 columns; w_down: 192/160/160). The
tokenizer is the llama fixture's (its token ids index this vocabulary)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "llama" / "model.gguf"
DIM, N_HEADS, N_KV, FFN, N_LAYERS = 256, 8, 2, 512, 2
# tensor -> type per layer (every type at least once, both K-quant row-parallel layers cut at np=3;
# layer 0's w_down is Q3_K, cut into q3_K_32 at np=3)
TYPES = [
    {"attn_q": "q4_K", "attn_k": "q5_K", "attn_v": "q6_K", "attn_output": "q4_K",
     "ffn_gate": "q2_K", "ffn_up": "q5_1", "ffn_down": "q3_K"},
    {"attn_q": "mxfp4", "attn_k": "q8_0", "attn_v": "q5_0", "attn_output": "q5_K",
     "ffn_gate": "q4_K", "ffn_up": "mxfp4", "ffn_down": "q5_K"},
]
# the IQ4 types in the mix (at 3 ranks layer 1's wo is cut inside super-blocks: iq4_xs_32)
TYPES[0]["attn_q"], TYPES[1]["attn_v"], TYPES[1]["attn_output"] = "iq4_xs", "iq4_nl", "iq4_xs"
EMBD_TYPE, OUTPUT_TYPE = "q6_K", "q5_K"


def make(path: Path, seed: int = 0, foreign: dict[str, str] | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """Write the GGUF; returns {gguf tensor name: (type, GGML block bytes)} of its matrices.
    ``foreign``: {tensor name: GGUF type name} written instead as random blocks of that type (fp16
    d first), e.g. a type mpillm does not store."""
    import gguf

    from mpillm.formats import quant

    rng = np.random.default_rng(seed)
    src = gguf.GGUFReader(FIXTURE)
    w = gguf.GGUFWriter(str(path), "llama")
    for f in src.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or not f.name.startswith("tokenizer."):
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(f.name, f.contents())
        else:
            w.add_key_value(f.name, f.contents(), vt)
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    hd = DIM // N_HEADS
    mats = {}

    def mat(name, wtype, rows, cols):
        if name in (foreign or {}):
            wtype = foreign[name]
            qt = getattr(gguf.GGMLQuantizationType, wtype)
            bs, bb = gguf.GGML_QUANT_SIZES[qt]
            raw = rng.integers(0, 256, (rows * cols // bs, bb), dtype=np.uint8)
            raw[:, :2] = np.full(len(raw), 0.01 / np.sqrt(cols), np.float16).view(np.uint8).reshape(-1, 2)
            raw = raw.reshape(rows, -1)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)
            mats[name] = (wtype, raw)
            return
        raw = quant.random_ggml(wtype, rows, cols, rng, scale=2.0 / np.sqrt(cols))
        qt = getattr(gguf.GGMLQuantizationType, wtype.upper())
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)
        mats[name] = (wtype, raw)

    def vec(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", EMBD_TYPE, vocab, DIM)
    for i, types in enumerate(TYPES):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", DIM)
        mat(p + "attn_q.weight", types["attn_q"], N_HEADS * hd, DIM)
        mat(p + "attn_k.weight", types["attn_k"], N_KV * hd, DIM)
        mat(p + "attn_v.weight", types["attn_v"], N_KV * hd, DIM)
        mat(p + "attn_output.weight", types["attn_output"], DIM, N_HEADS * hd)
        vec(p + "ffn_norm.weight", DIM)
        mat(p + "ffn_gate.weight", types["ffn_gate"], FFN, DIM)
        mat(p + "ffn_up.weight", types["ffn_up"], FFN, DIM)
        mat(p + "ffn_down.weight", types["ffn_down"], DIM, FFN)
    vec("output_norm.weight", DIM)
    mat("output.weight", OUTPUT_TYPE, vocab, DIM)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return mats
