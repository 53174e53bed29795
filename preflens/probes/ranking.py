"""Ranking accuracy, idealized ranking accuracy and the DPO flip condition.

Source: Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings"
(NeurIPS 2024, arXiv 2405.19534). The official code's departures from Eq. 3 (tie band, a1 = 0,
dropped rows, log-likelihood ratio bug) are flags in :mod:`preflens.probes.official`. Theorem 4.1
(flip condition, DPO^γ/IPO pair losses, flip buckets) lives in :mod:`preflens.probes.flip` and the
calibration metrics / rank correlations in :mod:`preflens.probes.calibration`; both are
re-exported here.

Conventions (all functions):
* Scores are log-probs of the *response tokens only*: pass summed log-probs s(y) for R and
  per-token means s~(y) = s(y)/|y| for the length-normalised R~. Report both.
* "chosen" = y_w (majority preferred), "rejected" = y_l.
* m = log pi_theta(y_w) - log pi_theta(y_l) (model log-ratio);
  c = log pi_ref(y_l) - log pi_ref(y_w) (reference log-ratio, loser on top: c > 0 <=> the
  reference mis-ranks the pair); Delta_ref = -c.
* Everything is computed in float64; scalar (Python number) inputs give a float back, tensor
  inputs a float64 tensor on the input's device. softplus is evaluated as
  max(z, 0) + log1p(exp(-|z|)), exact for |z| in the thousands.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from preflens.errors import ConfigError, DataError
from preflens.probes._numbers import _f64, _positive, _same_shape
from preflens.probes.calibration import (  # re-exported: calibration belongs to Chen et al. too
    CalibrationMetrics, RankCorrelations, calibration_metrics, expected_calibration_error,
    kendall_tau_b, ranking_correlations, spearman_rho)

__all__ = [
    "ranking_correct", "ranking_accuracy", "ranking_accuracies",
    "competition_ranks", "ranking_correct_multi", "MultiRankingResult", "ranking_accuracy_multi",
    "alpha_from_votes", "alphas_from_votes", "tie_mask", "TIE_ALPHA",
    "idealized_ranking_correct", "idealized_ranking_accuracy",
    "flip_loss_threshold", "required_loss_decrease", "dpo_loss_value", "correct_from_dpo_loss",
    "dpo_margin_bounds",
    "ipo_loss_value", "ipo_loss_bound", "ipo_guarantees_correct",
    "flip_buckets", "tie_aware_correct", "flip_frontier_point",
    "CalibrationMetrics", "calibration_metrics", "expected_calibration_error",
    "RankCorrelations", "ranking_correlations", "spearman_rho", "kendall_tau_b",
]

PAPER_BETAS = (0.01, 0.1, 1.0, 5.0, 10.0)
TIE_ALPHA = 0.5  #: alpha of a tied vote (equal votes for both responses).
EPS_MODES = ("loser_share_eps", "one_minus_eps")


# --------------------------------------------------------------------------- helpers
def _nonempty_mean(flags: Tensor, what: str) -> float:
    if flags.numel() == 0:
        raise DataError(f"no {what} to average over")
    return float(flags.to(torch.float64).mean())


# --------------------------------------------------------------------------- pairwise R
def ranking_correct(chosen_logps, rejected_logps, *, strict: bool = False) -> Tensor:
    """Per-pair ranking correctness R (Chen et al. 2024, Def. 2.3; Remark 2.4 for R~).

    R_i = 1[s(y_w) >= s(y_l)] (paper: non-strict, exact ties count correct);
    ``strict=True`` gives 1[s(y_w) > s(y_l)] (the official code's effective behaviour).
    Pass summed log-probs for R, per-token mean log-probs for R~.

    Shapes: ``chosen_logps [n]``, ``rejected_logps [n]`` (equal shapes) -> ``BoolTensor[n]``.
    """
    w, l = _f64(chosen_logps, "chosen_logps"), _f64(rejected_logps, "rejected_logps")
    _same_shape(w, l, "chosen_logps", "rejected_logps")
    return w > l if strict else w >= l


def ranking_accuracy(chosen_logps, rejected_logps, *, strict: bool = False) -> float:
    """Dataset ranking accuracy = mean of :func:`ranking_correct` (Def. 2.3; >= unless strict)."""
    return _nonempty_mean(ranking_correct(chosen_logps, rejected_logps, strict=strict), "pairs")


def ranking_accuracies(chosen, rejected, *, strict: bool = False) -> dict[str, float]:
    """Both R (summed log-probs) and R~ (per-token mean) from two scoring results.

    ``chosen``/``rejected`` are objects with ``.logp [n]`` (summed) and ``.mean_logp [n]``
    (e.g. ``preflens.scoring.ResponseScores``). Returns ``{"summed": R, "mean": R~}``.
    """
    return {"summed": ranking_accuracy(chosen.logp, rejected.logp, strict=strict),
            "mean": ranking_accuracy(chosen.mean_logp, rejected.mean_logp, strict=strict)}


# --------------------------------------------------------------------------- n > 2 responses
def competition_ranks(scores, *, tie_tol: float = 0.0) -> Tensor:
    """Competition ranks, descending (Chen et al. 2024, Def. A.8; "1224" ranking).

    rank_i = 1 + #{j : s_j - s_i > tie_tol}; with ``tie_tol = 0`` exactly equal scores share
    the best rank. With ``tie_tol > 0`` a response is outranked only by scores more than
    ``tie_tol`` above it (in the units of ``scores``: nats for summed/mean log-probs); this
    relation is not transitive, so e.g. [0, 0.6, 1.2] with tol 1 gives ranks [2, 1, 1].

    Shapes: ``scores [..., n]`` -> ``LongTensor[..., n]`` (ranks along the last dim, 1 = best).
    """
    s = _f64(scores, "scores")
    if s.dim() == 0:
        raise DataError("scores must have at least one dimension", field="scores")
    if tie_tol < 0:
        raise ConfigError("tie_tol", f"must be >= 0, got {tie_tol!r}")
    beats = (s.unsqueeze(-2) - s.unsqueeze(-1)) > tie_tol  # [..., i, j]: s_j - s_i > tol
    return 1 + beats.sum(dim=-1)


def _items(x, field: str) -> list[Tensor]:
    if not isinstance(x, (Tensor, Sequence)) and hasattr(x, "ndim"):  # numpy arrays
        x = torch.as_tensor(x)
    if isinstance(x, Tensor) and x.dim() == 2:
        return [_f64(row, field) for row in x]
    if isinstance(x, Tensor) or not isinstance(x, Sequence):
        raise DataError("expected a 2-D tensor or a list of 1-D score vectors", field=field)
    out = [_f64(row, field) for row in x]
    for k, row in enumerate(out):
        if row.dim() != 1:
            raise DataError(f"item {k} is not a 1-D score vector", field=field)
    return out


@dataclass(frozen=True)
class MultiRankingResult:
    """``correct`` BoolTensor[N] (exact rank match per item) and ``human_has_tie`` BoolTensor[N].
    Unpacks like the former tuple: ``correct, tied = ranking_correct_multi(...)``."""

    correct: Tensor
    human_has_tie: Tensor

    def __iter__(self):
        return iter((self.correct, self.human_has_tie))

    def __getitem__(self, i):
        return (self.correct, self.human_has_tie)[i]

    def __repr__(self) -> str:
        return (f"MultiRankingResult(N={self.correct.numel()}, correct={int(self.correct.sum())}, "
                f"human_ties={int(self.human_has_tie.sum())})")


def ranking_correct_multi(model_scores, human_scores, *, tie_tol: float = 0.0) -> MultiRankingResult:
    """Exact-match ranking correctness for n >= 2 responses (Def. A.8; no partial credit).

    R_k = 1[competition_ranks(model_k, tie_tol) == competition_ranks(human_k)] elementwise for all
    n responses. Human scores: higher = better (pass ``-ranks`` if you hold ranks with 1 = best);
    human ties are exact ties. Model ties use ``tie_tol`` (units of the model scores). Note: for
    n = 2 an exact model tie gives ranks [1, 1] and is *wrong* here, unlike pairwise R (>=).

    Inputs: a list of N 1-D tensors (n may vary per item) or 2-D ``[N, n]`` tensors.
    Returns a :class:`MultiRankingResult` (``correct``, ``human_has_tie``; unpacks as a pair).
    """
    ms, hs = _items(model_scores, "model_scores"), _items(human_scores, "human_scores")
    if len(ms) != len(hs):
        raise DataError(f"{len(ms)} model items vs {len(hs)} human items", field="human_scores")
    correct, tied = [], []
    for k, (m, h) in enumerate(zip(ms, hs)):
        if m.shape != h.shape or m.numel() < 2:
            raise DataError(f"item {k}: need n >= 2 scores on both sides, got {m.numel()} model / "
                            f"{h.numel()} human", field="model_scores")
        hr = competition_ranks(h)
        correct.append(bool(torch.equal(competition_ranks(m, tie_tol=tie_tol), hr)))
        tied.append(bool(hr.unique().numel() < hr.numel()))
    return MultiRankingResult(torch.tensor(correct, dtype=torch.bool), torch.tensor(tied, dtype=torch.bool))


def ranking_accuracy_multi(model_scores, human_scores, *, tie_tol: float = 0.0,
                           human_ties: str = "keep") -> float:
    """Mean exact-match ranking accuracy over items (Def. A.8), see :func:`ranking_correct_multi`.

    ``human_ties="keep"`` scores items whose human ranking contains a tie (practically
    unmatchable with continuous model scores unless ``tie_tol > 0``); ``"drop"`` excludes them.
    """
    if human_ties not in ("keep", "drop"):
        raise ConfigError("human_ties", f"unknown value {human_ties!r}", allowed=("keep", "drop"))
    correct, tied = ranking_correct_multi(model_scores, human_scores, tie_tol=tie_tol)
    if human_ties == "drop":
        correct = correct[~tied]
    return _nonempty_mean(correct, "items (after dropping human ties)")


# --------------------------------------------------------------------------- alpha from votes
def _vote_is_chosen(label, k: int) -> bool:
    if isinstance(label, str):
        if label in ("chosen", "rejected"):
            return label == "chosen"
    elif isinstance(label, numbers.Integral) and int(label) in (0, 1):
        return int(label) == 1
    raise DataError(f"vote {k}: invalid label {label!r}; valid: 'chosen', 'rejected', 1, 0",
                    field="votes")


def alpha_from_votes(votes, *, eps: float = 1e-3, eps_mode: str = "loser_share_eps") -> float:
    """alpha = share of raters preferring the chosen response (Chen et al. 2024, Sec. 3, App. C.4).

    ``votes``: the votes of ONE pair, each ``"chosen"``/``"rejected"`` or an int ``1`` (= chosen)
    / ``0`` (= rejected) (bools count as ints). alpha = #chosen / #votes exactly, except a
    unanimous vote, whose odds alpha/(1-alpha) are infinite (Remark 3.2). Then:

    * ``"loser_share_eps"`` (default; App. C.4 and the official code): the loser's share 0 is
      replaced by ``eps``, odds = 1/eps, returned as alpha = 1/(1+eps) (= eps/(1+eps) when all
      raters chose "rejected");
    * ``"one_minus_eps"`` (footnote 5): alpha := 1 - eps (or eps), odds (1-eps)/eps.

    A tie returns exactly :data:`TIE_ALPHA` = 0.5 (test with :func:`tie_mask`). alpha < 0.5
    means the majority preferred the "rejected" response.
    """
    if eps_mode not in EPS_MODES:
        raise ConfigError("eps_mode", f"unknown value {eps_mode!r}", allowed=EPS_MODES)
    if not (0 < eps < 0.5):
        raise ConfigError("eps", f"must be in (0, 0.5), got {eps!r}")
    if isinstance(votes, (str, bytes)) or not hasattr(votes, "__iter__"):
        raise DataError(f"expected a list of vote labels, got {type(votes).__name__}", field="votes")
    votes = list(votes)
    if len(votes) == 0:
        raise DataError("no votes", field="votes")
    n_chosen = sum(_vote_is_chosen(v, k) for k, v in enumerate(votes))
    n = len(votes)
    if 0 < n_chosen < n:
        return n_chosen / n
    hi = 1.0 / (1.0 + eps) if eps_mode == "loser_share_eps" else 1.0 - eps
    return hi if n_chosen == n else 1.0 - hi


def alphas_from_votes(votes_per_pair, *, eps: float = 1e-3,
                      eps_mode: str = "loser_share_eps") -> Tensor:
    """:func:`alpha_from_votes` for many pairs: list of N vote lists -> float64 ``Tensor[N]``."""
    out = []
    for i, v in enumerate(votes_per_pair):
        try:
            out.append(alpha_from_votes(v, eps=eps, eps_mode=eps_mode))
        except DataError as e:
            raise DataError(f"pair {i}: {e.reason}", field="votes") from None
    return torch.tensor(out, dtype=torch.float64)


def tie_mask(alpha) -> Tensor:
    """BoolTensor marking tied pairs, alpha == 0.5 (to within 1e-12)."""
    return (_f64(alpha, "alpha") - TIE_ALPHA).abs() <= 1e-12


# --------------------------------------------------------------------------- idealized R*
def idealized_ranking_correct(delta_ref, alpha, beta: float) -> Tensor:
    """Would the perfectly optimised DPO/RLHF policy rank the pair correctly? (Cor. 3.3, Thm 3.1)

    log pi*(y_w)/pi*(y_l) = Delta_ref + logit(alpha)/beta, correct iff that is > 0 (strict),
    with Delta_ref = log pi_ref(chosen) - log pi_ref(rejected) (summed for R*, per-token mean
    for R~*) and alpha = share preferring the chosen response (Eq. 3). For alpha < 0.5 the
    majority winner is "rejected" and correct means the opposite sign (same rule, pair swapped).
    Ties (alpha = 0.5) have pi* ratio = pi_ref ratio for every beta; they are returned as
    1[Delta_ref >= 0] (= R(pi_ref), Def. 2.3) but exclude them with :func:`tie_mask`.

    Shapes: ``delta_ref [n]``, ``alpha [n]`` or scalar, ``beta`` > 0 scalar -> ``BoolTensor[n]``.
    alpha must lie strictly in (0, 1): use :func:`alpha_from_votes` for unanimous votes.
    """
    _positive(beta, "beta")
    d, a = _f64(delta_ref, "delta_ref"), _f64(alpha, "alpha")
    if not ((a > 0) & (a < 1)).all():
        raise DataError("alpha must be in (0, 1); unanimous votes need alpha_from_votes(eps=...)",
                        field="alpha")
    log_ratio = d + (torch.log(a) - torch.log1p(-a)) / float(beta)
    sign = torch.sign(a - TIE_ALPHA)
    return torch.where(tie_mask(a), d >= 0, sign * log_ratio > 0)


def idealized_ranking_accuracy(delta_ref, alpha, betas: Sequence[float] = PAPER_BETAS, *,
                               include_ties: bool = False, tie_correct=None) -> dict:
    """Idealized ranking accuracy R* over a beta grid (Cor. 3.3; Sec. 3 reports min/median/max).

    For each beta: mean of :func:`idealized_ranking_correct` over pairs. Ties (alpha = 0.5) are
    excluded unless ``include_ties``; included ties score ``tie_correct`` (BoolTensor[n], e.g.
    :func:`tie_aware_correct` of pi_ref) or by default 1[Delta_ref >= 0]. The median is
    ``statistics.median`` over the grid (3rd of 5 for the paper's grid).

    Returns ``{"per_beta": {beta: R*}, "min", "median", "max", "n_pairs", "n_ties"}``.
    """
    if len(betas) == 0:
        raise ConfigError("betas", "need at least one beta")
    d, a = _f64(delta_ref, "delta_ref"), _f64(alpha, "alpha")
    a = a.expand_as(d) if a.dim() == 0 else a
    _same_shape(d, a, "delta_ref", "alpha")
    ties = tie_mask(a)
    keep = torch.ones_like(ties) if include_ties else ~ties
    per_beta = {}
    for b in betas:
        ok = idealized_ranking_correct(d, a, b)
        if include_ties and tie_correct is not None:
            tc = torch.as_tensor(tie_correct, dtype=torch.bool, device=ok.device)
            ok = torch.where(ties, tc, ok)
        per_beta[float(b)] = _nonempty_mean(ok[keep], "pairs (ties excluded)")
    vals = list(per_beta.values())
    return {"per_beta": per_beta, "min": min(vals), "median": statistics.median(vals),
            "max": max(vals), "n_pairs": int(keep.sum()), "n_ties": int(ties.sum())}


# --------------------------------------------------------------------------- ties (Def. C.1)
def tie_aware_correct(logp_1, logp_2, alpha, *, tol: float = 0.01, space: str = "prob",
                      tie_inclusive: bool = False) -> Tensor:
    """Tie-aware ranking correctness R_Ties (Chen et al. 2024, Def. C.1).

    alpha = share of raters preferring response 1. alpha > 0.5: 1[s1 > s2]; alpha < 0.5:
    1[s1 < s2] (strict; decided in log space, which is exact and monotone-equivalent); alpha = 0.5:
    1[|x1 - x2| < tol] (``tie_inclusive``: <=) where x = exp(s) for ``space="prob"`` (paper;
    with per-token mean log-probs this is the geometric-mean token probability; with summed
    log-probs nearly always true since sequence probabilities are tiny) or x = s for
    ``space="logprob"`` (nats; the official code's choice for R).

    Shapes: ``logp_1 [n]``, ``logp_2 [n]``, ``alpha [n]`` or scalar -> ``BoolTensor[n]``.
    """
    if space not in ("prob", "logprob"):
        raise ConfigError("space", f"unknown value {space!r}", allowed=("prob", "logprob"))
    if tol < 0:
        raise ConfigError("tol", f"must be >= 0, got {tol!r}")
    s1, s2, a = _f64(logp_1, "logp_1"), _f64(logp_2, "logp_2"), _f64(alpha, "alpha")
    _same_shape(s1, s2, "logp_1", "logp_2")
    if space == "logprob":
        gap = (s1 - s2).abs()
    else:  # |e^s1 - e^s2| = e^max * (1 - e^-|s1-s2|), no overflow or cancellation
        gap = torch.exp(torch.maximum(s1, s2)) * -torch.expm1(-(s1 - s2).abs())
        gap = torch.where(s1 == s2, torch.zeros_like(gap), gap)
    tied = gap <= tol if tie_inclusive else gap < tol
    decided = torch.where(a > TIE_ALPHA, s1 > s2, s1 < s2)
    return torch.where(tie_mask(a).expand_as(decided), tied, decided)


# Theorem 4.1 / Prop. A.7 (flip condition, DPO^γ and IPO losses, flip buckets) live in
# preflens.probes.flip; re-exported here so `from preflens.probes.ranking import ...` keeps working.
from preflens.probes.flip import (  # noqa: E402
    UNDETERMINED, correct_from_dpo_loss, dpo_loss_value, dpo_margin_bounds, flip_buckets,
    flip_loss_threshold, ipo_guarantees_correct, ipo_loss_bound, ipo_loss_value,
    required_loss_decrease)


def flip_frontier_point(margin, c, beta: float) -> dict:
    """Where one DPO run lands on the flip frontier: loss drop vs share of mis-ranked pairs flipped.

    Chen et al. 2024, Def. 2.2 (DPO loss), Theorem 4.1 and Sec. 4.1. Per pair, ``margin`` =
    m = log pi_theta(y_w) - log pi_theta(y_l) after training and ``c`` = log pi_ref(y_l) -
    log pi_ref(y_w) (summed log-probs; c > 0 <=> pi_ref mis-ranks the pair), ``beta`` the run's
    DPO beta. Correct means m >= 0 (Def. 2.3, >=), so "incorrect at start" is c > 0.

    Returns floats: ``mean_loss`` = mean over pairs of softplus(-beta (m + c)) (the DPO loss on
    every pair, not a training-batch average); ``loss_drop`` = log 2 - mean_loss (log 2 = the loss
    at pi_theta = pi_ref); ``flipped_to_correct_of_incorrect`` (i->c / #incorrect at start),
    ``flipped_to_incorrect_of_correct`` (c->i / #correct at start), NaN when the denominator is 0;
    ``ranking_accuracy`` = mean 1[m >= 0]; ``incorrect_at_start``; ``median_threshold_incorrect``
    = median (the mean of the two middle values for an even count) over the initially incorrect
    pairs of their flip threshold softplus(-beta c) (Theorem 4.1: such a pair ends correct iff its
    loss is at most that; NaN if there are none).
    """
    m, cc = _f64(margin, "margin"), _f64(c, "c")
    _same_shape(m, cc, "margin", "c")
    loss = dpo_loss_value(m, cc, beta)
    buckets = flip_buckets(cc <= 0, m >= 0)
    counts, n = buckets["counts"], buckets["n"]
    n_correct = counts["c->c"] + counts["c->i"]
    wrong = cc > 0
    return {
        "mean_loss": float(loss.mean()),
        "loss_drop": math.log(2.0) - float(loss.mean()),
        "flipped_to_correct_of_incorrect": float(buckets["fraction_flipped_to_correct_of_incorrect"]),
        "flipped_to_incorrect_of_correct": counts["c->i"] / n_correct if n_correct else math.nan,
        "ranking_accuracy": (counts["c->c"] + counts["i->c"]) / n,
        "incorrect_at_start": buckets["fraction_incorrect_at_start"],
        "median_threshold_incorrect": (float(flip_loss_threshold(cc[wrong], beta).quantile(0.5))
                                       if bool(wrong.any()) else math.nan),
    }
