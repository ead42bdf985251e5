"""Constrained decoding on rank 0: grammars from JSON schemas (and Lark), one matcher per request,
the token mask for each step.

The grammar engine is llguidance: it compiles a JSON schema (or a Lark grammar that embeds JSON
schemas with ``%json``) against the model's tokenizer and, for each step, gives a bit mask of the
tokens that keep the output inside the grammar; EOS is allowed only where the output is complete.
Only rank 0 holds grammar state: a constrained row is an ``OUT_LOGITS`` row (its logits are
gathered), ``Constraint.apply`` masks them before the sampler picks, and ``Constraint.consume``
advances the matcher with the token kept.

``Grammars`` is made once per tokenizer (building llguidance's token trie takes about a second;
it is done on first use). No MPI, no HTTP.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np

MAX_SCHEMA_BYTES = 256 << 10     # a JSON schema larger than this is refused before compiling


class GrammarError(ValueError):
    """A schema or grammar the engine cannot compile (the message says why)."""


def _llg():
    import llguidance

    return llguidance


class Grammars:
    """Compiles grammars for one tokenizer and makes per-request ``Constraint`` objects.

    ``vocab_size`` is the engine's logits width (it may exceed the tokenizer's: padding rows are
    never allowed)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tok, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._ll = None

    def _lltok(self):
        with self._lock:
            if self._ll is None:
                llg = _llg()
                spec = self.tok.backend_json()
                if spec is None:
                    raise GrammarError("constrained decoding needs a Hugging Face tokenizers tokenizer "
                                       f"(this model's is {self.tok.kind!r})")
                eos = sorted(self.tok.eos_ids) or None
                self._ll = llg.LLTokenizer(spec, eos_token=eos)
            return self._ll

    # ---- grammar sources (llguidance's grammar JSON, as a string)
    @staticmethod
    def json_schema(schema: Any, what: str = "schema") -> str:
        """The grammar of one JSON value matching ``schema`` (a dict; ``True`` or {} is any JSON)."""
        if schema is True or schema == {}:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(f"{what} must be a JSON schema object")
        size = len(json.dumps(schema))
        if size > MAX_SCHEMA_BYTES:
            raise GrammarError(f"{what} is {size} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}")
        try:
            return _llg().LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False,
                                                                                 "item_separator": ", ",
                                                                                 "key_separator": ": "})
        except ValueError as e:
            raise GrammarError(f"{what}: {e}") from None

    @staticmethod
    def lark(source: str) -> str:
        return _llg().LLMatcher.grammar_from_lark(source)

    def check(self, grammar: str, what: str = "schema") -> None:
        """Raise GrammarError when the engine cannot compile ``grammar`` (unsupported keywords too)."""
        is_error, msgs = _llg().LLMatcher.validate_grammar_with_warnings(grammar, self._lltok())
        if is_error or msgs:
            raise GrammarError(f"{what}: {'; '.join(msgs)[:500] or 'invalid'}")

    def constraint(self, grammar: str, what: str = "schema") -> "Constraint":
        self.check(grammar, what)
        m = _llg().LLMatcher(self._lltok(), grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"{what}: {m.get_error()[:500]}")
        return Constraint(m, self.vocab_size, self._lltok().vocab_size)


class Constraint:
    """One request's grammar state: the mask for the next token, then the token kept."""

    def __init__(self, matcher, vocab_size: int, grammar_vocab: int):
        self.m = matcher
        self.vocab_size = vocab_size
        self.words = (max(vocab_size, grammar_vocab) + 31) // 32
        self.bits = np.full(self.words, -1, np.int32)
        self.mask_seconds = 0.0          # time spent computing masks (the benchmark reports it)
        self.masks = 0

    def allowed(self) -> np.ndarray:
        """Boolean (vocab_size,): the tokens the grammar allows next."""
        t0 = time.perf_counter()
        self.bits.fill(0)
        self.m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        ok = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        self.mask_seconds += time.perf_counter() - t0
        self.masks += 1
        return ok

    def apply(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar forbids to -inf (in place)."""
        ok = self.allowed()
        t0 = time.perf_counter()
        if ok.any():                  # none allowed: the grammar is broken; leave the row as it is
            logits[~ok] = -np.inf
        self.mask_seconds += time.perf_counter() - t0

    def consume(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar did not allow it."""
        return bool(self.m.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """No token can follow: the value is complete and closed, or the engine stopped on an
        error (``error`` says which)."""
        return bool(self.m.is_stopped())

    @property
    def accepting(self) -> bool:
        """The output so far is a complete value (EOS here ends it validly)."""
        return bool(self.m.is_accepting())

    @property
    def error(self) -> str | None:
        return self.m.get_error() if self.m.is_error() else None
