"""Speculative decoding's pieces without MPI: the acceptance rule keeps the target's distribution
(chi-square goodness of fit on synthetic distributions, with a negative control), prompt lookup,
the adaptive draft length, and the vocabulary check for draft models.

False-alarm rate: each chi-square test below rejects at significance 0.001 (critical values of the
chi-square distribution for its degrees of freedom, from the standard table); the seeds are fixed,
so a run is deterministic and the 0.001 is the chance that a seed picked at random would fail a
correct implementation.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mpillm.serving import sampling
from mpillm.serving.sampling import Sampler, SamplingParams, accept_sampled, decide
from mpillm.serving.speculative import AdaptiveLength, LookupDrafter, check_same_vocabulary

CHI2_999 = {3: 16.266, 4: 18.467, 5: 20.515, 7: 24.322}   # 0.999 quantiles, by degrees of freedom
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def chi2_stat(counts: np.ndarray, probs: np.ndarray) -> float:
    exp = probs * counts.sum()
    return float(((counts - exp) ** 2 / exp).sum())


def spec_samples(p: np.ndarray, q: np.ndarray | None, n: int, seed: int, rule=accept_sampled) -> np.ndarray:
    """n outputs of one speculative position: draft d ~ q (or d = argmax q for a deterministic
    drafter, q None meaning one-hot at the fixed token 0), then the acceptance rule."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, np.int64)
    for i in range(n):
        d = 0 if q is None else int(rng.choice(len(q), p=q))
        out[i], _ = rule(p, d, q, rng)
    return out


P = np.array([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
Q_CASES = {
    "draft model close": np.array([0.10, 0.25, 0.10, 0.30, 0.15, 0.10]),
    "draft model far": np.array([0.60, 0.02, 0.30, 0.02, 0.03, 0.03]),
    "draft model missing tokens": np.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0]),
    "deterministic draft (lookup)": None,
}


@pytest.mark.parametrize("name", list(Q_CASES))
def test_acceptance_rule_keeps_target_distribution(name):
    counts = np.bincount(spec_samples(P, Q_CASES[name], 20000, seed=7), minlength=len(P))
    stat = chi2_stat(counts, P)
    assert stat < CHI2_999[len(P) - 1], f"{name}: chi2 {stat:.1f} (counts {counts.tolist()})"


def test_acceptance_test_has_power():
    """Negative controls: accepting every draft gives q, not p, and the same test rejects it;
    so does a rule that resamples from p itself on rejection (the classic mistake)."""
    q = Q_CASES["draft model far"]

    def always(p, d, q_, rng):
        return d, True

    def resample_from_p(p, d, q_, rng):
        t, ok = accept_sampled(p, d, q_, rng)
        return (t, ok) if ok else (int(rng.choice(len(p), p=p)), False)

    for rule in (always, resample_from_p):
        counts = np.bincount(spec_samples(P, q, 20000, seed=7, rule=rule), minlength=len(P))
        assert chi2_stat(counts, P) > CHI2_999[len(P) - 1], rule.__name__


# ---- the fixture's own distributions through decide(), sized for power against the classic bug -----
# tests/mpi/test_spec_mpi.py samples the llama fixture (target) with the qwen3 fixture as draft model at
# temperature 1, top-k 8. Its two-sample test of 300 + 300 draws catches the classic mistake (on a
# rejection, draw from p instead of normalize(max(0, p - q))) only about 40% of the time. Here the same
# fixtures' logits (tests/fixtures/*/expected.npz, the same prompt) go through the serving path's own
# code (Sampler.distribution and decide) and the output is checked against the exact target
# distribution, with a sample size computed from the buggy rule's exact output distribution.
# Positions 5 and 10 are where the two fixtures' top-8 sets overlap (elsewhere they do not, the
# draft is always rejected, and the buggy rule is the right one).
SPEC_POSITIONS = (5, 10)
POWER = 0.999     # against the classic bug, at significance 0.001


def resample_from_p(p, d, q, rng):
    """The classic mistake: the acceptance test as it should be, then on a rejection a fresh draw
    from p itself instead of from the positive residual."""
    qd = 1.0 if q is None else float(q[d])
    if qd > 0.0 and rng.random() * qd < float(p[d]):
        return d, True
    return int(rng.choice(len(p), p=p / p.sum())), False


def fixture_logits(pos: int) -> tuple[np.ndarray, np.ndarray]:
    """(target, draft): the llama and qwen3 fixtures' logits at one position of their shared prompt."""
    a, b = (np.load(FIXTURES / name / "expected.npz") for name in ("llama", "qwen3"))
    assert (a["tokens"] == b["tokens"]).all()
    return a["logits"][pos].astype(np.float64), b["logits"][pos].astype(np.float64)


def dense(sampler: Sampler, logits: np.ndarray) -> np.ndarray:
    ids, probs = sampler.distribution(logits)
    out = np.zeros(len(logits))
    out[ids] = probs
    return out


def buggy_output(p: np.ndarray, q: np.ndarray | None, d_fixed: int | None = None) -> np.ndarray:
    """The exact output distribution of resample_from_p: min(p, q) accepted, the rest drawn from p."""
    if q is None:
        q = np.zeros_like(p)
        q[d_fixed] = 1.0
    keep = np.minimum(p, q)
    return keep + (1.0 - keep.sum()) * p


def noncentrality_for_power(df: int, crit: float, power: float) -> float:
    """The smallest noncentrality at which a chi-square test with df degrees of freedom and critical
    value crit rejects with probability >= power (bisection on noncentral chi-square draws)."""
    draws = np.random.default_rng(0).standard_normal((200_000, df))
    lo, hi = 0.0, 500.0
    for _ in range(40):
        mid = (lo + hi) / 2
        shift = math.sqrt(mid)                      # all the noncentrality on one coordinate
        stat = ((draws[:, :1] + shift) ** 2).sum(1) + (draws[:, 1:] ** 2).sum(1)
        lo, hi = (lo, mid) if (stat > crit).mean() >= power else (mid, hi)
    return hi


def decide_counts(pos: int, mode: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """n draws of one speculative position through decide(): (counts over the vocabulary, the
    target's exact distribution p, the draft's q or None for a fixed draft at p's mode)."""
    lt, ld = fixture_logits(pos)
    vocab = len(lt)
    target = Sampler(SamplingParams(temperature=1.0, top_k=8, seed=seed), vocab)
    draft = Sampler(SamplingParams(temperature=1.0, top_k=8, seed=seed + 1), vocab)
    p = dense(target, lt)
    q = dense(draft, ld) if mode == "draft model" else None
    counts = np.zeros(vocab, np.int64)
    for _ in range(n):
        d = int(draft.rng.choice(vocab, p=q)) if q is not None else int(np.argmax(p))
        t, _ = decide(target, -1, lt, d, q, vocab)
        counts[t] += 1
    return counts, p, q


def verdict(counts: np.ndarray, p: np.ndarray) -> tuple[bool, str]:
    """(passes, why): nothing outside the target's support, and chi-square against p within the
    0.999 quantile for its degrees of freedom."""
    sup = p > 0
    stat = chi2_stat(counts[sup], p[sup])
    df = int(sup.sum()) - 1
    outside = int(counts[~sup].sum())
    return outside == 0 and stat < CHI2_999[df], f"chi2 {stat:.1f} (df {df}, limit {CHI2_999[df]}), {outside} outside"


def spec_sample_size(pos: int, mode: str) -> int:
    """Draws needed for POWER against the classic bug: the noncentrality of its exact output
    distribution is n * sum((bug - p)^2 / p)."""
    lt, ld = fixture_logits(pos)
    s = Sampler(SamplingParams(temperature=1.0, top_k=8), len(lt))
    p = dense(s, lt)
    bug = buggy_output(p, dense(s, ld), None) if mode == "draft model" else buggy_output(p, None, int(np.argmax(p)))
    sup = p > 0
    per_draw = float(((bug[sup] - p[sup]) ** 2 / p[sup]).sum())
    assert per_draw > 0.05, f"position {pos}: the bug barely moves the output ({per_draw:.3g} per draw)"
    df = int(sup.sum()) - 1
    return math.ceil(noncentrality_for_power(df, CHI2_999[df], POWER) / per_draw)


SPEC_CASES = [(pos, "draft model") for pos in SPEC_POSITIONS] + [(7, "fixed draft")]


@pytest.mark.parametrize("pos,mode", SPEC_CASES)
def test_decide_keeps_the_fixture_target_distribution(pos, mode):
    n = spec_sample_size(pos, mode)
    assert n < 2000, n      # a few hundred draws give the power; keep the suite fast
    counts, p, q = decide_counts(pos, mode, n, seed=pos)
    ok, why = verdict(counts, p)
    assert ok, f"position {pos} {mode}, {n} draws: {why}"


@pytest.mark.parametrize("pos,mode", SPEC_CASES)
def test_decide_check_rejects_resampling_from_p(pos, mode, monkeypatch):
    """Negative control: the same check, the same draws, with the classic bug as the acceptance rule."""
    n = spec_sample_size(pos, mode)
    monkeypatch.setattr(sampling, "accept_sampled", resample_from_p)
    counts, p, _ = decide_counts(pos, mode, n, seed=pos)
    ok, why = verdict(counts, p)
    assert not ok, f"position {pos} {mode}: the buggy rule passed with {n} draws ({why})"


def test_acceptance_rate_is_the_overlap():
    """With d ~ q the acceptance probability is sum(min(p, q)) (what makes a good draft model)."""
    q = Q_CASES["draft model close"]
    rng = np.random.default_rng(3)
    acc = sum(accept_sampled(P, int(rng.choice(6, p=q)), q, rng)[1] for _ in range(20000)) / 20000
    assert abs(acc - np.minimum(P, q).sum()) < 0.02


def test_lookup_finds_latest_longest_match():
    d = LookupDrafter(ngram_max=3, ngram_min=1, k_max=8)
    t = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3])
    # suffix 1 2 3 occurs at 1 and 6; the latest (6) is followed by 7 8 4 1 2 3
    assert d.lookup(t, 4) == [7, 8, 4, 1]
    assert d.lookup(t, 20) == [7, 8, 4, 1, 2, 3]
    # only the 1-gram 9 matches (at 0 and 1; the latest is followed by 1 2 9)
    assert d.lookup(np.array([9, 9, 1, 2, 9]), 3) == [1, 2, 9]
    assert d.lookup(np.array([1, 2, 3, 4]), 3) == []              # nothing repeats
    assert d.lookup(np.array([4]), 3) == []
    assert LookupDrafter(ngram_max=3, ngram_min=2).lookup(np.array([9, 9, 1, 2, 9]), 3) == []


def test_adaptive_length_grows_shrinks_and_pauses():
    a = AdaptiveLength(k_max=8)
    assert a.next() == 2
    a.update(2, 2)
    assert a.next() == 4
    a.update(4, 4)
    assert a.next() == 8
    a.update(8, 8)
    assert a.next() == 8                       # capped
    a.update(8, 3)
    assert a.next() == 4                       # what was accepted + 1
    a.update(4, 0)
    assert a.next() == 2
    a.update(2, 0)
    assert a.next() == 1
    a.update(1, 0)                             # down to 0: pause 1 step, then probe with 1
    assert [a.next() for _ in range(2)] == [0, 1]
    a.update(1, 0)                             # the probe fails: pause 2 steps
    assert [a.next() for _ in range(3)] == [0, 0, 1]
    a.update(1, 1)
    assert a.next() == 2 and a.backoff == 1


class FakeTok:
    def __init__(self, tokens, eos=(0,)):
        self.tokens, self.eos_ids, self.bos_id = list(tokens), frozenset(eos), None

    @property
    def vocab_size(self):
        return len(self.tokens)

    def id_to_token(self, i):
        return self.tokens[i]


class Cfg:
    def __init__(self, v):
        self.vocab_size = v


def test_draft_vocabulary_must_match():
    a = FakeTok(["<s>", "a", "b", "c"])
    check_same_vocabulary(Cfg(4), a, Cfg(4), FakeTok(["<s>", "a", "b", "c"]), "d")
    with pytest.raises(ValueError, match=r"vocabulary has 5 tokens, the target's 4"):
        check_same_vocabulary(Cfg(4), a, Cfg(5), a, "d")
    with pytest.raises(ValueError, match=r"tokenizer differs .*token id 2: 'x' vs 'b'"):
        check_same_vocabulary(Cfg(4), a, Cfg(4), FakeTok(["<s>", "a", "x", "c"]), "d")
    with pytest.raises(ValueError, match=r"tokenizer differs .*special tokens"):
        check_same_vocabulary(Cfg(4), a, Cfg(4), FakeTok(["<s>", "a", "b", "c"], eos=(3,)), "d")


def test_cli_refuses_draft_model_with_other_vocabulary(tmp_path):
    """At start-up, through generate under mpirun: one clear line from rank 0, every rank exits 1."""
    from test_errors import assert_failed, run_probed

    from mpiutil import ROOT

    r, dt = run_probed(2, ["-m", "mpillm.generate", "--quiet", "--max-tokens", "4", "--draft-model",
                           str(ROOT / "tests" / "fixtures" / "llama" / "model.gguf")], tmp_path)
    assert_failed(r, "--draft-model ", prog="mpillm.generate")
    assert "its vocabulary has 512 tokens, the target's 49152" in r.stderr, r.stderr[-2000:]
    assert dt < 120


def test_bench_reports_speculative_decoding(tmp_path):
    """mpillm.bench --draft lookup times plain and lookup decoding of the same prompt and reports the
    drafted / accepted counts; the speculative tokens equal plain decoding's."""
    import json
    import sys

    from mpiutil import ROOT, mpi_env, mpirun_cmd, run_killing_on_timeout

    out = tmp_path / "bench.json"
    cmd = mpirun_cmd(2) + [sys.executable, "-m", "mpillm.bench", "--prompt-tokens", "8", "--gen-tokens", "24",
                           "--repeats", "1", "--draft", "lookup", "--spec-prompt", "grounded", "--json", str(out)]
    r = run_killing_on_timeout(cmd, mpi_env(), 300, "mpirun -np 2 mpillm.bench --draft lookup")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    spec = json.loads(out.read_text())["speculative"]
    assert spec["draft"] == "lookup" and spec["prompt"] == "grounded" and spec["prompt_tokens"] > 500, spec
    assert spec["identical_to_plain"], spec
    assert 0 < spec["accepted"] <= spec["drafted"], spec   # the answer repeats its prompt: drafts get accepted
    assert spec["median_tokens_per_step"] > 1 and spec["median_plain_tok_s"] > 0 and spec["median_spec_tok_s"] > 0
