"""The ranking recipe on a tiny config: its steps are keyed on the fields they read (editing the
learning rate reruns the two DPO steps, not the reference scoring nor the frontier; editing the
SFT reruns only the miscalibrated arm; editing the β grid reruns nothing), a ``quick`` run says
in its JSON and its printed output that its numbers are a smoke test, and the results JSON
holds the per-pair values its figures draw, for both reference arms."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from preflens.data.toyworld.prefs import multi_token_pairs
from preflens.errors import ConfigError
from preflens.reproduce import ranking_accuracy, run_paper
from preflens.reproduce.common import toyworld_world

TINY = ranking_accuracy.Config(n_pairs=16, epochs=1, batch_size=8, track_every=1, skew_pairs=16, sft_steps=2,
                               sft_batch_size=8, skew_spread_seeds=(2,), frontier_betas=(1.0,), frontier_lrs=(1e-5,),
                               frontier_epochs=(1,))
ARM_KEYS = {"reference", "after_dpo", "alignment_gap", "fraction_flipped_to_correct", "fraction_flipped_to_incorrect",
            "fraction_incorrect_at_start", "fraction_flipped_to_correct_of_incorrect", "flip_buckets",
            "median_c_incorrect", "trajectory", "final_loss", "mean_final_dpo_loss", "theorem_4_1_agreement",
            "per_pair"}


def _run(monkeypatch, capsys, out, cfg) -> tuple[dict, str]:
    monkeypatch.setattr(ranking_accuracy.Config, "quick", classmethod(lambda cls: cfg))
    results = run_paper("ranking-accuracy", out=out, quick=True, device="cpu")
    return results, capsys.readouterr().out


def _steps(printed: str) -> tuple[int, int]:
    m = re.search(r"\((\d+) steps computed, (\d+) reused", printed)
    return int(m.group(1)), int(m.group(2))


@pytest.mark.slow  # five tiny runs of the real recipe: ~25 s on an idle 2-core machine
def test_steps_rerun_only_for_the_fields_they_read_and_quick_runs_are_marked(tmp_path, monkeypatch, capsys):
    results, printed = _run(monkeypatch, capsys, tmp_path, TINY)
    assert _steps(printed) == (6, 0)
    on_disk = json.loads((tmp_path / "results" / "ranking_accuracy.json").read_text())
    assert on_disk == results and results["quick"] is True and "smoke test" in results["note"]
    assert printed.count("smoke test") >= 2   # before and after the summary table
    assert "miscalibrated π_ref" in printed and "flip frontier" in printed
    assert ARM_KEYS <= set(results) and ARM_KEYS <= set(results["miscalibrated"])
    for arm in (results, results["miscalibrated"]):
        assert len(arm["per_pair"]["c"]) == len(arm["per_pair"]["final_dpo_loss"]) == 16
    assert results["miscalibrated"]["sft"]["n_examples"] == 16 and len(results["miscalibrated"]["sft"]["losses"]) == 2
    assert results["miscalibrated"]["per_pair"]["c"] != results["per_pair"]["c"]   # another reference
    spread = results["miscalibrated"]["seed_spread"]
    assert [r["skew_seed"] for r in spread["rows"]] == [1, 2] and spread["rows"][0]["gap"] == results[
        "miscalibrated"]["alignment_gap"]["exact"] and spread["gap_min"] <= spread["gap_median"] <= spread["gap_max"]
    (row,) = results["frontier"]["rows"]
    assert (row["dpo_beta"], row["lr"], row["epochs"]) == (1.0, 1e-5, 1)
    assert sorted(p.name for p in (tmp_path / "figures" / "ranking_accuracy").iterdir()) == [
        "dpo_loss_vs_c.png", "dpo_loss_vs_c_miscalibrated.png", "flip_frontier.png", "observed_vs_idealized.png",
        "ranking_accuracy_during_dpo.png"]

    _, printed = _run(monkeypatch, capsys, tmp_path, dataclasses.replace(TINY, lr=1e-4))
    assert _steps(printed) == (2, 4)   # both DPO steps reran; references, seed spread and frontier reused

    _, printed = _run(monkeypatch, capsys, tmp_path, dataclasses.replace(TINY, sft_lr=1e-4))
    assert _steps(printed) == (3, 3)   # the miscalibrated arm's steps (and its seed spread) reran

    grown, printed = _run(monkeypatch, capsys, tmp_path, dataclasses.replace(TINY, frontier_lrs=(1e-5, 3e-5)))
    assert _steps(printed) == (1, 6)   # one new frontier setting
    assert [r["lr"] for r in grown["frontier"]["rows"]] == [1e-5, 3e-5]

    again, printed = _run(monkeypatch, capsys, tmp_path, dataclasses.replace(TINY, betas=(0.1, 1.0)))
    assert _steps(printed) == (0, 6)   # R* is computed from cached scores: nothing reruns
    assert set(again["reference"]["idealized"]["per_beta"]) == {"0.1", "1.0"}
    assert again["reference"]["ranking_accuracy"] == results["reference"]["ranking_accuracy"]


@pytest.mark.parametrize("field", ["n_pairs", "votes", "data_seed"])
def test_the_data_fields_key_every_step(field):
    for step in (ranking_accuracy.reference, ranking_accuracy.dpo, ranking_accuracy.miscalibrated_reference,
                 ranking_accuracy.miscalibrated_dpo, ranking_accuracy.miscalibrated_spread,
                 ranking_accuracy.frontier_run):
        assert field in step.reads, step.__name__


def test_the_frontier_does_not_read_the_recipe_dpo_settings():
    assert not {"lr", "dpo_beta", "epochs"} & set(ranking_accuracy.frontier_run.reads)
    assert "skew_seed" not in ranking_accuracy.miscalibrated_spread.reads


def test_skewed_examples_emit_the_rejected_response_with_probability_q():
    pairs = multi_token_pairs(toyworld_world(), 400, seed=5)
    assert [r for _, r in ranking_accuracy.skewed_examples(pairs, 1.0, seed=0)] == [p.rejected for p in pairs]
    assert [r for _, r in ranking_accuracy.skewed_examples(pairs, 0.0, seed=0)] == [p.chosen for p in pairs]
    ex = ranking_accuracy.skewed_examples(pairs, 0.85, seed=3)
    assert ex == ranking_accuracy.skewed_examples(pairs, 0.85, seed=3) != ranking_accuracy.skewed_examples(
        pairs, 0.85, seed=4)
    share = sum(r == p.rejected for (_, r), p in zip(ex, pairs)) / len(pairs)
    assert abs(share - 0.85) < 4 * math.sqrt(0.85 * 0.15 / len(pairs))
    assert [x for x, _ in ex] == [p.prompt for p in pairs]


def _ref_lists(c):
    return {"logp_chosen": [-x for x in c], "logp_rejected": [0.0] * len(c),
            "mean_logp_chosen": [0.0] * len(c), "mean_logp_rejected": [0.0] * len(c)}


def test_frontier_rows_and_the_criterion():
    cfg = ranking_accuracy.Config(dpo_beta=1.0)
    c = [1.0, 1.0, -3.0, -3.0]   # two mis-ranked pairs
    runs = [{"dpo_beta": 1.0, "lr": 1e-6, "records": [
        {"epochs": 1, "margin": [-1.0, -1.0, 6.0, 6.0]},      # no flip, loss falls on the correct pairs
        {"epochs": 2, "margin": [0.5, 0.5, 6.0, 6.0]}]}]       # both mis-ranked pairs flip
    out = ranking_accuracy._frontier(cfg, _ref_lists(c), runs, idealized_median=0.9)
    first, second = out["rows"]
    assert first["flipped_to_correct_of_incorrect"] == 0.0 and first["loss_drop"] > 0.05 and first["meets_criterion"]
    assert second["flipped_to_correct_of_incorrect"] == 1.0 and not second["meets_criterion"]
    assert out["n_meeting"] == 1 and out["criterion"]["max_flip_share"] == cfg.max_flip_share
    gated = ranking_accuracy._frontier(cfg, _ref_lists(c), runs, idealized_median=0.8)
    assert gated["n_meeting"] == 0   # the base R* median must reach min_idealized_median
    none_wrong = ranking_accuracy._frontier(cfg, _ref_lists([-1.0, -1.0]), [
        {"dpo_beta": 1.0, "lr": 1e-6, "records": [{"epochs": 1, "margin": [2.0, 2.0]}]}], idealized_median=0.9)
    assert none_wrong["rows"][0]["flipped_to_correct_of_incorrect"] is None   # JSON-safe, not NaN
    assert not none_wrong["rows"][0]["meets_criterion"]


@pytest.mark.parametrize("change, field", [(dict(skew_q=1.5), "skew_q"), (dict(frontier_betas=()), "frontier_betas"),
                                           (dict(frontier_lrs=(0.0,)), "frontier_lrs"),
                                           (dict(frontier_epochs=(1.5,)), "frontier_epochs")])
def test_bad_config_is_a_config_error(change, field):
    with pytest.raises(ConfigError) as info:
        ranking_accuracy.Config(**change)
    assert info.value.option == field


def test_quick_config_is_small():
    q = ranking_accuracy.Config.quick()
    assert len(q.frontier_betas) * len(q.frontier_lrs) <= 2 and q.sft_steps * q.sft_batch_size <= 128
    assert torch.tensor(q.frontier_epochs).max() <= 2
