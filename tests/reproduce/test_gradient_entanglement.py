"""The gradient-entanglement recipe's sign-vs-lr step: its metrics, slopes, table and figure."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from preflens.errors import ConfigError
from preflens.reproduce import gradient_entanglement as ge
from preflens.reproduce import render_paper
from preflens.reproduce.common import RecipeContext

FIXTURE = Path(__file__).parent / "data" / "gradient_entanglement.json"


def test_first_order_agreement_counts_signs_and_errors():
    m_w, m_l = [1.0, -2.0, 3.0, 1e-3], [-1.0, -1.0, 2.0, -4.0]
    p_w, p_l = [2.0, 1.0, 3.0, 2e-3], [-1.0, -2.0, 0.0, -4.0]
    out = ge.first_order_agreement(m_w, m_l, p_w, p_l)
    assert out["agree_chosen"] == 0.75 and out["agree_rejected"] == 0.75 and out["agree_both"] == 0.5
    assert out["abs_error"] == pytest.approx((1 + 3 + 0 + 1e-3 + 0 + 1 + 2 + 0) / 8)
    # relative errors 0.5, 3, 0, 0.5 | 0, 0.5, (prediction 0: left out), 0 -> median of 7 = 0.5
    assert out["rel_error"] == 0.5
    assert ge.first_order_agreement([1.0], [1.0], [0.0], [0.0])["rel_error"] is None


def test_loglog_slope_of_a_power_law():
    lrs = np.array([1e-5, 3e-5, 1e-4])
    assert ge.loglog_slope(lrs, 7 * lrs ** 2) == pytest.approx(2.0)
    assert ge.loglog_slope(lrs, 0.5 * lrs) == pytest.approx(1.0)


def test_slopes_use_the_smallest_steps_of_each_run():
    rows = [{"loss": "a", "lr": lr, "abs_error": lr ** 2, "rel_error": lr} for lr in (1e-3, 1e-5, 1e-4, 1e-1)]
    rows += [{"loss": "b", "lr": 1e-3, "abs_error": 1.0, "rel_error": None},
             {"loss": "b", "lr": 1e-2, "abs_error": 1.0, "rel_error": 2.0}]
    rows[3]["abs_error"] = 1.0  # lr 1e-1, out of the fit
    out = ge._slopes(rows, 3)
    assert out["a"]["fit_lrs"] == [1e-5, 1e-4, 1e-3]
    assert out["a"]["abs_error"] == pytest.approx(2.0) and out["a"]["rel_error"] == pytest.approx(1.0)
    assert "b" not in out  # one usable row: no slope


@pytest.mark.parametrize("lrs", [(1e-3, 0.0), (-1e-4,), (float("nan"),)])
def test_bad_sign_lrs_are_config_errors(lrs):
    with pytest.raises(ConfigError, match="sign_lrs"):
        ge._sign_lrs(dataclasses.replace(ge.Config.quick(), sign_lrs=lrs))


def test_sign_lr_is_always_in_the_sweep():
    lrs = ge._sign_lrs(dataclasses.replace(ge.Config(), sign_lrs=(1e-2, 1e-4), sign_lr=3e-3))
    assert lrs == [1e-4, 3e-3, 1e-2]


def test_sign_vs_lr_step_on_a_tiny_model(tmp_path):
    """Every (run, lr) row; a row per step size of the config; agreement fractions in [0, 1]."""
    ctx = RecipeContext(paper=ge.PAPER, model="tiny-random", device="cpu", out=tmp_path)
    cfg = dataclasses.replace(ge.Config.quick(), sign_pairs=2)
    runs = {n: list(s) for n, s in ge.RUNS.items()}
    out = ctx.step("sign-vs-lr", ge.sign_vs_lr, cfg, runs)
    assert out["lrs"] == sorted({*cfg.sign_lrs, cfg.sign_lr})
    assert [(r["loss"], r["lr"]) for r in out["rows"]] == [(n, lr) for n in ge.RUNS for lr in out["lrs"]]
    for r in out["rows"]:
        assert 0 <= r["agree_both"] <= min(r["agree_chosen"], r["agree_rejected"]) <= 1
        assert r["abs_error"] >= 0 and r["rel_error"] >= 0
    errors = {lr: r["abs_error"] for r in out["rows"] if r["loss"] == "dpo" for lr in [r["lr"]]}
    assert errors[1e-4] < errors[1e-3] < errors[1e-2]
    json.dumps(out)


def test_summary_prints_the_sweep_table():
    text = ge.summary(json.loads(FIXTURE.read_text()))
    assert "sign agreement (both)" in text and "median relative error" in text and "slope |err|" in text
    assert "dpo_pairwise_normalized" in text.split("sign agreement (both)")[1]


def test_results_before_the_sweep_still_render_and_summarize(tmp_path):
    """A results JSON written before the step-size sweep (one step only) draws the other figures."""
    results = json.loads(FIXTURE.read_text())
    del results["sign_vs_lr"]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "gradient_entanglement.json").write_text(json.dumps(results))
    render_paper("gradient-entanglement", out=tmp_path)
    assert sorted(p.stem for p in (tmp_path / "figures" / "gradient_entanglement").iterdir()) == [
        "token_similarity", "trajectories"]
    assert "median relative error" not in ge.summary(results)

