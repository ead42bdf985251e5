"""mpillm.serving.sampling: the distributions the samplers draw from, their edge cases, penalties,
log-probabilities, parameter validation and stop strings.

Distribution checks are chi-square goodness-of-fit tests of N draws against the distribution
the parameters define, computed here in float64 from the logits. Each is run with a fixed
seed (so it is deterministic); the threshold p < 1e-4 is the false-alarm rate each check
would have over random seeds, and every check also has a negative control: the same draws
must be rejected against a distribution that differs by what a bug would change.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from mpillm.serving.sampling import Sampler, SamplingParams, StopMatcher, logprobs_of

ALPHA = 1e-4
N = 20000


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """P(chi-square >= observed) for counts against probs (cells with p > 0), with the
    Wilson-Hilferty normal approximation of the chi-square distribution (accurate to ~1e-3 in
    p at these degrees of freedom; we only compare against 1e-4 and ~1)."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, f"drew tokens of probability 0: {np.flatnonzero(counts * ~keep)}"
    exp = probs[keep] * n
    x = float(((counts[keep] - exp) ** 2 / exp).sum())
    k = int(keep.sum()) - 1
    if k == 0:
        return 1.0
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def draw(params: SamplingParams, logits: np.ndarray, n: int = N) -> np.ndarray:
    s = Sampler(params, len(logits))
    counts = np.zeros(len(logits), np.int64)
    for _ in range(n):
        counts[s(logits)] += 1
    return counts


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)


def expected(temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """The distribution the parameters define, written independently of the sampler: temperature,
    then the top-k, then the smallest prefix (by probability) reaching top_p, then min_p."""
    p = softmax(LOGITS.astype(np.float64) / temperature)
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    keep[order[:top_k or len(p)]] = True
    p = np.where(keep, p, 0)
    p /= p.sum()
    csum, kept = 0.0, np.zeros(len(p), bool)
    for i in order:
        if keep[i] and csum < top_p:
            kept[i] = True
            csum += p[i]
    p = np.where(kept, p, 0)
    p /= p.sum()
    p = np.where(p >= min_p * p.max(), p, 0)
    return p / p.sum()


@pytest.mark.parametrize("t,k,tp,mp", [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.5, 3, 1.0, 0.0),
                                       (1.0, 0, 0.8, 0.0), (1.0, 5, 0.9, 0.0), (1.0, 0, 1.0, 0.2)])
def test_draws_follow_the_defined_distribution(t, k, tp, mp):
    params = SamplingParams(temperature=t, top_k=k, top_p=tp, min_p=mp, seed=11)
    counts = draw(params, LOGITS)
    want = expected(t, k, tp, mp)
    p = chi2_pvalue(counts, want)
    assert p > ALPHA, f"draws do not follow the distribution (p = {p:.2e}): {counts} vs {want * N}"
    # negative control: over the same support, a 20% hotter temperature is rejected
    other = expected(t * 1.2, k, tp, mp)
    if (other > 0).sum() == (want > 0).sum() and (want > 0).sum() > 1:
        assert chi2_pvalue(counts, other) < ALPHA


def test_temperature_is_applied():
    """Negative control for the chi-square test: draws at temperature 0.5 reject the temperature-1
    distribution."""
    counts = draw(SamplingParams(temperature=0.5, seed=3), LOGITS)
    assert chi2_pvalue(counts, expected(0.5)) > ALPHA
    assert chi2_pvalue(counts, expected(1.0)) < ALPHA


def test_seeds_repeat_and_differ():
    s1, s2, s3 = (Sampler(SamplingParams(temperature=1.0, seed=s), 8) for s in (5, 5, 6))
    seq1 = [s1(LOGITS) for _ in range(200)]
    assert seq1 == [s2(LOGITS) for _ in range(200)]
    assert seq1 != [s3(LOGITS) for _ in range(200)]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1),
                                    SamplingParams(temperature=1.0, top_p=1e-6),
                                    SamplingParams(temperature=1.0, min_p=1.0)])
def test_degenerate_settings_are_greedy(params):
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    s = Sampler(params, len(logits))
    assert all(s(logits) == int(np.argmax(logits)) for _ in range(50))


def test_penalties():
    logits = np.array([3.0, 2.9, 1.0, -1.0], np.float32)
    # repetition: a seen positive logit is divided (3.0 -> 1.5 < 2.9), a seen negative one multiplied
    s = Sampler(SamplingParams(repetition_penalty=2.0), 4, context=[0, 3])
    assert s(logits) == 1
    s.work[:] = logits
    s._penalize(s.work)
    np.testing.assert_allclose(s.work, [1.5, 2.9, 1.0, -2.0])
    # presence / frequency count the output only: token 1 produced twice
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 4, context=[0])
    s.observe(1)
    s.observe(1)
    s.work[:] = logits
    s._penalize(s.work)
    np.testing.assert_allclose(s.work, [3.0, 2.9 - 0.5 - 0.5, 1.0, -1.0])
    assert SamplingParams(repetition_penalty=1.1).needs_logits and not SamplingParams().needs_logits


def test_logprobs_of():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    lp, top = logprobs_of(logits, 2, 3)
    ref = np.log(softmax(logits.astype(np.float64)))
    assert lp == pytest.approx(ref[2], abs=1e-12)
    assert [i for i, _ in top] == [1, 2, 0]
    np.testing.assert_allclose([v for _, v in top], ref[[1, 2, 0]], atol=1e-12)
    assert logprobs_of(logits, 0, 0)[1] == []


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("max_tokens", -5), ("temperature", -0.1),
                                         ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
                                         ("top_k", -1), ("min_p", 2.0), ("seed", -1), ("repetition_penalty", 0.0),
                                         ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
                                         ("top_logprobs", 21), ("stop", ("",)), ("max_tokens", True),
                                         ("temperature", "hot")])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**{field: value}).validate()


def test_top_logprobs_needs_logprobs():
    with pytest.raises(ValueError, match="^top_logprobs: needs logprobs"):
        SamplingParams(top_logprobs=2).validate()
    SamplingParams(logprobs=True, top_logprobs=2).validate()


def test_stop_matcher_holds_back_and_cuts():
    m = StopMatcher(["###", "END"])
    assert m.put("Hello #") == ("Hello ", False)       # "#" may start "###": held
    assert m.put("# world") == ("## world", False)      # "## " cannot: given out
    assert m.put(" E") == (" ", False)
    assert m.put("N") == ("", False)
    assert m.put("D and more") == ("", True)            # stop string and what follows are dropped
    m = StopMatcher(["stop"])
    assert m.put("no st") == ("no ", False)
    assert m.flush() == "st"                            # the sequence ended another way: held text comes out
    assert StopMatcher([]).put("anything") == ("anything", False)
    m = StopMatcher(["ab", "b c"])
    assert m.put("xa") == ("x", False)
    assert m.put("b c") == ("", True)                   # "ab" starts first: nothing before it
