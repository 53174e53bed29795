"""Pairwise-normalized gradient mitigation (spec §7) through the real training loop.

The guarantee: stepping along a(g_w/n_w − g_l/n_l) (surrogate −a(u_w/n_w − u_l/n_l), norms
detached, from ``entanglement.pair_gradient_norms``) gives Δu_w ≈ ηa·n_w(1 − cos) > 0 and
Δu_l ≈ −ηa·n_l(1 − cos) < 0 for every pair with cos < 1, under plain SGD, one pair per step.
Measured by re-evaluating float64 log-probs through plain HF logits after one
``train_preference(..., optimizer="sgd", pairwise_normalized=True)`` step.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from preflens.data import PreferencePair
from preflens.dynamics.entanglement import entanglement_case, pair_gradient_stats
from preflens.dynamics.train import train_preference

PROMPTS = ["The capital of France is", "Q: What is the capital of Italy?\nA:"]
SFX = " said the annotator, perhaps. The model"
# κ > 1 (rejected carries the shared suffix twice): DPO case 2; κ < 1: case 3; plus generic pairs
PAIRS = (
    [PreferencePair(p, " Paris" + SFX, " Rome" + SFX + SFX) for p in PROMPTS]
    + [PreferencePair(p, " Paris" + SFX + SFX, " Rome" + SFX) for p in PROMPTS]
    + [PreferencePair("Human: How do I bake bread? Assistant:", " Mix flour, water", " Never."),
       PreferencePair("Yes", " No", " No No No")]
)
BETA = 0.1


def summed_lp(model, tok, prompt, response, eos):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [eos]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].double(), -1)
    return sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(r))


def one_step(lm64, pair, tmp_path, normalized, lr):
    lm = dataclasses.replace(lm64, model=copy.deepcopy(lm64.model))
    before = [summed_lp(lm.model, lm.tokenizer, pair.prompt, r, lm.eos_id) for r in (pair.chosen, pair.rejected)]
    train_preference(lm, [pair], loss="dpo", loss_kwargs={"beta": BETA}, optimizer="sgd", lr=lr, steps=1,
                     batch_size=1, seed=0, out_dir=tmp_path / f"run{normalized}", resume=False,
                     pairwise_normalized=normalized)
    after = [summed_lp(lm.model, lm.tokenizer, pair.prompt, r, lm.eos_id) for r in (pair.chosen, pair.rejected)]
    return after[0] - before[0], after[1] - before[1]


@pytest.fixture(scope="module")
def setup(tiny):
    lm64 = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model).double().eval())
    return lm64, pair_gradient_stats(lm64, PAIRS, method="exact")


def test_pairwise_normalized_guarantee(setup, tmp_path):
    lm64, stats = setup
    assert (stats.cos < 1).all()
    dpo_cases = entanglement_case(stats.norm_w_sq - stats.inner, stats.inner - stats.norm_l_sq)
    assert dpo_cases[:2] == ["both_down"] * 2 and dpo_cases[2:4] == ["both_up"] * 2
    a = BETA * 0.5  # reference = initial policy: M = 0, a = βσ(0)
    lr = 0.05
    for i, pair in enumerate(PAIRS):
        plain = one_step(lm64, pair, tmp_path / f"p{i}", False, lr)
        assert entanglement_case(torch.tensor([plain[0]]), torch.tensor([plain[1]])) == [dpo_cases[i]]
        dw, dl = one_step(lm64, pair, tmp_path / f"p{i}", True, lr)
        assert dw > 0 and dl < 0, (i, dw, dl)  # case 1 for every pair, incl. DPO's case 2/3 pairs
        want_w = lr * a * stats.norm_w[i].item() * (1 - stats.cos[i].item())
        want_l = -lr * a * stats.norm_l[i].item() * (1 - stats.cos[i].item())
        assert dw == pytest.approx(want_w, rel=0.05) and dl == pytest.approx(want_l, rel=0.05)
