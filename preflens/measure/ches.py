"""``measure ches``: CHES, LN-CHES and the edit-similarity and last-hidden baselines per pair.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization", ICLR 2025 (arXiv 2410.08847), Definition 2 and Sec. 5-6: pairs with a high
(length-normalized) centered hidden embedding similarity are the ones DPO is most likely to
displace; filtering out the top ones mitigates it. Every number comes from
:mod:`preflens.probes.ches` on one set of hidden states per chunk
(:func:`preflens.scoring.response_hidden_states`: post-final-norm, EOS appended and counted).

Per-item row: ``ches``, ``ln_ches``, ``edit_similarity`` (negated normalized token edit
distance), ``last_hidden`` (inner product at the EOS-predicting position), ``n_tokens_chosen``,
``n_tokens_rejected``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from preflens.probes.ches import ches_scores, edit_similarity_for_pairs, last_hidden_inner_product
from preflens.scoring import response_hidden_states
from preflens.stats import spearman

NAME = "ches"
KIND = "forward"
REFERENCE = None
SCORE_KEYS = ("ches", "ln_ches", "edit_similarity", "last_hidden")


@dataclass(frozen=True)
class Options:
    """No options: CHES has none (the model and the data determine it)."""


def score_chunk(lm, reference, pairs, opts: Options, batch_size: int) -> list[dict]:
    prompts = [p.prompt for p in pairs]
    h_w = response_hidden_states(lm, prompts, [p.chosen for p in pairs], batch_size=batch_size,
                            sources=[p.source for p in pairs], response_field="chosen")
    h_l = response_hidden_states(lm, prompts, [p.rejected for p in pairs], batch_size=batch_size,
                            sources=[p.source for p in pairs], response_field="rejected")
    ches = ches_scores(h_w, h_l)
    ln = ches_scores(h_w, h_l, length_normalized=True)
    last = last_hidden_inner_product(h_w, h_l)
    edit = edit_similarity_for_pairs(lm.tokenizer, pairs)
    return [{"ches": float(ches[i]), "ln_ches": float(ln[i]), "edit_similarity": float(edit[i]),
             "last_hidden": float(last[i]), "n_tokens_chosen": int(h_w[i].shape[0]),
             "n_tokens_rejected": int(h_l[i].shape[0])} for i in range(len(pairs))]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """:func:`preflens.stats.spearman` (average ranks for ties); None when undefined (a constant
    side or fewer than two points)."""
    rho = spearman(a, b)
    return None if math.isnan(rho) else rho


def summarize(rows, opts: Options, has_reference: bool) -> dict:
    """Per-score quantiles and the Spearman correlation of LN-CHES with each other score."""
    cols = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in SCORE_KEYS}
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    out: dict = {"n_pairs": len(rows)}
    for k, v in cols.items():
        qs = torch.quantile(v, q).tolist()
        out[k] = {"mean": float(v.mean()), "min": qs[0], "p10": qs[1], "median": qs[2],
                  "p90": qs[3], "max": qs[4]}
    out["spearman_with_ln_ches"] = {k: _spearman(cols["ln_ches"], cols[k])
                                    for k in SCORE_KEYS if k != "ln_ches"}
    return out


def figure(rows, summary: dict):
    from preflens import plotting

    return plotting.histograms({k: [r[k] for r in rows] for k in SCORE_KEYS},
                               title=f"CHES and baselines over {len(rows)} pairs")
