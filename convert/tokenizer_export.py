"""The converter's tokenizer export: write a model's tokenizer into a converted model directory.

``export_from_gguf`` builds it from a GGUF's vocabulary (``gpt2`` byte-level BPE through
``tokenizers`` with the pre-tokenizer that ``tokenizer.ggml.pre`` names; ``llama`` SentencePiece
through a ModelProto written here), and ``export_from_hf`` copies a Hugging Face directory's
files.  Either writes our ``tokenizer_config.json`` beside it.  The file names, kinds and the
reading side (``load_tokenizer``) are the runtime's, in ``mpillm.formats.tokenizer``.
"""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpillm.formats.tokenizer import (
    CONFIG_NAME, EOG_TEXTS, KIND_SENTENCEPIECE, KIND_TOKENIZERS, SPM_MODEL, TOKENIZER_JSON, config_from_hf,
)

__all__ = ["export_from_gguf", "export_from_hf"]

# GGUF token types (gguf.TokenType); SentencePiece's piece types use the same numbers.
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6


# ----------------------------------------------------------------------------------------------
# Pre-tokenizers named by ``tokenizer.ggml.pre``.  Each regex splits every piece further and
# keeps both the matches and the text between them (llama.cpp's ``unicode_regex_split``, which is
# a ``Split(..., "isolated")`` in ``tokenizers``).  The byte-level mapping comes last.

_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PORO_RE = r" ?[^(\s|.,!?…。，、।۔،)]+"
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_RE = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTR_I = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_RE = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTR_I}"
             rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTR_I}"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreSpec:
    splits: tuple[str, ...] = ()    # regexes applied in order before the byte-level mapping
    digits: bool = False            # split every digit on its own first (HF ``Digits(individual_digits=True)``)
    gpt2_regex: bool = False        # let ByteLevel apply the GPT-2 regex itself (HF ``use_regex=True``)
    ignore_merges: bool = False     # a word that is itself a token is not merged from characters
    add_bos: bool = False           # llama.cpp's default when the GGUF does not say


_GPT2 = _PreSpec(gpt2_regex=True)
_DIGITS_GPT2 = _PreSpec(digits=True, gpt2_regex=True)      # SmolLM2's / StarCoder's tokenizer.json
_LLAMA3 = _PreSpec(splits=(_LLAMA3_RE,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreSpec(splits=(_QWEN2_RE,))
_PORO = _PreSpec(splits=(_PORO_RE,))

_PRE_TOKENIZERS: dict[str, _PreSpec] = {
    "default": _PreSpec(splits=(r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2"], _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe", "glm4", "chatglm-bpe"], _PreSpec(splits=(_LLAMA3_RE,))),
    **dict.fromkeys(["gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                     "jina-v2-de", "a.x-4.0", "mellum", "jina-v1-en", "jina-v2-code", "roberta-bpe",
                     "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"], _GPT2),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"], _DIGITS_GPT2),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez", "hunyuan"], _QWEN2),
    "falcon": _PreSpec(splits=(r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]")),
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"], _PORO),
    "viking": _PreSpec(splits=(_PORO_RE, r"\p{N}")),
    "tekken": _PreSpec(splits=(_TEKKEN_RE,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(["gpt-4o", "llama4"], _PreSpec(splits=(_GPT4O_RE,))),
}


# ----------------------------------------------------------------------------------------------
# GGUF metadata access (works on every gguf-py version: reads the field parts directly).

def _gguf_get(reader: Any, key: str, default: Any = None) -> Any:
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None or not field.types:
        return default
    main = field.types[0]

    def text(part: Any, what: str) -> str:
        try:
            return bytes(part).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"GGUF key {key!r}: {what} is not valid UTF-8 ({e})") from None

    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [text(field.parts[i], f"entry {n}") for n, i in enumerate(field.data)]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if main == GGUFValueType.STRING:
        return text(field.parts[-1], "the value")
    return field.parts[-1].tolist()[0]


def _gguf_token_id(reader: Any, name: str, n_vocab: int) -> int | None:
    v = _gguf_get(reader, f"tokenizer.ggml.{name}_token_id")
    if v is None:
        return None
    v = int(v)
    if not 0 <= v < n_vocab:
        raise ValueError(f"GGUF tokenizer.ggml.{name}_token_id = {v} is outside the vocabulary (size {n_vocab})")
    return v


# ----------------------------------------------------------------------------------------------
# Export from GGUF

def export_from_gguf(reader: Any, out_dir: Path) -> None:
    """Write ``tokenizer.json`` or ``tokenizer.model`` plus ``tokenizer_config.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    model = _gguf_get(reader, "tokenizer.ggml.model")
    if model is None:
        raise ValueError("GGUF has no tokenizer (key 'tokenizer.ggml.model' missing)")
    tokens = _gguf_get(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF has no vocabulary (key 'tokenizer.ggml.tokens' missing or empty)")
    n = len(tokens)
    types = _gguf_get(reader, "tokenizer.ggml.token_type") or [TT_NORMAL] * n
    if len(types) != n:
        raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    ids = {name: _gguf_token_id(reader, name, n) for name in ("bos", "eos", "eot", "eom", "unk", "pad")}

    out_dir.mkdir(parents=True, exist_ok=True)
    if model == "gpt2":
        pre = _gguf_get(reader, "tokenizer.ggml.pre") or "default"
        spec = _PRE_TOKENIZERS.get(pre)
        if spec is None:
            raise ValueError(f"unknown tokenizer.ggml.pre {pre!r} in GGUF; "
                             f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
        merges = _gguf_get(reader, "tokenizer.ggml.merges")
        if not merges:
            raise ValueError("GGUF gpt2 tokenizer has no merges (key 'tokenizer.ggml.merges' missing)")
        tk = _build_bpe(tokens, types, merges, spec)
        tk.save(str(out_dir / TOKENIZER_JSON))
        kind, default_add_bos = KIND_TOKENIZERS, spec.add_bos
    elif model == "llama":
        scores = _gguf_get(reader, "tokenizer.ggml.scores") or [0.0] * n
        if len(scores) != n:
            raise ValueError(f"GGUF tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        proto = _spm_model_proto(
            tokens, scores, types, ids,
            add_dummy_prefix=bool(_gguf_get(reader, "tokenizer.ggml.add_space_prefix", True)),
            remove_extra_whitespaces=bool(_gguf_get(reader, "tokenizer.ggml.remove_extra_whitespaces", False)))
        (out_dir / SPM_MODEL).write_bytes(proto)
        kind, default_add_bos = KIND_SENTENCEPIECE, True
    else:
        raise ValueError(f"unsupported tokenizer.ggml.model {model!r} in GGUF "
                         "(supported: 'gpt2' BPE, 'llama' SentencePiece)")

    specials = {tokens[i]: i for i in range(n) if types[i] == TT_CONTROL}
    eos_ids = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    eos_ids += [i for t, i in specials.items() if t in EOG_TEXTS]
    config = {
        "tokenizer_kind": kind,
        "source": "gguf",
        "chat_template": _gguf_get(reader, "tokenizer.chat_template"),
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "eot_token_id": ids["eot"],
        "eom_token_id": ids["eom"],
        "eos_token_ids": sorted(set(eos_ids)),
        "bos_token": tokens[ids["bos"]] if ids["bos"] is not None else None,
        "eos_token": tokens[ids["eos"]] if ids["eos"] is not None else None,
        "add_bos_token": bool(_gguf_get(reader, "tokenizer.ggml.add_bos_token", default_add_bos)),
    }
    _write_config(out_dir, config)


def _build_bpe(tokens: list[str], types: list[int], merges: list[str], spec: _PreSpec) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` from a GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)           # a duplicate text keeps its first id, as tokenizer.json would
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)             # the first part may itself start with a space
        if cut < 0:
            raise ValueError(f"GGUF merge {m!r} is not two tokens separated by a space")
        pairs.append((m[:cut], m[cut + 1:]))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=spec.ignore_merges)
    except Exception as e:  # tokenizers raises its own exception type
        raise ValueError(f"GGUF BPE vocabulary and merges are inconsistent: {e}") from None
    tk = HFTokenizer(bpe)

    steps = []
    if spec.digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps += [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.gpt2_regex))
    tk.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()

    # Control and unknown tokens are special; user-defined tokens are kept whole but printed.
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i in range(len(tokens)) if types[i] in (TT_CONTROL, TT_UNKNOWN)])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i in range(len(tokens)) if types[i] == TT_USER_DEFINED])
    return tk


# SentencePiece ModelProto, written directly (sentencepiece_model.proto field numbers), so that
# no protobuf runtime is needed.  Only the fields the runtime reads are written.
_MP_PIECES, _MP_TRAINER_SPEC, _MP_NORMALIZER_SPEC = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TS_MODEL_TYPE, _TS_VOCAB_SIZE, _TS_BYTE_FALLBACK = 3, 4, 35
_TS_UNK_ID, _TS_BOS_ID, _TS_EOS_ID, _TS_PAD_ID = 40, 41, 42, 43
_TS_UNK_PIECE, _TS_BOS_PIECE, _TS_EOS_PIECE, _TS_PAD_PIECE = 45, 46, 47, 48
_NS_NAME, _NS_ADD_DUMMY_PREFIX, _NS_REMOVE_EXTRA_WS, _NS_ESCAPE_WS = 1, 3, 4, 5
_SPM_MODEL_TYPE_BPE = 2


def _pb_varint(v: int) -> bytes:
    v &= (1 << 64) - 1                   # negative int32 -> ten-byte two's complement, as protobuf does
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _pb_int(field: int, v: int) -> bytes:
    return _pb_varint(field << 3) + _pb_varint(int(v))


def _pb_bytes(field: int, b: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(b)) + b


def _pb_float(field: int, v: float) -> bytes:
    return _pb_varint(field << 3 | 5) + struct.pack("<f", v)


def _spm_model_proto(tokens: list[str], scores: list[float], types: list[int], ids: dict[str, int | None],
                     *, add_dummy_prefix: bool, remove_extra_whitespaces: bool) -> bytes:
    """Serialized ``sentencepiece.ModelProto`` (BPE, llama.cpp's SPM vocabulary semantics)."""
    types = [int(t) if int(t) in (1, 2, 3, 4, 5, 6) else TT_NORMAL for t in types]
    tokens = list(tokens)
    for i, t in enumerate(tokens):
        if not t:                        # SentencePiece rejects empty pieces; llama.cpp renames them too
            tokens[i], types[i] = f"[EMPTY_{i}]", TT_UNUSED
    unk = ids.get("unk")
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == TT_UNKNOWN), None)
    if unk is None:
        raise ValueError("GGUF SentencePiece vocabulary has no unknown token (SentencePiece needs one)")
    for i, t in enumerate(types):        # exactly one UNKNOWN piece
        if t == TT_UNKNOWN and i != unk:
            types[i] = TT_CONTROL
    types[unk] = TT_UNKNOWN
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise ValueError(f"GGUF SentencePiece vocabulary has the piece {t!r} twice (ids {seen[t]} and {i})")
        seen[t] = i

    body = bytearray()
    for t, s, ty in zip(tokens, scores, types):
        piece = _pb_bytes(_PIECE_TEXT, t.encode("utf-8")) + _pb_float(_PIECE_SCORE, float(s))
        if ty != TT_NORMAL:
            piece += _pb_int(_PIECE_TYPE, ty)
        body += _pb_bytes(_MP_PIECES, piece)

    trainer = _pb_int(_TS_MODEL_TYPE, _SPM_MODEL_TYPE_BPE) + _pb_int(_TS_VOCAB_SIZE, len(tokens))
    trainer += _pb_int(_TS_BYTE_FALLBACK, int(TT_BYTE in types))
    for fid, fpiece, name in ((_TS_UNK_ID, _TS_UNK_PIECE, "unk"), (_TS_BOS_ID, _TS_BOS_PIECE, "bos"),
                              (_TS_EOS_ID, _TS_EOS_PIECE, "eos"), (_TS_PAD_ID, _TS_PAD_PIECE, "pad")):
        i = unk if name == "unk" else ids.get(name)
        trainer += _pb_int(fid, -1 if i is None else i)
        if i is not None:
            trainer += _pb_bytes(fpiece, tokens[i].encode("utf-8"))
    body += _pb_bytes(_MP_TRAINER_SPEC, trainer)

    normalizer = (_pb_bytes(_NS_NAME, b"identity") + _pb_int(_NS_ADD_DUMMY_PREFIX, int(add_dummy_prefix))
                  + _pb_int(_NS_REMOVE_EXTRA_WS, int(remove_extra_whitespaces)) + _pb_int(_NS_ESCAPE_WS, 1))
    body += _pb_bytes(_MP_NORMALIZER_SPEC, normalizer)
    return bytes(body)


# ----------------------------------------------------------------------------------------------
# Export from a Hugging Face directory

def export_from_hf(src_dir: Path, out_dir: Path) -> None:
    """Copy ``tokenizer.json`` / ``tokenizer.model`` and write our ``tokenizer_config.json``."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    files = [f for f in (TOKENIZER_JSON, SPM_MODEL) if (src_dir / f).is_file()]
    if not files:
        raise ValueError(f"{src_dir}: no tokenizer: neither {TOKENIZER_JSON} nor {SPM_MODEL} is there")
    config = config_from_hf(src_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        if (src_dir / f).resolve() != (out_dir / f).resolve():
            shutil.copyfile(src_dir / f, out_dir / f)
    _write_config(out_dir, config)


def _write_config(out_dir: Path, config: dict) -> None:
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
