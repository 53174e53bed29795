"""``measure ranking``: ranking accuracy R, R̃, idealized R* and flips against a reference.

Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings" (NeurIPS
2024): R = mean 1[log π(y_w|x) ≥ log π(y_l|x)] on summed response log-probs (Def. 2.3, ties
correct), R̃ the same on per-token means (Remark 2.4), and R* = the accuracy of the ideal
DPO/RLHF policy from π_ref over a β grid (Cor. 3.3), where π_ref is ``reference`` when given,
else the measured model itself. α per pair: the exact ``alpha`` when the data has it, else
:func:`~preflens.probes.ranking.alpha_from_votes` of its ``votes``; pairs with neither are left
out of R*, ties (α = 0.5) too. With a ``reference``, the flip buckets (Sec. 4.1, Fig. 2) count
pairs that went incorrect → correct and correct → incorrect from the reference to the model.

Per-item row: ``logp_chosen``, ``logp_rejected`` (summed, EOS counted), ``mean_logp_*``,
``n_tokens_*``, ``correct``, ``correct_mean``, ``alpha``, ``alpha_votes`` and, with a reference,
``ref_logp_chosen``/``ref_logp_rejected``/``ref_mean_logp_*``/``ref_correct``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preflens.errors import ConfigError
from preflens.probes.ranking import (
    PAPER_BETAS,
    alpha_from_votes,
    flip_buckets,
    idealized_ranking_accuracy,
    ranking_correct,
)
from preflens.scoring import response_logprobs

NAME = "ranking"
KIND = "forward"
REFERENCE = "optional"


@dataclass(frozen=True)
class Options:
    """``betas``: the β grid of R* (default the paper's 0.01, 0.1, 1, 5, 10)."""

    betas: tuple[float, ...] = PAPER_BETAS

    def __post_init__(self) -> None:
        betas = tuple(float(b) for b in self.betas)
        if not betas or any(not b > 0 or b != b or b == float("inf") for b in betas):
            raise ConfigError("betas", f"need finite betas > 0, got {list(self.betas)}")
        object.__setattr__(self, "betas", betas)


def _scores(lm, pairs, batch_size: int):
    prompts = [p.prompt for p in pairs]
    s_w = response_logprobs(lm, prompts, [p.chosen for p in pairs], batch_size=batch_size,
                            sources=[p.source for p in pairs], response_field="chosen")
    s_l = response_logprobs(lm, prompts, [p.rejected for p in pairs], batch_size=batch_size,
                            sources=[p.source for p in pairs], response_field="rejected")
    return s_w, s_l


def score_chunk(lm, reference, pairs, opts: Options, batch_size: int) -> list[dict]:
    s_w, s_l = _scores(lm, pairs, batch_size)
    ok = ranking_correct(s_w.logp, s_l.logp)
    ok_mean = ranking_correct(s_w.mean_logp, s_l.mean_logp)
    rows = []
    for i, p in enumerate(pairs):
        rows.append({
            "logp_chosen": float(s_w.logp[i]), "logp_rejected": float(s_l.logp[i]),
            "mean_logp_chosen": float(s_w.mean_logp[i]), "mean_logp_rejected": float(s_l.mean_logp[i]),
            "n_tokens_chosen": int(s_w.n_tokens[i]), "n_tokens_rejected": int(s_l.n_tokens[i]),
            "correct": bool(ok[i]), "correct_mean": bool(ok_mean[i]),
            "alpha": p.alpha,
            "alpha_votes": alpha_from_votes(p.votes) if p.votes else None,
        })
    if reference is not None:
        r_w, r_l = _scores(reference, pairs, batch_size)
        r_ok = ranking_correct(r_w.logp, r_l.logp)
        for i, row in enumerate(rows):
            row.update({"ref_logp_chosen": float(r_w.logp[i]), "ref_logp_rejected": float(r_l.logp[i]),
                        "ref_mean_logp_chosen": float(r_w.mean_logp[i]),
                        "ref_mean_logp_rejected": float(r_l.mean_logp[i]),
                        "ref_correct": bool(r_ok[i])})
    return rows


def _col(rows, key) -> torch.Tensor:
    return torch.tensor([r[key] for r in rows], dtype=torch.float64)


def _public(d: dict) -> dict:
    return {"min": d["min"], "median": d["median"], "max": d["max"],
            "per_beta": {str(k): v for k, v in d["per_beta"].items()},
            "n_pairs": d["n_pairs"], "n_ties": d["n_ties"]}


def _idealized(rows, opts: Options, prefix: str) -> dict | None:
    """R* from π_ref's Δ (``prefix`` "" = the model, "ref_" = the reference), or None without α."""
    alpha = [r["alpha"] if r["alpha"] is not None else r["alpha_votes"] for r in rows]
    keep = [k for k, a in enumerate(alpha) if a is not None]
    if not keep:
        return None
    sub = [rows[k] for k in keep]
    a = torch.tensor([alpha[k] for k in keep], dtype=torch.float64)
    d = _col(sub, f"{prefix}logp_chosen") - _col(sub, f"{prefix}logp_rejected")
    d_mean = _col(sub, f"{prefix}mean_logp_chosen") - _col(sub, f"{prefix}mean_logp_rejected")
    if bool((a == 0.5).all()):
        return None
    out = _public(idealized_ranking_accuracy(d, a, opts.betas))
    out["length_normalized"] = _public(idealized_ranking_accuracy(d_mean, a, opts.betas))
    votes = [k for k in keep if rows[k]["alpha_votes"] is not None]
    if votes and any(rows[k]["alpha"] is not None for k in votes):
        av = torch.tensor([rows[k]["alpha_votes"] for k in votes], dtype=torch.float64)
        dv = torch.tensor([rows[k][f"{prefix}logp_chosen"] - rows[k][f"{prefix}logp_rejected"]
                           for k in votes], dtype=torch.float64)
        if not bool((av == 0.5).all()):
            out["from_votes"] = _public(idealized_ranking_accuracy(dv, av, opts.betas))
    return out


def summarize(rows, opts: Options, has_reference: bool) -> dict:
    """Aggregate numbers: R, R̃, R* (from π_ref) and, with a reference, its R, R̃ and the flips."""
    w, l = _col(rows, "logp_chosen"), _col(rows, "logp_rejected")
    wm, lm_ = _col(rows, "mean_logp_chosen"), _col(rows, "mean_logp_rejected")
    out: dict = {
        "n_pairs": len(rows),
        "ranking_accuracy": float(ranking_correct(w, l).double().mean()),
        "ranking_accuracy_mean": float(ranking_correct(wm, lm_).double().mean()),
    }
    prefix = "ref_" if has_reference else ""
    out["idealized"] = _idealized(rows, opts, prefix)
    out["idealized_from"] = "reference" if has_reference else "model"
    if has_reference:
        rw, rl = _col(rows, "ref_logp_chosen"), _col(rows, "ref_logp_rejected")
        ref_ok = ranking_correct(rw, rl)
        out["reference"] = {
            "ranking_accuracy": float(ref_ok.double().mean()),
            "ranking_accuracy_mean": float(ranking_correct(_col(rows, "ref_mean_logp_chosen"),
                                                           _col(rows, "ref_mean_logp_rejected")).double().mean()),
        }
        flips = flip_buckets(ref_ok, ranking_correct(w, l))
        out["flips"] = {k: flips[k] for k in ("counts", "fractions", "fraction_flipped_to_correct",
                                              "fraction_flipped_to_incorrect", "fraction_incorrect_at_start")}
    return out


def figure(rows, summary: dict):
    from preflens import plotting

    groups = ["model"] + (["reference"] if "reference" in summary else [])
    series = {"R": [summary["ranking_accuracy"]], "R̃": [summary["ranking_accuracy_mean"]]}
    if "reference" in summary:
        series["R"].append(summary["reference"]["ranking_accuracy"])
        series["R̃"].append(summary["reference"]["ranking_accuracy_mean"])
    ideal = summary.get("idealized")
    if ideal:
        for k in ("min", "median", "max"):
            series[f"R* {k}"] = [ideal[k]] * len(groups)
    return plotting.grouped_bars(groups, series, ylabel="accuracy",
                                 title=f"ranking accuracy vs idealized (R* from the {summary['idealized_from']})")
