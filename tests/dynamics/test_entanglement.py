"""First-order predictions, case labels, constructed pairs and token maps (preflens.dynamics.entanglement).

Independent references: log-probs and per-token gradients by plain autograd through HF logits
(``model(ids).logits`` log-softmax, float64, no preflens scoring code); one real SGD step on the
loss from ``losses.compute_loss`` (not ``weights``) measured by re-evaluation (finite differences).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from preflens.data import PreferencePair
from preflens.dynamics.entanglement import (
    CASES,
    case_counts,
    entanglement_case,
    last_layer_factorization,
    pair_gradient_stats,
    predict_first_order,
    token_gradient_similarity,
)
from preflens.dynamics.losses import LOSSES, compute_loss, weights
from preflens.errors import ConfigError

PAIRS = [
    PreferencePair("The capital of France is", " Paris.", " Rome, said the fox."),
    PreferencePair("Q: What is the capital of Italy?\nA:", " Rome", " Warsaw. The quick brown fox"),
    PreferencePair("Human: How do I bake bread? Assistant:", " Mix flour, water", " Never."),
]
PROMPTS = ["The capital of France is", "Q: What is the capital of Italy?\nA:",
           "Human: How do I bake bread? Assistant:"]
SUFFIX = " said the annotator, perhaps. The model assigns each response a log-probability".split(" ")


def suffix(k: int) -> str:
    return " ".join(SUFFIX[: k + 1])


@pytest.fixture(scope="module")
def lm64(tiny):
    return dataclasses.replace(tiny, model=copy.deepcopy(tiny.model).double().eval())


def ids_of(lm, prompt, response, eos=True):
    p = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = lm.tokenizer(response, add_special_tokens=False)["input_ids"] + ([lm.eos_id] if eos else [])
    return p, r


def token_lps(lm, prompt, response):
    """[R] float64 per-token log-probs through plain HF logits (differentiable)."""
    p, r = ids_of(lm, prompt, response)
    logp = torch.log_softmax(lm.model(torch.tensor([p + r])).logits[0].double(), -1)
    return torch.stack([logp[len(p) - 1 + k, t] for k, t in enumerate(r)])


def measured_step(lm, pair, loss, etas, u_ref, kw=None):
    """One plain-SGD step θ − η∇ℓ on this pair alone (|B| = 1) for each η; returns [(Δu_w, Δu_l)]."""
    params = [p for p in lm.model.parameters()]
    lw = torch.tensor([float(len(ids_of(lm, pair.prompt, pair.chosen)[1]))], dtype=torch.float64)
    ll = torch.tensor([float(len(ids_of(lm, pair.prompt, pair.rejected)[1]))], dtype=torch.float64)
    u_w, u_l = token_lps(lm, pair.prompt, pair.chosen).sum(), token_lps(lm, pair.prompt, pair.rejected).sum()
    ell = compute_loss(loss, u_w[None], u_l[None], u_ref[0], u_ref[1], lw, ll, **(kw or {}))[0]
    grads = torch.autograd.grad(ell, params)
    theta0 = [p.detach().clone() for p in params]
    out = []
    with torch.no_grad():
        for eta in etas:
            for p, t0, g in zip(params, theta0, grads):
                p.copy_(t0 - eta * g)
            out.append((token_lps(lm, pair.prompt, pair.chosen).sum().item() - u_w.item(),
                        token_lps(lm, pair.prompt, pair.rejected).sum().item() - u_l.item()))
        for p, t0 in zip(params, theta0):
            p.copy_(t0)
    return out


@pytest.fixture(scope="module")
def stats(lm64):
    return pair_gradient_stats(lm64, PAIRS, method="exact")


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_first_order_prediction_matches_sgd_step(lm64, stats, loss):
    """Spec §1/§3: Δu ≈ η(a_w n_w² − a_l ip), η(a_w ip − a_l n_l²); error shrinks ~linearly in η."""
    u_ref_w = stats.u_w + torch.tensor([0.3, -0.4, 0.5], dtype=torch.float64)
    u_ref_l = stats.u_l + torch.tensor([-0.2, 0.6, 0.1], dtype=torch.float64)
    a_w, a_l = weights(loss, stats.u_w, stats.u_l, u_ref_w, u_ref_l, stats.len_w.double(),
                       stats.len_l.double())
    scale = a_w.abs() * stats.norm_w_sq + a_l.abs() * stats.norm_l_sq + (a_w.abs() + a_l.abs()) * stats.inner.abs()
    assert (scale > 0).all(), "every pair must have an active loss here"
    eta0 = 2e-3 / scale.max().item()
    errs = []
    for eta in (eta0, eta0 / 4):
        dw, dl = predict_first_order(stats, loss, lr=eta, u_ref_w=u_ref_w, u_ref_l=u_ref_l)
        errs.append((dw, dl))
    for i, pair in enumerate(PAIRS):
        steps = measured_step(lm64, pair, loss, (eta0, eta0 / 4), (u_ref_w[i:i + 1], u_ref_l[i:i + 1]))
        rel = []
        for (mw, ml), (dw, dl), eta in zip(steps, errs, (eta0, eta0 / 4)):
            rel.append(max(abs(mw - dw[i].item()), abs(ml - dl[i].item())) / (eta * scale[i].item()))
        assert rel[0] < 0.03, (loss, i, rel)
        assert rel[1] < 0.4 * rel[0] + 1e-7, (loss, i, rel)  # first order: error ∝ η


def test_dpo_closed_form(stats):
    """Yuan et al. Eqs. 3–5: C = ηβσ(−βM); Δu_w = C(n_w² − ip), Δu_l = C(ip − n_l²), Δmargin = C‖g_w − g_l‖²."""
    ref_w, ref_l = stats.u_w - 0.7, stats.u_l + 0.2
    dw, dl = predict_first_order(stats, "dpo", lr=0.01, loss_kwargs={"beta": 0.5},
                                 u_ref_w=ref_w, u_ref_l=ref_l)
    c = 0.01 * 0.5 * torch.sigmoid(torch.tensor(-0.5 * 0.9, dtype=torch.float64))
    assert torch.allclose(dw, c * (stats.norm_w_sq - stats.inner), rtol=1e-13)
    assert torch.allclose(dl, c * (stats.inner - stats.norm_l_sq), rtol=1e-13)
    assert ((dw - dl) >= 0).all()
    assert torch.allclose(dw - dl, c * (stats.norm_w_sq + stats.norm_l_sq - 2 * stats.inner), rtol=1e-12)
    with pytest.raises(ConfigError):
        predict_first_order(stats, "dpo", lr=0.01)  # DPO needs reference log-probs


def test_case_labels_and_counts(stats):
    labels = entanglement_case(torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 2.0]),
                               torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0, -1.0, 0.0]))
    assert labels == ["ideal", "both_down", "both_up", "chosen_down_rejected_up", "zero_weight",
                      "both_down", "both_up"]  # an exact 0 counts as the unfavourable direction
    counts = case_counts(labels)
    assert list(counts) == list(CASES) and sum(counts.values()) == len(labels)
    assert counts["both_down"] == 2 and counts["zero_weight"] == 1
    with pytest.raises(ConfigError):
        case_counts(["nope"])
    # inactive hinge (βM ≥ 1): zero weights -> "zero_weight"
    ref_w, ref_l = stats.u_w - 20.0, stats.u_l + 20.0
    a_w, a_l = weights("hinge", stats.u_w, stats.u_l, ref_w, ref_l)
    dw, dl = predict_first_order(stats, "hinge", lr=1.0, u_ref_w=ref_w, u_ref_l=ref_l)
    assert entanglement_case(dw, dl, a_w=a_w, a_l=a_l) == ["zero_weight"] * len(PAIRS)


def test_chosen_down_rejected_up_impossible_with_positive_weights():
    """Spec §1: needs ip > max(ρn_w², n_l²/ρ) ≥ n_w n_l, impossible for a_w, a_l > 0 and |cos| ≤ 1."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    nw, nl = torch.rand(n, generator=g, dtype=torch.float64) * 10, torch.rand(n, generator=g, dtype=torch.float64) * 10
    cos = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    cos[:100] = 1.0
    a_w, a_l = torch.rand(n, generator=g, dtype=torch.float64) * 5, torch.rand(n, generator=g, dtype=torch.float64) * 5
    ip = cos * nw * nl
    labels = entanglement_case(a_w * nw**2 - a_l * ip, a_w * ip - a_l * nl**2)
    assert "chosen_down_rejected_up" not in labels
    # Table 1 (DPO, a_w = a_l): case from the signs == case from ip vs n_w², n_l²
    dpo = entanglement_case(nw**2 - ip, ip - nl**2)
    table = ["ideal" if i < min(w2, l2) else "both_down" if w2 <= i < l2 else "both_up" if l2 < i <= w2
             else "?" for i, w2, l2 in zip(ip.tolist(), (nw**2).tolist(), (nl**2).tolist())]
    assert dpo == table


def test_constructed_pairs_suffix_entanglement(lm64):
    """Spec §6: cos rises with a shared suffix; suffix-dominated with κ > 1 (rejected carries the
    suffix twice) is case 2 (both down), κ < 1 case 3 (both up); predicted labels = measured signs."""
    def stats_for(chosen_sfx, rejected_sfx):
        pairs = [PreferencePair(p, " Paris" + chosen_sfx, " Rome" + rejected_sfx) for p in PROMPTS]
        return pairs, pair_gradient_stats(lm64, pairs)

    mean_cos = [stats_for(suffix(k), suffix(k))[1].cos.mean().item() for k in (0, 2, 10)]
    assert mean_cos[0] < mean_cos[1] < mean_cos[2]
    one_token = stats_for("", "")[1]
    assert (one_token.cos < stats_for(suffix(10), suffix(10))[1].cos).all()
    for (cw, cl), want in (((suffix(6), suffix(6) + suffix(6)), "both_down"),
                           ((suffix(6) + suffix(6), suffix(6)), "both_up")):
        pairs, s = stats_for(cw, cl)
        dw, dl = predict_first_order(s, "dpo", lr=1.0, u_ref_w=s.u_w, u_ref_l=s.u_l)
        labels = entanglement_case(dw, dl)
        assert labels == [want] * len(pairs)
        cond = (s.inner > s.norm_w_sq) & (s.inner < s.norm_l_sq) if want == "both_down" else \
            (s.inner > s.norm_l_sq) & (s.inner < s.norm_w_sq)
        assert cond.all()  # Table 1 inequalities
        eta = 1e-3 / (0.05 * (s.norm_w_sq + s.norm_l_sq).max().item())
        mw, ml = measured_step(lm64, pairs[0], "dpo", (eta,), (s.u_w[:1], s.u_l[:1]))[0]
        assert entanglement_case(torch.tensor([mw]), torch.tensor([ml])) == [want]


def test_single_token_learnable_logits_always_ideal(lm64):
    """Spec §6: one-token responses, same context, gradient of the logits' linear map (untied copy's
    lm_head): ip = ‖h‖²(‖π‖² − π_a − π_b) and ip − n_w² = −‖h‖²(1 − π_a + π_b) < 0 ⇒ case 1."""
    model = copy.deepcopy(lm64.model)
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    lm = dataclasses.replace(lm64, model=model)
    pairs = [PreferencePair(p, " Paris", " Rome") for p in PROMPTS] + \
        [PreferencePair(p, " Yes", " Never") for p in PROMPTS]
    s = pair_gradient_stats(lm, pairs, params=["lm_head.weight"], add_eos=False, method="exact")
    for i, pair in enumerate(pairs):
        p, (a,) = ids_of(lm, pair.prompt, pair.chosen, eos=False)
        _, (b,) = ids_of(lm, pair.prompt, pair.rejected, eos=False)
        with torch.no_grad():
            h = model.transformer(torch.tensor([p])).last_hidden_state[0, -1]
            pi = torch.softmax(model.lm_head(h), -1)
        hh = (h @ h).item()
        assert s.inner[i].item() == pytest.approx(hh * ((pi @ pi) - pi[a] - pi[b]).item(), rel=1e-10)
        assert (s.inner[i] - s.norm_w_sq[i]).item() == pytest.approx(-hh * (1 - pi[a] + pi[b]).item(), rel=1e-10)
    dw, dl = predict_first_order(s, "dpo", lr=1.0, u_ref_w=s.u_w, u_ref_l=s.u_l)
    assert entanglement_case(dw, dl) == ["ideal"] * len(pairs)


def per_token_grads(lm, prompt, response, params):
    lps = token_lps(lm, prompt, response)
    return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(lp, params, retain_graph=True)])
                        for lp in lps])


def test_token_similarity_matches_direct_and_sums_to_ip(lm64, stats):
    for i, pair in enumerate(PAIRS[:2]):
        sim = token_gradient_similarity(lm64, pair)
        params = list(lm64.model.parameters())
        gw, gl = per_token_grads(lm64, pair.prompt, pair.chosen, params), \
            per_token_grads(lm64, pair.prompt, pair.rejected, params)
        assert sim.inner.shape == (len(sim.tokens_w), len(sim.tokens_l)) == (gw.shape[0], gl.shape[0])
        assert torch.allclose(sim.inner, gw @ gl.T, rtol=1e-10, atol=1e-10)
        direct_cos = (gw @ gl.T) / (gw.norm(dim=1)[:, None] * gl.norm(dim=1)[None, :])
        assert torch.allclose(sim.cos, direct_cos, rtol=1e-10, atol=1e-12)
        assert sim.inner.sum().item() == pytest.approx(stats.inner[i].item(), rel=1e-10)
    last = token_gradient_similarity(lm64, PAIRS[0], params="last_block")
    s_last = pair_gradient_stats(lm64, PAIRS[:1], params="last_block", method="exact")
    assert last.inner.sum().item() == pytest.approx(s_last.inner[0].item(), rel=1e-10)


def test_shared_response_prefix_tokens_have_identical_gradients(lm64):
    """Spec §6 (2): tokens of a shared response prefix have exactly equal per-token gradients."""
    pair = PreferencePair("The capital of France is", " The quick brown fox", " The quick lazy dog")
    sim = token_gradient_similarity(lm64, pair)
    shared = 0
    for t, (a, b) in enumerate(zip(sim.tokens_w, sim.tokens_l)):
        if a != b:
            break
        shared += 1
        assert sim.cos[t, t].item() == pytest.approx(1.0, abs=1e-12)
        assert sim.inner[t, t].item() == pytest.approx(sim.norm_w[t].item() ** 2, rel=1e-12)
    assert shared >= 2
    assert sim.cos[shared, shared].item() < 1 - 1e-6


@pytest.mark.parametrize("bias", [False, True])
def test_last_layer_factorization_matches_autograd(lm64, bias):
    """cos_last = cos(h,h')·cos(δ,δ') equals the per-token gradient cosine of an untied lm_head
    (weight, and bias: (⟨h,h'⟩ + 1)⟨δ,δ'⟩) computed by autograd."""
    model = copy.deepcopy(lm64.model)
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    if bias:
        model.lm_head.bias = torch.nn.Parameter(0.3 * torch.randn(model.lm_head.weight.shape[0],
                                                                  dtype=torch.float64))
    untied = dataclasses.replace(lm64, model=model)
    pair = PAIRS[1]
    params = [model.lm_head.weight] + ([model.lm_head.bias] if bias else [])
    gw = per_token_grads(untied, pair.prompt, pair.chosen, params)
    gl = per_token_grads(untied, pair.prompt, pair.rejected, params)
    direct = (gw @ gl.T) / (gw.norm(dim=1)[:, None] * gl.norm(dim=1)[None, :])
    hid, res, cos = last_layer_factorization(untied, pair)
    assert torch.allclose(cos, direct, rtol=1e-10, atol=1e-12)
    assert torch.allclose(cos, hid * res, rtol=1e-14)
    if not bias:  # the tied original has the same h, W: same factorization
        assert torch.allclose(last_layer_factorization(lm64, pair)[2], direct, rtol=1e-10, atol=1e-12)
        p, r = ids_of(untied, pair.prompt, pair.chosen)
        with torch.no_grad():
            h = model.transformer(torch.tensor([p + r])).last_hidden_state[0, len(p) - 1: len(p) + len(r) - 1]
        hc = (h @ h.T) / (h.norm(dim=1)[:, None] * h.norm(dim=1)[None, :])
        hid_ww = last_layer_factorization(untied, PreferencePair(pair.prompt, pair.chosen, pair.chosen + "!"))[0]
        assert torch.allclose(hid_ww[:, : len(r)], hc, rtol=1e-10, atol=1e-12)
