"""Calibration of likelihood ratios against rater shares, and rank correlations for n-way rankings.

Source: Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings"
(NeurIPS 2024, arXiv 2405.19534), Sec. 3 and App. C (calibration of the reference model's
likelihood ratios), with the metric definitions of its official code (``distance_lib``: MSE,
LogDifference, Correlation, ExpectedCalibrationError, RankingMetric). Re-exported by
:mod:`preflens.probes.ranking`.

Conventions: pairs in annotation order (response 1, response 2); ``model_logratio`` =
log π(y1|x) − log π(y2|x) (summed log-probs, or per-token means for the length-normalized
ratio); ``share_1`` = fraction of raters preferring response 1, ``share_2`` = 1 − share_1 unless
given. The expected ratio is a1/a2 with a zero a2 replaced by ``eps`` (official); all sums are
float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from preflens.errors import ConfigError, DataError
from preflens.stats import average_ranks

__all__ = ["CalibrationMetrics", "calibration_metrics", "expected_calibration_error",
           "RankCorrelations", "ranking_correlations", "spearman_rho", "kendall_tau_b"]


def _vec(x, field: str) -> Tensor:
    try:
        t = x.detach().to(torch.float64) if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot read as numbers: {e}", field=field) from None
    if t.dim() != 1 or t.numel() == 0:
        raise DataError(f"expected a non-empty 1-D sequence, got shape {tuple(t.shape)}", field=field)
    if torch.isnan(t).any():
        raise DataError("contains NaN", field=field)
    return t.cpu()


@dataclass(frozen=True)
class CalibrationMetrics:
    """Likelihood-ratio calibration over ``n`` kept pairs (``n_dropped`` had a non-finite ratio).

    ``lr_mse``/``lr_mse_std``: mean and population std of (a1/a2 − π1/π2)²; ``log_diff``/
    ``log_diff_std``: mean and std of |log(a1/a2) − log(π1/π2)|; ``pearson``: Pearson r of the two
    ratios (NaN if either is constant); ``ece``: :func:`expected_calibration_error` of σ(log-ratio)
    against the majority label, over the ``n_decided`` pairs without a tied vote.
    """

    n: int
    n_dropped: int
    lr_mse: float
    lr_mse_std: float
    log_diff: float
    log_diff_std: float
    pearson: float
    ece: float
    n_decided: int


def _pearson(x: Tensor, y: Tensor) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / den if den > 0 else math.nan


def expected_calibration_error(y_true, y_prob, *, n_bins: int = 10) -> float:
    """Binned ECE (Naeini et al. 2015) as in Chen et al.'s code (sklearn-style uniform bins).

    Edges 0, 1/n_bins, …, 1; a probability equal to an inner edge goes to the LOWER bin
    (searchsorted, left); ECE = Σ_b (n_b/N)·|mean(y_true in b) − mean(y_prob in b)| over
    non-empty bins. ``y_true`` in {0, 1}, ``y_prob`` in [0, 1].
    """
    t, p = _vec(y_true, "y_true"), _vec(y_prob, "y_prob")
    if t.shape != p.shape:
        raise DataError(f"shape {tuple(p.shape)} != {tuple(t.shape)}", field="y_prob")
    if ((p < 0) | (p > 1)).any():
        raise DataError("probabilities outside [0, 1]", field="y_prob")
    if not ((t == 0) | (t == 1)).all():
        raise DataError("labels must be 0 or 1", field="y_true")
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError("n_bins", f"must be a positive integer, got {n_bins!r}")
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    ids = torch.searchsorted(edges[1:-1].contiguous(), p, right=False)
    total = torch.bincount(ids, minlength=n_bins).to(torch.float64)
    s_true = torch.bincount(ids, weights=t, minlength=n_bins)
    s_prob = torch.bincount(ids, weights=p, minlength=n_bins)
    nz = total > 0
    err = (s_true[nz] / total[nz] - s_prob[nz] / total[nz]).abs()
    return float((total[nz] / p.numel() * err).sum())


def calibration_metrics(model_logratio, share_1, *, share_2=None, eps: float = 1e-3,
                        n_bins: int = 10) -> CalibrationMetrics:
    """Calibration of the model's likelihood ratios π(y1)/π(y2) against the raters' a1/a2.

    Chen et al. 2024 ask whether π_ref's likelihood ratio matches the human preference ratio
    (the official ``likelihood_ratio`` metrics). Ratios are exp(``model_logratio``) in float64;
    rows where that overflows (log-ratio > ~709.8, common for summed log-probs) are dropped and
    counted, as the official code does. ``log_diff`` is computed in log space (exact).
    """
    lr, a1 = _vec(model_logratio, "model_logratio"), _vec(share_1, "share_1")
    a2 = 1.0 - a1 if share_2 is None else _vec(share_2, "share_2")
    if lr.shape != a1.shape or a2.shape != a1.shape:
        raise DataError("model_logratio, share_1 and share_2 must have the same length", field="share_1")
    if ((a1 < 0) | (a1 > 1) | (a2 < 0) | (a2 > 1) | ((a1 == 0) & (a2 == 0))).any():
        raise DataError("rater shares must lie in [0, 1] and not both be 0", field="share_1")
    if not (0 < eps < 1):
        raise ConfigError("eps", f"must be in (0, 1), got {eps!r}")
    expected = a1 / torch.where(a2 > 0, a2, torch.full_like(a2, eps))
    pred = torch.exp(lr)
    keep = torch.isfinite(pred)
    if not bool(keep.any()):
        raise DataError("every likelihood ratio overflowed", field="model_logratio")
    e, p, l = expected[keep], pred[keep], lr[keep]
    sq = (e - p) ** 2
    log_e = torch.log(torch.where(e > 0, e, torch.full_like(e, eps)))
    ad = (log_e - l).abs()
    decided = a1 != a2
    ece = (expected_calibration_error((a1[decided] > a2[decided]).double(), torch.sigmoid(lr[decided]),
                                      n_bins=n_bins) if bool(decided.any()) else math.nan)
    return CalibrationMetrics(int(keep.sum()), int((~keep).sum()), float(sq.mean()),
                              float(sq.std(unbiased=False)), float(ad.mean()),
                              float(ad.std(unbiased=False)), _pearson(e, p), ece, int(decided.sum()))


# --------------------------------------------------------------------------- rank correlations
def spearman_rho(x, y) -> float:
    """Spearman's ρ with average ranks for ties (Pearson r of the rank vectors); NaN if either
    side is constant."""
    a, b = _vec(x, "x"), _vec(y, "y")
    if a.shape != b.shape:
        raise DataError(f"shape {tuple(b.shape)} != {tuple(a.shape)}", field="y")
    return _pearson(average_ranks(a), average_ranks(b))


def kendall_tau_b(x, y) -> float:
    """Kendall's τ_b (Kendall 1945): (P − Q)/sqrt((n0 − n1)(n0 − n2)), n0 = n(n−1)/2, n1/n2 the
    pairs tied in x / y; pairs tied in both count in neither P nor Q. NaN if either is constant.
    O(n²), meant for the small n of n-way rankings."""
    a, b = _vec(x, "x"), _vec(y, "y")
    if a.shape != b.shape:
        raise DataError(f"shape {tuple(b.shape)} != {tuple(a.shape)}", field="y")
    da = torch.sign(a[:, None] - a[None, :])
    db = torch.sign(b[:, None] - b[None, :])
    iu = torch.triu_indices(a.numel(), a.numel(), offset=1)
    sa, sb = da[iu[0], iu[1]], db[iu[0], iu[1]]
    n0 = sa.numel()
    s = float((sa * sb).sum())
    den = math.sqrt(float((sa != 0).sum()) * float((sb != 0).sum()))
    return s / den if den > 0 and n0 > 0 else math.nan


@dataclass(frozen=True)
class RankCorrelations:
    """Per-item Spearman ρ and Kendall τ_b (``[N]`` float64, NaN where undefined) and their means
    over the defined items (the official code's ``RankingMetric`` on lists of rankings)."""

    spearman: Tensor
    kendall: Tensor
    mean_spearman: float
    mean_kendall: float
    n_undefined: int

    def __repr__(self) -> str:
        return (f"RankCorrelations(N={self.spearman.numel()}, mean_spearman={self.mean_spearman:.4g}, "
                f"mean_kendall={self.mean_kendall:.4g}, n_undefined={self.n_undefined})")


def ranking_correlations(model_scores, human_scores) -> RankCorrelations:
    """Rank agreement of model and human for n-way items (Chen et al. 2024, App. A.8, C).

    Inputs: lists of N 1-D score vectors (higher = better; n may vary per item) or ``[N, n]``
    tensors. Each item: :func:`spearman_rho` and :func:`kendall_tau_b` of the two score vectors
    (rank correlations are invariant to the ranking direction as long as both use the same).
    An item where either side is constant has no correlation: NaN, counted in ``n_undefined``
    and left out of the means (the official code instead perturbs one entry by 1e-3).
    """
    def items(x, f):
        if isinstance(x, Tensor) and x.dim() == 2:
            return [row for row in x]
        if isinstance(x, Tensor) or isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
            raise DataError("expected a 2-D tensor or a list of 1-D score vectors", field=f)
        return list(x)
    ms, hs = items(model_scores, "model_scores"), items(human_scores, "human_scores")
    if len(ms) != len(hs) or not ms:
        raise DataError(f"{len(ms)} model items vs {len(hs)} human items", field="human_scores")
    sp = torch.tensor([spearman_rho(m, h) for m, h in zip(ms, hs)], dtype=torch.float64)
    kt = torch.tensor([kendall_tau_b(m, h) for m, h in zip(ms, hs)], dtype=torch.float64)
    ok = ~torch.isnan(sp)
    mean = (lambda t: float(t[~torch.isnan(t)].mean()) if bool((~torch.isnan(t)).any()) else math.nan)
    return RankCorrelations(sp, kt, mean(sp), mean(kt), int((~ok).sum()))
