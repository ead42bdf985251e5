"""Token sampling on rank 0: greedy, temperature, top-k, top-p (nucleus), seeded."""
from __future__ import annotations

import numpy as np


class Sampler:
    def __init__(self, vocab_size: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None):
        if temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {top_k}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)
        self.probs = np.empty(vocab_size, np.float64)

    def __call__(self, logits: np.ndarray) -> int:
        """logits (vocab,) -> a token id."""
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        p = self.probs
        np.divide(logits, self.temperature, out=p)
        cand = None
        if self.top_k and self.top_k < len(p):
            cand = np.argpartition(-p, self.top_k - 1)[: self.top_k]
        vals = p if cand is None else p[cand]
        vals = np.exp(vals - vals.max())
        vals /= vals.sum()
        if self.top_p < 1.0:
            order = np.argsort(-vals)
            csum = np.cumsum(vals[order])
            keep = order[: int(np.searchsorted(csum, self.top_p)) + 1]
            ids = keep if cand is None else cand[keep]
            vals = vals[keep] / vals[keep].sum()
        else:
            ids = np.arange(len(vals)) if cand is None else cand
        return int(ids[self.rng.choice(len(vals), p=vals)])
