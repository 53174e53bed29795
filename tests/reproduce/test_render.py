"""``render_only``: every figure is drawn from a results JSON alone, with no model and no training.

The fixtures in ``data/`` are the results JSON of ``preflens reproduce all --quick`` (the slow
quick test checks that a fresh quick run still writes the same key structure).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import preflens.reproduce.common as common
from preflens.errors import ConfigError
from preflens.reproduce import PAPERS, render_paper

DATA = Path(__file__).parent / "data"
FIGURES = {
    "likelihood_displacement": ["ches_quantiles", "single_token_dissimilar", "single_token_similar"],
    "ranking_accuracy": ["dpo_loss_vs_c", "dpo_loss_vs_c_miscalibrated", "flip_frontier", "observed_vs_idealized",
                         "ranking_accuracy_during_dpo"],
    "factual_recall": ["dla_vs_causal", "head_attribution", "head_scaling", "rates_by_frequency"],
    "gradient_entanglement": ["sign_vs_lr", "token_similarity", "trajectories"],
}


def _refuse(*args, **kwargs):
    raise AssertionError("render touched a model or the training loop")


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model, training, or running any torch module fails the test."""
    monkeypatch.setattr(common, "load_model", _refuse)
    monkeypatch.setattr(torch.nn.Module, "__call__", _refuse)
    for name in PAPERS.values():
        module = __import__(f"preflens.reproduce.{name}", fromlist=["run"])
        if hasattr(module, "train_preference"):
            monkeypatch.setattr(module, "train_preference", _refuse)


def _out_with(tmp_path: Path, paper: str) -> Path:
    (tmp_path / "results").mkdir()
    shutil.copy(DATA / f"{paper}.json", tmp_path / "results" / f"{paper}.json")
    return tmp_path


@pytest.mark.parametrize("paper", sorted(FIGURES))
def test_render_only_draws_every_figure_from_the_results_json(tmp_path, no_models, capsys, paper):
    out = _out_with(tmp_path, paper)
    before = (out / "results" / f"{paper}.json").read_bytes()
    results = render_paper(paper.replace("_", "-"), out=out)
    figures = out / "figures" / paper
    assert sorted(p.stem for p in figures.iterdir()) == FIGURES[paper]
    for path in figures.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert (out / "results" / f"{paper}.json").read_bytes() == before  # the JSON is only read
    assert not (out / "results" / ".cache").exists()
    assert results["quick"] is True and "smoke test" in capsys.readouterr().out


def test_render_only_without_results_names_the_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"out: no .*ranking_accuracy\.json; run the recipe first"):
        render_paper("ranking-accuracy", out=tmp_path)
    assert not (tmp_path / "figures" / "ranking_accuracy").exists() or not list(
        (tmp_path / "figures" / "ranking_accuracy").iterdir())


def test_render_only_on_results_lacking_per_item_data_is_a_config_error(tmp_path, no_models):
    out = _out_with(tmp_path, "ranking_accuracy")
    path = out / "results" / "ranking_accuracy.json"
    results = json.loads(path.read_text())
    del results["per_pair"]  # as in results written before the recipes kept per-pair values
    path.write_text(json.dumps(results))
    with pytest.raises(ConfigError, match=r"lacks what the figures need \(KeyError\('per_pair'\)\)"):
        render_paper("ranking_accuracy", out=out)


def test_unknown_paper_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="paper: unknown paper 'ranking'; valid: .*ranking-accuracy"):
        render_paper("ranking", out=tmp_path)


def test_cli_render_only_all_redraws_every_paper(tmp_path, no_models, capsys):
    from preflens.cli import main

    (tmp_path / "results").mkdir()
    for paper in FIGURES:
        shutil.copy(DATA / f"{paper}.json", tmp_path / "results" / f"{paper}.json")
    assert main(["reproduce", "all", "--render-only", "--out", str(tmp_path)]) == 0
    for paper, names in FIGURES.items():
        assert sorted(p.stem for p in (tmp_path / "figures" / paper).iterdir()) == names


def test_cli_render_only_without_results_is_one_line_naming_the_flag(tmp_path, capsys):
    from preflens.cli import main

    assert main(["reproduce", "factual_recall", "--render-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out: no " in err and "factual_recall.json" in err


@pytest.mark.parametrize("paper", sorted(FIGURES))
def test_the_committed_results_redraw_the_committed_figures(tmp_path, no_models, paper):
    """``results/*.json`` in the repository hold everything its ``figures/`` were drawn from."""
    committed = Path(__file__).parents[2] / "results" / f"{paper}.json"
    (tmp_path / "results").mkdir()
    shutil.copy(committed, tmp_path / "results" / committed.name)
    results = render_paper(paper, out=tmp_path)
    assert results["quick"] is False and "note" not in results
    expected = FIGURES[paper]
    if paper == "gradient_entanglement" and "sign_vs_lr" not in results:  # written before the step-size sweep
        expected = [f for f in expected if f != "sign_vs_lr"]
    if paper == "factual_recall" and "selection" not in results:  # written before the every-head search
        expected = [f for f in expected if f not in ("dla_vs_causal", "head_scaling")]
    if paper == "ranking_accuracy" and "frontier" not in results:  # written before the second arm and the frontier
        expected = [f for f in expected if f not in ("dpo_loss_vs_c_miscalibrated", "flip_frontier")]
    assert sorted(p.stem for p in (tmp_path / "figures" / paper).iterdir()) == expected
