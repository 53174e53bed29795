"""Parity flags for Chen et al. 2024 R*, tested against a port of the official
``RLHFMinimizerClient.compute_ranks`` (angie-chen55/pref-learning-ranking-acc) written from
reading it: perplexities in, per-β accuracy out, numpy float64 as the original."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from preflens.errors import ConfigError, DataError
from preflens.probes import ranking as rk
from preflens.probes.official import (RankingCompat, idealized_accuracy_pairs,
                                      idealized_correct_pairs)


def _official_compute_ranks(a1, a2, ppl_1, ppl_2, n1, n2, beta, normalized, eps=1e-3):
    """Port. Returns (accuracy over kept rows, per-row correct, kept mask)."""
    def label(r):
        if np.abs(r - 1.0) < 0.05:
            return (1, 1)
        return (1, 2) if r >= 1.05 else (2, 1)
    expected, posterior = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x1, x2, p1, p2, k1, k2 in zip(a1, a2, ppl_1, ppl_2, n1, n2):
            x1, x2 = np.float64(x1), np.float64(x2)
            expected.append(x1 / x2 if x2 > 0.0 else x1 / eps)
            pr = (x1 / x2) if x2 > 0.0 else x1 / eps
            pr = pr ** (1 / beta)
            if normalized:
                lik = np.float64(p2) / np.float64(p1)
            else:
                lik = (-k1 * np.log(np.float64(p1))) / (-k2 * np.log(np.float64(p2)))
            posterior.append(pr * lik)
    posterior = np.array(posterior)
    kept = ~np.isnan(posterior) & ~np.isinf(posterior)
    correct = np.array([label(e) == label(p) for e, p in zip(expected, posterior)])
    return float(np.mean(correct[kept])), correct, kept


def _shared(seed, n=400):
    g = np.random.default_rng(seed)
    a1 = g.choice([0.0, 0.25, 1 / 3, 2 / 3, 0.75, 1.0], size=n)
    a2 = 1.0 - a1
    n1, n2 = g.integers(1, 60, n).astype(float), g.integers(1, 60, n).astype(float)
    mean1, mean2 = -g.uniform(0.02, 6, n), -g.uniform(0.02, 6, n)
    mean2[:12] = -g.uniform(20, 30, 12)   # extreme rows: likelihood ratio > 1.8e8, so
    a1[:12], a2[:12] = 1.0, 0.0           # (1/eps)^(1/0.01) x ratio overflows at beta = 0.01
    ppl1, ppl2 = np.exp(-mean1), np.exp(-mean2)
    # what the official code sums to: -n log ppl (the same float ops); ppl2/ppl1 vs exp(m1 - m2)
    return dict(a1=a1, a2=a2, n1=n1, n2=n2, ppl1=ppl1, ppl2=ppl2,
                mean1=-np.log(ppl1), mean2=-np.log(ppl2),
                sum1=-n1 * np.log(ppl1), sum2=-n2 * np.log(ppl2))


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_official_flags_match_port(normalized, seed):
    d = _shared(seed)
    s1, s2 = (d["mean1"], d["mean2"]) if normalized else (d["sum1"], d["sum2"])
    compat = RankingCompat.official(length_normalized=normalized)
    for beta in (0.01, 0.1, 1.0, 5.0, 10.0):
        acc, correct, kept = _official_compute_ranks(d["a1"], d["a2"], d["ppl1"], d["ppl2"],
                                                     d["n1"], d["n2"], beta, normalized)
        res = idealized_correct_pairs(s1, s2, d["a1"], beta, share_2=d["a2"], compat=compat)
        assert res.kept.numpy().tolist() == kept.tolist()
        assert res.correct.numpy()[kept].tolist() == correct[kept].tolist()
        got = idealized_accuracy_pairs(s1, s2, d["a1"], (beta,), share_2=d["a2"], compat=compat)
        assert got["per_beta"][beta] == pytest.approx(acc, abs=1e-15)
        assert got["n_dropped"][beta] == int((~kept).sum())


def test_drop_and_zero_share_cases_are_exercised():
    d = _shared(0)
    res = idealized_correct_pairs(d["mean1"], d["mean2"], d["a1"], 0.01, share_2=d["a2"],
                                  compat=RankingCompat.official(length_normalized=True))
    assert (~res.kept).sum() > 0                        # (1/eps)^100 x ratio overflowed
    zero = torch.as_tensor(d["a1"] == 0.0)
    assert zero.sum() > 0 and res.correct[zero].all()   # a1 = 0: always "correct"


def test_paper_mode_equals_idealized_ranking_correct():
    d = _shared(3)
    inside = (d["a1"] > 0) & (d["a1"] < 1)
    for beta in (0.1, 1.0, 10.0):
        a = idealized_correct_pairs(d["sum1"][inside], d["sum2"][inside], d["a1"][inside], beta)
        b = rk.idealized_ranking_correct(d["sum1"][inside] - d["sum2"][inside], d["a1"][inside], beta)
        assert torch.equal(a.correct, b) and a.kept.all()


def test_each_flag_alone_changes_what_it_says():
    beta = 1.0
    # tie band: posterior ratio 1.03 (log 0.0296) on a decided 3:1 vote -> paper correct, band wrong
    s1, s2 = [0.0296 - np.log(3.0)], [0.0]
    assert idealized_correct_pairs(s1, s2, [0.75], beta).correct.item()
    assert not idealized_correct_pairs(s1, s2, [0.75], beta, compat=RankingCompat(tie_band=0.05)).correct.item()
    # a1 = 0 asymmetry: reference strongly prefers response 1, all raters response 2
    s1, s2 = [-1.0], [-30.0]
    assert not idealized_correct_pairs(s1, s2, [0.0], beta).correct.item()
    assert idealized_correct_pairs(s1, s2, [0.0], beta, compat=RankingCompat(zero_share_correct=True)).correct.item()
    # the mirror case a2 = 0 is NOT special-cased by the official code
    assert not idealized_correct_pairs(s2, s1, [1.0], beta, compat=RankingCompat(zero_share_correct=True)).correct.item()
    # drop: (1/eps)^(1/0.01) * exp(20) = 1e300 * 4.9e8 overflows
    r = idealized_correct_pairs([-1.0], [-21.0], [1.0], 0.01, compat=RankingCompat(drop_nonfinite=True))
    assert not r.kept.item()
    # log-likelihood ratio bug: s1 = -10 > s2 = -20 (1 is likelier) but s1/s2 = 0.5 < 1 reads as 2 likelier
    s1, s2 = [-10.0], [-20.0]
    assert idealized_correct_pairs(s1, s2, [2 / 3], 100.0).correct.item()
    assert not idealized_correct_pairs(s1, s2, [2 / 3], 100.0, compat=RankingCompat(loglik_ratio_bug=True)).correct.item()


def test_errors():
    with pytest.raises(ConfigError):
        RankingCompat(tie_band=1.5)
    with pytest.raises(DataError):
        idealized_correct_pairs([0.0], [0.0, 1.0], [0.5], 1.0)
    with pytest.raises(DataError):
        idealized_correct_pairs([0.0], [1.0], [1.2], 1.0)
    with pytest.raises(ConfigError):
        idealized_correct_pairs([0.0], [1.0], [0.75], 0.0)
    assert "kept=1" in repr(idealized_correct_pairs([0.0], [1.0], [0.75], 1.0))
