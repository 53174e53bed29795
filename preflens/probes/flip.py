"""The DPO flip condition (Theorem 4.1), DPO^γ and IPO losses of one pair, and flip buckets.

Source: Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings"
(NeurIPS 2024, arXiv 2405.19534), Def. 2.2, Eq. 4, Theorem 4.1, Remark 4.2, Prop. A.7, Sec. 4.1.
Conventions as in :mod:`preflens.probes.ranking`: m = log π_θ(y_w) − log π_θ(y_l), c =
log π_ref(y_l) − log π_ref(y_w) (c > 0 ⇔ the reference mis-ranks); float64 throughout; scalar
inputs give floats, tensors float64 tensors. Re-exported by :mod:`preflens.probes.ranking`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from preflens.errors import ConfigError, DataError
from preflens.probes._numbers import _f64, _is_scalar, _out, _positive, _same_shape, _softplus

__all__ = ["dpo_loss_value", "flip_loss_threshold", "required_loss_decrease", "dpo_margin_bounds",
           "correct_from_dpo_loss", "UNDETERMINED", "ipo_loss_value", "ipo_loss_bound",
           "ipo_guarantees_correct", "flip_buckets"]


# --------------------------------------------------------------------------- DPO / IPO theory
def dpo_loss_value(m, c, beta, gamma=1.0):
    """DPO^gamma loss of one pair (Def. 2.2; Eq. 4): softplus(-beta * (m + gamma * c)).

    gamma = 1 is DPO (beta * (m + c) = implicit reward margin); gamma = 0 drops pi_ref.
    Scalars -> float; tensors broadcast -> float64 tensor.
    """
    _positive(beta, "beta")
    mm, cc, b, g = (_f64(x, f) for x, f in ((m, "m"), (c, "c"), (beta, "beta"), (gamma, "gamma")))
    return _out(_softplus(-(b * (mm + g * cc))), _is_scalar(m, c, beta, gamma))


def flip_loss_threshold(c, beta, gamma=1.0):
    """Loss level at which a pair flips to correct (Theorem 4.1): softplus(-beta*gamma*c).

    R = 1 (m >= 0) <=> L_DPO^gamma <= softplus(-beta * gamma * c) = -log sigma(beta*gamma*c),
    because the loss is strictly decreasing in m and equals the threshold exactly at m = 0
    (evaluated with the same float operations as :func:`dpo_loss_value` at m = 0). For large
    beta*c the threshold ~ exp(-beta*c) (0.0 once it underflows float64); gamma = 0 gives log 2.
    """
    return dpo_loss_value(0.0 if _is_scalar(c) else torch.zeros(()), c, beta, gamma)


def required_loss_decrease(c, beta, gamma=1.0):
    """log 2 - :func:`flip_loss_threshold` (Sec. 4.1), signed, not clamped.

    log 2 is the loss at initialisation (pi_theta = pi_ref) for DPO (gamma = 1). Positive iff
    gamma*c > 0 (the reference mis-ranks the pair); negative values mean the threshold lies
    above log 2, i.e. the pair starts out correct and may even *gain* loss while staying correct.
    """
    t = flip_loss_threshold(c, beta, gamma)
    return math.log(2.0) - t


def _log_expm1(x: Tensor) -> Tensor:
    """log(e^x - 1) for x >= 0 without overflow (x > 1: x + log1p(-e^-x)); log(0) = -inf at x = 0."""
    big = x > 1.0
    return torch.where(big, x + torch.log1p(-torch.exp(-torch.where(big, x, torch.ones_like(x)))),
                       torch.log(torch.expm1(torch.where(big, torch.zeros_like(x), x))))


def dpo_margin_bounds(loss, c, beta, gamma=1.0, *, rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """Interval [m_lo, m_hi] for the model log-ratio m that a float DPO^gamma loss value allows.

    Inverts Eq. 4, L = softplus(-z) with z = beta*(m + gamma*c): z = -log(e^L - 1), so
    m = z/beta - gamma*c, computed in log space. The loss is trusted only to a relative ``rtol``
    (default 4 ulp of the loss's dtype: float32 tensors 4*2^-23, everything else 4*2^-52) plus
    the smallest subnormal of that dtype (a loss of 0.0 means "below half the smallest
    subnormal", i.e. z >= ~744.4 in float64: an unbounded interval). Rounding of the last two
    operations is added to the interval. Returns two float64 tensors broadcast over the inputs.
    """
    _positive(beta, "beta")
    dt = loss.dtype if isinstance(loss, Tensor) and loss.dtype in (torch.float32, torch.float16,
                                                                     torch.bfloat16) else torch.float64
    eps = torch.finfo(dt).eps
    rtol = 4 * eps if rtol is None else float(rtol)
    if not (0 <= rtol < 1):
        raise ConfigError("rtol", f"must be in [0, 1), got {rtol!r}")
    lv = _f64(loss, "loss")
    if (lv < 0).any():
        raise DataError("a DPO loss is >= 0; got a negative value", field="loss")
    sub = float(torch.finfo(dt).smallest_normal) * float(torch.finfo(dt).eps)  # smallest subnormal
    l_lo, l_hi = lv * (1.0 - rtol), lv * (1.0 + rtol) + sub
    b = _f64(beta, "beta")
    gc = _f64(gamma, "gamma") * _f64(c, "c")
    z_lo, z_hi = -_log_expm1(l_hi) / b, -_log_expm1(l_lo) / b       # loss decreasing in z
    e64 = torch.finfo(torch.float64).eps
    m_lo = z_lo - gc
    m_hi = z_hi - gc
    slack = 4 * e64 * (z_lo.abs() + gc.abs())
    m_lo = m_lo - slack
    m_hi = torch.where(torch.isinf(z_hi), z_hi, m_hi + 4 * e64 * (z_hi.abs() + gc.abs()))
    return m_lo, m_hi


UNDETERMINED = ("raise", "tie")


def correct_from_dpo_loss(loss, c, beta, gamma=1.0, *, strict: bool = False,
                          undetermined: str = "raise", rtol: float | None = None) -> Tensor:
    """Ranking correctness read off the DPO^gamma loss via Theorem 4.1 (Chen et al. 2024).

    Theorem 4.1: R = 1 (m >= 0) <=> L <= softplus(-beta*gamma*c). A float loss cannot decide this
    when m is within the loss's rounding of 0, and when z = beta*(m + gamma*c) is so large
    (>~ 708, float64) that loss and threshold are both subnormal or 0 (e.g. m = -1, c = 100,
    beta = 10: loss e^-990 = 0.0 and threshold 0.0). So the comparison is made in margin space:
    :func:`dpo_margin_bounds` gives the interval of m the loss allows (relative ``rtol``);
    the pair is correct if the whole interval is > 0, incorrect if it is < 0, else
    *undetermined*: ``undetermined="raise"`` (default) raises DataError naming the pairs;
    ``"tie"`` counts them as m = 0, i.e. correct unless ``strict`` (R uses >=, strict uses >).
    Pass the margin itself to :func:`ranking_correct` when you have it: that is exact.
    Returns a BoolTensor broadcast over the inputs.
    """
    if undetermined not in UNDETERMINED:
        raise ConfigError("undetermined", f"unknown value {undetermined!r}", allowed=UNDETERMINED)
    m_lo, m_hi = dpo_margin_bounds(loss, c, beta, gamma, rtol=rtol)
    right, wrong = m_lo > 0, m_hi < 0
    open_ = ~(right | wrong)
    if undetermined == "raise" and bool(open_.any()):
        idx = torch.nonzero(open_.reshape(-1)).reshape(-1)[:5].tolist()
        raise DataError(f"{int(open_.sum())} pair(s) (first indices {idx}) have a loss too close to "
                        "the Theorem 4.1 threshold, or too small (underflowed), to decide the sign of m; "
                        "pass undetermined='tie' to count them as m = 0, or use the margins",
                        field="loss")
    return right | (open_ & (not strict))


def ipo_loss_value(m, c, tau):
    """IPO loss of one pair (Remark 4.2, Prop. A.7): (m + c - 1/(2 tau))^2."""
    _positive(tau, "tau")
    mm, cc, t = _f64(m, "m"), _f64(c, "c"), _f64(tau, "tau")
    return _out((mm + cc - 1.0 / (2.0 * t)) ** 2, _is_scalar(m, c, tau))


def ipo_loss_bound(c, tau):
    """(d + 1/(2 tau))^2 with d = Delta_ref = -c: the IPO loss bound of Prop. A.7."""
    _positive(tau, "tau")
    cc, t = _f64(c, "c"), _f64(tau, "tau")
    return _out((-cc + 1.0 / (2.0 * t)) ** 2, _is_scalar(c, tau))


def ipo_guarantees_correct(c, tau, loss=None) -> Tensor:
    """Sufficient condition for R = 1 under IPO (Remark 4.2, Prop. A.7), with d = -c.

    * ``loss=None``: 1[d >= -1/(2 tau)], i.e. the zero-loss IPO optimum m = d + 1/(2 tau) ranks
      the pair correctly (m >= 0); if d < -1/(2 tau) the optimum has m < 0 (R = 0).
    * with ``loss``: 1[d >= -1/(2 tau) and loss <= (d + 1/(2 tau))^2], which implies m >= 0.
      Sufficient, not necessary: correct pairs can have larger loss.
    Returns a BoolTensor broadcast over the inputs.
    """
    _positive(tau, "tau")
    cc, t = _f64(c, "c"), _f64(tau, "tau")
    ok = -cc >= -1.0 / (2.0 * t)
    if loss is None:
        return ok
    return ok & (_f64(loss, "loss") <= _f64(ipo_loss_bound(c, tau), "bound"))


# --------------------------------------------------------------------------- dynamics buckets
def flip_buckets(correct_ref, correct_now) -> dict:
    """Flip buckets between pi_ref and a checkpoint (Sec. 4.1 / Fig. 2 of Chen et al. 2024).

    Inputs: ``BoolTensor[n]`` of R per pair under pi_ref and under pi_theta_t (same pairs).
    Returns ``{"n", "counts": {"c->c","c->i","i->c","i->i"}, "fractions": {... of n},
    "fraction_flipped_to_correct" (i->c / n), "fraction_flipped_to_correct_of_incorrect"
    (i->c / #incorrect at start; NaN if none), "fraction_flipped_to_incorrect" (c->i / n),
    "fraction_incorrect_at_start"}``.
    """
    r0 = torch.as_tensor(correct_ref).to(torch.bool).reshape(-1)
    r1 = torch.as_tensor(correct_now).to(torch.bool).reshape(-1)
    _same_shape(r0, r1, "correct_ref", "correct_now")
    n = r0.numel()
    if n == 0:
        raise DataError("no pairs", field="correct_ref")
    counts = {"c->c": int((r0 & r1).sum()), "c->i": int((r0 & ~r1).sum()),
              "i->c": int((~r0 & r1).sum()), "i->i": int((~r0 & ~r1).sum())}
    n_inc = counts["i->c"] + counts["i->i"]
    return {"n": n, "counts": counts, "fractions": {k: v / n for k, v in counts.items()},
            "fraction_flipped_to_correct": counts["i->c"] / n,
            "fraction_flipped_to_correct_of_incorrect": counts["i->c"] / n_inc if n_inc else math.nan,
            "fraction_flipped_to_incorrect": counts["c->i"] / n,
            "fraction_incorrect_at_start": n_inc / n}
