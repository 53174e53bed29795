"""Tests for preflens.dynamics.losses: analytic weights vs autograd, closed-form values vs an
independent scalar (math-module) implementation, optima, numerics, and configuration errors."""

from __future__ import annotations

import math

import pytest
import torch

from preflens.dynamics.losses import LOSSES, compute_loss, get_loss, resolve_kwargs, weights
from preflens.errors import ConfigError

N = 96
# Non-default parameters where the defaults would leave a branch untested (hinge at β = 0.1 is
# always active for margins of a few nats).
TEST_KW = {"hinge": {"beta": 1.0}, "dpop": {"lam": 2.0}, "kto_paired": {"z0": 0.3},
           "dpo_gamma": {"gamma": 0.6}, "rdpo": {"alpha": 0.05}}


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    len_w = torch.randint(1, 30, (N,), generator=g).double()
    len_l = torch.randint(1, 30, (N,), generator=g).double()
    u_w = -len_w * (0.2 + 3 * torch.rand(N, generator=g, dtype=torch.float64))
    u_l = -len_l * (0.2 + 3 * torch.rand(N, generator=g, dtype=torch.float64))
    u_ref_w = u_w + 3 * torch.randn(N, generator=g, dtype=torch.float64)
    u_ref_l = u_l + 3 * torch.randn(N, generator=g, dtype=torch.float64)
    return dict(chosen_logps=u_w, rejected_logps=u_l, ref_chosen_logps=u_ref_w,
                ref_rejected_logps=u_ref_l, chosen_lengths=len_w, rejected_lengths=len_l)


def _kw(name: str, seed: int = 0) -> dict:
    kw = dict(TEST_KW.get(name, {}))
    if name == "cdpo":  # per-pair soft labels
        g = torch.Generator().manual_seed(seed + 7)
        kw["alpha"] = torch.rand(N, generator=g, dtype=torch.float64)
    return kw


def _autograd_weights(name, x, kw):
    uw = x["chosen_logps"].clone().requires_grad_(True)
    ul = x["rejected_logps"].clone().requires_grad_(True)
    loss = compute_loss(name, uw, ul, x["ref_chosen_logps"], x["ref_rejected_logps"], x["chosen_lengths"], x["rejected_lengths"], **kw)
    gw, gl = torch.autograd.grad(loss.sum(), (uw, ul))
    return loss.detach(), -gw, gl


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_match_autograd(name, seed):
    x, kw = _inputs(seed), _kw(name, seed)
    _, aw_auto, al_auto = _autograd_weights(name, x, kw)
    aw, al = weights(name, **x, **kw)
    assert aw.shape == al.shape == (N,) and aw.dtype == torch.float64
    torch.testing.assert_close(aw, aw_auto, rtol=0, atol=1e-10)
    torch.testing.assert_close(al, al_auto, rtol=0, atol=1e-10)


def test_both_branches_exercised():
    x = _inputs(0)
    m = (x["chosen_logps"] - x["ref_chosen_logps"]) - (x["rejected_logps"] - x["ref_rejected_logps"])
    hinge_active = TEST_KW["hinge"]["beta"] * m < 1
    assert hinge_active.any() and (~hinge_active).any()
    dpop_active = x["chosen_logps"] < x["ref_chosen_logps"]
    assert dpop_active.any() and (~dpop_active).any()
    rrhf_active = x["rejected_logps"] / x["rejected_lengths"] > x["chosen_logps"] / x["chosen_lengths"]
    assert rrhf_active.any() and (~rrhf_active).any()
    # the two branches really give different weights
    aw, _ = weights("dpop", **x, **TEST_KW["dpop"])
    s = 0.1 * torch.sigmoid(-0.1 * (m - 2.0 * torch.relu(x["ref_chosen_logps"] - x["chosen_logps"])))
    torch.testing.assert_close(aw[dpop_active], 3.0 * s[dpop_active], rtol=1e-12, atol=0)
    torch.testing.assert_close(aw[~dpop_active], s[~dpop_active], rtol=1e-12, atol=0)
    _, al = weights("hinge", **x, beta=1.0)
    assert set(al.tolist()) == {0.0, 1.0}


# --- independent scalar reference (math module, written from the spec table) ---------------
def _sp(z):  # softplus
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def _sig(z):
    return 1 / (1 + math.exp(-z))


def _ref_loss(name, uw, ul, rw, rl, lw, ll, p):
    M = (uw - rw) - (ul - rl)
    b = p.get("beta")
    if name == "dpo":
        return _sp(-b * M)
    if name == "cdpo":
        return -p["alpha"] * math.log(_sig(b * M)) - (1 - p["alpha"]) * math.log(_sig(-b * M))
    if name == "ipo":
        return (M - 1 / (2 * p["tau"])) ** 2
    if name == "ipo_mean":
        return ((uw - rw) / lw - (ul - rl) / ll - 1 / (2 * p["tau"])) ** 2
    if name == "hinge":
        return max(0.0, 1 - b * M)
    if name == "rdpo":
        return -math.log(_sig(b * M + p["alpha"] * (lw - ll)))
    if name == "simpo":
        return -math.log(_sig(b * (uw / lw - ul / ll) - p["gamma"]))
    if name == "dpop":
        return -math.log(_sig(b * (M - p["lam"] * max(0.0, rw - uw))))
    if name == "rpo":
        return -math.log(_sig(b * M)) + p["lam"] * (-uw / lw)
    if name == "cpo":
        return -math.log(_sig(b * (uw - ul))) - p["lam"] * uw / lw
    if name == "orpo":
        lo = [m - math.log(1 - math.exp(m)) for m in (uw / lw, ul / ll)]
        return -uw / lw - p["lam"] * math.log(_sig(lo[0] - lo[1]))
    if name == "rrhf":
        return max(0.0, ul / ll - uw / lw) - p["alpha"] * uw / lw
    if name == "kto_paired":
        return (p["lambda_d"] * (1 - _sig(b * (uw - rw) - p["z0"]))
                + p["lambda_u"] * (1 - _sig(p["z0"] - b * (ul - rl))))
    if name == "dpo_gamma":
        return -math.log(_sig(b * ((uw - ul) + p["gamma"] * (rl - rw))))
    if name == "sppo":
        return 0.5 * ((uw - rw - 1 / (2 * b)) ** 2 + (ul - rl + 1 / (2 * b)) ** 2)
    raise AssertionError(f"no scalar reference for {name}")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_values_match_scalar_reference(name):
    x = {k: v[:12] for k, v in _inputs(3).items()}
    kw = dict(TEST_KW.get(name, {}), **({"alpha": 0.8} if name == "cdpo" else {}))
    p = resolve_kwargs(name, kw)
    got = compute_loss(name, **x, **kw)
    want = [_ref_loss(name, *(float(x[k][i]) for k in x), p) for i in range(12)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_defaults_follow_spec():
    d = {k: v.defaults for k, v in LOSSES.items()}
    assert d["dpo"]["beta"] == 0.1 and d["ipo"]["tau"] == 0.1 and d["simpo"]["gamma"] == 0.5
    assert d["rdpo"]["alpha"] == 0.2 and d["dpop"]["lam"] == 50 and d["rrhf"]["alpha"] == 1
    assert d["cpo"]["lam"] == 1 and d["rpo"]["lam"] == 1 and d["orpo"]["lam"] == 0.1
    no_ref = {n for n, s in LOSSES.items() if not s.uses_reference}
    assert no_ref == {"simpo", "cpo", "orpo", "rrhf"}


def test_registry_size_and_docs():
    assert len(LOSSES) >= 14
    for name, spec in LOSSES.items():
        assert spec.name == name and get_loss(name) is spec
        assert any(str(y) in spec.doc for y in (2023, 2024)), name
    with pytest.raises(Exception):
        spec.name = "x"  # frozen


# --- closed-form facts -------------------------------------------------------------------------
def test_dpo_at_reference():
    u = -torch.linspace(1, 40, 9, dtype=torch.float64)
    v = -torch.linspace(3, 70, 9, dtype=torch.float64)
    for beta in (0.1, 0.5, 2.0):
        loss = compute_loss("dpo", u, v, u.clone(), v.clone(), beta=beta)
        torch.testing.assert_close(loss, torch.full_like(u, math.log(2)), rtol=0, atol=1e-14)
        aw, al = weights("dpo", u, v, u.clone(), v.clone(), beta=beta)
        torch.testing.assert_close(aw, torch.full_like(u, beta / 2), rtol=0, atol=1e-14)
        torch.testing.assert_close(al, torch.full_like(u, beta / 2), rtol=0, atol=1e-14)


def test_dpo_gamma_limits():
    x = _inputs(5)
    for b in (0.1, 1.0):
        torch.testing.assert_close(compute_loss("dpo_gamma", **x, beta=b, gamma=1.0),
                                   compute_loss("dpo", **x, beta=b), rtol=1e-13, atol=0)
        for a, c in zip(weights("dpo_gamma", **x, beta=b, gamma=1.0), weights("dpo", **x, beta=b)):
            torch.testing.assert_close(a, c, rtol=1e-13, atol=0)
    # γ = 0: reference has no effect and may be omitted
    l0 = compute_loss("dpo_gamma", **x, gamma=0.0)
    other = dict(x, ref_chosen_logps=x["ref_chosen_logps"] + 17.0, ref_rejected_logps=x["ref_rejected_logps"] - 5.0)
    torch.testing.assert_close(l0, compute_loss("dpo_gamma", **other, gamma=0.0), rtol=0, atol=0)
    torch.testing.assert_close(l0, compute_loss("dpo_gamma", x["chosen_logps"], x["rejected_logps"], gamma=0.0))
    z = torch.zeros(N, dtype=torch.float64)
    torch.testing.assert_close(l0, compute_loss("dpo", x["chosen_logps"], x["rejected_logps"], z, z))
    with pytest.raises(ConfigError, match="reference"):
        compute_loss("dpo_gamma", x["chosen_logps"], x["rejected_logps"], gamma=0.5)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_cdpo_optimum_is_logit_alpha_over_beta(beta):
    alpha = torch.tensor([0.05, 0.3, 0.5, 0.75, 0.9, 0.999], dtype=torch.float64)
    m_star = torch.log(alpha / (1 - alpha)) / beta
    zero = torch.zeros_like(alpha)
    aw, al = weights("cdpo", m_star, zero, zero, zero, beta=beta, alpha=alpha)
    torch.testing.assert_close(aw, zero, rtol=0, atol=1e-12)
    torch.testing.assert_close(al, zero, rtol=0, atol=1e-12)
    # derivative zero by autograd too, and a strict minimum (convex in M)
    m = m_star.clone().requires_grad_(True)
    def cdpo(mm):
        return compute_loss("cdpo", mm, zero, zero, zero, beta=beta, alpha=alpha)

    (g,) = torch.autograd.grad(cdpo(m).sum(), m)
    torch.testing.assert_close(g, zero, rtol=0, atol=1e-12)
    for d in (-0.3, 0.3):
        assert (cdpo(m_star + d) > cdpo(m_star)).all()
    # α = 1 (no smoothing) is DPO
    one = torch.ones_like(alpha)
    torch.testing.assert_close(compute_loss("cdpo", m_star, zero, zero, zero, beta=beta, alpha=one),
                               compute_loss("dpo", m_star, zero, zero, zero, beta=beta))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_overflow_at_large_margin(name, dtype):
    # β = 0.1, M = ±50000 ⇒ |βM| = 5000; ū < 0 throughout (ORPO needs it), lengths 1.
    uw = torch.tensor([-1.0, -50001.0], dtype=dtype, requires_grad=True)
    ul = torch.tensor([-50001.0, -1.0], dtype=dtype, requires_grad=True)
    z = torch.zeros(2, dtype=dtype)
    one = torch.ones(2, dtype=dtype)
    kw = {"rdpo": {"alpha": 0.2}}.get(name, {})
    loss = compute_loss(name, uw, ul, z, z, one, one, **kw)
    gw, gl = torch.autograd.grad(loss.sum(), (uw, ul))
    aw, al = weights(name, uw, ul, z, z, one, one, **kw)
    for t in (loss, gw, gl, aw, al):
        assert torch.isfinite(t).all(), (name, t)
    loss = loss.detach()
    if name in ("dpo", "dpo_gamma", "rdpo", "simpo"):  # sigmoid losses saturate at 0 and |z|
        assert float(loss[0]) < 1e-3
        assert abs(float(loss[1]) / 50000.0 - 0.1) < 1e-3
    if name in ("rpo", "cpo"):  # NLL term only on the easy pair: λ·(−ū_w) = 1
        assert abs(float(loss[0]) - 1.0) < 1e-3
    if name == "cdpo":  # α = 0.9: (1 − α)·5000 on the right side, α·5000 on the wrong side
        torch.testing.assert_close(loss, torch.tensor([500.0, 4500.0], dtype=dtype))
    if name == "dpo":
        torch.testing.assert_close(loss[1], torch.tensor(5000.0, dtype=dtype))
        torch.testing.assert_close(aw, torch.tensor([0.0, 0.1], dtype=dtype))


def test_orpo_log1mexp_is_stable_near_zero():
    # ū close to 0 (very confident) and very negative; compare with a float64 brute-force value.
    uw = torch.tensor([-1e-9, -1e-3, -30.0], dtype=torch.float64)
    ul = torch.tensor([-2.0, -1e-6, -700.0], dtype=torch.float64)
    one = torch.ones(3, dtype=torch.float64)
    got = compute_loss("orpo", uw, ul, chosen_lengths=one, rejected_lengths=one, lam=0.5)
    import mpmath as mp  # in the test extra
    mp.mp.dps = 50  # 50-digit reference: the naive float formula itself loses digits near ū = 0

    def lo(m):
        return m - mp.log(1 - mp.exp(m))

    want = [float(-a + 0.5 * mp.log(1 + mp.exp(-(lo(mp.mpf(a)) - lo(mp.mpf(b))))))
            for a, b in zip(uw.tolist(), ul.tolist())]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)
    with pytest.raises(ConfigError, match="ū < 0"):
        compute_loss("orpo", torch.zeros(3, dtype=torch.float64), ul, chosen_lengths=one, rejected_lengths=one)


# --- configuration errors ----------------------------------------------------------------------
def test_unknown_loss_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        get_loss("dpoo")
    assert e.value.option == "loss" and "dpoo" in str(e.value)
    assert set(e.value.allowed) == set(LOSSES) and "valid: cdpo" in str(e.value)
    x = _inputs()
    with pytest.raises(ConfigError, match="unknown loss"):
        compute_loss("nope", **x)
    with pytest.raises(ConfigError, match="unknown loss"):
        weights("nope", **x)


@pytest.mark.parametrize("name, kw, option", [
    ("dpo", {"beta": 0.0}, "beta"), ("dpo", {"beta": -1}, "beta"),
    ("dpo", {"beta": float("nan")}, "beta"), ("dpo", {"beta": float("inf")}, "beta"),
    ("ipo", {"tau": 0}, "tau"), ("dpop", {"lam": -1.0}, "lam"),
    ("orpo", {"lambda": float("nan")}, "lam"), ("cdpo", {"alpha": 1.5}, "alpha"),
    ("cdpo", {"alpha": torch.tensor([0.5, -0.1])}, "alpha"), ("dpo", {"beta": "0.1"}, "beta"),
    ("dpo", {"beta": True}, "beta"), ("simpo", {"gamma": float("nan")}, "gamma"),
    ("kto_paired", {"lambda_u": -2}, "lambda_u"), ("rrhf", {"alpha": -1}, "alpha"),
])
def test_bad_params_raise(name, kw, option):
    with pytest.raises(ConfigError) as e:
        resolve_kwargs(name, kw)
    assert e.value.option == option and name in str(e.value)


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        resolve_kwargs("dpop", {"betta": 0.2})
    assert e.value.option == "betta" and e.value.allowed == ["beta", "lam"]
    with pytest.raises(ConfigError, match="betta"):
        compute_loss("dpo", *_inputs()["chosen_logps"].split(N // 2), betta=1)


def test_resolve_merges_defaults_and_alias():
    assert resolve_kwargs("dpop", {"lambda": 5}) == {"beta": 0.1, "lam": 5}
    assert resolve_kwargs("simpo", None) == {"beta": 0.1, "gamma": 0.5}
    assert resolve_kwargs("rdpo", {"alpha": -0.1})["alpha"] == -0.1  # sign is a research knob


def test_missing_reference_lengths_and_bad_shapes():
    x = _inputs()
    with pytest.raises(ConfigError, match="reference") as e:
        compute_loss("dpo", x["chosen_logps"], x["rejected_logps"])
    assert e.value.option == "ref_chosen_logps"
    with pytest.raises(ConfigError, match="reference"):
        weights("ipo", x["chosen_logps"], x["rejected_logps"], x["ref_chosen_logps"])
    with pytest.raises(ConfigError, match="lengths"):
        compute_loss("simpo", x["chosen_logps"], x["rejected_logps"])
    compute_loss("simpo", x["chosen_logps"], x["rejected_logps"], chosen_lengths=x["chosen_lengths"], rejected_lengths=x["rejected_lengths"])  # no ref needed
    with pytest.raises(ConfigError, match="shape") as e:
        compute_loss("dpo", x["chosen_logps"], x["rejected_logps"][:-1], x["ref_chosen_logps"], x["ref_rejected_logps"])
    assert e.value.option == "rejected_logps"
    with pytest.raises(ConfigError, match="shape"):
        compute_loss("dpo", x["chosen_logps"][None], x["rejected_logps"][None], x["ref_chosen_logps"], x["ref_rejected_logps"])
    with pytest.raises(ConfigError, match="shape"):
        compute_loss("dpo", x["chosen_logps"], x["rejected_logps"], x["ref_chosen_logps"], x["ref_rejected_logps"][:3])
    with pytest.raises(ConfigError, match="shape"):
        compute_loss("dpo", x["chosen_logps"].tolist(), x["rejected_logps"], x["ref_chosen_logps"], x["ref_rejected_logps"])
    with pytest.raises(ConfigError, match="> 0"):
        compute_loss("simpo", x["chosen_logps"], x["rejected_logps"], chosen_lengths=x["chosen_lengths"] * 0, rejected_lengths=x["rejected_lengths"])
    with pytest.raises(ConfigError, match="per-pair"):
        compute_loss("cdpo", **x, alpha=torch.full((3,), 0.5, dtype=torch.float64))


def test_mixed_dtypes_promote():
    x = _inputs()
    l32 = compute_loss("dpo", x["chosen_logps"].float(), x["rejected_logps"].float(), x["ref_chosen_logps"], x["ref_rejected_logps"])
    assert l32.dtype == torch.float64
    as_long = compute_loss("simpo", x["chosen_logps"], x["rejected_logps"], chosen_lengths=x["chosen_lengths"].long(),
                           rejected_lengths=x["rejected_lengths"].long())
    as_float = compute_loss("simpo", x["chosen_logps"], x["rejected_logps"], chosen_lengths=x["chosen_lengths"], rejected_lengths=x["rejected_lengths"])
    torch.testing.assert_close(as_long, as_float)


# ----------------------------------------------------------------------------- scale vs TRL 1.16
# Ports of TRL 1.16's batch losses (trl/trainer/dpo_trainer.py, kto_trainer.py,
# experimental/cpo, experimental/orpo), written from reading them: per-token log-probs in,
# the scalar the trainer backpropagates out. Each test asserts the ratio documented in
# preflens.dynamics.losses.
def _token_batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    lens_w = [int(v) for v in torch.randint(1, 12, (n,), generator=g)]
    lens_l = [int(v) for v in torch.randint(1, 12, (n,), generator=g)]
    lens_p = [int(v) for v in torch.randint(1, 8, (n,), generator=g)]
    def toks(lens, lo=-3.0):
        return [lo * torch.rand(k, generator=g, dtype=torch.float64) - 0.01 for k in lens]
    return dict(tok_w=toks(lens_w), tok_l=toks(lens_l), tok_p=toks(lens_p),
                ref_w=-20 * torch.rand(n, generator=g, dtype=torch.float64),
                ref_l=-20 * torch.rand(n, generator=g, dtype=torch.float64))


def _sums(b):
    u_w = torch.stack([t.sum() for t in b["tok_w"]])
    u_l = torch.stack([t.sum() for t in b["tok_l"]])
    L_w = torch.tensor([float(len(t)) for t in b["tok_w"]], dtype=torch.float64)
    L_l = torch.tensor([float(len(t)) for t in b["tok_l"]], dtype=torch.float64)
    return u_w, u_l, L_w, L_l


def test_kto_paired_is_twice_trl_kto():
    b = _token_batch(1)
    u_w, u_l, L_w, L_l = _sums(b)
    beta, kl = 0.3, 0.25
    # TRL KTOTrainer (loss_type "kto"): concatenated chosen then rejected, then nanmean
    ch = 1 - torch.sigmoid(beta * ((u_w - b["ref_w"]) - kl))
    rj = 1 - torch.sigmoid(beta * (kl - (u_l - b["ref_l"])))
    trl = torch.cat([ch, rj]).nanmean()
    ours = compute_loss("kto_paired", u_w, u_l, b["ref_w"], b["ref_l"], beta=beta, z0=beta * kl).mean()
    torch.testing.assert_close(ours, 2 * trl, rtol=1e-14, atol=0)


def test_sppo_is_half_trl_sppo_hard():
    b = _token_batch(2)
    u_w, u_l, L_w, L_l = _sums(b)
    beta = 0.2
    r_w, r_l = u_w - b["ref_w"], u_l - b["ref_l"]
    trl = ((r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2).mean()  # DPOTrainer "sppo_hard"
    ours = compute_loss("sppo", u_w, u_l, b["ref_w"], b["ref_l"], beta=beta).mean()
    torch.testing.assert_close(ours, 0.5 * trl, rtol=1e-14, atol=0)


def _sigmoid_loss(beta, m):
    return torch.nn.functional.softplus(-beta * m)


def test_rpo_cpo_nll_per_pair_mean_vs_trl_token_mean():
    b = _token_batch(3)
    u_w, u_l, L_w, L_l = _sums(b)
    beta, lam = 0.1, 0.7
    assert len(set(L_w.tolist())) > 1  # unequal lengths: the two NLL conventions differ
    trl_sft = -torch.cat(b["tok_w"]).mean()                    # DPOTrainer "sft" / CPO NLL
    ours_nll = (-u_w / L_w).mean()
    # RPO: TRL loss_type=["sigmoid", "sft"], loss_weights=[1, lam]
    trl_rpo = _sigmoid_loss(beta, (u_w - b["ref_w"]) - (u_l - b["ref_l"])).mean() + lam * trl_sft
    ours_rpo = compute_loss("rpo", u_w, u_l, b["ref_w"], b["ref_l"], L_w, L_l, beta=beta, lam=lam).mean()
    torch.testing.assert_close(ours_rpo - trl_rpo, lam * (ours_nll - trl_sft), rtol=1e-12, atol=1e-14)
    assert abs(float(ours_nll - trl_sft)) > 1e-3
    # CPO: CPOTrainer "sigmoid" on summed log-probs + cpo_alpha * token-mean NLL (prompt masked)
    trl_cpo = _sigmoid_loss(beta, u_w - u_l).mean() + lam * trl_sft
    ours_cpo = compute_loss("cpo", u_w, u_l, None, None, L_w, L_l, beta=beta, lam=lam).mean()
    torch.testing.assert_close(ours_cpo - trl_cpo, lam * (ours_nll - trl_sft), rtol=1e-12, atol=1e-14)
    # equal chosen lengths: the conventions coincide
    same = {k: ([t[:1] for t in v] if k == "tok_w" else v) for k, v in b.items()}
    u_w1, _, L_w1, _ = _sums(same)
    one = compute_loss("rpo", u_w1, u_l, b["ref_w"], b["ref_l"], L_w1, L_l, beta=beta, lam=lam).mean()
    trl1 = (_sigmoid_loss(beta, (u_w1 - b["ref_w"]) - (u_l - b["ref_l"])).mean()
            - lam * torch.cat(same["tok_w"]).mean())
    torch.testing.assert_close(one, trl1, rtol=1e-13, atol=0)


def test_orpo_nll_vs_trl_prompt_and_batch_token_mean():
    b = _token_batch(4)
    u_w, u_l, L_w, L_l = _sums(b)
    lam = 0.2
    mw, ml = u_w / L_w, u_l / L_l
    try:  # TRL's own log1mexp is a pure function; use it when trl is installed
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.orpo.orpo_trainer import log1mexp
    except Exception:  # noqa: BLE001 - optional dependency
        def log1mexp(x):
            return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    log_odds = (mw - ml) - (log1mexp(mw) - log1mexp(ml))
    or_term = -lam * torch.nn.functional.logsigmoid(log_odds).mean()
    # ORPOTrainer NLL: CrossEntropyLoss over prompt + chosen tokens of the whole batch
    trl_nll = -torch.cat([torch.cat([p, w]) for p, w in zip(b["tok_p"], b["tok_w"])]).mean()
    trl = trl_nll + or_term
    ours = compute_loss("orpo", u_w, u_l, None, None, L_w, L_l, lam=lam).mean()
    torch.testing.assert_close(ours - trl, (-mw).mean() - trl_nll, rtol=1e-12, atol=1e-14)
    assert abs(float(ours - trl)) > 1e-3   # the documented difference is real on this batch
    # one pair without prompt tokens: identical
    one = compute_loss("orpo", u_w[:1], u_l[:1], None, None, L_w[:1], L_l[:1], lam=lam)
    trl1 = -b["tok_w"][0].mean() - lam * torch.nn.functional.logsigmoid(log_odds[:1])
    torch.testing.assert_close(one, trl1, rtol=1e-13, atol=0)


def test_rpo_docstring_does_not_cite_rpo_alpha():
    # TRL 1.16 has no rpo_alpha; RPO is loss_type=["sigmoid", "sft"] (issue 14.5)
    assert "TRL 1.16 has no ``rpo_alpha``" in get_loss("rpo").doc
    assert '["sigmoid", "sft"]' in get_loss("rpo").doc
    assert "prompt" in get_loss("orpo").doc
    assert "2 × TRL" in get_loss("kto_paired").doc and "½ × TRL" in get_loss("sppo").doc


def test_deprecated_keyword_names_still_work():
    x = _inputs()
    new = compute_loss("simpo", x["chosen_logps"], x["rejected_logps"],
                       chosen_lengths=x["chosen_lengths"], rejected_lengths=x["rejected_lengths"])
    with pytest.warns(DeprecationWarning, match="chosen_lengths"):
        old = compute_loss("simpo", u_w=x["chosen_logps"], u_l=x["rejected_logps"],
                           len_w=x["chosen_lengths"], len_l=x["rejected_lengths"])
    torch.testing.assert_close(new, old)
    with pytest.raises(ConfigError):
        compute_loss("dpo", x["chosen_logps"], x["rejected_logps"], x["ref_chosen_logps"],
                     x["ref_rejected_logps"], u_ref_w=x["ref_chosen_logps"])


def test_losses_equal_to_trl_per_pair():
    # DPOTrainer (reverse KL): delta_score = chosen_logratios - rejected_logratios;
    # "sigmoid" -logsigmoid(beta*delta), "hinge" relu(1 - beta*delta), "ipo" on token-averaged
    # log-ratios; CPOTrainer "simpo" on mean log-probs with gamma/beta subtracted.
    b = _token_batch(5)
    u_w, u_l, L_w, L_l = _sums(b)
    beta, tau, gamma = 0.3, 0.2, 0.5
    rw, rl = u_w - b["ref_w"], u_l - b["ref_l"]
    delta = rw - rl
    F_ = torch.nn.functional
    args = (u_w, u_l, b["ref_w"], b["ref_l"], L_w, L_l)
    torch.testing.assert_close(compute_loss("dpo", *args, beta=beta), -F_.logsigmoid(beta * delta))
    torch.testing.assert_close(compute_loss("hinge", *args, beta=beta), torch.relu(1 - beta * delta))
    torch.testing.assert_close(compute_loss("ipo_mean", *args, tau=tau),
                               (rw / L_w - rl / L_l - 1 / (2 * tau)) ** 2)
    logits = (u_w / L_w - u_l / L_l) - gamma / beta
    torch.testing.assert_close(compute_loss("simpo", u_w, u_l, None, None, L_w, L_l, beta=beta, gamma=gamma),
                               -F_.logsigmoid(beta * logits))
