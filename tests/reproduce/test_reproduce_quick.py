"""Smoke test: `preflens reproduce all --quick` on toyworld writes every documented JSON key and
figure, with every number finite (the README's JSON keys are the contract checked here), marks
its results as a smoke test, and writes the same key structure as the render fixtures in
``data/`` (regenerate them from a quick run when a recipe's results change shape)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from preflens.cli import main

EXPECTED = {
    "likelihood_displacement": {
        "keys": ["single_token", "ches_quantiles", "spearman_ches_vs_delta", "unembedding_geometry"],
        "single_token": ["pair", "seed", "max_drop", "loss_monotone", "top_gaining", "overlap_at_10"],
        "ches_quantiles": ["q", "mean_ches", "mean_delta_logp_chosen"],
        "figures": ["single_token_similar", "single_token_dissimilar", "ches_quantiles"],
    },
    "ranking_accuracy": {
        "keys": ["reference", "after_dpo", "fraction_flipped_to_correct",
                 "fraction_flipped_to_incorrect", "fraction_incorrect_at_start", "miscalibrated", "frontier"],
        "figures": ["ranking_accuracy_during_dpo", "observed_vs_idealized", "dpo_loss_vs_c",
                    "dpo_loss_vs_c_miscalibrated", "flip_frontier"],
    },
    "factual_recall": {
        "keys": ["rates", "by_decile", "memory_heads", "in_context_heads", "scaling", "selection", "sweeps"],
        "scaling": ["head", "alpha", "baseline_in_context_rate", "in_context_rate"],
        "figures": ["head_attribution", "rates_by_frequency", "head_scaling", "dla_vs_causal"],
    },
    "gradient_entanglement": {
        "keys": ["losses", "first_order_sign_agreement", "sign_vs_lr", "overlap_experiment",
                 "normalized_mitigation"],
        "figures": ["trajectories", "token_similarity", "sign_vs_lr"],
    },
}


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.slow  # all four recipes, minutes on 2 cores


def _key_paths(obj, path="$") -> set[str]:
    """Every key path of a JSON object, list indices collapsed to ``[]``."""
    out = {path}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= _key_paths(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for v in obj:
            out |= _key_paths(v, f"{path}[]")
    return out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "all", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("paper", list(EXPECTED))
def test_quick_reproduction_outputs(quick_run, paper):
    spec = EXPECTED[paper]
    results = json.loads((quick_run / "results" / f"{paper}.json").read_text())
    for key in spec["keys"]:
        assert key in results, f"{paper}.json lacks {key}"
    for section in ("single_token", "ches_quantiles"):
        if section in spec:
            assert results[section], section
            for row in results[section]:
                assert set(spec[section]) <= set(row), (section, row)
    if "scaling" in spec:
        assert set(spec["scaling"]) <= set(results["scaling"])
    for arm in (results, results.get("miscalibrated", {})):
        for block in ("reference", "after_dpo"):
            if block in arm:
                assert {"ranking_accuracy", "ranking_accuracy_mean", "idealized"} <= set(arm[block])
                assert {"min", "median", "max", "per_beta"} <= set(arm[block]["idealized"])
    if paper == "gradient_entanglement":
        for name in ("dpo", "ipo", "simpo", "slic", "dpop", "cpo", "dpo_pairwise_normalized"):
            assert {"chosen_delta", "rejected_delta", "case_counts"} <= set(results["losses"][name])
    assert all(math.isfinite(x) for x in _numbers(results)), paper
    assert results["quick"] is True and "smoke test" in results["note"]
    fixture = json.loads((DATA / f"{paper}.json").read_text())
    assert _key_paths(results) == _key_paths(fixture), "results changed shape: regenerate tests/reproduce/data"
    for fig in spec["figures"]:
        path = quick_run / "figures" / paper / f"{fig}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


@pytest.mark.slow
def test_rerun_reuses_finished_steps(quick_run, capsys):
    """A second run finds every step cached and rewrites identical results."""
    before = (quick_run / "results" / "factual_recall.json").read_text()
    assert main(["reproduce", "factual-recall", "--quick", "--out", str(quick_run), "--device", "cpu"]) == 0
    assert (quick_run / "results" / "factual_recall.json").read_text() == before
