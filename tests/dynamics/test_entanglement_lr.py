"""First-order predictions against step size (preflens.dynamics.entanglement.sgd_step_changes).

Yuan et al. 2024 Eqs. 3–5 predict Δu after one plain-SGD step to first order in η, so the
measured − predicted error is the O(η²) remainder: its log-log slope against η is 2 (1 for the
relative error). fp64 tiny model with randomized LayerNorm parameters (the default w = 1, b = 0
would hide a wrong LayerNorm term); the step's gradient comes from ``compute_loss`` by autograd,
the prediction from ``weights`` and the gradient statistics, so a wrong sign or factor in either
breaks the slope.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from preflens.data import PreferencePair
from preflens.dynamics.entanglement import pair_gradient_stats, predict_first_order, sgd_step_changes
from preflens.dynamics.losses import LOSSES, weights
from preflens.errors import ConfigError

PAIRS = [
    PreferencePair("The capital of France is", " Paris.", " Rome, said the fox."),
    PreferencePair("Q: What is the capital of Italy?\nA:", " Rome", " Warsaw. The quick brown fox"),
    PreferencePair("Human: How do I bake bread? Assistant:", " Mix flour, water", " Never."),
]
RUNS = {name: (name, None, False) for name in sorted(LOSSES)} | {"dpo_normalized": ("dpo", None, True)}


@pytest.fixture(scope="module")
def lm64(tiny):
    model = copy.deepcopy(tiny.model).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:  # LayerNorm weights and biases away from (1, 0)
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return dataclasses.replace(tiny, model=model)


@pytest.fixture(scope="module")
def stats(lm64):
    return pair_gradient_stats(lm64, PAIRS, method="exact")


def _slope(lrs, errs) -> float:
    return float(np.polyfit(np.log(lrs), np.log(errs), 1)[0])


def _predict(stats, run, lr):
    loss, kw, normalized = RUNS[run]
    return predict_first_order(stats, loss, lr=lr, loss_kwargs=kw, ref_chosen_logps=stats.u_w,
                               ref_rejected_logps=stats.u_l, pairwise_normalized=normalized)


@pytest.fixture(scope="module")
def sweep(lm64, stats):
    """Per run: its step sizes (scaled to its gradient size) and the measured changes."""
    out = {}
    for run, (loss, kw, _) in RUNS.items():
        unit_w, unit_l = _predict(stats, run, 1.0)
        eta0 = 1e-3 / float(torch.cat([unit_w, unit_l]).abs().max())
        lrs = [eta0 / 2 ** k for k in range(4)]
        out[run] = (lrs, sgd_step_changes(lm64, PAIRS, {run: RUNS[run]}, lrs,
                                          norms=(stats.norm_w, stats.norm_l))[run])
    return out


@pytest.mark.parametrize("run", sorted(RUNS))
def test_first_order_error_shrinks_quadratically_in_the_step(stats, sweep, run):
    lrs, (m_w, m_l) = sweep[run]
    abs_err, rel_err = [], []
    for k, lr in enumerate(lrs):
        p_w, p_l = _predict(stats, run, lr)
        err = torch.cat([m_w[k] - p_w, m_l[k] - p_l]).abs()
        pred = torch.cat([p_w, p_l]).abs()
        abs_err.append(float(err.mean()))
        rel_err.append(float((err[pred > 0] / pred[pred > 0]).median()))
        assert bool((torch.sign(m_w[k]) == torch.sign(p_w)).all() and (torch.sign(m_l[k]) == torch.sign(p_l)).all())
    assert 1.8 <= _slope(lrs, abs_err) <= 2.2, (run, abs_err)
    assert 0.8 <= _slope(lrs, rel_err) <= 1.2, (run, rel_err)
    assert rel_err[-1] < 1e-2, (run, rel_err)


@pytest.mark.parametrize("wrong", ["ip_sign", "factor", "a_l_for_a_w"])
def test_a_wrong_prediction_breaks_the_slope(stats, sweep, wrong):
    """The slope test can fail: a prediction off by a sign, a factor or a swapped weight leaves a
    first-order error (slope ≈ 1), outside [1.8, 2.2]."""
    lrs, (m_w, _) = sweep["simpo"]  # a_w ≠ a_l (length-normalized), so swapping them matters
    a_w, a_l = weights("simpo", stats.u_w, stats.u_l, stats.u_w, stats.u_l, stats.len_w.double(), stats.len_l.double())
    errs = []
    for k, lr in enumerate(lrs):
        if wrong == "ip_sign":
            p_w = lr * (a_w * stats.norm_w_sq + a_l * stats.inner)
        elif wrong == "factor":
            p_w = 1.05 * _predict(stats, "simpo", lr)[0]
        else:
            p_w = lr * (a_l * stats.norm_w_sq - a_w * stats.inner)
        errs.append(float((m_w[k] - p_w).abs().mean()))
    assert not 1.8 <= _slope(lrs, errs) <= 2.2
    assert abs(_slope(lrs, errs) - 1.0) < 0.1


def test_pairwise_normalized_prediction_is_the_mitigations_closed_form(stats):
    """Δu_w = η a_w n_w (1 − cos) ≥ 0 and Δu_l = −η a_w n_l (1 − cos) ≤ 0 (Yuan et al. Sec. 5)."""
    d_w, d_l = _predict(stats, "dpo_normalized", 0.01)
    a_w, _ = weights("dpo", stats.u_w, stats.u_l, stats.u_w, stats.u_l)
    torch.testing.assert_close(d_w, 0.01 * a_w * stats.norm_w * (1 - stats.cos), rtol=1e-12, atol=0)
    torch.testing.assert_close(d_l, -0.01 * a_w * stats.norm_l * (1 - stats.cos), rtol=1e-12, atol=0)
    assert bool((d_w > 0).all() and (d_l < 0).all())
    plain = predict_first_order(stats, "dpo", lr=0.01, ref_chosen_logps=stats.u_w, ref_rejected_logps=stats.u_l)
    assert not torch.allclose(plain[0], d_w)


def test_weights_are_restored_bit_for_bit(lm64, monkeypatch):
    import preflens.dynamics.entanglement as ent

    before = {k: v.clone() for k, v in lm64.model.state_dict().items()}
    sgd_step_changes(lm64, PAIRS[:1], {"dpo": ("dpo", None, False), "n": ("dpo", None, True)}, [0.5, 1e-3])
    assert all(torch.equal(before[k], v) for k, v in lm64.model.state_dict().items())
    calls, forward = [], ent.concatenated_logps

    def fail_on_the_third_forward(model, batch):  # the second η: the weights are at θ0 − 0.5 g
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return forward(model, batch)

    monkeypatch.setattr(ent, "concatenated_logps", fail_on_the_third_forward)
    with pytest.raises(RuntimeError, match="interrupted"):
        sgd_step_changes(lm64, PAIRS[:1], {"dpo": ("dpo", None, False)}, [1e-3, 0.5])
    assert len(calls) == 3 and all(torch.equal(before[k], v) for k, v in lm64.model.state_dict().items())


def test_one_call_equals_separate_calls(lm64):
    """Sharing the forward between runs, step sizes and pairs changes nothing (each pair starts
    from θ0 whatever came before it)."""
    runs = {"dpo": ("dpo", None, False), "ipo": ("ipo", {"tau": 0.1}, False)}
    both = sgd_step_changes(lm64, PAIRS[:2], runs, [1e-3, 1e-1])
    alone = sgd_step_changes(lm64, PAIRS[1:2], {"ipo": runs["ipo"]}, [1e-1])["ipo"]
    assert torch.equal(both["ipo"][0][1, 1], alone[0][0, 0]) and torch.equal(both["ipo"][1][1, 1], alone[1][0, 0])


@pytest.mark.parametrize("lrs", [[], [0.0], [-1e-3], [float("nan")], [float("inf")], [True]])
def test_bad_step_sizes_are_config_errors(lm64, lrs):
    with pytest.raises(ConfigError, match="lrs"):
        sgd_step_changes(lm64, PAIRS[:1], {"dpo": ("dpo", None, False)}, lrs)


@pytest.mark.parametrize("runs", [{}, {"dpo": "dpo"}, {"dpo": ("dpo", None)}])
def test_bad_runs_are_config_errors(lm64, runs):
    with pytest.raises(ConfigError, match="runs"):
        sgd_step_changes(lm64, PAIRS[:1], runs, [1e-3])
