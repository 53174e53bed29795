"""Tests for preflens.probes.displacement.

Theorem checks (Razin et al. 2024, Thms 4, 5, 6, 8, Prop. 1, W-only) use the unconstrained
features model π(·|prefix) = softmax(W h_prefix), float64, one plain SGD step of size η: the
finite-difference rate (ln π_after − ln π_before)/η is compared with the closed forms written
out independently below.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from preflens.probes.displacement import (
    DisplacementTracker,
    overlap_at_k,
    peak_to_trough_drop,
    top_gaining_tokens,
    unembedding_alignment,
    unembedding_geometry,
)

DT = torch.float64


# --------------------------------------------------------------------------- toy model helpers
def loss_fn(kind, u, u_ref, coef):
    """ℓ(u): DPO −ln σ(β(u − u_ref)) or IPO (u − u_ref − 1/(2τ))²."""
    if kind == "dpo":
        return -F.logsigmoid(coef * (u - u_ref))
    return (u - u_ref - 1.0 / (2 * coef)) ** 2


def loss_prime(kind, u, u_ref, coef):
    """ℓ′(u) written out by hand (spec §5)."""
    if kind == "dpo":
        return -coef * torch.sigmoid(coef * (u_ref - u))
    return 2 * (u - u_ref - 1.0 / (2 * coef))


def sgd_step(params, loss, lr):
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g


def random_single(seed, V=12, d=6, h_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g, dtype=DT).requires_grad_()
    h = (h_scale * torch.randn(d, generator=g, dtype=DT)).requires_grad_()
    return W, h


def single_rates(W0, h0, pos, neg, kind, coef, u_ref, lr, train_h=True):
    """Finite-difference d/dt ln π(z|x) for every z after one SGD step of the single-token loss."""
    W, h = W0.detach().clone().requires_grad_(), h0.detach().clone().requires_grad_()
    lp0 = torch.log_softmax(W @ h, -1)
    loss = loss_fn(kind, lp0[pos] - lp0[neg], u_ref, coef)
    sgd_step([W, h] if train_h else [W], loss, lr)
    with torch.no_grad():
        lp1 = torch.log_softmax(W @ h, -1)
    return ((lp1 - lp0) / lr).detach()


def thm4_rate(W, h, pos, neg, lprime):
    W, h = W.detach(), h.detach()
    p = torch.softmax(W @ h, -1)
    wp, wn = W[pos], W[neg]
    others = [z for z in range(W.shape[0]) if z not in (pos, neg)]
    m = (1 - p[pos]) * wp @ wp + p[neg] * wn @ wn + (1 - p[pos] + p[neg]) * h @ h
    align = sum(p[z] * W[z] @ (wp - wn) for z in others)
    return -lprime * (m - (1 - p[pos] + p[neg]) * wp @ wn - align)


def thm5_rates(W, h, pos, neg, lprime):
    W, h = W.detach(), h.detach()
    p = torch.softmax(W @ h, -1)
    diff = W[pos] - W[neg]
    c = (p[neg] - p[pos]) * h @ h - (p * (W @ diff)).sum()
    return -lprime * (W @ diff + c)


# --------------------------------------------------------------------------- Theorem 4
@pytest.mark.parametrize("kind,coef", [("dpo", 0.1), ("dpo", 2.0), ("ipo", 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem4_single_token_rate(kind, coef, seed):
    W, h = random_single(seed)
    pos, neg = 3, 7
    with torch.no_grad():
        lp = torch.log_softmax(W @ h, -1)
        u = lp[pos] - lp[neg]
    u_ref = u - 0.3  # policy already moved away from the reference
    predicted = thm4_rate(W, h, pos, neg, loss_prime(kind, u, u_ref, coef))
    errs = []
    for lr in (1e-3, 1e-4, 1e-5):
        rate = single_rates(W, h, pos, neg, kind, coef, u_ref, lr)[pos]
        errs.append(abs(rate - predicted).item() / abs(predicted).item())
    assert errs[-1] < 1e-3
    assert errs[-1] < errs[0] / 10 or errs[0] < 1e-8  # error shrinks with η (first order)


# --------------------------------------------------------------------------- Theorem 5
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_theorem5_ordering_and_value(seed):
    W, h = random_single(seed, V=16, d=5)
    pos, neg, beta = 2, 9, 0.5
    rates = single_rates(W, h, pos, neg, "dpo", beta, torch.tensor(0.0, dtype=DT), 1e-6)
    with torch.no_grad():
        lp = torch.log_softmax(W @ h, -1)
    lprime = loss_prime("dpo", lp[pos] - lp[neg], torch.tensor(0.0, dtype=DT), beta)
    predicted = thm5_rates(W, h, pos, neg, lprime)
    others = torch.tensor([z for z in range(W.shape[0]) if z not in (pos, neg)])
    scale = predicted[others].abs().max()
    assert torch.allclose(rates[others], predicted[others], rtol=0, atol=1e-4 * scale)
    # the library's alignment (TransformerLens convention W_U = Wᵀ) gives the exact order
    align = unembedding_alignment(W.detach().T, pos, neg)
    assert torch.equal(torch.argsort(rates[others]), torch.argsort(align[others]))
    assert overlap_at_k(align, rates, k=5, exclude=(pos, neg)) == 5


# --------------------------------------------------------------------------- W-only training
def test_w_only_training_never_displaces():
    W, h = random_single(11, V=10, d=4)
    pos, neg, beta = 1, 4, 1.0
    with torch.no_grad():
        lp = torch.log_softmax(W @ h, -1)
        u_ref = lp[pos] - lp[neg]
    lprime = loss_prime("dpo", lp[pos] - lp[neg], u_ref, beta)
    p = lp.exp()
    predicted = -lprime * (1 - p[pos] + p[neg]) * (h @ h)
    rate = single_rates(W, h, pos, neg, "dpo", beta, u_ref, 1e-6, train_h=False)[pos]
    assert predicted > 0
    assert abs(rate - predicted) < 1e-3 * predicted
    # and over a long run with a large step ln π+ increases at every step
    W2 = W.detach().clone().requires_grad_()
    traj = []
    for _ in range(150):
        lp = torch.log_softmax(W2 @ h.detach(), -1)
        traj.append(lp[pos].exp().item())
        sgd_step([W2], loss_fn("dpo", lp[pos] - lp[neg], u_ref, beta), 0.2)
    assert all(np.diff(traj) > 0)
    assert peak_to_trough_drop(traj) == 0.0


# --------------------------------------------------------------------------- Theorem 6
def seq_logprob(W, H, prefix_key, y):
    return sum(torch.log_softmax(W @ H[prefix_key(y[:k])], -1)[y[k]] for k in range(len(y)))


def test_theorem6_multi_token_rate():
    g = torch.Generator().manual_seed(7)
    V, d, beta = 9, 5, 0.7
    y_pos, y_neg = (2, 5, 5, 1), (4, 2, 8)  # y+_1 ≠ y-_1
    key = lambda pre: "x" + "".join(f"_{t}" for t in pre)  # noqa: E731
    prefixes = {key(y[:k]) for y in (y_pos, y_neg) for k in range(len(y))}
    W = torch.randn(V, d, generator=g, dtype=DT).requires_grad_()
    H = {k: torch.randn(d, generator=g, dtype=DT).requires_grad_() for k in sorted(prefixes)}
    params = [W] + [H[k] for k in sorted(prefixes)]

    lp_pos = seq_logprob(W, H, key, y_pos)
    lp_neg = seq_logprob(W, H, key, y_neg)
    u = lp_pos - lp_neg
    u_ref = u.detach() + 0.2
    lprime = loss_prime("dpo", u.detach(), u_ref, beta)

    # independent closed form (Theorem 6)
    with torch.no_grad():
        Wd = W.detach()
        hp = [H[key(y_pos[:k])].detach() for k in range(len(y_pos))]
        hn = [H[key(y_neg[:k])].detach() for k in range(len(y_neg))]
        pp = [torch.softmax(Wd @ h, -1) for h in hp]
        pn = [torch.softmax(Wd @ h, -1) for h in hn]
        e = torch.eye(V, dtype=DT)
        gp = [e[y_pos[k]] - pp[k] for k in range(len(y_pos))]
        gn = [e[y_neg[k]] - pn[k] for k in range(len(y_neg))]
        a, b = y_pos[0], y_neg[0]
        px = pp[0]
        m = (1 - px[a]) * Wd[a] @ Wd[a] + px[b] * Wd[b] @ Wd[b]
        for k in range(1, len(y_pos)):
            v = Wd[y_pos[k]] - pp[k] @ Wd
            m = m + v @ v
        S = -(1 - px[a] + px[b]) * Wd[a] @ Wd[b]
        S = S - sum(px[z] * Wd[z] @ (Wd[a] - Wd[b]) for z in range(V) if z not in (a, b))
        Kp, Kn = range(len(hp)), range(len(hn))
        cross = sum((gp[k] @ gn[j]) * (hp[k] @ hn[j]) for k in Kp for j in Kn)  # α⁻ terms
        self_ = sum((gp[k] @ gp[j]) * (hp[k] @ hp[j]) for k in Kp for j in Kp)  # α⁺ terms
        predicted = -lprime * (m + S - cross + self_)

    lr = 1e-6
    sgd_step(params, loss_fn("dpo", u, u_ref, beta), lr)
    with torch.no_grad():
        rate = (seq_logprob(W, H, key, y_pos) - lp_pos.detach()) / lr
    assert abs(rate - predicted) < 1e-3 * abs(predicted)


# --------------------------------------------------------------------------- Theorem 8, Prop. 1
def test_theorem8_other_samples_and_prop1_sft():
    g = torch.Generator().manual_seed(5)
    V, d, beta = 8, 4, 1.0
    W = torch.randn(V, d, generator=g, dtype=DT).requires_grad_()
    hx = torch.randn(d, generator=g, dtype=DT).requires_grad_()
    hy = torch.randn(d, generator=g, dtype=DT).requires_grad_()
    (p1, n1), (p2, n2) = (0, 3), (3, 5)  # the second sample prefers the first's y-
    lp_x, lp_y = torch.log_softmax(W @ hx, -1), torch.log_softmax(W @ hy, -1)
    u1, u2 = lp_x[p1] - lp_x[n1], lp_y[p2] - lp_y[n2]
    ref1, ref2 = u1.detach() - 0.1, u2.detach() + 0.4
    l1 = loss_prime("dpo", u1.detach(), ref1, beta)
    l2 = loss_prime("dpo", u2.detach(), ref2, beta)
    with torch.no_grad():
        px = lp_x.exp()
        alpha = float(p1 == p2) - float(p1 == n2) + px[n2] - px[p2]
        predicted = thm4_rate(W, hx, p1, n1, l1) / 2 + (-l2 / 2) * alpha * (hx @ hy)
    loss = (loss_fn("dpo", u1, ref1, beta) + loss_fn("dpo", u2, ref2, beta)) / 2
    lam, lr = 0.3, 1e-6
    # Prop. 1: adding −λ ln π(y+|x) adds λ‖∇ ln π(y+|x)‖²
    grad_lp = torch.autograd.grad(lp_x[p1], [W, hx], retain_graph=True)  # no hy dependence
    sft_extra = lam * sum((gg**2).sum() for gg in grad_lp)
    for extra, target in ((0.0, predicted), (lam, predicted + sft_extra)):
        W2, hx2, hy2 = (t.detach().clone().requires_grad_() for t in (W, hx, hy))
        a, b = torch.log_softmax(W2 @ hx2, -1), torch.log_softmax(W2 @ hy2, -1)
        l_x = loss_fn("dpo", a[p1] - a[n1], ref1, beta)
        total = (l_x + loss_fn("dpo", b[p2] - b[n2], ref2, beta)) / 2
        total = total - extra * a[p1]
        sgd_step([W2, hx2, hy2], total, lr)
        with torch.no_grad():
            rate = (torch.log_softmax(W2 @ hx2, -1)[p1] - a[p1]) / lr
        assert abs(rate - target) < 1e-3 * abs(target) + 1e-6
    assert torch.isfinite(loss)


# --------------------------------------------------------------------- hand-built displacement
# <W+, W-> = 2 > ||W+||^2 = 1; token 2 is "opposite": aligned with W+ - W- = (-1, 0)
W_HAND = ((1.0, 0.0), (2.0, 0.0), (-2.0, 0.0), (0.0, 1.0), (0.0, -1.0))


def _train_toy(freeze_h, steps=200, lr=0.05):
    W = torch.tensor(W_HAND, dtype=DT, requires_grad=True)
    h = torch.tensor([0.1, 0.0], dtype=DT, requires_grad=True)
    pos, neg = 0, 1
    with torch.no_grad():
        lp = torch.log_softmax(W @ h, -1)
        u_ref = lp[pos] - lp[neg]
    probs, losses, modes = [], [], []
    for t in range(steps + 1):
        lp = torch.log_softmax(W @ h, -1)
        loss = loss_fn("dpo", lp[pos] - lp[neg], u_ref, 1.0)
        probs.append(lp[pos].exp().item())
        losses.append(loss.item())
        modes.append(int(lp.argmax()))
        if t < steps:
            sgd_step([W] if freeze_h else [W, h], loss, lr)
    return probs, losses, modes, W.detach()


def test_hand_built_displacement_and_frozen_h():
    probs, losses, modes, W_end = _train_toy(freeze_h=False)
    assert all(np.diff(losses) < 0)  # loss falls monotonically ...
    drop = peak_to_trough_drop(probs)
    assert drop > 0.1  # ... while π(y+) falls
    assert probs[-1] < probs[0]
    assert modes[-1] == 2  # the opposite token becomes the mode
    geo = unembedding_geometry(torch.tensor(W_HAND, dtype=DT).T, 0, 1)
    assert geo["signed_projection"] < 0  # Theorem-4 risk: <W+,W-> > ||W+||^2
    probs_f, losses_f, _, _ = _train_toy(freeze_h=True)
    assert all(np.diff(losses_f) < 0)
    assert peak_to_trough_drop(probs_f) == 0.0
    assert probs_f[-1] > probs_f[0]


# --------------------------------------------------------------------------- pure helpers
def test_peak_to_trough_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.random(rng.integers(1, 30))
        brute = max([0.0] + [x[i] - x[j] for i in range(len(x)) for j in range(i + 1, len(x))])
        assert math.isclose(peak_to_trough_drop(x), brute, abs_tol=1e-15)
    assert peak_to_trough_drop([0.1, 0.2, 0.3]) == 0.0
    assert math.isclose(peak_to_trough_drop([0.5, 0.9, 0.2, 0.8, 0.1]), 0.8)
    assert peak_to_trough_drop(torch.tensor([0.3])) == 0.0


def test_unembedding_geometry_by_hand():
    W_U = torch.tensor([[3.0, 1.0, 0.0], [4.0, 2.0, 1.0]], dtype=DT)  # [d=2, V=3]
    g = unembedding_geometry(W_U, 0, 1)
    wp, wn = np.array([3.0, 4.0]), np.array([1.0, 2.0])
    inner = wp @ wn
    assert math.isclose(g["norm_pos"], 5.0) and math.isclose(g["inner"], inner)
    assert math.isclose(g["norm_neg"], math.sqrt(5))
    assert math.isclose(g["proj_coef"], inner / 5)
    assert math.isclose(g["signed_projection"], 5 - inner / 5)
    d = wp - wn
    orth = d - (d @ wp) / (wp @ wp) * wp
    assert math.isclose(g["orthogonal_norm"], np.linalg.norm(orth))
    a = unembedding_alignment(W_U, 0, 1)
    assert torch.allclose(a, torch.tensor(W_U.T.numpy() @ d))


def test_top_gaining_tokens_and_overlap():
    p0 = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05], dtype=DT)
    p1 = torch.tensor([0.1, 0.3, 0.3, 0.25, 0.05], dtype=DT)
    out = top_gaining_tokens(p0, p1, k=2)
    ids, deltas = out["by_prob"]
    assert ids.tolist() == [3, 2] and torch.allclose(deltas, torch.tensor([0.2, 0.1], dtype=DT))
    ids, deltas = out["by_logprob"]
    assert ids.tolist() == [3, 2]
    assert math.isclose(deltas[0].item(), math.log(5))
    assert math.isclose(deltas[1].item(), math.log(1.5))
    out_log = top_gaining_tokens(p0.log(), p1.log(), k=2, log_space=True)
    assert out_log["by_logprob"][0].tolist() == [3, 2]
    align = torch.tensor([9.0, 1.0, 5.0, 4.0, 3.0, 2.0])
    change = torch.tensor([0.0, 9.0, 5.0, 1.0, 4.0, 3.0])
    assert overlap_at_k(align, change, k=3) == 1  # {0,2,3} ∩ {1,2,4}
    assert overlap_at_k(align, change, k=4) == 2  # {0,2,3,4} ∩ {1,2,4,5}
    assert overlap_at_k(align, change, k=2, exclude=(0, 1)) == 1  # {2,3} ∩ {2,4}


# --------------------------------------------------------------------------- tracker on tiny-random
def test_tracker_records_scoring_logprobs():
    import preflens.models as models
    import preflens.scoring as scoring
    from preflens.data import PreferencePair

    lm = models.load_model("tiny-random")
    tok = lm.tokenizer
    single = [
        t for t in ("a", "b", "c", "d", "e", "x", "y")
        if len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    ]
    pairs = [
        PreferencePair(prompt="Question: is it?", chosen=single[0], rejected=single[1]),
        PreferencePair(prompt="Another longer prompt here", chosen="yes it is fine", rejected="no"),
    ]
    policy = lm.model
    tracker = DisplacementTracker(lm, pairs, every=2)
    assert tracker.single_token_pairs == [0]
    tracker.record(policy, 0)
    policy.train()
    opt = torch.optim.SGD(policy.parameters(), lr=1e-2)
    state = SimpleNamespace(step=0, policy=policy, lm=lm, metrics={})
    enc = scoring.encode(tok, [p.prompt for p in pairs], [p.chosen for p in pairs])
    batch = scoring.collate(enc, pad_id=tok.eos_token_id)
    for step in range(1, 4):
        opt.zero_grad()
        (-scoring.token_logprobs(policy, batch).sum()).backward()
        opt.step()
        state.step, state.metrics = step, {}
        tracker.on_step(state)
        assert policy.training  # train mode restored
        if step == 2:
            assert "displacement/mean_logp_chosen" in state.metrics
    tracker.on_end(state)
    assert tracker.steps == [0, 2, 3]
    last = tracker.history[-1]
    policy.eval()
    prompts, chosen = [p.prompt for p in pairs], [p.chosen for p in pairs]
    ref = scoring.response_logprobs(lm, prompts, chosen, batch_size=1)
    assert np.allclose(last["logp_chosen"], ref.logp.tolist(), atol=1e-4)
    dist = last["next_token_logprobs"]
    assert dist.shape == (1, lm.vocab_size)
    assert abs(torch.logsumexp(dist[0].double(), -1).item()) < 1e-4
    first_id = tok(single[0], add_special_tokens=False)["input_ids"][0]
    assert math.isclose(last["first_logp_chosen"][0], dist[0, first_id].item(), abs_tol=1e-6)
    # the distribution sits at the last prompt position: it gives the first response token's
    # log-prob, and adding the EOS term gives the summed log-prob (EOS counted)
    assert math.isclose(last["first_logp_chosen"][0], ref.token_logprobs[0, 0].item(), abs_tol=1e-4)
    with_eos = last["first_logp_chosen"][0] + ref.token_logprobs[0, 1].item()
    assert math.isclose(with_eos, last["logp_chosen"][0], abs_tol=1e-4)
    traj = tracker.prob_trajectory(0)
    assert len(traj) == 3 and traj[-1] > traj[0]  # SFT on y+ raises π(y+|x)
    d = tracker.to_dict()
    assert "next_token_logprobs" not in d["history"][0]
    full = tracker.to_dict(include_distributions=True)
    assert len(full["history"][0]["next_token_logprobs"][0]) == lm.vocab_size
