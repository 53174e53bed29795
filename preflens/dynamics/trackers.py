"""The gradient-entanglement lens as a training-loop tracker (Yuan et al. 2024).

:class:`EntanglementTracker` is a :class:`preflens.tracking.Tracker`: it records at the start,
every ``every`` steps and at the last step, on rank 0, without perturbing training (gradients by
``torch.autograd.grad`` on the plain module -- the ghost method of
:mod:`preflens.dynamics.entanglement` -- so parameter ``.grad`` fields and DDP's reducer hooks
are never touched; RNG forked, eval mode restored).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from preflens.dynamics import losses
from preflens.dynamics.entanglement import (CASES, case_counts, entanglement_case, pair_gradient_stats,
                                            predict_first_order)
from preflens.errors import ConfigError
from preflens.tracking import ProbeSet, Tracker, tensor_list

__all__ = ["EntanglementTracker"]


class EntanglementTracker(Tracker):
    """Per-pair gradient inner products and the first-order cases they predict, during training.

    Yuan et al. 2024 (arXiv 2410.13828), Eqs. 3-5 and Table 1. At each record, on the first
    ``ghost_n`` probe pairs (:func:`~preflens.dynamics.entanglement.pair_gradient_stats`, ``method``
    "ghost" by default, or "exact";
    g = ∇θ log π(y|x) of SUMMED log-probs with EOS counted, all trainable parameters unless
    ``params``):

    * ``mean_inner`` = mean ⟨g_w, g_l⟩, ``mean_norm_w_sq`` / ``mean_norm_l_sq`` = mean ‖g‖²,
      ``mean_cos``, ``frac_cos_positive`` (cos > 0, strict);
    * ``cases/<case>`` = how many pairs each case of Table 1 holds when one plain-SGD step on the
      pair alone is predicted to first order (:func:`~preflens.dynamics.entanglement.predict_first_order`
      with the run's ``loss``/``loss_kwargs``; only signs matter, so lr = 1), the reference
      log-probs being those of step 0 (the default reference, the initial policy);
    * between two records: ``realised_cases/<case>`` = the cases of the measured changes
      Δu = u(now) − u(previous record), and ``sign_agreement_chosen`` / ``sign_agreement_rejected``
      = the fraction of pairs whose measured Δu_w (Δu_l) has the sign predicted at the previous
      record (0 counts as unfavourable, as in :func:`~preflens.dynamics.entanglement.entanglement_case`).
      The prediction is per pair and plain SGD; the run's batched, possibly adaptive updates are
      what the agreement tests.

    Also ``logp_chosen`` / ``logp_rejected``: mean summed log-probs over ALL probe pairs. Detail
    per ghost pair: ``inner``, ``cos``, ``norm_w_sq``, ``norm_l_sq``, ``predicted_w``/``predicted_l``
    (lr = 1), ``case`` and, from the second record on, ``realised_w``/``realised_l``.
    """

    name = "entanglement"

    def __init__(self, lm, pairs: Sequence = (), *, loss: str = "dpo", loss_kwargs: dict | None = None,
                 every: int = 10, ghost_n: int | None = None, batch_size: int = 64,
                 ghost_batch_size: int = 16, params=None, method: str = "ghost",
                 probes: ProbeSet | None = None) -> None:
        super().__init__(lm, every=every)
        self.probes = probes if probes is not None else ProbeSet(lm, pairs, batch_size=batch_size)
        n = len(self.probes)
        if ghost_n is not None and (not isinstance(ghost_n, int) or isinstance(ghost_n, bool) or ghost_n < 1):
            raise ConfigError("ghost_n", f"must be an integer >= 1, got {ghost_n!r}")
        self.ghost_n = min(ghost_n or n, n)
        self.spec = losses.get_loss(loss)
        self.loss, self.loss_kwargs = loss, losses.resolve_kwargs(loss, loss_kwargs)
        self.ghost_batch_size, self.params, self.method = ghost_batch_size, params, method
        self.ref: list[list[float]] | None = None      # step-0 (u_w, u_l) of all probe pairs
        self.prev: dict[str, list[float]] | None = None  # previous record: u and predictions

    def measure(self, lm, step):
        s = self.probes.score(lm.model, step)
        if self.ref is None:
            self.ref = [tensor_list(s.u_w), tensor_list(s.u_l)]
        k = self.ghost_n
        sub = self.probes.pairs[:k]
        with torch.enable_grad():  # a loop may call callbacks under no_grad
            st = pair_gradient_stats(lm, sub, method=self.method, batch_size=self.ghost_batch_size,
                                     params=self.params)
        refs = {}
        if self.spec.uses_reference:
            refs = dict(ref_chosen_logps=torch.tensor(self.ref[0][:k], dtype=torch.float64),
                        ref_rejected_logps=torch.tensor(self.ref[1][:k], dtype=torch.float64))
        d_w, d_l = predict_first_order(st, self.loss, lr=1.0, loss_kwargs=self.loss_kwargs, **refs)
        cases = entanglement_case(d_w, d_l)
        scalars: dict[str, float] = {
            "logp_chosen": float(s.u_w.mean()), "logp_rejected": float(s.u_l.mean()),
            "mean_inner": float(st.inner.mean()), "mean_cos": float(st.cos.mean()),
            "mean_norm_w_sq": float(st.norm_w_sq.mean()), "mean_norm_l_sq": float(st.norm_l_sq.mean()),
            "frac_cos_positive": float((st.cos > 0).double().mean()),
        }
        scalars.update({f"cases/{c}": float(v) for c, v in case_counts(cases).items()})
        detail: dict[str, Any] = {"inner": tensor_list(st.inner), "cos": tensor_list(st.cos),
                                  "norm_w_sq": tensor_list(st.norm_w_sq), "norm_l_sq": tensor_list(st.norm_l_sq),
                                  "predicted_w": tensor_list(d_w), "predicted_l": tensor_list(d_l), "case": cases}
        u_w, u_l = s.u_w[:k], s.u_l[:k]
        if self.prev is not None:
            real_w = u_w - torch.tensor(self.prev["u_w"], dtype=torch.float64)
            real_l = u_l - torch.tensor(self.prev["u_l"], dtype=torch.float64)
            pred_w = torch.tensor(self.prev["pred_w"], dtype=torch.float64)
            pred_l = torch.tensor(self.prev["pred_l"], dtype=torch.float64)
            realised = case_counts(entanglement_case(real_w, real_l))
            scalars.update({f"realised_cases/{c}": float(v) for c, v in realised.items()})
            scalars["sign_agreement_chosen"] = float(((real_w > 0) == (pred_w > 0)).double().mean())
            scalars["sign_agreement_rejected"] = float(((real_l >= 0) == (pred_l >= 0)).double().mean())
            detail.update(realised_w=tensor_list(real_w), realised_l=tensor_list(real_l))
        self.prev = {"u_w": tensor_list(u_w), "u_l": tensor_list(u_l),
                     "pred_w": tensor_list(d_w), "pred_l": tensor_list(d_l)}
        return scalars, detail

    def settings(self):
        return {"loss": self.loss, "loss_kwargs": self.loss_kwargs, "ghost_n": self.ghost_n, "method": self.method,
                "params": self.params if isinstance(self.params, (str, type(None))) else sorted(self.params)}

    def case_counts_at(self, index: int) -> dict[str, int]:
        """The predicted case counts of record ``index`` of :attr:`history` as ints."""
        h = self.history[index]
        return {c: int(h[f"cases/{c}"]) for c in CASES}

    def extra_state(self):
        return {"ref": self.ref, "prev": self.prev}

    def load_extra_state(self, d):
        self.ref, self.prev = d.get("ref"), d.get("prev")
