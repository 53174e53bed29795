"""Gradient lenses on every family: ghost == exact == independent autograd (all parameters),
every parameter preset, and the first-order prediction vs one real SGD step."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from preflens.data import PreferencePair
from preflens.dynamics.entanglement import pair_gradient_stats, predict_first_order, sgd_step_changes
from preflens.dynamics.ghost import PRESETS, _is_norm, select_parameters

PAIRS = [
    PreferencePair("The capital of France is", " Paris.", " Rome, said the fox."),
    PreferencePair("Q: What is the capital of Italy?\nA:", " Rome", " Never. No No"),
]


def _f64(lm):
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model).double().eval())


def _independent(lm, pair, names):
    """(g_w, g_l, u_w, u_l): ``.backward()`` of the HF module's own ``logits.log_softmax`` on
    ``tokenizer(prompt)`` (BOS as the tokenizer adds it) + response + EOS; flattened float64."""
    model, tok = lm.model, lm.tokenizer
    params = dict(model.named_parameters())
    out = []
    for resp in (pair.chosen, pair.rejected):
        p = list(tok(pair.prompt)["input_ids"])
        r = list(tok(resp, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        logp = model(input_ids=torch.tensor([p + r])).logits.double().log_softmax(-1)[0]
        u = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(r))
        model.zero_grad(set_to_none=True)
        u.backward()
        out.append((torch.cat([(params[n].grad if params[n].grad is not None
                                else torch.zeros_like(params[n])).double().flatten()
                               for n in names]), float(u.detach())))
    model.zero_grad(set_to_none=True)
    return out[0][0], out[1][0], out[0][1], out[1][1]


# Gemma's RMSNorm computes in float32 even in a float64 model, so its ghost norm coefficient
# (and everything downstream) is float32-precise there: 1e-6, not 1e-12.
REL = 1e-6


def _close(a, b, rel=REL):
    for f in ("inner", "norm_w_sq", "norm_l_sq", "u_w", "u_l"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=rel, atol=1e-12)


def test_ghost_equals_exact_equals_autograd_all_parameters(lm):
    lm64 = _f64(lm)
    ghost = pair_gradient_stats(lm64, PAIRS, method="ghost")
    exact = pair_gradient_stats(lm64, PAIRS, method="exact")
    assert len(ghost.params) == len({id(p) for p in lm64.model.parameters()})  # tied counted once
    _close(ghost, exact)
    for i, pair in enumerate(PAIRS):
        gw, gl, uw, ul = _independent(lm64, pair, ghost.params)
        assert float(exact.inner[i]) == pytest.approx(float(gw @ gl), rel=REL)
        assert float(exact.norm_w_sq[i]) == pytest.approx(float(gw @ gw), rel=REL)
        assert float(exact.norm_l_sq[i]) == pytest.approx(float(gl @ gl), rel=REL)
        assert float(ghost.u_w[i]) == pytest.approx(uw, rel=REL)
        assert float(ghost.u_l[i]) == pytest.approx(ul, rel=REL)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in ("all", "lora")] + ["no_norms"])
def test_every_preset_ghost_equals_exact(lm, preset):
    lm64 = _f64(lm)
    kw = dict(params=None, include_layernorm=False) if preset == "no_norms" else dict(params=preset)
    selected = select_parameters(lm64.model, **{("params" if k == "params" else k): v
                                               for k, v in kw.items()})
    if preset == "no_norms":
        owners = {id(p): m for m in lm64.model.modules() for p in m.parameters(recurse=False)}
        assert not any(_is_norm(owners[id(p)]) for p in selected.values())
    ghost = pair_gradient_stats(lm64, PAIRS[:1], method="ghost", **kw)
    exact = pair_gradient_stats(lm64, PAIRS[:1], method="exact", **kw)
    assert ghost.params == exact.params == tuple(selected)
    _close(ghost, exact)


def test_first_order_prediction_matches_one_sgd_step(lm, family):
    """Δu after one plain SGD step on one pair's DPO loss vs Yuan et al. Eqs. 3–5.

    The measured change is the central difference (u(θ − ηg) − u(θ + ηg)) / 2 of the SGD step
    and the step back, which cancels the second-order term (large on the soft-capped Gemma), and
    |Δu| ~ 1e-3 stays far above float32 rounding inside the HF norms (RMSNorm computes in fp32
    even in a float64 model). The large-logit Gemma's |u| ~ 90 carries ~1e-5 of that rounding,
    so its tolerance is 10 % (a missing soft-cap derivative would be off by far more)."""
    from preflens.dynamics.losses import weights

    lm64 = _f64(lm)
    pair = PAIRS[:1]
    stats = pair_gradient_stats(lm64, pair, method="ghost")
    lr = 1e-3 / float(torch.maximum(stats.norm_w_sq, stats.norm_l_sq)[0])
    d_w, d_l = predict_first_order(stats, "dpo", lr=lr, loss_kwargs={"beta": 1.0},
                                   u_ref_w=stats.u_w, u_ref_l=stats.u_l)
    a_w, a_l = weights("dpo", stats.u_w, stats.u_l, stats.u_w, stats.u_l, beta=1.0)
    gw, gl, _, _ = _independent(lm64, pair[0], stats.params)
    g = -(float(a_w) * gw - float(a_l) * gl)  # the loss gradient over all parameters

    def u_after(sign: float):
        moved = copy.deepcopy(lm64.model)
        named, off = dict(moved.named_parameters()), 0
        with torch.no_grad():
            for n in stats.params:
                k = named[n].numel()
                named[n].sub_(sign * lr * g[off: off + k].view_as(named[n]))
                off += k
        s = pair_gradient_stats(dataclasses.replace(lm64, model=moved), pair, method="exact",
                                params="unembed")
        return s.u_w, s.u_l

    (fw, fl), (bw, bl) = u_after(+1.0), u_after(-1.0)
    for pred, meas in ((d_w, (fw - bw) / 2), (d_l, (fl - bl) / 2)):
        assert abs(float(pred[0])) > 1e-5
        assert float(meas[0]) == pytest.approx(float(pred[0]), rel=0.1 if family == "gemma2" else 1e-2)
    # sgd_step_changes (the recipe's step-size sweep) takes the same one-sided step by itself:
    # its Δu equals u(θ − ηg) − u(θ) from the independent step above.
    d = sgd_step_changes(lm64, pair, {"dpo": ("dpo", {"beta": 1.0}, False)}, [lr])  # same default selection
    s_w, s_l = d["dpo"]
    for got, want in ((s_w, fw - stats.u_w), (s_l, fl - stats.u_l)):
        assert float(got.reshape(-1)[0]) == pytest.approx(float(want[0]), rel=1e-3, abs=1e-9)
