"""Speculative decoding on rank 0: drafters propose tokens, the target verifies them in one step.

A decoding sequence with a draft d[0..k-1] runs k + 1 rows in one step of the target (its newest
token and the drafts, at positions n..n+k): the same two Allreduce per layer as one token, and on a
memory-bound CPU each weight is read once for all rows. Row i gives the target's distribution
after d[:i]; ``sampling.decide`` walks the rows in order and either accepts d[i] or ends with the target's
own token (the correction, or after a full accept the bonus token of row k). Positions are
explicit in every row, so the keys and values of rejected drafts are simply overwritten by later
steps: nothing is copied or rolled back (the draft model's cache works the same way).

Exactness: with greedy decoding the accepted tokens are exactly the target's argmax tokens. With
sampling the rule of Leviathan et al. / Chen et al. (2023) keeps the output distribution the
target's own: accept d ~ q with probability min(1, p(d) / q(d)); on rejection sample from
normalize(max(0, p - q)). Prompt lookup proposes deterministically (q is one-hot at d).

Drafters (all on rank 0, no MPI collectives):
  * ``LookupDrafter``: prompt lookup. The sequence's last n tokens (n from ``ngram_max`` down to
    ``ngram_min``) are searched for earlier in its own tokens; what followed the latest match is
    the draft. Free of cost when nothing matches.
  * ``ModelDrafter``: a small model with the target's vocabulary, its own ``Engine`` on
    ``MPI.COMM_SELF`` with a KV slot per target slot.
Both size each sequence's draft with ``AdaptiveLength`` so text that drafts badly stops drafting.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from mpillm.runtime.steps import OUT_GREEDY, OUT_LOGITS
from mpillm.serving.sampling import Sampler


# ---- draft length -------------------------------------------------------------------------------
@dataclasses.dataclass
class AdaptiveLength:
    """Per sequence: how many tokens to draft next. Doubles after a full accept, shrinks to what
    was accepted plus one after a partial one, halves after an immediate rejection; at 0 it pauses
    for a number of steps that doubles with each failed probe (up to ``max_pause``), then probes
    with 1 again. Free text that drafts badly thus costs at most an extra row every few steps."""
    k_max: int
    k: int = 2
    pause: int = 0
    backoff: int = 1
    max_pause: int = 32

    def __post_init__(self):
        self.k = min(self.k, self.k_max)

    def next(self) -> int:
        if self.k == 0:
            if self.pause > 0:
                self.pause -= 1
                return 0
            self.k = 1
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.k, self.backoff = min(self.k_max, 2 * drafted), 1
        elif accepted > 0:
            self.k, self.backoff = min(self.k_max, accepted + 1), 1
        else:
            self.k = drafted // 2
            if self.k == 0:
                self.pause = self.backoff
                self.backoff = min(2 * self.backoff, self.max_pause)


class Drafter:
    """The interface Service uses. ``propose`` sets ``seq.draft`` (and ``seq.draft_q``, the draft's
    distributions, or None for deterministic drafts) for sequences that decode this step;
    ``feedback`` learns from the verification; ``release`` forgets a finished sequence."""

    def __init__(self, k_max: int = 8):
        if k_max < 1:
            raise ValueError(f"--draft-max {k_max} must be >= 1")
        self.k_max = k_max
        self.lengths: dict[str, AdaptiveLength] = {}

    def want(self, seq, room: int) -> int:
        """How many tokens to draft for seq (0: none), at most ``room``."""
        st = self.lengths.get(seq.id)
        if st is None:
            st = self.lengths[seq.id] = AdaptiveLength(self.k_max)
        return max(0, min(st.next(), room))

    def propose(self, seq, k: int) -> None:
        raise NotImplementedError

    def feedback(self, seq, drafted: int, accepted: int) -> None:
        st = self.lengths.get(seq.id)
        if st is not None:
            st.update(drafted, accepted)

    def release(self, seq) -> None:
        self.lengths.pop(seq.id, None)

    def close(self) -> None:
        pass


class LookupDrafter(Drafter):
    """Prompt lookup (n-gram) drafting from the sequence's own tokens."""

    def __init__(self, ngram_max: int = 4, ngram_min: int = 2, k_max: int = 8):
        super().__init__(k_max)
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"--draft-ngram-min {ngram_min} / --draft-ngram {ngram_max}: need 1 <= min <= max")
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._arrays: dict[str, tuple[np.ndarray, int]] = {}

    def _tokens(self, seq) -> np.ndarray:
        """seq.tokens as an int64 array, kept per sequence and grown (tokens are only appended)."""
        a, filled = self._arrays.get(seq.id, (None, 0))
        n = len(seq.tokens)
        if a is None or len(a) < n:
            b = np.empty(max(2 * n, 256), np.int64)
            if a is not None:
                b[:filled] = a[:filled]
            a = b
        if filled < n:
            a[filled:n] = seq.tokens[filled:n]
        self._arrays[seq.id] = (a, n)
        return a[:n]

    def lookup(self, tokens: np.ndarray, k: int) -> list[int]:
        """The continuation (up to k tokens) of the latest earlier occurrence of the longest
        matching suffix n-gram, or []."""
        L = len(tokens)
        for n in range(min(self.ngram_max, L - 1), self.ngram_min - 1, -1):
            pat = tokens[L - n:]
            hay = tokens[:L - 1]                     # a match must be followed by at least one token
            cand = np.flatnonzero(hay[:L - n] == pat[0]) if n > 0 else np.zeros(0, np.int64)
            cand = cand[cand + n <= L - 1]
            for j in range(1, n):
                if len(cand) == 0:
                    break
                cand = cand[tokens[cand + j] == pat[j]]
            if len(cand):
                s = int(cand[-1]) + n
                return tokens[s:s + k].tolist()
        return []

    def propose(self, seq, k: int) -> None:
        seq.draft, seq.draft_q = self.lookup(self._tokens(seq), k), None

    def release(self, seq) -> None:
        super().release(seq)
        self._arrays.pop(seq.id, None)


def tokenizer_digest(tok) -> str:
    """A hash of the tokenizer's token list (id -> token text) and special ids."""
    h = hashlib.sha256()
    for i in range(tok.vocab_size):
        h.update(repr(tok.id_to_token(i)).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    h.update(repr((sorted(tok.eos_ids), tok.bos_id)).encode())
    return h.hexdigest()


def check_same_vocabulary(target_cfg, target_tok, draft_cfg, draft_tok, draft_path) -> None:
    """Refuse a draft model whose vocabulary or tokenizer differs from the target's."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(f"--draft-model {draft_path}: its vocabulary has {draft_cfg.vocab_size} tokens, the "
                         f"target's {target_cfg.vocab_size}; a draft model must share the target's tokenizer")
    if target_tok is not None and draft_tok is not None and \
            tokenizer_digest(draft_tok) != tokenizer_digest(target_tok):
        diff = next((i for i in range(min(draft_tok.vocab_size, target_tok.vocab_size))
                     if draft_tok.id_to_token(i) != target_tok.id_to_token(i)), None)
        where = f" (first difference at token id {diff}: {draft_tok.id_to_token(diff)!r} vs " \
                f"{target_tok.id_to_token(diff)!r})" if diff is not None else " (special tokens or size differ)"
        raise ValueError(f"--draft-model {draft_path}: its tokenizer differs from the target's{where}; "
                         f"a draft model must share the target's tokenizer")


class ModelDrafter(Drafter):
    """A small model with the target's vocabulary, run by rank 0 alone (its own Engine on
    MPI.COMM_SELF: no collectives) with one KV slot per target slot. Its cache rolls back like the
    target's: it remembers which of its positions hold tokens the sequence still has, and later
    steps overwrite the rest."""

    def __init__(self, engine, k_max: int = 8):
        super().__init__(k_max)
        self.engine = engine
        self.vocab = engine.cfg.vocab_size
        self.state: dict[str, tuple[int, int, list[int]]] = {}   # id -> (slot, valid, draft tail run)
        self.samplers: dict[str, Sampler] = {}

    @classmethod
    def open(cls, out: Path, target_engine, target_tok, k_max: int = 8, threads: int = 1,
             kv_type: str = "f16", buffer_type: str = "f32", path: str | None = None) -> "ModelDrafter":
        """Rank 0: check the vocabulary of the converted single-rank draft model in ``out`` (``path``:
        what the user named, for messages; mpillm.startup.open_model_drafter converts on first use)
        and open the draft engine."""
        from mpi4py import MPI

        from mpillm.formats import format as fmt
        from mpillm.formats.config import ModelConfig
        from mpillm.formats.tokenizer import load_tokenizer
        from mpillm.runtime.engine import Engine

        path = str(out) if path is None else path
        dcfg = ModelConfig.from_dict(fmt.read_manifest(out)["config"])
        try:
            dtok = load_tokenizer(out)
        except ValueError:
            dtok = None
        if target_tok is not None and dtok is None:
            raise ValueError(f"--draft-model {path}: no tokenizer in {out} to compare with the target's")
        check_same_vocabulary(target_engine.cfg, target_tok, dcfg, dtok, path)
        eng = Engine(out, max_seq_len=target_engine.max_seq_len, threads=threads,
                     max_batch=target_engine.max_batch, n_slots=target_engine.n_slots,
                     comm=MPI.COMM_SELF, verbose=False, kv_type=kv_type, buffer_type=buffer_type)
        return cls(eng, k_max)

    def _sampler(self, seq) -> Sampler | None:
        req = seq.owner
        params = getattr(req, "params", None)
        if params is None or params.temperature == 0.0:
            return None
        s = self.samplers.get(seq.id)
        if s is None:
            # the draft's own proposal distribution: the target's temperature and truncation, no
            # penalties (any proposal keeps the rule exact; this one tracks the target closely)
            dp = dataclasses.replace(params, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                     logprobs=False, top_logprobs=0,
                                     seed=None if params.seed is None else (params.seed * 7919 + 1) % 2 ** 64)
            s = self.samplers[seq.id] = Sampler(dp, self.vocab)
        return s

    def propose(self, seq, k: int) -> None:
        slot = seq.slot.index
        st = self.state.get(seq.id)
        valid, tail = (0, []) if st is None or st[0] != slot else st[1:]
        toks = seq.tokens
        # the draft tokens run last time that the sequence kept are still valid in the draft cache
        i = 0
        while i < len(tail) and valid + i < len(toks) and toks[valid + i] == tail[i]:
            i += 1
        valid += i
        valid = min(valid, len(toks) - 1)
        sampler = self._sampler(seq)
        kind = OUT_LOGITS if sampler is not None else OUT_GREEDY
        eng, B = self.engine, self.engine.max_batch
        feed = toks[valid:]
        draft, qs = [], []
        pos = valid
        for step in range(k):
            for s in range(0, len(feed), B):
                chunk = feed[s:s + B]
                last = s + len(chunk) == len(feed)
                rows = np.array([len(chunk) - 1]) if last else np.zeros(0, np.int64)
                res = eng.run(np.asarray(chunk, np.int64), np.arange(pos, pos + len(chunk)),
                              np.full(len(chunk), slot), rows, np.full(len(rows), kind))
                pos += len(chunk)
            ids, logits = res
            if sampler is None:
                d = int(ids[0])
                qs.append(None)
            else:
                cand, probs = sampler.distribution(logits[0])
                q = np.zeros(self.vocab, np.float64)
                q[cand] = probs
                d = int(cand[sampler.rng.choice(len(probs), p=probs)])
                qs.append(q)
            draft.append(d)
            feed = [d]
        # the draft cache now holds toks[:len(toks)] and draft[:-1]
        self.state[seq.id] = (slot, len(toks), draft[:-1])
        seq.draft = draft
        seq.draft_q = None if sampler is None else qs

    def release(self, seq) -> None:
        super().release(seq)
        self.state.pop(seq.id, None)
        self.samplers.pop(seq.id, None)


__all__ = ["AdaptiveLength", "Drafter", "LookupDrafter", "ModelDrafter", "check_same_vocabulary",
           "tokenizer_digest"]
