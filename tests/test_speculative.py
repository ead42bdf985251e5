"""Speculative decoding's pieces without MPI: the acceptance rule keeps the target's distribution
(chi-square goodness of fit on synthetic distributions, with a negative control), prompt lookup,
the adaptive draft length, and the vocabulary check for draft models.

False-alarm rate: each chi-square test below rejects at significance 0.001 (critical values of the
chi-square distribution for its degrees of freedom, from the standard table); the seeds are fixed,
so a run is deterministic and the 0.001 is the chance that a seed picked at random would fail a
correct implementation.
"""
from __future__ import annotations

import numpy as np
import pytest

from mpillm.serving.sampling import accept_sampled
from mpillm.serving.speculative import AdaptiveLength, LookupDrafter, check_same_vocabulary

CHI2_999 = {3: 16.266, 4: 18.467, 5: 20.515, 7: 24.322}   # 0.999 quantiles, by degrees of freedom


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
