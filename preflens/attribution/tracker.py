"""The per-head attribution lens as a training-loop tracker (Yu, Merullo & Pavlick 2023, Sec. 5).

:class:`DlaTracker` is a :class:`preflens.tracking.Tracker`: at the start, every ``every`` steps
and at the last step (rank 0), it builds a compatibility-mode TransformerBridge over a deep copy
of the current model (the trained module is never wrapped or mutated) and runs
:func:`preflens.attribution.heads.head_logit_attribution` on the probe triples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from preflens.attribution.heads import head_logit_attribution
from preflens.attribution.recall import first_token_ids
from preflens.data.recall_prompts import CounterfactualPrompt
from preflens.errors import DataError
from preflens.scoring import collate, encode, final_hidden, head_logits
from preflens.tracking import Tracker

__all__ = ["DlaTracker", "probe_triples"]


def probe_triples(lm, pairs: Sequence) -> tuple[list[int], list[CounterfactualPrompt]]:
    """The probe triples (prompt, first chosen token, first rejected token) of ``pairs``.

    A pair qualifies when both responses start with a space (so the first token of
    ``" " + response[1:]`` is the response's own first token, as :func:`first_token_ids` takes it)
    and the two first tokens differ (a zero direction has no attribution). Returns the indices of
    the qualifying pairs and, for each, a :class:`CounterfactualPrompt` with ``in_context`` = the
    chosen response and ``memorized`` = (the rejected response,), so DLA > 0 means the head
    promotes the chosen response's first token over the rejected one's.
    """
    keep, out = [], []
    prompts = [p.prompt for p in pairs]
    enc_w = encode(lm.tokenizer, prompts, [p.chosen for p in pairs], add_eos=True)
    enc_l = encode(lm.tokenizer, prompts, [p.rejected for p in pairs], add_eos=True)
    for i, (p, a, b) in enumerate(zip(pairs, enc_w, enc_l)):
        if not (p.chosen.startswith(" ") and p.rejected.startswith(" ")) or len(p.chosen) < 2 or len(p.rejected) < 2:
            continue
        w, l = p.chosen[1:], p.rejected[1:]
        ids = first_token_ids(lm.tokenizer, [w, l])
        if ids[0] == ids[1] or ids != [a.response_ids[0], b.response_ids[0]]:
            continue
        keep.append(i)
        out.append(CounterfactualPrompt(text=p.prompt, country="", in_context=w, memorized=(l,)))
    return keep, out


class DlaTracker(Tracker):
    """Direct logit attribution of every attention head on the probe triples, during training.

    Yu, Merullo & Pavlick 2023, Sec. 5.1: DLA[l, h](n) = (z[l,h,T] W_O[l,h]) / σ_T · (W_U[:, y+_1] −
    W_U[:, y−_1]) at the last prompt position T, with LN-folded, centred weights (compatibility
    mode) and the cached ln_final scale; y±_1 the first tokens of the chosen and rejected
    responses (:func:`probe_triples`). Scalars: ``logit_diff`` = mean logit(y+_1) − logit(y−_1)
    at T, ``heads_sum`` = mean over probes of Σ over heads, ``max_head`` / ``min_head`` = the
    largest and smallest head mean, and ``L{l}H{h}`` for every head when the model has at most
    ``per_head_limit`` heads. Detail: ``heads`` = the [n_layers][n_heads] means, ``per_probe``
    = [n_layers][n_heads][n_probes] values, ``probes`` = the probe pairs' indices.
    """

    name = "dla"

    def __init__(self, lm, pairs: Sequence, *, every: int = 10, batch_size: int = 32,
                 per_head_limit: int = 64) -> None:
        super().__init__(lm, every=every)
        self.indices, self.prompts = probe_triples(lm, list(pairs))
        if not self.prompts:
            raise DataError("the dla tracker needs probe pairs whose chosen and rejected responses start "
                            "with a space and with different first tokens; none of the given pairs do",
                            field="pairs")
        self.batch_size, self.per_head_limit = batch_size, per_head_limit
        self.pairs = [list(pairs)[i] for i in self.indices]
        self.enc = encode(lm.tokenizer, [p.prompt for p in self.pairs], [p.chosen for p in self.pairs],
                          max_length=lm.n_ctx)
        self.first = torch.tensor([first_token_ids(lm.tokenizer, [p.in_context, p.memorized[0]])
                                   for p in self.prompts])

    def measure(self, lm, step):
        bridge = lm.bridge(compat=True)  # a deep copy of the current weights
        try:
            per = head_logit_attribution(bridge, self.prompts, per_prompt=True, batch_size=self.batch_size)
        finally:
            del bridge
        per = per.double()
        logit_diff = self._logit_diff(lm.model)
        mean = per.mean(-1)
        L, H = mean.shape
        scalars = {"logit_diff": logit_diff, "heads_sum": float(per.sum((0, 1)).mean()),
                   "max_head": float(mean.max()), "min_head": float(mean.min())}
        if L * H <= self.per_head_limit:
            scalars.update({f"L{l}H{h}": float(mean[l, h]) for l in range(L) for h in range(H)})
        return scalars, {"heads": mean.tolist(), "per_probe": per.tolist(), "probes": self.indices}

    @torch.no_grad()
    def _logit_diff(self, model) -> float:
        """Mean logit(y+_1) − logit(y−_1) at the last prompt position, from the plain model through its
        own logit head (a compatibility-mode bridge shifts each position's logits by one constant)."""
        device = next(model.parameters()).device
        total = 0.0
        for s in range(0, len(self.enc), self.batch_size):
            batch = collate(self.enc[s : s + self.batch_size], pad_id=self.lm.pad_id, device=device)
            hidden = final_hidden(model, batch)
            h = hidden[torch.arange(hidden.shape[0], device=device), batch.prompt_lens.to(device) - 1]
            logits = head_logits(model, h, dtype=torch.float32)  # the model's own head (soft-cap, scale)
            ids = self.first[s : s + self.batch_size].to(device)
            rows = torch.arange(len(ids), device=device)
            total += float((logits[rows, ids[:, 0]] - logits[rows, ids[:, 1]]).double().sum())
        return total / len(self.enc)
