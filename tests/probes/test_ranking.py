"""Tests for preflens.probes.ranking (Chen et al. 2024). Expected values are derived by hand
or from closed forms (Eq. 3 crossover, Thm 4.1 monotonicity, Prop. A.7 interval), not from
the implementation's own formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from preflens.errors import ConfigError, DataError
from preflens.probes import ranking as rk

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- pairwise R
def test_summed_and_mean_disagree():
    # chosen: 1 token of log-prob -2 (sum -2, mean -2); rejected: 8 tokens of -0.5 (sum -4, mean -0.5)
    chosen_tok, rejected_tok = [-2.0], [-0.5] * 8
    s_w, s_l = sum(chosen_tok), sum(rejected_tok)
    m_w, m_l = s_w / len(chosen_tok), s_l / len(rejected_tok)
    assert rk.ranking_correct([s_w], [s_l]).tolist() == [True]      # -2 >= -4
    assert rk.ranking_correct([m_w], [m_l]).tolist() == [False]     # -2 <  -0.5
    both = rk.ranking_accuracies(SimpleNamespace(logp=torch.tensor([s_w]), mean_logp=torch.tensor([m_w])),
                                 SimpleNamespace(logp=torch.tensor([s_l]), mean_logp=torch.tensor([m_l])))
    assert both == {"summed": 1.0, "mean": 0.0}


def test_nonstrict_vs_strict_at_exact_ties():
    w, l = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0, -3.0, -2.0])
    assert rk.ranking_correct(w, l).tolist() == [True, True, False]
    assert rk.ranking_correct(w, l, strict=True).tolist() == [False, True, False]
    assert rk.ranking_accuracy(w, l) == pytest.approx(2 / 3)
    assert rk.ranking_accuracy(w, l, strict=True) == pytest.approx(1 / 3)
    assert rk.ranking_correct(w.float(), l).dtype == torch.bool


def test_pairwise_input_errors():
    with pytest.raises(DataError, match="shape"):
        rk.ranking_correct([1.0, 2.0], [1.0])
    with pytest.raises(DataError, match="NaN"):
        rk.ranking_accuracy([float("nan")], [0.0])
    with pytest.raises(DataError):
        rk.ranking_accuracy([], [])


# ----------------------------------------------------------------------------- n > 2
def _ranks_by_sorting(xs):
    desc = sorted(xs, reverse=True)
    return [desc.index(x) + 1 for x in xs]  # first position of the value = competition rank


def test_competition_ranks_with_ties():
    assert rk.competition_ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [1, 4, 1, 3]
    assert rk.competition_ranks(torch.tensor([5, 5, 5])).tolist() == [1, 1, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        xs = torch.randint(0, 4, (6,), generator=g).tolist()
        assert rk.competition_ranks(xs).tolist() == _ranks_by_sorting(xs)
    batch = torch.tensor([[1.0, 2.0, 2.0], [0.0, -1.0, 0.0]])
    assert rk.competition_ranks(batch).tolist() == [[3, 1, 1], [1, 3, 1]]
    assert rk.competition_ranks(batch).dtype == torch.long
    # tolerance: j outranks i only if s_j - s_i > tol (not transitive)
    assert rk.competition_ranks([0.0, 0.6, 1.2], tie_tol=1.0).tolist() == [2, 1, 1]


def test_multi_exact_match_and_ties():
    model = [torch.tensor([0.3, 0.1, 0.2, -1.0]),    # ranks 1 3 2 4
             torch.tensor([0.3, 0.2, 0.1, -1.0]),    # ranks 1 2 3 4
             torch.tensor([0.5, 0.4, 0.1])]          # ranks 1 2 3 (n = 3)
    human = [torch.tensor([4.0, 2.0, 3.0, 1.0]),     # ranks 1 3 2 4 -> match
             torch.tensor([4.0, 2.0, 3.0, 1.0]),     # mismatch (no partial credit)
             torch.tensor([3.0, 3.0, 1.0])]          # ranks 1 1 3 (human tie)
    correct, tied = rk.ranking_correct_multi(model, human)
    assert correct.tolist() == [True, False, False]
    assert tied.tolist() == [False, False, True]
    assert rk.ranking_accuracy_multi(model, human) == pytest.approx(1 / 3)
    assert rk.ranking_accuracy_multi(model, human, human_ties="drop") == pytest.approx(1 / 2)
    # tol 0.2: 0.5 and 0.4 tie (ranks 1 1), 0.1 is beaten by both (rank 3) -> matches human tie
    assert rk.ranking_accuracy_multi(model[2:], human[2:]) == 0.0
    assert rk.ranking_accuracy_multi(model[2:], human[2:], tie_tol=0.2) == 1.0
    # ... but tol also merges item 0's 0.3 / 0.2 / 0.1 (gaps <= 0.2) -> ranks 1 1 1 4, now wrong
    assert rk.ranking_correct_multi(model, human, tie_tol=0.2)[0].tolist() == [False, False, True]
    # 2-D tensors; n = 2 exact model tie -> ranks [1, 1] != [1, 2] -> wrong
    m2, h2 = torch.tensor([[1.0, 1.0], [2.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert rk.ranking_correct_multi(m2, h2)[0].tolist() == [False, True]
    with pytest.raises(ConfigError, match="human_ties"):
        rk.ranking_accuracy_multi(m2, h2, human_ties="ignore")
    with pytest.raises(DataError):
        rk.ranking_accuracy_multi([torch.tensor([1.0, 2.0])], [torch.tensor([1.0, 2.0, 3.0])])
    with pytest.raises(DataError):  # all items dropped
        rk.ranking_accuracy_multi([[1.0, 2.0]], [[1.0, 1.0]], human_ties="drop")


# ----------------------------------------------------------------------------- alpha from votes
def test_alpha_from_votes():
    assert rk.alpha_from_votes(["chosen", "chosen", "rejected", "chosen"]) == 0.75
    assert rk.alpha_from_votes([1, 0, 0]) == pytest.approx(1 / 3)
    tie = rk.alpha_from_votes([1, 1, 0, 0])
    assert tie == rk.TIE_ALPHA == 0.5 and rk.tie_mask(tie).item()
    # unanimous, default: loser share -> eps, odds 1/eps
    a = rk.alpha_from_votes(["chosen"] * 4, eps=1e-3)
    assert a / (1 - a) == pytest.approx(1000.0, rel=1e-9)
    a0 = rk.alpha_from_votes(["rejected"] * 4, eps=1e-3)
    assert (1 - a0) / a0 == pytest.approx(1000.0, rel=1e-9)
    # footnote 5: alpha := 1 - eps
    assert rk.alpha_from_votes([1, 1], eps=1e-3, eps_mode="one_minus_eps") == pytest.approx(0.999)
    assert rk.alpha_from_votes([0, 0], eps=1e-3, eps_mode="one_minus_eps") == pytest.approx(0.001)
    batch = rk.alphas_from_votes([["chosen", "rejected"], [1, 1, 1, 0]])
    assert batch.dtype == torch.float64 and batch.tolist() == [0.5, 0.75]
    assert rk.tie_mask(batch).tolist() == [True, False]


def test_alpha_from_votes_errors():
    with pytest.raises(DataError, match="'maybe'"):
        rk.alpha_from_votes(["chosen", "maybe"])
    with pytest.raises(DataError, match="2"):
        rk.alpha_from_votes([1, 2])
    with pytest.raises(DataError, match="1.0"):
        rk.alpha_from_votes([1.0])
    with pytest.raises(DataError, match="no votes"):
        rk.alpha_from_votes([])
    with pytest.raises(DataError):
        rk.alpha_from_votes("chosen")
    with pytest.raises(DataError, match="pair 1"):
        rk.alphas_from_votes([["chosen"], ["Chosen"]])
    with pytest.raises(ConfigError, match="eps_mode"):
        rk.alpha_from_votes([1], eps_mode="clip")
    with pytest.raises(ConfigError, match="eps"):
        rk.alpha_from_votes([1], eps=0.0)


# ----------------------------------------------------------------------------- idealized R*
def test_eq3_crossover_in_beta():
    # Delta_ref < 0: correct iff beta < logit(alpha) / (-Delta_ref)
    for delta, alpha in [(-2.0, 0.75), (-0.3, 0.6), (-40.0, 1 / 1.001)]:
        beta_star = math.log(alpha / (1 - alpha)) / (-delta)
        below = rk.idealized_ranking_correct([delta], [alpha], beta_star * (1 - 1e-9))
        above = rk.idealized_ranking_correct([delta], [alpha], beta_star * (1 + 1e-9))
        assert below.tolist() == [True] and above.tolist() == [False]
    # Delta_ref >= 0 and alpha > 0.5: correct for every beta (0 included: logit > 0)
    for beta in (1e-3, 1.0, 1e3, 1e9):
        assert rk.idealized_ranking_correct([0.0, 3.0], [0.75, 0.75], beta).tolist() == [True, True]
    # exact indifference (pi* ratio = 1) is NOT correct (strict >); beta = 1 keeps it bit-exact
    lo = math.log(0.75) - math.log1p(-0.75)
    got = rk.idealized_ranking_correct([-lo, -lo + 1e-12, -lo - 1e-12], 0.75, 1.0)
    assert got.tolist() == [False, True, False]
    # alpha < 0.5: majority prefers "rejected"; correct iff 2 - log3/beta < 0 <=> beta < log3/2
    b = math.log(3.0) / 2.0
    assert rk.idealized_ranking_correct([2.0], [0.25], b * 0.999).tolist() == [True]
    assert rk.idealized_ranking_correct([2.0], [0.25], b * 1.001).tolist() == [False]
    with pytest.raises(DataError, match="alpha"):
        rk.idealized_ranking_correct([1.0], [1.0], 1.0)
    with pytest.raises(ConfigError, match="beta"):
        rk.idealized_ranking_correct([1.0], [0.75], 0.0)


def test_idealized_accuracy_over_grid():
    delta = torch.tensor([1.0, -0.5, -5.0, -50.0, 0.3, -0.3])
    alpha = torch.tensor([0.75, 0.75, 1 / 1.001, 0.75, 0.5, 0.5])
    betas = (0.01, 0.1, 1.0, 5.0, 10.0)

    def closed_form(d, a, beta):  # Cor. 3.3 closed form for alpha > 1/2
        return d >= 0 or beta < math.log(a / (1 - a)) / (-d)

    expected = {b: sum(closed_form(float(d), float(a), b) for d, a in zip(delta[:4], alpha[:4])) / 4
                for b in betas}
    # by hand, crossovers beta* = log3/0.5 = 2.20, log1000/5 = 1.38, log3/50 = 0.022:
    # beta=0.01 -> 4/4; 0.1 and 1 -> pairs 1,2,3 -> 3/4; 5 and 10 -> pair 1 only -> 1/4
    assert [expected[b] for b in betas] == [1.0, 0.75, 0.75, 0.25, 0.25]
    out = rk.idealized_ranking_accuracy(delta, alpha, betas)
    assert out["per_beta"] == pytest.approx(expected)
    assert (out["min"], out["median"], out["max"]) == (0.25, 0.75, 1.0)
    assert out["n_pairs"] == 4 and out["n_ties"] == 2
    # ties included: default R(pi_ref) = 1[Delta_ref >= 0] -> tie pairs score [True, False]
    inc = rk.idealized_ranking_accuracy(delta, alpha, (1.0,), include_ties=True)
    assert inc["per_beta"][1.0] == pytest.approx((3 + 1) / 6)
    over = rk.idealized_ranking_accuracy(delta, alpha, (1.0,), include_ties=True,
                                         tie_correct=torch.tensor([False] * 4 + [True, True]))
    assert over["per_beta"][1.0] == pytest.approx((3 + 2) / 6)
    with pytest.raises(DataError):  # nothing left after dropping ties
        rk.idealized_ranking_accuracy([1.0], [0.5])


# ----------------------------------------------------------------------------- Theorem 4.1
@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_theorem_4_1_iff_by_sweeping_m(beta, gamma):
    # arange/100 hits 0 exactly (linspace gives -4e-17 there, below float resolution of the loss)
    m = torch.cat([torch.arange(-200, 201, dtype=torch.float64) / 100,
                   torch.tensor([-1e-6, 1e-6], dtype=torch.float64)])
    for c in (-3.0, 0.0, 0.7, 4.0):
        loss = rk.dpo_loss_value(m, torch.full_like(m, c), beta, gamma)
        thr = rk.flip_loss_threshold(c, beta, gamma)
        # independent value: -log sigmoid(beta*gamma*c)
        assert thr == pytest.approx(-math.log(1 / (1 + math.exp(-beta * gamma * c))), rel=1e-12)
        tie = dict(undetermined="tie")  # m = 0 is in the sweep: undecidable from a float loss
        assert torch.equal(rk.correct_from_dpo_loss(loss, c, beta, gamma, **tie), m >= 0)
        assert torch.equal(rk.correct_from_dpo_loss(loss, c, beta, gamma, strict=True, **tie), m > 0)
        nz = m != 0
        assert torch.equal(rk.correct_from_dpo_loss(loss[nz], c, beta, gamma), m[nz] > 0)
        at0 = rk.dpo_loss_value(0.0, c, beta, gamma)
        assert at0 == thr  # exactly at the threshold <=> m = 0 -> R = 1 under >=
        assert rk.dpo_loss_value(-1e-6, c, beta, gamma) > thr
        # loss strictly decreasing in m on the sweep
        ms, order = torch.sort(m)
        assert (torch.diff(loss[order]) < 0).all()


def test_correct_from_dpo_loss_one_ulp_at_m0_does_not_flip():
    # defect (issue 14.3): at m = 0 two loss implementations differing by 1 ulp gave opposite answers
    for c, beta in ((0.7, 1.0), (-3.0, 0.1), (4.0, 5.0)):
        thr = rk.flip_loss_threshold(c, beta)
        up, down = math.nextafter(thr, math.inf), math.nextafter(thr, -math.inf)
        with pytest.raises(DataError, match="too close"):
            rk.correct_from_dpo_loss(up, c, beta)
        got = [bool(rk.correct_from_dpo_loss(x, c, beta, undetermined="tie")) for x in (down, thr, up)]
        assert got == [True, True, True]
        got = [bool(rk.correct_from_dpo_loss(x, c, beta, strict=True, undetermined="tie"))
               for x in (down, thr, up)]
        assert got == [False, False, False]


def test_correct_from_dpo_loss_underflow_is_not_called_correct():
    # defect (issue 14.3): m = -1, c = 100, beta = 10 -> z = 990: loss and threshold both 0.0,
    # and the mis-ranked pair counted as correct
    loss = rk.dpo_loss_value(-1.0, 100.0, 10.0)
    assert loss == 0.0 and rk.flip_loss_threshold(100.0, 10.0) == 0.0
    with pytest.raises(DataError, match="underflowed"):
        rk.correct_from_dpo_loss(loss, 100.0, 10.0)
    lo, hi = rk.dpo_margin_bounds(loss, 100.0, 10.0)
    assert float(lo) < -1.0 and math.isinf(float(hi))  # the true m = -1 lies inside
    # still decidable where the interval excludes 0: z = 10*(-50 + 100) = 500, e^-500 is normal
    assert not bool(rk.correct_from_dpo_loss(rk.dpo_loss_value(-50.0, 100.0, 10.0), 100.0, 10.0))
    assert bool(rk.correct_from_dpo_loss(rk.dpo_loss_value(5.0, -60.0, 10.0), -60.0, 10.0))


def test_dpo_margin_bounds_contain_true_margin_float32():
    g = torch.Generator().manual_seed(3)
    m = (torch.rand(500, generator=g, dtype=torch.float64) - 0.5) * 40
    c = (torch.rand(500, generator=g, dtype=torch.float64) - 0.5) * 20
    loss32 = torch.nn.functional.softplus(-(0.5 * (m + c))).float()  # a float32 loss implementation
    lo, hi = rk.dpo_margin_bounds(loss32, c, 0.5)
    assert ((lo <= m) & (m <= hi)).all()
    assert ((hi - lo) < 1e-4 * (1 + m.abs() + c.abs())).all()


def test_dpo_init_and_required_decrease():
    for c in (-2.0, 0.0, 1.0, 6.0):
        assert rk.dpo_loss_value(-c, c, 0.7) == pytest.approx(LOG2, abs=1e-15)  # pi_theta = pi_ref
    assert rk.required_loss_decrease(1.0, 1.0) == pytest.approx(LOG2 - math.log1p(math.exp(-1.0)))
    assert rk.required_loss_decrease(0.0, 3.0) == 0.0
    assert rk.required_loss_decrease(-1.0, 1.0) < 0  # signed: pair already correct at init
    c = torch.tensor([-1.0, 0.5, 2.0])
    assert (torch.sign(rk.required_loss_decrease(c, 2.0)) == torch.sign(c)).all()


def test_prop_2_6_low_loss_and_correct_reference():
    g = torch.Generator().manual_seed(1)
    c = -torch.rand(2000, generator=g, dtype=torch.float64) * 5           # c <= 0
    m = (torch.rand(2000, generator=g, dtype=torch.float64) - 0.5) * 20
    beta = 0.8
    low = rk.dpo_loss_value(m, c, beta) <= 0.6
    assert low.sum() > 100 and (m[low] > 0).all()


def test_dpo_gamma_zero_threshold_is_log2():
    c = torch.tensor([-5000.0, -3.0, 0.0, 2.5, 5000.0], dtype=torch.float64)
    for beta in (0.01, 1.0, 10.0):
        assert torch.allclose(rk.flip_loss_threshold(c, beta, gamma=0.0),
                              torch.full_like(c, LOG2), atol=0, rtol=1e-15)
        assert rk.required_loss_decrease(123.0, beta, gamma=0.0) == 0.0


def test_stability_large_beta_c():
    assert rk.flip_loss_threshold(5000.0, 1.0) == 0.0             # ~e^-5000, underflows cleanly
    assert rk.flip_loss_threshold(-5000.0, 1.0) == 5000.0         # softplus(5000) = 5000 + 0
    assert rk.flip_loss_threshold(30.0, 1.0) == pytest.approx(math.exp(-30) - math.exp(-60) / 2, rel=1e-12)
    assert rk.flip_loss_threshold(-30.0, 1.0) == pytest.approx(30 + math.exp(-30), rel=1e-15)
    assert rk.dpo_loss_value(-5000.0, 0.0, 1.0) == 5000.0
    assert rk.dpo_loss_value(5000.0, 5000.0, 1.0) == 0.0
    out = rk.dpo_loss_value(torch.tensor([-1e4, 1e4]), torch.tensor([5e3, -5e3]), 2.0)
    assert torch.isfinite(out).all() and out.dtype == torch.float64
    assert rk.required_loss_decrease(5000.0, 1.0) == pytest.approx(LOG2)
    r = rk.tie_aware_correct([-5000.0, -4000.0], [-4000.0, -4000.0], [0.5, 0.5])
    assert r.tolist() == [True, True]


# ----------------------------------------------------------------------------- IPO
def test_ipo_sufficient_condition():
    tau = 0.25  # 1/(2 tau) = 2
    g = torch.Generator().manual_seed(2)
    d = torch.rand(200, generator=g, dtype=torch.float64) * 10 - 2     # d >= -1/(2 tau) = -2
    c = -d
    assert rk.ipo_guarantees_correct(c, tau).all()
    hits = 0
    for ci, di in zip(c.tolist(), d.tolist()):
        m = torch.rand(500, generator=g, dtype=torch.float64) * 40 - 20
        cc = torch.full_like(m, ci)
        ok = rk.ipo_guarantees_correct(cc, tau, loss=rk.ipo_loss_value(m, cc, tau))
        assert (m[ok] >= 0).all()
        # the bound is exactly the interval 0 <= m <= 2 (d + 1/(2 tau))
        inside = (m >= 0) & (m <= 2 * (di + 2.0))
        assert torch.equal(ok, inside)
        hits += int(ok.sum())
    assert hits > 1000
    # not necessary: correct pair (m > 0) with a loss above the bound
    assert not rk.ipo_guarantees_correct(0.0, tau, loss=rk.ipo_loss_value(10.0, 0.0, tau)).item()
    # zero-loss optimum m = d + 1/(2 tau): boundary d = -2 gives m = 0 (correct under >=)
    assert rk.ipo_guarantees_correct(2.0, tau).item()
    assert not rk.ipo_guarantees_correct(2.0 + 1e-9, tau).item()
    assert rk.ipo_loss_value(-1.0 + 2.0, 1.0, tau) == 0.0          # d = -1: m* = 1
    assert rk.ipo_loss_bound(-1.0, tau) == 9.0                     # (1 + 2)^2
    with pytest.raises(ConfigError, match="tau"):
        rk.ipo_loss_value(0.0, 0.0, -1.0)


# ----------------------------------------------------------------------------- buckets & ties
def test_flip_buckets():
    ref = torch.tensor([True, True, False, False, False, False])
    now = torch.tensor([True, False, True, False, False, True])
    out = rk.flip_buckets(ref, now)
    assert out["counts"] == {"c->c": 1, "c->i": 1, "i->c": 2, "i->i": 2}
    assert out["n"] == 6 and sum(out["fractions"].values()) == pytest.approx(1.0)
    assert out["fraction_flipped_to_correct"] == pytest.approx(2 / 6)
    assert out["fraction_flipped_to_correct_of_incorrect"] == pytest.approx(2 / 4)
    assert out["fraction_flipped_to_incorrect"] == pytest.approx(1 / 6)
    assert out["fraction_incorrect_at_start"] == pytest.approx(4 / 6)
    assert math.isnan(rk.flip_buckets([True], [False])["fraction_flipped_to_correct_of_incorrect"])
    with pytest.raises(DataError):
        rk.flip_buckets([True, False], [True])


def test_tie_aware_correct():
    s1 = torch.tensor([-1.0, -1.0, -2.0, -1.0])
    s2 = torch.tensor([-2.0, -1.0, -1.0, -1.0])
    assert rk.tie_aware_correct(s1, s2, 0.75).tolist() == [True, False, False, False]   # strict >
    assert rk.tie_aware_correct(s1, s2, 0.25).tolist() == [False, False, True, False]   # strict <
    # alpha = 0.5 in log space (nats): |diff| 0.005 < 0.01 tie; 0.02 not
    assert rk.tie_aware_correct([-1.0, -1.0], [-1.005, -1.02], 0.5, space="logprob").tolist() == [True, False]
    # probability space: |0.5 - 0.505| = 0.005 < 0.01; |0.5 - 0.52| = 0.02
    p = rk.tie_aware_correct([math.log(0.5)] * 2, [math.log(0.505), math.log(0.52)], 0.5, space="prob")
    assert p.tolist() == [True, False]
    # caveat: tiny sequence probabilities always "tie" in probability space
    assert rk.tie_aware_correct([-50.0], [-10.0], 0.5).tolist() == [True]
    assert rk.tie_aware_correct([-50.0], [-10.0], 0.5, space="logprob").tolist() == [False]
    # boundary: diff exactly tol -> tie only with tie_inclusive (0.25 is exact in binary)
    assert rk.tie_aware_correct([0.0], [-0.25], 0.5, tol=0.25, space="logprob").tolist() == [False]
    assert rk.tie_aware_correct([0.0], [-0.25], 0.5, tol=0.25, space="logprob",
                                tie_inclusive=True).tolist() == [True]
    with pytest.raises(ConfigError, match="space"):
        rk.tie_aware_correct([0.0], [0.0], 0.5, space="nats")


# ----------------------------------------------------------------------------- flip frontier
def test_flip_frontier_point_by_hand():
    # c > 0: mis-ranked at start (pairs 0, 1); c = 0 counts correct (>=); margins after training:
    # pair 0 flips to correct, 1 stays wrong, 2 stays correct, 3 flips to incorrect, 4 m = 0 stays correct.
    c = [1.0, 2.0, -1.0, -0.5, 0.0]
    m = [0.5, -1.0, 2.0, -0.1, 0.0]
    beta = 2.0
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731
    losses = [sp(-beta * (mi + ci)) for mi, ci in zip(m, c)]
    out = rk.flip_frontier_point(torch.tensor(m, dtype=torch.float64), torch.tensor(c, dtype=torch.float64), beta)
    assert out["mean_loss"] == pytest.approx(sum(losses) / 5, abs=1e-12)
    assert out["loss_drop"] == pytest.approx(LOG2 - sum(losses) / 5, abs=1e-12)
    assert out["flipped_to_correct_of_incorrect"] == 0.5
    assert out["flipped_to_incorrect_of_correct"] == pytest.approx(1 / 3)
    assert out["ranking_accuracy"] == pytest.approx(3 / 5)
    assert out["incorrect_at_start"] == pytest.approx(2 / 5)
    # median of the two mis-ranked pairs' thresholds softplus(-2), softplus(-4): their mean
    assert out["median_threshold_incorrect"] == pytest.approx((sp(-2.0) + sp(-4.0)) / 2, abs=1e-12)
    # Theorem 4.1 holds pair by pair: the flipped pair's loss is under its threshold, the other's is not
    assert losses[0] <= sp(-beta * c[0]) and losses[1] > sp(-beta * c[1])


def test_flip_frontier_point_undefined_shares_are_nan_and_at_init_the_drop_is_zero():
    c = torch.tensor([-1.0, -2.0])
    out = rk.flip_frontier_point(-c, c, 0.5)   # pi_theta = pi_ref: m = -c, loss = ln 2 everywhere
    assert out["loss_drop"] == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(out["flipped_to_correct_of_incorrect"]) and math.isnan(out["median_threshold_incorrect"])
    assert out["flipped_to_incorrect_of_correct"] == 0.0
    with pytest.raises(DataError):
        rk.flip_frontier_point([0.0, 1.0], [0.0], 1.0)
