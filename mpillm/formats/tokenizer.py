"""Tokenizers and chat templates, as a running job uses them.

A converted model directory holds its tokenizer in one of two forms, plus our
own ``tokenizer_config.json``:

  tokenizer.json         a Hugging Face ``tokenizers`` tokenizer (kind "tokenizers")
  tokenizer.model        a SentencePiece model protobuf            (kind "sentencepiece")
  tokenizer_config.json  tokenizer_kind, chat_template, bos/eos ids, add_bos_token

The converter writes them (``convert.tokenizer_export``: from a GGUF's vocabulary or a
Hugging Face directory's files).  ``load_tokenizer`` reads either back into a ``Tokenizer``
(a plain Hugging Face directory too, through ``config_from_hf``); ``StreamDecoder`` turns
generated ids into printable text without splitting a multi-byte character.
"""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "CONFIG_NAME", "TOKENIZER_JSON", "SPM_MODEL", "KIND_TOKENIZERS", "KIND_SENTENCEPIECE", "EOG_TEXTS",
    "config_from_hf", "load_tokenizer", "Tokenizer", "StreamDecoder",
]

CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
SPM_MODEL = "tokenizer.model"
CHAT_TEMPLATE_FILE = "chat_template.jinja"     # Hugging Face keeps long templates here

KIND_TOKENIZERS = "tokenizers"
KIND_SENTENCEPIECE = "sentencepiece"

# Texts of control tokens that end a generation even when the file names another EOS
# (llama.cpp treats the same set as end-of-generation).
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})


# ----------------------------------------------------------------------------------------------
# Our tokenizer_config.json fields from a Hugging Face model directory (the converter's
# export_from_hf writes them; load_tokenizer reads a plain Hugging Face directory with them).

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


def config_from_hf(src_dir: Path) -> dict:
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
    eos_ids |= {i for t, i in backend.special_tokens().items() if t in EOG_TEXTS}

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

    def to_json(self) -> str:
        return self.tk.to_str()


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

    def backend_json(self) -> str | None:
        """The tokenizers tokenizer as its tokenizer.json text (a grammar engine builds its token
        table from it); None for a SentencePiece model."""
        f = getattr(self._backend, "to_json", None)
        return f() if f is not None else None

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
    """The tokenizer that the converter (``convert.tokenizer_export``) wrote into ``model_dir``.
    A plain Hugging Face model directory is read too (its tokenizer_config.json is interpreted)."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / CONFIG_NAME)
    kind = config.get("tokenizer_kind")
    if kind is None:
        if not (model_dir / TOKENIZER_JSON).is_file() and not (model_dir / SPM_MODEL).is_file():
            raise ValueError(f"{model_dir}: no tokenizer: expected {TOKENIZER_JSON} or {SPM_MODEL} "
                             f"(with {CONFIG_NAME}); convert the model first")
        config = config_from_hf(model_dir)
        kind = config["tokenizer_kind"]
    needed = TOKENIZER_JSON if kind == KIND_TOKENIZERS else SPM_MODEL
    if kind in (KIND_TOKENIZERS, KIND_SENTENCEPIECE) and not (model_dir / needed).is_file():
        raise ValueError(f"{model_dir}: {CONFIG_NAME} says tokenizer_kind {kind!r} but {needed} is missing")
    return Tokenizer(_open_backend(model_dir, kind), config)
