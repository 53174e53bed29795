"""Parity functions for Yu et al. 2023 (preflens.attribution.official), each tested against a
port of the official code (yuqinan/CounterfactsRecall) written from reading it."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

import preflens
from preflens.attribution.official import (head_attribution_batches, memorized_capital_substring,
                                           tuning_sets)
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
