"""Parity functions for Yu et al. 2023 (preflens.attribution.official), each tested against a
port of the official code (yuqinan/CounterfactsRecall) written from reading it."""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import pytest
import torch

import preflens
from preflens.attribution.official import (head_attribution_batches, memorized_capital_substring,
                                           official_sweep, sweep_rates, sweep_score, tuning_sets)
from preflens.attribution.recall import generate_continuations
from preflens.data.capitals import classify_continuation
from preflens.data.recall_prompts import counterfactual_prompts
from preflens.errors import ConfigError, DataError


# --------------------------------------------------------------------------- batch-summed DLA
def _official_batches(scaled, directions, batch_size):
    """generate_heads.get_heads_id: each prompt alone ([C, 1, d]) einsum'd with the batch's [B, d]
    directions ("... batch d_model, batch d_model -> ..."), then the mean over the batch's prompts."""
    out = []
    for s in range(0, scaled.shape[0], batch_size):
        dirs = directions[s:s + batch_size]
        per_prompt = [torch.einsum("...bd,bd->...", scaled[i][:, None, :], dirs)
                      for i in range(s, min(s + batch_size, scaled.shape[0]))]
        out.append(torch.stack(per_prompt).mean(0))
    return torch.stack(out)


def test_batch_summed_direction_matches_official_port():
    g = torch.Generator().manual_seed(0)
    scaled = torch.randn(45, 12, 8, generator=g, dtype=torch.float64)  # 45 prompts, 12 heads
    dirs = torch.randn(45, 8, generator=g, dtype=torch.float64)
    got = head_attribution_batches(scaled, dirs, batch_size=20, batch_sum_direction=True)
    torch.testing.assert_close(got, _official_batches(scaled, dirs, 20), rtol=1e-12, atol=1e-12)
    paper = head_attribution_batches(scaled, dirs, batch_size=20)
    want = torch.stack([(scaled[s:s + 20] * dirs[s:s + 20, None, :]).sum(-1).mean(0) for s in (0, 20, 40)])
    torch.testing.assert_close(paper, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(paper, got)
    # batch size 1: both coincide
    torch.testing.assert_close(head_attribution_batches(scaled, dirs, batch_size=1, batch_sum_direction=True),
                               head_attribution_batches(scaled, dirs, batch_size=1))
    with pytest.raises(DataError):
        head_attribution_batches(scaled, dirs[:3])
    with pytest.raises(ConfigError):
        head_attribution_batches(scaled, dirs, batch_size=0)


# --------------------------------------------------------------------------- substring lookup
def _rows():
    path = Path(preflens.__file__).parent / "data" / "capitals.csv"
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    return [(r["country"], r["capital"]) for r in csv.DictReader(lines)]


def _official_lookup(country, rows):
    original = None
    for c, cap in rows:  # build_open_prompt's loop, verbatim semantics
        if country in c:
            original = cap
        if country == "Cocos Islands":
            original = "West Island"
    return original


def test_substring_lookup_matches_port_on_shipped_capitals():
    rows = _rows()
    for country, _ in rows:
        assert memorized_capital_substring(country, rows) == _official_lookup(country, rows)
    assert memorized_capital_substring("Niger", rows) == "Abuja"        # Nigeria comes later
    assert memorized_capital_substring("Guinea", rows) == "Port Moresby"
    assert memorized_capital_substring("Cocos Islands", rows + [("Cocos Islands", "x")]) == "West Island"
    with pytest.raises(DataError):
        memorized_capital_substring("Atlantis", rows)


# --------------------------------------------------------------------------- tuning sets
def _official_tuning(all_rank, key, seed):
    rng = random.Random(seed)  # the official used the unseeded global random module
    out = {}
    for k, v in all_rank.items():
        end = len(v) if len(v) < 20 else 20
        sampled = []
        while len(sampled) < end:
            pick = v[rng.choice(range(len(v)))]
            if pick[key] == 1:
                sampled.append(pick)
        out[k] = sampled
    return out


def test_tuning_sets_match_official_port():
    g = random.Random(5)
    recs = {str(d): [{"id": f"{d}-{i}", "correct": int(g.random() < 0.4), "gt_correct": int(g.random() < 0.5)}
                     for i in range(g.choice([7, 25, 60]))] for d in range(10)}
    for key in ("correct", "gt_correct"):
        got = tuning_sets(recs, key, seed=11)
        assert got == _official_tuning(recs, key, 11)
        assert all(len(v) == min(len(recs[k]), 20) for k, v in got.items())
        assert all(r[key] == 1 for v in got.values() for r in v)
    pool = {"0": [{"id": i, "correct": 1} for i in range(30)]}
    with_repl = tuning_sets(pool, "correct", seed=0)["0"]
    distinct = tuning_sets(pool, "correct", seed=0, replace=False)["0"]
    assert len(with_repl) == len(distinct) == 20
    assert len({r["id"] for r in distinct}) == 20 > len({r["id"] for r in with_repl})  # official repeats
    with pytest.raises(DataError):
        tuning_sets({"0": [{"correct": 0}]}, "correct")
    with pytest.raises(DataError):
        tuning_sets({"0": [{"correct": 0}, {"correct": 1}]}, "correct", replace=False)


# --------------------------------------------------------------------------- sweep scorer
def _official_intervention_scores(decoded, ct_answers, gt_answers):
    """scale_graph.intervention's scoring of each decoded text (prompt + generation): slice from
    the first "A:", cut at "Q:", re.findall of each (unescaped) target; then run_all's /20."""
    ct, gt = [], []
    for idx, a in enumerate(decoded):
        answer = a[a.index("A:"):]
        if "Q:" in answer:
            answer = answer[:answer.index("Q:")]
        ct.append(1 if len(re.findall(ct_answers[idx], answer)) > 0 else 0)
        gt.append(1 if len(re.findall(gt_answers[idx], answer)) > 0 else 0)
    return ct, gt, sum(ct) / 20, sum(gt) / 20


PROMPT = "The capital of {c} is {ic}.\nQ: What is the capital of {c}?\nA:"
SWEEP_CASES = [  # (generated continuation, query country, in-context city, memorized capital)
    (" Warsaw. Warsaw.", "Poland", "London", "Warsaw"),
    (" London.", "Poland", "London", "Warsaw"),
    (" London or Warsaw.", "Poland", "London", "Warsaw"),          # both: (1, 1)
    (" The capital of Poland is", "Poland", "London", "Warsaw"),   # neither
    (" Paris.\nQ: What is Warsaw?\nA: Warsaw", "France", "Warsaw", "Paris"),  # cut at Q:
    (" StX John's.", "Antigua", "St. John's", "Rome"),            # "." matches any character
    (" Tokyo", "Japan", "Tokyo", "Kyoto"),
    ("", "Japan", "Tokyo", "Kyoto"),                               # the prompt names Tokyo before "A:" only
    (" Londonderry", "Poland", "London", "Warsaw"),                # plain substring, as the paper's rule
]


def _sweep_inputs():
    texts = [PROMPT.format(c=c, ic=ic) + gen for gen, c, ic, _ in SWEEP_CASES]
    return texts, [" " + ic for _, _, ic, _ in SWEEP_CASES], [" " + m for *_, m in SWEEP_CASES]


def test_sweep_scorer_matches_official_port():
    texts, ics, mems = _sweep_inputs()
    ct, gt, ct_rate, gt_rate = _official_intervention_scores(texts, ics, mems)
    assert [sweep_score(t, i, m) for t, i, m in zip(texts, ics, mems)] == list(zip(ct, gt))
    r = sweep_rates(texts, ics, mems)
    assert (r["n"], r["in_context"], r["memorized"]) == (len(texts), ct_rate, gt_rate)
    assert r["both"] == sum(a and b for a, b in zip(ct, gt)) / 20
    assert sweep_rates(texts, ics, mems, denominator=None)["in_context"] == sum(ct) / len(texts)
    # where it departs from the paper's rule on the continuation alone
    assert sweep_score(texts[2], ics[2], mems[2]) == (1, 1)
    assert classify_continuation(SWEEP_CASES[2][0], (mems[2],), ics[2]) == "memorized"
    assert sweep_score(texts[5], ics[5], mems[5]) == (1, 0)
    assert classify_continuation(SWEEP_CASES[5][0], (mems[5],), ics[5]) == "neither"
    assert sweep_score(texts[4], ics[4], mems[4]) == (0, 1)


def test_sweep_scorer_errors():
    with pytest.raises(DataError, match="A:"):
        sweep_score("no answer marker", " London", " Warsaw")
    with pytest.raises(DataError, match="regular expression"):
        sweep_score("Q: x\nA: Kuala (Lumpur", " Kuala (Lumpur", " Warsaw")
    with pytest.raises(DataError):
        sweep_rates(["A: x"], [" x"], [])
    with pytest.raises(ConfigError):
        sweep_rates(["A: x"], [" x"], [" y"], denominator=0)


def test_official_sweep_scores_the_hooked_generation(tiny):
    ps = counterfactual_prompts(["Poland", "Japan", "Chad"], pairs=1, seed=0)
    bridge = tiny.bridge(compat=True)
    rows = official_sweep(tiny, ps, (0, 1), [1.0, -2.0], bridge=bridge, max_new_tokens=4, denominator=None)
    conts = generate_continuations(bridge, ps, max_new_tokens=4)
    want = sweep_rates([p.text + c.text for p, c in zip(ps, conts)], [p.ic_target for p in ps],
                       [" " + p.memorized[-1] for p in ps], denominator=None)
    assert rows[0] == {"alpha": 1.0, **want}
    assert [r["alpha"] for r in rows] == [1.0, -2.0] and rows[1]["n"] == 3
    with pytest.raises(DataError):
        official_sweep(tiny, ps, (0, 1), [1.0], bridge=bridge, memorized_targets=[" x"])
