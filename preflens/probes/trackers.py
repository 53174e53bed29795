"""Probe lenses as training-loop trackers: ranking accuracy, likelihood displacement, CHES.

Each class is a :class:`preflens.tracking.Tracker` (the callback protocol of the training loop:
record at the start, every ``every`` steps and at the last step, on rank 0, without perturbing
training; scalars ``tracked/<lens>/<quantity>`` in ``metrics.jsonl``, per-pair detail in
``OUT/tracked/<lens>.jsonl``). Trackers built on the same :class:`~preflens.tracking.ProbeSet`
share one scoring pass per record. Log-probs are SUMMED over response tokens with EOS appended
and counted (:mod:`preflens.scoring`); "since step 0" means since the baseline record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from preflens.probes.ches import ches_scores
from preflens.probes.displacement import top_gaining_tokens
from preflens.probes.ranking import ranking_correct
from preflens.tracking import ProbeSet, Tracker, spearman, tensor_list

__all__ = ["RankingTracker", "DisplacementTracker", "ChesTracker"]


def _probes(lm, pairs, probes, batch_size) -> ProbeSet:
    return probes if probes is not None else ProbeSet(lm, pairs, batch_size=batch_size)


class RankingTracker(Tracker):
    """Ranking accuracy of the policy on a fixed pair set, and flips since step 0.

    Chen et al. 2024, Def. 2.3 and Remark 2.4: R = mean 1[log π(y_w|x) ≥ log π(y_l|x)] on summed
    log-probs (≥, not >), R̃ the same on per-token means. Scalars: ``accuracy`` (R),
    ``accuracy_mean`` (R̃), ``flipped_to_correct`` / ``flipped_to_incorrect`` (fractions of all
    pairs whose summed-log-prob ranking changed that way since step 0). Detail per pair:
    ``correct`` (0/1) and ``margin`` = log π(y_w) − log π(y_l).
    """

    name = "ranking"

    def __init__(self, lm, pairs: Sequence = (), *, every: int = 10, batch_size: int = 64,
                 probes: ProbeSet | None = None) -> None:
        super().__init__(lm, every=every)
        self.probes = _probes(lm, pairs, probes, batch_size)
        self.pairs = self.probes.pairs
        self.baseline: list[int] | None = None

    def measure(self, lm, step):
        s = self.probes.score(lm.model, step)
        ok = ranking_correct(s.u_w, s.u_l)
        ok_mean = ranking_correct(s.u_w / s.len_w, s.u_l / s.len_l)
        if self.baseline is None:
            self.baseline = [int(x) for x in ok.tolist()]
        base = torch.tensor(self.baseline, dtype=torch.bool)
        scalars = {
            "accuracy": float(ok.double().mean()),
            "accuracy_mean": float(ok_mean.double().mean()),
            "flipped_to_correct": float((~base & ok).double().mean()),
            "flipped_to_incorrect": float((base & ~ok).double().mean()),
        }
        return scalars, {"correct": [int(x) for x in ok.tolist()], "margin": tensor_list(s.u_w - s.u_l)}

    def extra_state(self):
        return {"baseline": self.baseline}

    def load_extra_state(self, d):
        self.baseline = d.get("baseline")


class DisplacementTracker(Tracker):
    """Likelihood displacement on a probe set (Razin et al. 2024, Sec. 3).

    Scalars: ``logp_chosen`` / ``logp_rejected`` (means of summed log π(y±|x)), ``delta_chosen`` /
    ``delta_rejected`` (mean change since step 0, nats), ``frac_chosen_down`` (fraction of pairs
    with log π(y+|x) below its step-0 value), ``max_drop_logp`` (mean over pairs of the
    peak-to-trough fall of log π(y+|x) over the records so far, nats; 0 if it never fell). For
    single-token pairs (each response one token before EOS): ``single_prob_chosen`` = mean
    π(y+_1|x) at the last prompt position (no EOS, the paper's quantity) and
    ``single_max_drop_prob`` = mean peak-to-trough fall of it so far (the paper's metric).
    Detail: per-pair ``logp_chosen``/``logp_rejected`` and, for the first ``max_distributions``
    single-token pairs, ``top_gaining`` = the ``k`` tokens whose log-prob rose most since step 0
    (ids, decoded tokens, Δ ln π) -- Razin et al. Tables 2-3.

    This is the training-run lens; :class:`preflens.probes.displacement.DisplacementTracker` is
    the full-distribution recorder of the single-token recipe.
    """

    name = "displacement"

    def __init__(self, lm, pairs: Sequence = (), *, every: int = 10, batch_size: int = 64,
                 probes: ProbeSet | None = None, k: int = 3) -> None:
        super().__init__(lm, every=every)
        self.probes = _probes(lm, pairs, probes, batch_size)
        self.probes.want_distributions = True
        self.k = k
        self.base: dict[str, Any] | None = None

    def measure(self, lm, step):
        s = self.probes.score(lm.model, step, distributions=True)
        single, dist_rows = self.probes.single_token, self.probes.distribution_pairs
        p1 = s.first_w if single else torch.zeros(0, dtype=torch.float64)
        if self.base is None:
            self.base = {"u_w": tensor_list(s.u_w), "u_l": tensor_list(s.u_l),
                         "peak": tensor_list(s.u_w), "drop": [0.0] * len(s.u_w),
                         "p_peak": tensor_list(p1.exp()), "p_drop": [0.0] * len(single),
                         "next_logp": [r.tolist() for r in s.next_logp] if s.next_logp is not None else []}
        b = self.base
        u0_w, u0_l = torch.tensor(b["u_w"], dtype=torch.float64), torch.tensor(b["u_l"], dtype=torch.float64)
        peak = torch.maximum(torch.tensor(b["peak"], dtype=torch.float64), s.u_w)
        drop = torch.maximum(torch.tensor(b["drop"], dtype=torch.float64), peak - s.u_w)
        b["peak"], b["drop"] = tensor_list(peak), tensor_list(drop)
        scalars = {
            "logp_chosen": float(s.u_w.mean()), "logp_rejected": float(s.u_l.mean()),
            "delta_chosen": float((s.u_w - u0_w).mean()), "delta_rejected": float((s.u_l - u0_l).mean()),
            "frac_chosen_down": float((s.u_w < u0_w).double().mean()),
            "max_drop_logp": float(drop.mean()),
        }
        detail: dict[str, Any] = {"logp_chosen": tensor_list(s.u_w), "logp_rejected": tensor_list(s.u_l)}
        if single:
            prob = p1.exp()
            p_peak = torch.maximum(torch.tensor(b["p_peak"], dtype=torch.float64), prob)
            p_drop = torch.maximum(torch.tensor(b["p_drop"], dtype=torch.float64), p_peak - prob)
            b["p_peak"], b["p_drop"] = tensor_list(p_peak), tensor_list(p_drop)
            scalars["single_prob_chosen"] = float(prob.mean())
            scalars["single_max_drop_prob"] = float(p_drop.mean())
        if dist_rows and s.next_logp is not None:
            tok = lm.tokenizer
            gains = []
            for row, i in enumerate(dist_rows):
                top = top_gaining_tokens(torch.tensor(b["next_logp"][row]), s.next_logp[row], self.k,
                                         log_space=True)["by_logprob"]
                ids = top[0].tolist()
                gains.append({"pair": i, "ids": ids, "tokens": [tok.decode([t]) for t in ids],
                              "delta_logp": top[1].tolist()})
            detail["top_gaining"] = gains
        return scalars, detail

    def settings(self):
        return {"k": self.k, "distributions": self.probes.distribution_pairs}

    def extra_state(self):
        return {"base": self.base}

    def load_extra_state(self, d):
        self.base = d.get("base")


class ChesTracker(Tracker):
    """CHES of the probe pairs under the current policy, and whether it predicts displacement.

    Razin et al. 2024, Definition 2: CHES = ⟨H+, H−⟩ − ‖H+‖² with H± the sums of the post-final-norm
    hidden states at the positions predicting each response token (EOS counted); LN-CHES uses means.
    Scalars: ``ches_mean``, ``ln_ches_mean`` (means over pairs), ``spearman_initial`` = Spearman's
    rho across pairs between step-0 CHES and Δ log π(y+|x) since step 0 (the paper's prediction:
    negative), ``spearman_current`` = the same with the current CHES. Detail per pair: ``ches``,
    ``ln_ches``, ``delta_chosen``.
    """

    name = "ches"

    def __init__(self, lm, pairs: Sequence = (), *, every: int = 10, batch_size: int = 64,
                 probes: ProbeSet | None = None) -> None:
        super().__init__(lm, every=every)
        self.probes = _probes(lm, pairs, probes, batch_size)
        self.probes.want_hidden = True
        self.base: dict[str, list] | None = None

    def measure(self, lm, step):
        s = self.probes.score(lm.model, step, hidden=True)
        ches = ches_scores(list(s.h_w[:, None]), list(s.h_l[:, None]))
        ln_ches = ches_scores(list(s.hm_w[:, None]), list(s.hm_l[:, None]))
        if self.base is None:
            self.base = {"ches": tensor_list(ches), "u_w": tensor_list(s.u_w)}
        delta = s.u_w - torch.tensor(self.base["u_w"], dtype=torch.float64)
        scalars = {
            "ches_mean": float(ches.mean()), "ln_ches_mean": float(ln_ches.mean()),
            "spearman_initial": spearman(torch.tensor(self.base["ches"], dtype=torch.float64), delta),
            "spearman_current": spearman(ches, delta),
        }
        return scalars, {"ches": tensor_list(ches), "ln_ches": tensor_list(ln_ches),
                         "delta_chosen": tensor_list(delta)}

    def extra_state(self):
        return {"base": self.base}

    def load_extra_state(self, d):
        self.base = d.get("base")
