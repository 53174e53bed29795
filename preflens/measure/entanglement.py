"""``measure entanglement``: per-pair gradient inner products, norms and cosines.

Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement" (ICLR 2025, arXiv 2410.13828), Eqs. 3-5 and Table 1: with g = ∇θ log π(y|x)
(summed response log-probs, EOS counted), a margin loss moves log π(y_w) by ∝ a_w‖g_w‖² − a_l⟨g_w,g_l⟩
and log π(y_l) by ∝ a_w⟨g_w,g_l⟩ − a_l‖g_l‖²; pairs with a large ⟨g_w, g_l⟩ relative to the norms
pull the chosen response down. Numbers come from
:func:`preflens.dynamics.entanglement.pair_gradient_stats` (ghost inner products by default,
``method="exact"`` for two backwards per pair) and the predicted first-step case from
:func:`~preflens.dynamics.entanglement.predict_first_order` with the loss's weights at the
reference log-probs (the ``reference`` when given, else the model itself, i.e. at initialization).

Per-item row: ``inner``, ``norm_w_sq``, ``norm_l_sq``, ``cos``, ``r_w``, ``r_l``, ``u_w``, ``u_l``,
``len_w``, ``len_l``, ``pred_delta_u_w``, ``pred_delta_u_l`` (lr = 1) and ``case``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from preflens.dynamics.entanglement import (
    CASES,
    case_counts,
    entanglement_case,
    pair_gradient_stats,
    predict_first_order,
)
from preflens.errors import ConfigError
from preflens.scoring import response_logprobs

NAME = "entanglement"
KIND = "gradient"
REFERENCE = "optional"
METHODS = ("ghost", "exact")


@dataclass(frozen=True)
class Options:
    """``method`` ghost (default) or exact; ``params`` a parameter selection (None = all, or a
    preset/regex of :func:`preflens.dynamics.ghost.select_parameters`); ``include_layernorm``;
    ``loss`` and ``loss_kwargs`` for the predicted first-step case (default DPO with the registry's
    defaults, β = 0.1)."""

    method: str = "ghost"
    params: str | None = None
    include_layernorm: bool = True
    loss: str = "dpo"
    loss_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown value {self.method!r}", allowed=METHODS)
        from preflens.dynamics.losses import get_loss, resolve_kwargs

        get_loss(self.loss)
        resolve_kwargs(self.loss, dict(self.loss_kwargs))


def score_chunk(lm, reference, pairs, opts: Options, batch_size: int) -> list[dict]:
    from preflens.dynamics.losses import get_loss

    stats = pair_gradient_stats(lm, pairs, params=opts.params, method=opts.method,
                                batch_size=batch_size, include_layernorm=opts.include_layernorm)
    ref_w = ref_l = None
    if get_loss(opts.loss).uses_reference:
        if reference is None:
            ref_w, ref_l = stats.u_w, stats.u_l
        else:
            prompts = [p.prompt for p in pairs]
            ref_w = response_logprobs(reference, prompts, [p.chosen for p in pairs]).logp
            ref_l = response_logprobs(reference, prompts, [p.rejected for p in pairs]).logp
    d_w, d_l = predict_first_order(stats, opts.loss, lr=1.0, loss_kwargs=dict(opts.loss_kwargs),
                                   ref_chosen_logps=ref_w, ref_rejected_logps=ref_l)
    cases = entanglement_case(d_w, d_l)
    keys = ("inner", "norm_w_sq", "norm_l_sq", "cos", "r_w", "r_l", "u_w", "u_l")
    rows = []
    for i in range(len(pairs)):
        row = {k: float(getattr(stats, k)[i]) for k in keys}
        row.update(len_w=int(stats.len_w[i]), len_l=int(stats.len_l[i]),
                   pred_delta_u_w=float(d_w[i]), pred_delta_u_l=float(d_l[i]), case=cases[i])
        rows.append(row)
    return rows


def _stats(values: list) -> dict:
    v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
    if v.numel() == 0:
        return {"mean": None, "median": None}
    return {"mean": float(v.mean()), "median": float(v.median())}


def summarize(rows, opts: Options, has_reference: bool) -> dict:
    """Means/medians, the share of positively entangled pairs and the predicted-case counts."""
    from preflens.dynamics.losses import resolve_kwargs

    counts = case_counts([r["case"] for r in rows])
    inner = [r["inner"] for r in rows]
    return {
        "n_pairs": len(rows),
        "method": opts.method,
        **{k: _stats([r[k] for r in rows]) for k in ("inner", "cos", "norm_w_sq", "norm_l_sq", "r_w", "r_l")},
        "fraction_positive_inner": sum(x is not None and x > 0 for x in inner) / len(rows),
        "fraction_chosen_predicted_down": sum(r["pred_delta_u_w"] is not None and r["pred_delta_u_w"] <= 0
                                              for r in rows) / len(rows),
        "predicted_cases": counts,
        "predicted_cases_fraction": {c: counts[c] / len(rows) for c in CASES},
        "loss": opts.loss, "loss_kwargs": resolve_kwargs(opts.loss, dict(opts.loss_kwargs)),
    }


def figure(rows, summary: dict):
    from preflens import plotting

    ok = [r for r in rows if r["norm_w_sq"] is not None and r["norm_l_sq"] is not None]
    xs = [min(r["norm_w_sq"], r["norm_l_sq"]) for r in ok]
    ys = [r["inner"] for r in ok]
    lim = max(xs, default=1.0)
    return plotting.scatter_with_curve(
        xs, ys, curve=([0.0, lim], [0.0, lim]), colors=[r["case"] for r in ok],
        xlabel="min(‖g_w‖², ‖g_l‖²)", ylabel="⟨g_w, g_l⟩", curve_label="⟨g_w,g_l⟩ = min norm²",
        title=f"gradient entanglement ({summary['method']}); colour: predicted {summary['loss']} case")
