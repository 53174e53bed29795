"""Idealized ranking accuracy R* with the official code's departures as named flags.

Source: Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings"
(NeurIPS 2024, arXiv 2405.19534), Eq. 3 / Corollary 3.3, and its official code
(angie-chen55/pref-learning-ranking-acc: ``RLHFMinimizerClient.compute_ranks``, driven by
``calculate_upper_bound_rlhf.py``), which departs from Eq. 3 in four ways. Each departure is one
field of :class:`RankingCompat`; ``RankingCompat()`` is the paper, ``RankingCompat.official(...)``
reproduces the published numbers' arithmetic. :func:`preflens.probes.ranking.idealized_ranking_correct`
is the paper's form on Δ_ref; the functions here take the two responses' reference log-probs
*in annotation order* (response 1, response 2) and the share of raters preferring each, because
two of the departures are not symmetric in the two responses.

Paper (Eq. 3, Cor. 3.3): log π*(y1)/π*(y2) = Δ_ref + (log a1 − log a2)/β, Δ_ref = s1 − s2; the
pair is correct iff that log-ratio has the sign of a1 − a2 (strict). A zero share is replaced by
``eps`` on either side (loser-share ε, App. C.4). Computed in log space: exact, never overflows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from preflens.errors import ConfigError, DataError
from preflens.probes.ranking import PAPER_BETAS

__all__ = ["RankingCompat", "IdealizedCorrect", "idealized_correct_pairs",
           "idealized_accuracy_pairs"]


@dataclass(frozen=True)
class RankingCompat:
    """Which official-code departures from Eq. 3 to apply (all off = the paper).

    * ``tie_band``: ``None`` (paper: the sign decides) or a float (official: 0.05). The expected
      ratio a1/a2 and the posterior ratio π*(y1)/π*(y2) are each labelled "tie" when
      |r − 1| < band, "1 wins" when r ≥ 1 + band, else "2 wins"; correct iff the labels agree.
      A near-1 posterior therefore counts wrong for a decided vote.
    * ``zero_share_correct``: official ``a1 = 0`` handling: the odds are exactly 0, so both ratios
      are 0 and the pair is correct for every β and π_ref (the ε guards only a2 = 0). Paper:
      a zero share on either side becomes ε.
    * ``drop_nonfinite``: official: the posterior ratio is computed in linear float64
      ((a1/a2)^(1/β) × likelihood ratio) and rows where it is inf or NaN (overflow, e.g.
      a2 = 0 at β = 0.01 gives (1/ε)^100 = 1e300) are silently left out of the mean.
    * ``loglik_ratio_bug``: official summed (non-length-normalized) path: the likelihood ratio
      π_ref(y1)/π_ref(y2) is replaced by the ratio of log-likelihoods s1/s2 (positive, near 1,
      and inverted: s1 > s2 gives s1/s2 < 1). **This is a bug** in the official code; it is
      offered only to reproduce published summed-path R* values. The length-normalized path
      used the correct ratio exp(s̃1 − s̃2).
    """

    tie_band: float | None = None
    zero_share_correct: bool = False
    drop_nonfinite: bool = False
    loglik_ratio_bug: bool = False

    @classmethod
    def official(cls, *, length_normalized: bool) -> RankingCompat:
        """The official code's R* (``compute_ranks``): all departures; the log-likelihood-ratio
        bug only on the summed path (``length_normalized=False``)."""
        return cls(tie_band=0.05, zero_share_correct=True, drop_nonfinite=True,
                   loglik_ratio_bug=not length_normalized)

    def __post_init__(self):
        if self.tie_band is not None and not (0 <= float(self.tie_band) < 1):
            raise ConfigError("tie_band", f"must be None or in [0, 1), got {self.tie_band!r}")

    @property
    def is_paper(self) -> bool:
        return self == RankingCompat()


@dataclass(frozen=True)
class IdealizedCorrect:
    """Per pair: ``correct`` BoolTensor[n]; ``kept`` BoolTensor[n] (False = left out of the mean,
    only under ``drop_nonfinite``)."""

    correct: Tensor
    kept: Tensor

    def __repr__(self) -> str:
        n = self.correct.numel()
        return (f"IdealizedCorrect(n={n}, correct={int((self.correct & self.kept).sum())}, "
                f"kept={int(self.kept.sum())})")


def _vec(x, field: str) -> Tensor:
    try:
        t = x.detach().to(torch.float64) if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot read as numbers: {e}", field=field) from None
    if t.dim() != 1:
        raise DataError(f"expected a 1-D sequence, got shape {tuple(t.shape)}", field=field)
    if torch.isnan(t).any():
        raise DataError("contains NaN", field=field)
    return t.cpu()


def _inputs(ref_logp_1, ref_logp_2, share_1, share_2):
    s1, s2, a1 = _vec(ref_logp_1, "ref_logp_1"), _vec(ref_logp_2, "ref_logp_2"), _vec(share_1, "share_1")
    a2 = 1.0 - a1 if share_2 is None else _vec(share_2, "share_2")
    for t, f in ((s2, "ref_logp_2"), (a1, "share_1"), (a2, "share_2")):
        if t.shape != s1.shape:
            raise DataError(f"shape {tuple(t.shape)} != shape {tuple(s1.shape)} of 'ref_logp_1'", field=f)
    if ((a1 < 0) | (a1 > 1) | (a2 < 0) | (a2 > 1) | ((a1 == 0) & (a2 == 0))).any():
        raise DataError("rater shares must lie in [0, 1] and not both be 0", field="share_1")
    return s1, s2, a1, a2


def _labels(r: Tensor, band: float) -> Tensor:
    """Official ``_get_ranking_from_ratio``: 0 = tie (|r-1| < band), 1 = first (r >= 1+band), 2 = second."""
    return torch.where((r - 1.0).abs() < band, torch.zeros_like(r, dtype=torch.long),
                       torch.where(r >= 1.0 + band, torch.ones_like(r, dtype=torch.long),
                                   torch.full_like(r, 2, dtype=torch.long)))


def idealized_correct_pairs(ref_logp_1, ref_logp_2, share_1, beta: float, *, share_2=None,
                            compat: RankingCompat | None = None, eps: float = 1e-3) -> IdealizedCorrect:
    """Would the perfect DPO/RLHF optimum rank each pair as the raters did? (Chen et al. Eq. 3.)

    Args:
        ref_logp_1, ref_logp_2: ``[n]`` reference log-probs of response 1 and 2 (summed for R*,
            per-token means for R̃*), in annotation order.
        share_1: ``[n]`` share of raters preferring response 1; ``share_2`` defaults to 1 − share_1.
        beta: > 0. compat: :class:`RankingCompat` (default: the paper). eps: the zero-share guard.

    Paper: correct iff sign(a1 − a2)·(s1 − s2 + (log a1' − log a2')/β) > 0 with zero shares
    replaced by ``eps`` (a tie a1 = a2 is correct iff s1 ≥ s2, R(π_ref)). With any flag on, the
    official linear-space arithmetic is used, flag by flag (see :class:`RankingCompat`).
    """
    if not (isinstance(beta, (int, float)) and beta > 0 and beta != float("inf")):
        raise ConfigError("beta", f"must be finite and > 0, got {beta!r}")
    if not (0 < eps < 1):
        raise ConfigError("eps", f"must be in (0, 1), got {eps!r}")
    compat = compat or RankingCompat()
    s1, s2, a1, a2 = _inputs(ref_logp_1, ref_logp_2, share_1, share_2)
    e = torch.full_like(a1, float(eps))
    if compat.is_paper:
        lo = torch.log(torch.where(a1 > 0, a1, e)) - torch.log(torch.where(a2 > 0, a2, e))
        log_post = (s1 - s2) + lo / float(beta)
        correct = torch.where(a1 == a2, s1 >= s2, torch.sign(a1 - a2) * log_post > 0)
        return IdealizedCorrect(correct, torch.ones_like(correct))
    # official arithmetic, linear float64, flag by flag
    num = a1 if compat.zero_share_correct else torch.where(a1 > 0, a1, e)
    odds = num / torch.where(a2 > 0, a2, e)
    lik = s1 / s2 if compat.loglik_ratio_bug else torch.exp(s1 - s2)
    post = odds ** (1.0 / float(beta)) * lik
    kept = torch.isfinite(post) if compat.drop_nonfinite else torch.ones_like(post, dtype=torch.bool)
    if compat.tie_band is not None:
        correct = _labels(odds, float(compat.tie_band)) == _labels(post, float(compat.tie_band))
    else:
        correct = torch.where(a1 == a2, post >= 1, (post > 1) == (odds > 1))
    return IdealizedCorrect(correct, kept)


def idealized_accuracy_pairs(ref_logp_1, ref_logp_2, share_1, betas: Sequence[float] = PAPER_BETAS,
                             *, share_2=None, compat: RankingCompat | None = None, eps: float = 1e-3,
                             include_ties: bool = False) -> dict:
    """R* over a β grid (Cor. 3.3, Sec. 3: min / median / max) from :func:`idealized_correct_pairs`.

    Tied votes (a1 = a2) are left out unless ``include_ties`` (the official driver hard-codes
    that for AlpacaFarm). Under ``drop_nonfinite`` each β's mean is over its kept rows only.
    Returns ``{"per_beta": {β: R*}, "min", "median", "max", "n_pairs", "n_ties",
    "n_dropped": {β: count}}``.
    """
    if len(betas) == 0:
        raise ConfigError("betas", "need at least one beta")
    _, _, a1, a2 = _inputs(ref_logp_1, ref_logp_2, share_1, share_2)
    ties = a1 == a2
    use = torch.ones_like(ties) if include_ties else ~ties
    per_beta, dropped = {}, {}
    for b in betas:
        res = idealized_correct_pairs(ref_logp_1, ref_logp_2, share_1, b, share_2=share_2,
                                      compat=compat, eps=eps)
        m = use & res.kept
        if not bool(m.any()):
            raise DataError(f"no pairs left at beta={b} (ties excluded, non-finite dropped)")
        per_beta[float(b)] = float(res.correct[m].to(torch.float64).mean())
        dropped[float(b)] = int((use & ~res.kept).sum())
    vals = list(per_beta.values())
    return {"per_beta": per_beta, "min": min(vals), "median": statistics.median(vals),
            "max": max(vals), "n_pairs": int(use.sum()), "n_ties": int(ties.sum()),
            "n_dropped": dropped}
