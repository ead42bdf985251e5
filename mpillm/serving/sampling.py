"""Per-sequence sampling on rank 0: parameters, penalties, temperature / top-k / top-p / min-p,
log-probabilities, stop strings, and the token each output row of a step gives its sequence
(``decide``: plain sampling, greedy, and the speculative acceptance rule).

Each sequence has its own ``Sampler`` with its own seeded generator, so what it draws depends
only on its own logits and seed, never on what else is in the batch. Rows that decode greedily
with no penalties and no log-probabilities never reach a Sampler: the engine's distributed
argmax gives their token without gathering logits (``SamplingParams.needs_logits``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0   # 1 = off; divides positive logits of tokens seen in prompt or output
    presence_penalty: float = 0.0     # subtracted once from the logit of every token the output holds
    frequency_penalty: float = 0.0    # subtracted per occurrence in the output
    stop: tuple[str, ...] = ()        # stop strings (never part of the output text)
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS ids
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0             # 0..20

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        def bad(name: str, what: str):
            raise ValueError(f"{name}: {what}, got {getattr(self, name)!r}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", "int", "int | None") and v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                        (isinstance(v, float) and not math.isfinite(v)):
                    bad(f.name, "must be a finite number")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 64):
            bad("seed", "must be an integer in [0, 2^64)")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", "must be in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "must be in [-2, 2]")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            bad("top_logprobs", "needs logprobs")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 16:
            bad("stop", "must be at most 16 non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be token ids")

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_logits(self) -> bool:
        """False when the greedy token alone decides (the engine's distributed argmax)."""
        return self.temperature > 0.0 or self.penalized or self.logprobs


@dataclass
class TokenLogprob:
    token_id: int
    text: str                          # the token's own text
    logprob: float                     # log p of the chosen token under the model (before penalties)
    top: list[tuple[int, str, float]]  # the top_logprobs most likely (id, text, logprob), best first


class Sampler:
    """One sequence's sampler. ``context`` holds the prompt ids (repetition penalty); ``constraint``
    (mpillm.serving.grammar.Constraint, or anything with ``apply(logits)``) masks the logits to the
    tokens a grammar allows, after the penalties and before the pick."""

    def __init__(self, params: SamplingParams, vocab_size: int, context=(), constraint=None):
        params.validate()
        self.p = params
        self.constraint = constraint
        self.rng = np.random.default_rng(params.seed)
        self.work = np.empty(vocab_size, np.float64)   # (vocab,) penalized / scaled logits
        self.counts: dict[int, int] = {}               # output token -> occurrences
        self.seen = set(int(t) for t in context)       # prompt + output tokens (repetition penalty)

    def observe(self, token: int) -> None:
        """Record a token the sequence produced (however it was chosen)."""
        self.counts[token] = self.counts.get(token, 0) + 1
        self.seen.add(token)

    def __call__(self, logits: np.ndarray) -> int:
        """logits (vocab,) -> a token id (not yet observed: call observe with the token kept)."""
        if self.p.temperature == 0.0:
            np.copyto(self.work, logits)
            if self.p.penalized:
                self._penalize(self.work)
            if self.constraint is not None:
                self.constraint.apply(self.work)
            return int(np.argmax(self.work))
        ids, probs = self.distribution(logits)
        return int(ids[self.rng.choice(len(probs), p=probs)])

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distribution a temperature > 0 draw uses: (candidate ids, their probabilities) after
        penalties, temperature, top-k, top-p and min-p (speculative sampling needs it whole)."""
        p, w = self.p, self.work
        np.copyto(w, logits)
        if p.penalized:
            self._penalize(w)
        if self.constraint is not None:
            self.constraint.apply(w)
        w /= p.temperature
        cand = None
        if p.top_k and p.top_k < len(w):
            cand = np.argpartition(-w, p.top_k - 1)[: p.top_k]
        vals = w if cand is None else w[cand]
        probs = np.exp(vals - vals.max())
        probs /= probs.sum()
        ids = np.arange(len(probs)) if cand is None else cand
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            csum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(csum, p.top_p)) + 1]
            ids, probs = ids[keep], probs[keep]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs.max()
            ids, probs = ids[keep], probs[keep]
        return ids, probs / probs.sum()

    def _penalize(self, w: np.ndarray) -> None:
        p = self.p
        if p.repetition_penalty != 1.0 and self.seen:
            ids = np.fromiter(self.seen, np.int64, len(self.seen))
            v = w[ids]
            w[ids] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self.counts.keys(), np.int64, len(self.counts))
            n = np.fromiter(self.counts.values(), np.float64, len(self.counts))
            w[ids] -= p.presence_penalty + p.frequency_penalty * n


def logprobs_of(logits: np.ndarray, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """log softmax(logits)[token] and the top_n (id, logprob), best first, in float64."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    top: list[tuple[int, float]] = []
    if top_n:
        idx = np.argpartition(-x, top_n - 1)[:top_n]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return float(x[token] - lse), top


class StopMatcher:
    """Finds stop strings in streamed text. Text that may be the start of a stop string is held
    back until the following text decides; a stop string and everything after it is dropped."""

    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.held = ""

    def put(self, text: str) -> tuple[str, bool]:
        """(text to give out now, whether a stop string ended the sequence)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held text, when the sequence ends for another reason."""
        h, self.held = self.held, ""
        return h


# ---- the token a row gets, and speculative acceptance ---------------------------------------------
def accept_sampled(p: np.ndarray, d: int, q: np.ndarray | None, rng: np.random.Generator) -> tuple[int, bool]:
    """One draft position under speculative sampling: ``p`` the target's distribution (vocab,),
    ``d`` the draft token, ``q`` the draft's distribution (None: a deterministic draft, q one-hot at
    d). Returns (token, accepted): d itself, or a token drawn from normalize(max(0, p - q))."""
    qd = 1.0 if q is None else float(q[d])
    pd = float(p[d])
    if qd > 0.0 and rng.random() * qd < pd:   # u < p(d) / q(d), without dividing
        return d, True
    if q is None:
        resid = p.copy()
        resid[d] = 0.0
    else:
        resid = np.maximum(p - q, 0.0)
    s = resid.sum()
    if s <= 0.0:     # p <= q everywhere but p(d) < q(d): cannot happen for distributions; be safe
        resid, s = p, p.sum()
    return int(rng.choice(len(resid), p=resid / s)), False


def decide(sampler: Sampler | None, greedy_id: int, logits: np.ndarray | None, d: int | None,
           q: np.ndarray | None, vocab: int) -> tuple[int, bool]:
    """Row i of a verified draft: (the token the sequence gets, whether draft d was accepted).
    ``d`` None is the row after the last draft (or a sequence without one): the target's own token.
    Greedy rows (no sampler) accept while d equals the target's argmax."""
    if sampler is None:
        return greedy_id, d is not None and greedy_id == d
    if d is None:
        return sampler(logits), False
    if sampler.p.temperature == 0.0:            # greedy with penalties or log-probabilities
        t = sampler(logits)
        return t, t == d
    ids, probs = sampler.distribution(logits)
    p = np.zeros(vocab, np.float64)
    p[ids] = probs
    return accept_sampled(p, d, q, sampler.rng)
