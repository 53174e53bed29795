"""Registry of pairwise preference losses with closed-form per-pair gradient weights.

Conventions (Yuan et al. 2024, "Gradient Entanglement", Eqs. 1–5): ``chosen_logps`` = u_w and
``rejected_logps`` = u_l [n] are SUMMED response log-probs log π(y|x) (EOS appended and counted),
``ref_chosen_logps``/``ref_rejected_logps`` = u_ref_* the same under the frozen reference,
``chosen_lengths``/``rejected_lengths`` = L_w, L_l in tokens (EOS counted), ū = u/L.
r = u − u_ref, M = r_w − r_l. (Formulas below use the short names.)
Each loss returns the per-pair loss [n] (the caller takes the mean); −log σ(z) is written
softplus(−z) throughout, so |βM| in the thousands neither overflows nor gives NaN.
Weights (Yuan et al. 2024, "Gradient Entanglement" §1): a_w = −∂ℓ/∂u_w, a_l = +∂ℓ/∂u_l, so
∇ℓ = −(a_w ∇u_w − a_l ∇u_l); written in closed form and tested against autograd.
Kinks (relu, hinge) take the strict-inequality branch, as torch's relu does (0 at the kink).

Scale versus TRL 1.16 (checked against its source; tests/dynamics/test_losses.py computes TRL's
form and asserts each ratio): dpo, ipo_mean, hinge (DPOTrainer ``sigmoid``/``ipo``/``hinge``) and
simpo (CPOTrainer ``loss_type="simpo"``) equal TRL's per-pair loss; ``kto_paired`` = 2 × TRL KTO (TRL averages
over the 2n concatenated chosen+rejected examples, we sum the two halves per pair);
``sppo`` = ½ × TRL ``sppo_hard``; ``cpo``/``rpo``/``orpo`` take their NLL per pair (−u_w/L_w, then
the caller's mean over pairs) where TRL takes one token mean over all chosen tokens of the batch
(equal only when every chosen response has the same length), and TRL's ORPO NLL also covers the
prompt tokens. Loss scale never changes ranking correctness: only the sign of u_w − u_l does
(Chen et al. 2024, Def. 2.3).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preflens.errors import ConfigError

__all__ = ["LossSpec", "LOSSES", "get_loss", "resolve_kwargs", "compute_loss", "weights"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: ``fn(u_w, u_l, u_ref_w, u_ref_l, len_w, len_l, **params) -> [n]`` and
    ``weights_fn(same) -> (a_w, a_l)``; ``defaults`` lists every accepted keyword; ``doc`` cites
    the source. Unused inputs are passed as ``None``."""

    name: str
    fn: Callable[..., Tensor]
    weights_fn: Callable[..., tuple[Tensor, Tensor]]
    defaults: dict
    uses_reference: bool
    doc: str
    uses_lengths: bool = False


def _margin(uw, ul, rw, rl):
    return (uw - rw) - (ul - rl)


def _same(a: Tensor) -> tuple[Tensor, Tensor]:
    return a, a.clone()


def _sig_prime(x: Tensor) -> Tensor:
    return torch.sigmoid(x) * torch.sigmoid(-x)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, stable at both ends (Mächler 2012): log(−expm1 x) near 0,
    log1p(−eˣ) far from it."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ----------------------------------------------------------------------------- losses + weights
def _dpo(uw, ul, rw, rl, lw, ll, *, beta):
    """DPO (Rafailov et al. 2023, Eq. 7): ℓ = −log σ(βM), summed log-probs. a_w = a_l = βσ(−βM)."""
    return F.softplus(-beta * _margin(uw, ul, rw, rl))


def _dpo_w(uw, ul, rw, rl, lw, ll, *, beta):
    return _same(beta * torch.sigmoid(-beta * _margin(uw, ul, rw, rl)))


def _cdpo(uw, ul, rw, rl, lw, ll, *, beta, alpha):
    """Conservative DPO / soft label (Mitchell 2023 note; Chen et al. 2024 Thm 3.1):
    ℓ = −α log σ(βM) − (1−α) log σ(−βM), α scalar or per-pair [n] in [0, 1] (label smoothing
    ε = 1 − α). a_w = a_l = β(α − σ(βM)); minimiser M* = logit(α)/β (α = 1 is DPO)."""
    z = beta * _margin(uw, ul, rw, rl)
    return alpha * F.softplus(-z) + (1.0 - alpha) * F.softplus(z)


def _cdpo_w(uw, ul, rw, rl, lw, ll, *, beta, alpha):
    return _same(beta * (alpha - torch.sigmoid(beta * _margin(uw, ul, rw, rl))))


def _ipo(uw, ul, rw, rl, lw, ll, *, tau):
    """IPO, paper form (Azar et al. 2023, IPO sample loss): ℓ = (M − 1/(2τ))², summed log-probs.
    a_w = a_l = 2(1/(2τ) − M) (negative past the target)."""
    return (_margin(uw, ul, rw, rl) - 0.5 / tau) ** 2


def _ipo_w(uw, ul, rw, rl, lw, ll, *, tau):
    return _same(2.0 * (0.5 / tau - _margin(uw, ul, rw, rl)))


def _ipo_mean(uw, ul, rw, rl, lw, ll, *, tau):
    """IPO as TRL runs it (Azar et al. 2023; TRL ``loss_type="ipo"``): ℓ = (M̄ − 1/(2τ))² with
    M̄ = (u_w − u_ref,w)/L_w − (u_l − u_ref,l)/L_l (policy AND reference length-averaged).
    a_w = 2(1/(2τ) − M̄)/L_w, a_l = 2(1/(2τ) − M̄)/L_l."""
    return ((uw - rw) / lw - (ul - rl) / ll - 0.5 / tau) ** 2


def _ipo_mean_w(uw, ul, rw, rl, lw, ll, *, tau):
    g = 2.0 * (0.5 / tau - ((uw - rw) / lw - (ul - rl) / ll))
    return g / lw, g / ll


def _hinge(uw, ul, rw, rl, lw, ll, *, beta):
    """SLiC-HF hinge (Zhao et al. 2023, calibration loss with δ = 1) as TRL ``hinge`` runs it, on
    reference log-ratios: ℓ = relu(1 − βM). a_w = a_l = β·1[βM < 1]."""
    return torch.relu(1.0 - beta * _margin(uw, ul, rw, rl))


def _hinge_w(uw, ul, rw, rl, lw, ll, *, beta):
    z = beta * _margin(uw, ul, rw, rl)
    return _same(beta * (z < 1.0).to(z.dtype))


def _rdpo(uw, ul, rw, rl, lw, ll, *, beta, alpha):
    """R-DPO (Park et al. 2024; Gradient-Entanglement repo ``rdpo``, α = 0.2 on TL;DR):
    ℓ = −log σ(βM + α(L_w − L_l)). Sign: the length term is ADDED inside σ, from the reward
    r = β log π/π_ref + α|y| implied by the length-penalised RLHF objective r − α|y|. Pairs
    whose chosen answer is longer start with a head start (smaller weight), shorter-chosen pairs
    get a larger push, so the learned margin does not credit length. a_w = a_l = βσ(−z)."""
    return F.softplus(-(beta * _margin(uw, ul, rw, rl) + alpha * (lw - ll)))


def _rdpo_w(uw, ul, rw, rl, lw, ll, *, beta, alpha):
    return _same(beta * torch.sigmoid(-(beta * _margin(uw, ul, rw, rl) + alpha * (lw - ll))))


def _simpo(uw, ul, rw, rl, lw, ll, *, beta, gamma):
    """SimPO (Meng et al. 2024, Eq. 6): ℓ = −log σ(β(ū_w − ū_l) − γ), no reference, mean
    log-probs. a_w = βσ(−z)/L_w, a_l = βσ(−z)/L_l. (Default β = 0.1 is the GE repo's; the
    paper uses ~2–2.5.)"""
    return F.softplus(-(beta * (uw / lw - ul / ll) - gamma))


def _simpo_w(uw, ul, rw, rl, lw, ll, *, beta, gamma):
    s = beta * torch.sigmoid(-(beta * (uw / lw - ul / ll) - gamma))
    return s / lw, s / ll


def _dpop(uw, ul, rw, rl, lw, ll, *, beta, lam):
    """DPO-Positive (Pal et al. 2024; GE repo ``pdpo``): ℓ = −log σ(β(M − λ·relu(u_ref,w − u_w))).
    a_w = βσ(−z)(1 + λ·1[u_w < u_ref,w]), a_l = βσ(−z)."""
    return F.softplus(-beta * (_margin(uw, ul, rw, rl) - lam * torch.relu(rw - uw)))


def _dpop_w(uw, ul, rw, rl, lw, ll, *, beta, lam):
    s = beta * torch.sigmoid(-beta * (_margin(uw, ul, rw, rl) - lam * torch.relu(rw - uw)))
    return s * (1.0 + lam * (uw < rw).to(s.dtype)), s


def _rpo(uw, ul, rw, rl, lw, ll, *, beta, lam):
    """RPO = DPO + λ·NLL on the chosen response (Pang et al. 2024, Eq. 3; Liu et al. 2024):
    ℓ = −log σ(βM) − λu_w/L_w. TRL 1.16 has no ``rpo_alpha``; its equivalent is
    ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, λ]``, whose ``sft`` term is ONE token mean
    of −log π over all chosen tokens of the batch, Σu_w/ΣL_w (equal to our per-pair mean of
    u_w/L_w only when all chosen lengths are equal). a_w = βσ(−βM) + λ/L_w, a_l = βσ(−βM)."""
    return F.softplus(-beta * _margin(uw, ul, rw, rl)) - lam * uw / lw


def _rpo_w(uw, ul, rw, rl, lw, ll, *, beta, lam):
    s = beta * torch.sigmoid(-beta * _margin(uw, ul, rw, rl))
    return s + lam / lw, s


def _cpo(uw, ul, rw, rl, lw, ll, *, beta, lam):
    """CPO (Xu et al. 2024, Eq. 5; TRL CPOTrainer ``sigmoid``, ``cpo_alpha`` = λ): no reference,
    ℓ = −log σ(β(u_w − u_l)) − λū_w (summed in the preference term, per-pair mean in the NLL;
    TRL's NLL is one token mean over the batch's chosen response tokens, Σu_w/ΣL_w).
    a_w = βσ(−z) + λ/L_w, a_l = βσ(−z)."""
    return F.softplus(-beta * (uw - ul)) - lam * uw / lw


def _cpo_w(uw, ul, rw, rl, lw, ll, *, beta, lam):
    s = beta * torch.sigmoid(-beta * (uw - ul))
    return s + lam / lw, s


def _orpo(uw, ul, rw, rl, lw, ll, *, lam):
    """ORPO (Hong et al. 2024, Eq. 6, L_SFT + λ·L_OR; odds on mean log-probs as TRL, TRL's β = λ):
    ℓ = −ū_w − λ log σ(lo_w − lo_l), lo = ū − log(1 − e^ū) (needs ū < 0). TRL 1.16's ORPOTrainer
    differs in the NLL: it is one token mean over the whole chosen sequences of the batch,
    prompt tokens included, (Σ(u_prompt + u_w))/Σ(L_prompt + L_w); ours is −ū_w per pair.
    a_w = [1 + λσ(−Δlo)/(1 − e^{ū_w})]/L_w, a_l = λσ(−Δlo)/((1 − e^{ū_l})L_l)."""
    mw, ml = uw / lw, ul / ll
    return -mw + lam * F.softplus(-((mw - _log1mexp(mw)) - (ml - _log1mexp(ml))))


def _orpo_w(uw, ul, rw, rl, lw, ll, *, lam):
    mw, ml = uw / lw, ul / ll
    s = lam * torch.sigmoid(-((mw - _log1mexp(mw)) - (ml - _log1mexp(ml))))
    return (1.0 - s / torch.expm1(mw)) / lw, -s / (torch.expm1(ml) * ll)


def _rrhf(uw, ul, rw, rl, lw, ll, *, alpha):
    """RRHF, pairwise (Yuan et al. 2023, ranking + SFT loss; GE repo via CPOTrainer, cpo_alpha = α):
    ℓ = relu(ū_l − ū_w) − αū_w, no reference.
    a_w = (1[ū_l > ū_w] + α)/L_w, a_l = 1[ū_l > ū_w]/L_l."""
    return torch.relu(ul / ll - uw / lw) - alpha * uw / lw


def _rrhf_w(uw, ul, rw, rl, lw, ll, *, alpha):
    act = (ul / ll > uw / lw).to(uw.dtype)
    return (act + alpha) / lw, act / ll


def _kto_paired(uw, ul, rw, rl, lw, ll, *, beta, lambda_d, lambda_u, z0):
    """KTO on a pair (Ethayarajh et al. 2024), chosen as desirable, rejected as undesirable:
    ℓ = λ_D(1 − σ(βr_w − z0)) + λ_U(1 − σ(z0 − βr_l)). z0 (scalar or [n]) is given in reward
    units (= β × the paper's KL reference point) and detached. Scale: 2 × TRL's KTO for the same
    pairs (TRL concatenates chosen and rejected into 2n examples and averages over them; here the
    two terms are summed per pair and the caller averages over n pairs).
    a_w = λ_Dβσ'(βr_w − z0), a_l = λ_Uβσ'(z0 − βr_l), σ' = σ(1 − σ)."""
    z0 = z0.detach() if isinstance(z0, Tensor) else z0
    return (lambda_d * torch.sigmoid(z0 - beta * (uw - rw))  # 1 − σ(x) = σ(−x)
            + lambda_u * torch.sigmoid(beta * (ul - rl) - z0))


def _kto_paired_w(uw, ul, rw, rl, lw, ll, *, beta, lambda_d, lambda_u, z0):
    return (lambda_d * beta * _sig_prime(beta * (uw - rw) - z0),
            lambda_u * beta * _sig_prime(z0 - beta * (ul - rl)))


def _dpo_gamma(uw, ul, rw, rl, lw, ll, *, beta, gamma):
    """DPO^γ, reference-attenuated (Chen et al. 2024, Eq. 4): ℓ = −log σ(β(m + γc)),
    m = u_w − u_l, c = u_ref,l − u_ref,w. γ = 1 is DPO; γ = 0 drops the reference (then
    ``u_ref_*`` may be None). a_w = a_l = βσ(−z)."""
    return F.softplus(-beta * ((uw - ul) + gamma * (rl - rw)))


def _dpo_gamma_w(uw, ul, rw, rl, lw, ll, *, beta, gamma):
    return _same(beta * torch.sigmoid(-beta * ((uw - ul) + gamma * (rl - rw))))


def _sppo(uw, ul, rw, rl, lw, ll, *, beta):
    """SPPO-style squared loss (Wu et al. 2024 with P̂ ∈ {1, 0}, η = 1/β; GE repo ``sppo``):
    ℓ = ½[(r_w − 1/(2β))² + (r_l + 1/(2β))²]. a_w = 1/(2β) − r_w, a_l = r_l + 1/(2β).
    Scale: ½ × TRL ``sppo_hard`` (which omits the ½)."""
    return 0.5 * ((uw - rw - 0.5 / beta) ** 2 + (ul - rl + 0.5 / beta) ** 2)


def _sppo_w(uw, ul, rw, rl, lw, ll, *, beta):
    return 0.5 / beta - (uw - rw), (ul - rl) + 0.5 / beta


# ----------------------------------------------------------------------------- registry
LOSSES: dict[str, LossSpec] = {}


def _register(name, fn, wfn, defaults, *, ref=True, lengths=False):
    doc = " ".join(fn.__doc__.split())
    LOSSES[name] = LossSpec(name, fn, wfn, dict(defaults), ref, doc, lengths)


# Defaults: the Gradient-Entanglement repo's TL;DR settings (its scripts) where it ran the loss,
# else the source paper / TRL default. cdpo α = 0.9 (label smoothing 0.1) is illustrative only.
_register("dpo", _dpo, _dpo_w, {"beta": 0.1})
_register("cdpo", _cdpo, _cdpo_w, {"beta": 0.1, "alpha": 0.9})
_register("ipo", _ipo, _ipo_w, {"tau": 0.1})
_register("ipo_mean", _ipo_mean, _ipo_mean_w, {"tau": 0.1}, lengths=True)
_register("hinge", _hinge, _hinge_w, {"beta": 0.1})
_register("rdpo", _rdpo, _rdpo_w, {"beta": 0.1, "alpha": 0.2}, lengths=True)
_register("simpo", _simpo, _simpo_w, {"beta": 0.1, "gamma": 0.5}, ref=False, lengths=True)
_register("dpop", _dpop, _dpop_w, {"beta": 0.1, "lam": 50.0})
_register("rpo", _rpo, _rpo_w, {"beta": 0.1, "lam": 1.0}, lengths=True)
_register("cpo", _cpo, _cpo_w, {"beta": 0.1, "lam": 1.0}, ref=False, lengths=True)
_register("orpo", _orpo, _orpo_w, {"lam": 0.1}, ref=False, lengths=True)
_register("rrhf", _rrhf, _rrhf_w, {"alpha": 1.0}, ref=False, lengths=True)
_register("kto_paired", _kto_paired, _kto_paired_w,
          {"beta": 0.1, "lambda_d": 1.0, "lambda_u": 1.0, "z0": 0.0})
_register("dpo_gamma", _dpo_gamma, _dpo_gamma_w, {"beta": 0.1, "gamma": 1.0})
_register("sppo", _sppo, _sppo_w, {"beta": 0.1})

# Constraint per keyword; (loss, key) overrides. Tensor values are allowed only for _PER_PAIR.
_RULES = {"beta": "positive", "tau": "positive", "lam": "non-negative", "lambda_d": "non-negative",
          "lambda_u": "non-negative", "alpha": "non-negative", "gamma": "finite", "z0": "finite"}
_RULE_FOR = {("cdpo", "alpha"): "in [0, 1]", ("rdpo", "alpha"): "finite"}
_PER_PAIR = {("cdpo", "alpha"), ("kto_paired", "z0")}
_ALIASES = {"lambda": "lam"}


def get_loss(name: str) -> LossSpec:
    """Look up a registered loss by name; unknown names raise ConfigError listing the valid ones."""
    if name not in LOSSES:
        raise ConfigError("loss", f"unknown loss '{name}'", allowed=LOSSES)
    return LOSSES[name]


def _check_value(name: str, key: str, v: object) -> None:
    rule = _RULE_FOR.get((name, key), _RULES[key])
    if isinstance(v, Tensor) and (name, key) in _PER_PAIR:
        vals = v.detach().to(torch.float64)
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        vals = torch.tensor(float(v), dtype=torch.float64)
    else:
        kind = "a number or a per-pair tensor" if (name, key) in _PER_PAIR else "a number"
        raise ConfigError(key, f"loss '{name}' expects {kind}, got {type(v).__name__}")
    if not bool(torch.isfinite(vals).all()):
        raise ConfigError(key, f"must be finite for loss '{name}', got {v}")
    bad = {"positive": vals <= 0, "non-negative": vals < 0, "in [0, 1]": (vals < 0) | (vals > 1),
           "finite": torch.zeros_like(vals, dtype=torch.bool)}[rule]
    if bool(bad.any()):
        raise ConfigError(key, f"must be {rule} for loss '{name}', got {v}")


def resolve_kwargs(name: str, loss_kwargs: Mapping[str, object] | None = None) -> dict:
    """Merge ``loss_kwargs`` over the loss's defaults and validate them.

    ``"lambda"`` is accepted as an alias of ``"lam"``. Unknown keys raise ConfigError naming the
    key and the valid keys; β, τ must be finite and > 0, λ's finite and ≥ 0, cdpo's α in [0, 1].
    """
    spec = get_loss(name)
    out = dict(spec.defaults)
    for key, v in (loss_kwargs or {}).items():
        key = _ALIASES.get(key, key)
        if key not in spec.defaults:
            raise ConfigError(key, f"unknown option for loss '{name}'", allowed=spec.defaults)
        _check_value(name, key, v)
        out[key] = v
    return out


def _vector(option: str, x: object, n: int | None) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 1 or (n is not None and x.shape[0] != n):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        want = f"[{n}]" if n is not None else "[n]"
        raise ConfigError(option, f"expected a 1-D tensor of shape {want}, got {shape}")
    return x


def _prepare(spec, u_w, u_l, u_ref_w, u_ref_l, len_w, len_l, params):  # internal short names
    """Check shapes/presence; cast to one floating dtype; return the six inputs (None if unused)."""
    n = _vector("chosen_logps", u_w, None).shape[0]
    _vector("rejected_logps", u_l, n)
    dtype = torch.promote_types(u_w.dtype, u_l.dtype)
    refs = [None, None]
    if spec.uses_reference:
        optional = spec.name == "dpo_gamma" and params["gamma"] == 0  # γ = 0 drops the reference
        if u_ref_w is None and u_ref_l is None and optional:
            refs = [torch.zeros(n, dtype=dtype, device=u_w.device)] * 2
        elif u_ref_w is None or u_ref_l is None:
            raise ConfigError("ref_chosen_logps" if u_ref_w is None else "ref_rejected_logps",
                              f"loss '{spec.name}' needs reference log-probs (ref_chosen_logps and "
                              "ref_rejected_logps)")
        else:
            refs = [_vector("ref_chosen_logps", u_ref_w, n), _vector("ref_rejected_logps", u_ref_l, n)]
            dtype = torch.promote_types(dtype, torch.promote_types(u_ref_w.dtype, u_ref_l.dtype))
            refs = [r.to(dtype) for r in refs]
    if not dtype.is_floating_point:
        raise ConfigError("chosen_logps", f"log-probs must be floating point, got {dtype}")
    lens = [None, None]
    for i, (opt, L) in enumerate((("chosen_lengths", len_w), ("rejected_lengths", len_l)) if spec.uses_lengths else ()):
        if L is None:
            raise ConfigError(opt, f"loss '{spec.name}' needs response lengths (chosen_lengths and rejected_lengths)")
        lens[i] = _vector(opt, L, n).to(dtype)
        if not bool((torch.isfinite(lens[i]) & (lens[i] > 0)).all()):
            raise ConfigError(opt, "response lengths must be finite and > 0 (EOS counted)")
    for key in ("alpha", "z0"):
        v = params.get(key)
        if isinstance(v, Tensor):
            if v.ndim not in (0, 1) or (v.ndim == 1 and v.shape[0] != n):
                raise ConfigError(key, f"per-pair value must be a scalar or shape [{n}], "
                                       f"got {tuple(v.shape)}")
            params[key] = v.to(dtype=dtype, device=u_w.device)
    uw, ul = u_w.to(dtype), u_l.to(dtype)
    if spec.name == "orpo" and not bool(((uw / lens[0] < 0) & (ul / lens[1] < 0)).all()):
        raise ConfigError("chosen_logps/rejected_logps", "ORPO needs mean log-probs ū < 0 (log-odds undefined at 0)")
    return uw, ul, refs[0], refs[1], lens[0], lens[1]


_OLD_NAMES = {"u_w": "chosen_logps", "u_l": "rejected_logps", "u_ref_w": "ref_chosen_logps",
              "u_ref_l": "ref_rejected_logps", "len_w": "chosen_lengths", "len_l": "rejected_lengths"}


def _split_old_names(kwargs: dict, given: dict) -> dict:
    """Deprecated keyword names (u_w, u_ref_w, len_w, …) -> the TRL-style ones; rest = loss params."""
    for old, new in _OLD_NAMES.items():
        if old in kwargs:
            warnings.warn(f"'{old}=' is deprecated; use '{new}='", DeprecationWarning, stacklevel=3)
            if given[new] is not None:
                raise ConfigError(old, f"given twice (as '{old}' and '{new}')")
            given[new] = kwargs.pop(old)
    return given


def compute_loss(name: str, chosen_logps: Tensor | None = None, rejected_logps: Tensor | None = None,
                 ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
                 chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                 **kwargs) -> Tensor:
    """Per-pair loss [n] of registered loss ``name`` (differentiable in the policy log-probs).

    Inputs are [n] tensors (TRL names): SUMMED response log-probs of the chosen / rejected
    response under the policy (``chosen_logps``, ``rejected_logps``) and the frozen reference
    (``ref_*``), and response lengths in tokens (EOS counted). Keyword parameters are merged
    over the loss's defaults by :func:`resolve_kwargs`. Missing reference/lengths where the loss
    needs them, or wrong shapes, raise ConfigError. (``u_w=``/``u_ref_w=``/``len_w=`` … are
    deprecated aliases.)
    """
    g = _split_old_names(kwargs, dict(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                                      ref_chosen_logps=ref_chosen_logps,
                                      ref_rejected_logps=ref_rejected_logps,
                                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths))
    spec = get_loss(name)
    params = resolve_kwargs(name, kwargs)
    args = _prepare(spec, *g.values(), params)
    return spec.fn(*args, **params)


def weights(name: str, chosen_logps: Tensor | None = None, rejected_logps: Tensor | None = None,
            ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
            chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
            **kwargs) -> tuple[Tensor, Tensor]:
    """Closed-form gradient weights (a_w, a_l), each [n], with a_w = −∂ℓ/∂u_w, a_l = +∂ℓ/∂u_l
    (u_w = ``chosen_logps``, u_l = ``rejected_logps``).

    Source: Yuan et al. 2024 (Gradient Entanglement) §1 generalised per loss. Computed on
    detached inputs (no autograd); same inputs and validation as :func:`compute_loss`.
    """
    g = _split_old_names(kwargs, dict(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                                      ref_chosen_logps=ref_chosen_logps,
                                      ref_rejected_logps=ref_rejected_logps,
                                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths))
    spec = get_loss(name)
    params = resolve_kwargs(name, kwargs)
    with torch.no_grad():
        args = _prepare(spec, *(x.detach() if isinstance(x, Tensor) else x for x in g.values()), params)
        return spec.weights_fn(*args, **params)
