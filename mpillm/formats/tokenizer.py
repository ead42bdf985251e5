"""Tokenizers and chat templates.

A converted model directory holds its tokenizer in one of two forms, plus our
own ``tokenizer_config.json``:

  tokenizer.json         a Hugging Face ``tokenizers`` tokenizer (kind "tokenizers")
  tokenizer.model        a SentencePiece model protobuf            (kind "sentencepiece")
  tokenizer_config.json  tokenizer_kind, chat_template, bos/eos ids, add_bos_token

``export_from_gguf`` builds them from a GGUF's vocabulary (``gpt2`` byte-level
BPE through ``tokenizers`` with the pre-tokenizer that ``tokenizer.ggml.pre``
names; ``llama`` SentencePiece through a ModelProto written here), and
``export_from_hf`` copies a Hugging Face directory's files.  ``load_tokenizer``
reads either back into a ``Tokenizer``; ``StreamDecoder`` turns generated ids
into printable text without splitting a multi-byte character.
"""
from __future__ import annotations

import datetime
import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "CONFIG_NAME", "TOKENIZER_JSON", "SPM_MODEL", "KIND_TOKENIZERS", "KIND_SENTENCEPIECE",
    "export_from_gguf", "export_from_hf", "load_tokenizer", "Tokenizer", "StreamDecoder",
]

CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
SPM_MODEL = "tokenizer.model"
CHAT_TEMPLATE_FILE = "chat_template.jinja"     # Hugging Face keeps long templates here

KIND_TOKENIZERS = "tokenizers"
KIND_SENTENCEPIECE = "sentencepiece"

# GGUF token types (gguf.TokenType); SentencePiece's piece types use the same numbers.
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

# Texts of control tokens that end a generation even when the file names another EOS
# (llama.cpp treats the same set as end-of-generation).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})


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
    eos_ids += [i for t, i in specials.items() if t in _EOG_TEXTS]
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
    config = _config_from_hf(src_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        if (src_dir / f).resolve() != (out_dir / f).resolve():
            shutil.copyfile(src_dir / f, out_dir / f)
    _write_config(out_dir, config)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_text(v: Any) -> str | None:
    """A token as Hugging Face writes it in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _id_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(v)]


def _config_from_hf(src_dir: Path) -> dict:
    """Our tokenizer_config.json fields from a Hugging Face model directory."""
    tc = _read_json(src_dir / "tokenizer_config.json")
    mc = _read_json(src_dir / "config.json")
    gc = _read_json(src_dir / "generation_config.json")
    kind = KIND_TOKENIZERS if (src_dir / TOKENIZER_JSON).is_file() else KIND_SENTENCEPIECE
    backend = _open_backend(src_dir, kind)

    template: Any = None
    if (src_dir / CHAT_TEMPLATE_FILE).is_file():
        template = (src_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    else:
        template = tc.get("chat_template")
        if isinstance(template, list):   # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        if not isinstance(template, str):
            template = None

    def lookup(text: str | None) -> int | None:
        return None if text is None else backend.token_to_id(text)

    bos_text, eos_text = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
    bos_id = lookup(bos_text)
    if bos_id is None:
        bos_id = next(iter(_id_list(mc.get("bos_token_id")) + _id_list(gc.get("bos_token_id"))), None)
    eos_from_files = _id_list(gc.get("eos_token_id")) + _id_list(mc.get("eos_token_id"))
    eos_id = lookup(eos_text)
    if eos_id is None:
        eos_id = next(iter(_id_list(mc.get("eos_token_id")) + _id_list(gc.get("eos_token_id"))), None)
    eos_ids = set(eos_from_files) | ({eos_id} if eos_id is not None else set())
    eos_ids |= {i for t, i in backend.special_tokens().items() if t in _EOG_TEXTS}

    add_bos = tc.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = kind == KIND_SENTENCEPIECE or _post_processor_adds(src_dir, bos_id, backend)
    return {
        "tokenizer_kind": kind,
        "source": "hf",
        "chat_template": template,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "eot_token_id": None,
        "eom_token_id": None,
        "eos_token_ids": sorted(eos_ids),
        "bos_token": backend.id_to_token(bos_id) if bos_id is not None else None,
        "eos_token": backend.id_to_token(eos_id) if eos_id is not None else None,
        "add_bos_token": bool(add_bos),
    }


def _post_processor_adds(src_dir: Path, bos_id: int | None, backend: "_Backend") -> bool:
    """Whether tokenizer.json's post-processor puts the BOS token first (Llama 3 style)."""
    if bos_id is None or not (src_dir / TOKENIZER_JSON).is_file():
        return False
    try:
        return backend.encode_with_post_processor("")[:1] == [bos_id]
    except Exception:
        return False


def _write_config(out_dir: Path, config: dict) -> None:
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Backends: the same small interface over ``tokenizers`` and ``sentencepiece``.

class _Backend:
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special: bool) -> str: ...
    def token_to_id(self, text: str) -> int | None: ...
    def id_to_token(self, i: int) -> str | None: ...
    def special_tokens(self) -> dict[str, int]: ...
    def encode_with_post_processor(self, text: str) -> list[int]: return self.encode(text)


class _HFBackend(_Backend):
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tk = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable tokenizers file ({e})") from None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_post_processor(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, text: str) -> int | None:
        return self.tk.token_to_id(text)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}


class _SPMBackend(_Backend):
    """SentencePiece with llama.cpp's handling of control tokens written in the text: the text is
    cut at them, each piece between is encoded on its own (so it gets the dummy space prefix)."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self._special = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._control = frozenset(i for i in self._special.values() if self.sp.is_control(i))
        pieces = sorted((p for p in self._special if p), key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, pieces))) if pieces else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text) if text else []
        ids: list[int] = []
        pos = 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                ids += self.sp.encode(text[pos:m.start()])
            ids.append(self._special[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.sp.encode(text[pos:])
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        out, run = [], []
        for i in ids:
            if i in self._control:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, text: str) -> int | None:
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() and text != self.sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)


def _open_backend(model_dir: Path, kind: str) -> _Backend:
    if kind == KIND_TOKENIZERS:
        return _HFBackend(model_dir / TOKENIZER_JSON)
    if kind == KIND_SENTENCEPIECE:
        return _SPMBackend(model_dir / SPM_MODEL)
    raise ValueError(f"{model_dir / CONFIG_NAME}: unknown tokenizer_kind {kind!r}")


# ----------------------------------------------------------------------------------------------
# Chat templates, rendered the way Hugging Face transformers does.

def _compile_chat_template(source: str) -> Any:
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training): renders its body."""
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the model's chat template does not compile: {e}") from None


# ----------------------------------------------------------------------------------------------
# The runtime tokenizer

class Tokenizer:
    """Encode, decode and render chats for a converted model (see ``load_tokenizer``)."""

    def __init__(self, backend: _Backend, config: dict):
        self._backend = backend
        self.kind: str = config["tokenizer_kind"]
        self.config = config
        self.bos_id: int | None = config.get("bos_token_id")
        eos = set(config.get("eos_token_ids") or [])
        eos |= {config[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if config.get(k) is not None}
        # harmony (gpt-oss): <|end|> ends a message and the model goes on with the next one;
        # <|return|> and <|call|> end the generation (llama.cpp drops <|end|> the same way)
        end, ret = backend.token_to_id("<|end|>"), backend.token_to_id("<|return|>")
        if end is not None and ret is not None and backend.token_to_id("<|channel|>") is not None:
            eos = (eos - {end}) | {ret} | {i for i in [backend.token_to_id("<|call|>")] if i is not None}
        self.eos_ids: frozenset[int] = frozenset(int(i) for i in eos)
        self.eos_id: int | None = config.get("eos_token_id")
        self.add_bos: bool = bool(config.get("add_bos_token", False))
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token: str | None = config.get("bos_token") or (
            backend.id_to_token(self.bos_id) if self.bos_id is not None else None)
        self.eos_token: str | None = config.get("eos_token") or (
            backend.id_to_token(self.eos_id) if self.eos_id is not None else None)
        self._template: Any = None

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) become their ids.
        ``add_bos`` defaults to the model's own setting; a BOS already at the start is not doubled."""
        ids = list(self._backend.encode(text))
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens)

    def token_to_id(self, text: str) -> int | None:
        return self._backend.token_to_id(text)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(int(i))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for ``messages`` ([{"role": ..., "content": ...}, ...]) in the model's own
        chat format.  Encode it with ``add_bos=False`` when the template writes the BOS itself."""
        import jinja2

        if not self.chat_template:
            raise ValueError("this model has no chat template "
                             "(tokenizer.chat_template / chat_template is missing)")
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns generated ids, one at a time, into printable text pieces.

    It decodes a short window of recent ids twice, without and with the new ones, and gives out
    the difference once it does not end in U+FFFD (an incomplete UTF-8 sequence: the rest of the
    character is still to come) or more than four ids are waiting (the bytes are invalid).  The
    window keeps one id of context before the new text so that decoders which strip a leading
    space on the first piece (SentencePiece) stay consistent.
    ``"".join(put(i) for i in ids) + flush() == tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0     # window start: ids before it are done with
        self._read = 0       # ids before this have been given out as text

    def put(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self._ids.append(int(token_id))
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        # A character spans at most 4 byte tokens: a longer wait means the bytes are invalid, so
        # give them out (as U+FFFD) rather than hold the stream back for ever.
        stuck = len(self._ids) - self._read > 4
        if len(text) > len(done) and (stuck or not text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD); then start afresh."""
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(done):] if len(text) > len(done) else ""


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer that ``export_from_gguf`` / ``export_from_hf`` wrote into ``model_dir``.
    A plain Hugging Face model directory is read too (its tokenizer_config.json is interpreted)."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / CONFIG_NAME)
    kind = config.get("tokenizer_kind")
    if kind is None:
        if not (model_dir / TOKENIZER_JSON).is_file() and not (model_dir / SPM_MODEL).is_file():
            raise ValueError(f"{model_dir}: no tokenizer: expected {TOKENIZER_JSON} or {SPM_MODEL} "
                             f"(with {CONFIG_NAME}); convert the model first")
        config = _config_from_hf(model_dir)
        kind = config["tokenizer_kind"]
    needed = TOKENIZER_JSON if kind == KIND_TOKENIZERS else SPM_MODEL
    if kind in (KIND_TOKENIZERS, KIND_SENTENCEPIECE) and not (model_dir / needed).is_file():
        raise ValueError(f"{model_dir}: {CONFIG_NAME} says tokenizer_kind {kind!r} but {needed} is missing")
    return Tokenizer(_open_backend(model_dir, kind), config)
