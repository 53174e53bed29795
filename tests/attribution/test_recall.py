"""Tests of preflens.attribution.recall (factual_recall.md §2-4)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from preflens.attribution.recall import (
    answer_logit_diff,
    classify_continuations,
    first_token_ids,
    generate_continuations,
    per_prompt_frequency,
    rates_by_frequency,
)
from preflens.data.capitals import (
    CAPITALS_CSV,
    CapitalRow,
    CapitalsWorld,
    classify_continuation,
)
from preflens.data.recall_prompts import CounterfactualPrompt, closed_book_prompts, counterfactual_prompts
from preflens.errors import ConfigError, DataError, ScoringError
from preflens.models import load_model

TOYWORLD_DIR = __import__("preflens.toyworld", fromlist=["ASSETS_DIR"]).ASSETS_DIR


# --------------------------------------------------------------------------- helpers

def require_toyworld() -> None:
    """The toyworld checkpoint ships with the package: its absence is a failure, not a skip."""
    for f in ("config.json", "world.json", "frequencies.json"):
        assert (TOYWORLD_DIR / f).is_file(), f"the shipped toyworld checkpoint lacks {TOYWORLD_DIR / f}"


def toyworld_capitals():
    from preflens.data.toyworld.world import load_world

    spec = load_world(TOYWORLD_DIR / "world.json")
    return spec, CapitalsWorld(tuple(CapitalRow(c, k) for c, k in zip(spec.countries, spec.capitals)), {})


@pytest.fixture(scope="module")
def untied_lm():
    """tiny-random with an independent random unembedding: greedy outputs vary with the context
    (the tied random model just repeats its last token), so generation equalities can fail."""
    lm = load_model("tiny-random", device="cpu")
    g = torch.Generator().manual_seed(7)
    lm.model.lm_head.weight = torch.nn.Parameter(torch.randn(lm.model.lm_head.weight.shape, generator=g))
    lm.model.config.tie_word_embeddings = False
    return lm


@pytest.fixture(scope="module")
def untied_bridge(untied_lm):
    return untied_lm.bridge(compat=True)


def small_world():
    rows = (CapitalRow("A", "Aa"), CapitalRow("B", "Bb"), CapitalRow("B", "Bc"),
            CapitalRow("C", "Nic"), CapitalRow("D", "Nic"))
    return CapitalsWorld(rows, {"AX": "A"})


# --------------------------------------------------------------------------- prompts
def test_template_whitespace_and_targets():
    (p,) = [q for q in counterfactual_prompts(["Poland"]) if q.in_context == "London"]
    assert p.text == "The capital of Poland is London.\nQ: What is the capital of Poland?\nA:"
    assert p.memorized == ("Warsaw",) and p.mem_targets == (" Warsaw",) and p.ic_target == " London"
    assert p.ic_country == "United Kingdom" and not p.degenerate and not p.overlap


def test_exact_lookup_not_substring():
    ps = counterfactual_prompts(["China", "Niger", "Ireland", "Bolivia", "UK"])
    mem = {p.country: p.memorized for p in ps}
    assert mem == {"China": ("Beijing",), "Niger": ("Niamey",), "Ireland": ("Dublin",),
                   "Bolivia": ("Sucre", "La Paz"), "UK": ("London",)}


def test_all_pairs_small_world_by_hand():
    got = {(p.country, p.in_context, p.degenerate) for p in counterfactual_prompts(world=small_world())}
    want = {("A", c, False) for c in ("Bb", "Bc", "Nic")}
    want |= {("B", "Aa", False), ("B", "Nic", False), ("B", "Bb", True), ("B", "Bc", True)}
    want |= {("C", "Aa", False), ("C", "Bb", False), ("C", "Bc", False), ("C", "Nic", True)}
    want |= {("D", "Aa", False), ("D", "Bb", False), ("D", "Bc", False), ("D", "Nic", True)}
    want |= {("AX", "Aa", True), ("AX", "Bb", False), ("AX", "Bc", False), ("AX", "Nic", False)}
    assert got == want
    ps = counterfactual_prompts(world=small_world())
    assert len(ps) == len(want)  # each (country, city) exactly once


def test_all_pairs_full_data_counts_and_uniqueness():
    with open(CAPITALS_CSV, encoding="utf-8") as fh:
        rows = list(csv.DictReader(ln for ln in fh if not ln.startswith("#")))
    caps = [r["capital"] for r in rows]
    countries = list(dict.fromkeys(r["country"] for r in rows))
    aliases = [a for r in rows for a in r["aliases"].split(";") if a]
    expected = 0
    for c in countries:
        own = [i for i, r in enumerate(rows) if r["country"] == c]
        expected += len({caps[j] for i in own for j in range(len(rows)) if j != i})
    expected += len(aliases) * len(set(caps))
    ps = counterfactual_prompts()
    assert len(ps) == expected
    assert len({(p.country, p.in_context) for p in ps}) == len(ps)
    degen = {(p.country, p.in_context) for p in ps if p.degenerate}
    assert ("Bolivia", "La Paz") in degen and ("Bolivia", "Sucre") in degen and ("UK", "London") in degen
    assert all(p.in_context in p.memorized for p in ps if p.degenerate)
    assert not any(p.in_context in p.memorized for p in ps if not p.degenerate)
    assert len(degen) == 2 + len(aliases)


def test_sampled_pairs_seeded_and_independent():
    a = counterfactual_prompts(["Poland", "France"], pairs=5, seed=3)
    b = counterfactual_prompts(["France"], pairs=5, seed=3)
    c = counterfactual_prompts(["Poland", "France"], pairs=5, seed=4)
    assert [p for p in a if p.country == "France"] == b
    assert a != c and len(a) == 10 and not any(p.degenerate for p in a)
    full = set(counterfactual_prompts(["Poland", "France"]))
    assert set(a) <= full


def test_overlap_flags_and_closed_book():
    ps = counterfactual_prompts(["Singapore", "Tunisia", "Poland"], pairs=2)
    assert all(p.overlap for p in ps if p.country in ("Singapore", "Tunisia"))
    assert not any(p.overlap for p in ps if p.country == "Poland")
    (cb,) = closed_book_prompts(["Poland"])
    assert cb.text == "Q: What is the capital of Poland?\nA:" and cb.in_context == "" and cb.ic_target == ""


def test_prompt_errors():
    with pytest.raises(DataError):
        counterfactual_prompts(["Atlantis"])
    with pytest.raises(ConfigError):
        counterfactual_prompts(["Poland"], pairs=0)
    with pytest.raises(ConfigError):
        counterfactual_prompts(["Poland"], pairs=10_000)
    with pytest.raises(ConfigError):
        counterfactual_prompts(["Poland"], template="{city} {country}")


# --------------------------------------------------------------------------- generation
def test_batched_equals_unbatched_generation(untied_lm, untied_bridge):
    ps = counterfactual_prompts(["Poland", "Bolivia", "United Kingdom", "Chad", "Sri Lanka"], pairs=2)
    assert len({len(untied_lm.tokenizer(p.text)["input_ids"]) for p in ps}) >= 3  # real left padding
    one = generate_continuations(untied_bridge, ps, batch_size=1)
    many = generate_continuations(untied_bridge, ps, batch_size=8)
    assert one == many
    assert len({c.token_ids for c in one}) >= 3 and all(len(c.token_ids) == 16 for c in one)
    # labels follow the paper rule on the decoded text; the LM entry point gives the same result
    assert [c.label for c in one] == [classify_continuation(c.text, p.mem_targets, p.ic_target)
                                      for c, p in zip(one, ps)]
    assert classify_continuations(untied_lm, ps[:3], max_new_tokens=4, batch_size=3) == \
        [c.label for c in generate_continuations(untied_bridge, ps[:3], max_new_tokens=4)]


def test_first_step_matches_hf_unpadded(untied_lm, untied_bridge):
    ps = counterfactual_prompts(["Poland", "United Kingdom"], pairs=1)
    tok = untied_lm.tokenizer
    conts = generate_continuations(untied_bridge, ps, max_new_tokens=1, batch_size=2)
    for p, c in zip(ps, conts):
        ids = torch.tensor([tok(p.text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            assert c.token_ids == (int(untied_lm.model(ids).logits[0, -1].argmax()),)


def test_eos_stops_generation(untied_lm, untied_bridge):
    calls = []

    def force_eos(logits, hook):
        calls.append(1)
        logits = logits.clone()
        logits[..., untied_lm.eos_id] = 1e4
        return logits

    ps = counterfactual_prompts(["Poland"], pairs=3)
    with untied_bridge.hooks(fwd_hooks=[("hook_unembed", force_eos)]):
        out = generate_continuations(untied_bridge, ps, batch_size=4)
    assert all(c.token_ids == () and c.text == "" and c.label == "neither" for c in out)
    assert len(calls) == 1


def test_context_overflow_raises(untied_bridge):
    p = counterfactual_prompts(["Poland"], pairs=1)[0]
    with pytest.raises(ScoringError):
        generate_continuations(untied_bridge, [p], max_new_tokens=300)


def test_answer_logit_diff_against_manual(untied_lm):
    tok = untied_lm.tokenizer
    ps = counterfactual_prompts(["Poland", "Bolivia", "United Kingdom"], pairs=2)
    ld = answer_logit_diff(untied_lm, ps, batch_size=4)
    ldp = answer_logit_diff(untied_lm, ps, answer_prefix=" The capital of {country} is")
    for i, p in enumerate(ps):
        ic = first_token_ids(tok, [p.in_context])[0]
        mem = first_token_ids(tok, p.memorized)
        for extra, val in (("", ld[i]), (" The capital of " + p.country + " is", ldp[i])):
            ids = tok(p.text, add_special_tokens=False)["input_ids"]
            ids += tok(extra, add_special_tokens=False)["input_ids"] if extra else []
            with torch.no_grad():
                lg = untied_lm.model(torch.tensor([ids])).logits[0, -1]
            assert float(val) == pytest.approx(float(lg[ic] - lg[mem].max()), abs=1e-5)
    # identical first tokens give exactly 0
    same = CounterfactualPrompt("The capital of Poland is Warsaw.\nQ: What is the capital of Poland?\nA:",
                                "Poland", "Warsaw", ("Warsaw",), True)
    assert float(answer_logit_diff(untied_lm, [same])[0]) == 0.0


# --------------------------------------------------------------------------- frequency bins
def test_rates_by_frequency_by_hand():
    labels = ["memorized"] * 2 + ["in_context"] * 3 + ["memorized"] * 4 + ["neither"]
    r = rates_by_frequency(labels, list(range(1, 11)), bins=2)
    assert r["edges"] == [1.0, 5.5, 10.0] and [b["n"] for b in r["bins"]] == [5, 5]
    assert r["bins"][0]["memorized"] == pytest.approx(0.4) and r["bins"][0]["in_context"] == pytest.approx(0.6)
    assert r["bins"][1]["memorized"] == pytest.approx(0.8) and r["bins"][1]["neither"] == pytest.approx(0.2)
    assert r["spearman"]["memorized"] == pytest.approx(1.0)


def test_rates_by_frequency_edges_half_open_last_closed():
    r = rates_by_frequency(["memorized", "in_context", "neither"], [0, 1, 2], bins=2)
    assert r["edges"] == [0.0, 1.0, 2.0] and [b["n"] for b in r["bins"]] == [1, 2]
    r = rates_by_frequency(["memorized"] * 4, [5, 5, 5, 5], bins=4)
    assert [b["n"] for b in r["bins"]] == [0, 0, 0, 4] and math.isnan(r["bins"][0]["memorized"])
    assert math.isnan(r["spearman"]["memorized"])  # one non-empty bin


def test_rates_by_frequency_one_bin_per_prompt_vs_numpy():
    rng = np.random.default_rng(0)
    freq = rng.integers(0, 6, size=200).astype(float)  # many ties and repeated edges
    labels = list(rng.choice(["memorized", "in_context", "neither"], size=200))
    r = rates_by_frequency(labels, freq, bins=10)
    edges = np.percentile(freq, np.linspace(0, 100, 11))
    assert np.allclose(r["edges"], edges)
    assert sum(b["n"] for b in r["bins"]) == 200
    for b in r["bins"]:  # brute force: [e_k, e_k+1) half-open, the last bin closed
        k = b["bin"]
        hi_ok = freq < edges[k + 1] if k < 9 else freq <= edges[k + 1]
        assert b["n"] == int(((freq >= edges[k]) & hi_ok).sum())


def test_rates_by_frequency_degenerate_and_errors():
    r = rates_by_frequency(["memorized", "neither", "in_context"], [1, 2, 3], bins=1,
                           degenerate=[False, True, False])
    assert r["n"] == 2 and r["n_excluded"] == 1 and r["bins"][0]["neither"] == 0.0
    assert rates_by_frequency(["memorized", "neither"], [1, 2], bins=1, degenerate=[False, True],
                              keep_degenerate=True)["n"] == 2
    with pytest.raises(ConfigError):
        rates_by_frequency(["memorized"], [1], bins=0)
    with pytest.raises(DataError):
        rates_by_frequency(["memorized"], [1, 2])
    with pytest.raises(DataError):
        rates_by_frequency(["copied"], [1])
    with pytest.raises(DataError):
        rates_by_frequency(["memorized"], [float("nan")])


def test_per_prompt_frequency():
    ps = counterfactual_prompts(["Poland"], pairs=2)
    assert per_prompt_frequency(ps, {"Poland": 3}) == [3.0, 3.0]
    with pytest.raises(DataError):
        per_prompt_frequency(ps, {}, by="in_context")


# --------------------------------------------------------------------------- toyworld / GPT-2
@pytest.mark.slow
def test_toyworld_memorized_rate_rises_with_fact_frequency():
    require_toyworld()
    spec, world = toyworld_capitals()
    counts = json.loads((TOYWORLD_DIR / "frequencies.json").read_text(encoding="utf-8"))["counts"]
    fact = {c: counts[c]["fact"] for c in spec.countries}
    ps = counterfactual_prompts(world=world, pairs=4, seed=0)
    lm = load_model("toyworld", device="cpu")
    labels = classify_continuations(lm, ps, max_new_tokens=8, batch_size=64)
    r = rates_by_frequency(labels, per_prompt_frequency(ps, fact), bins=5)
    mem = [b["memorized"] for b in r["bins"] if b["n"]]
    assert r["spearman"]["memorized"] > 0.5, r
    assert mem[-1] > mem[0] + 0.1, r
    # a trained model: left-padded batches give the same labels as unbatched runs
    some = ps[::13]
    assert len({len(lm.tokenizer(p.text)["input_ids"]) for p in some}) >= 3
    one = classify_continuations(lm.bridge(compat=True), some, max_new_tokens=8, batch_size=1)
    assert one == labels[::13]


@pytest.mark.gpt2
def test_gpt2_paper_template_mostly_in_context(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("gpt2", device="cpu")
    ps = counterfactual_prompts(["Poland", "France", "Japan", "Germany", "Italy", "Spain"], pairs=4)
    labels = classify_continuations(lm, ps)
    assert labels.count("in_context") / len(labels) > 0.5, labels
