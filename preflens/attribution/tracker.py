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
from preflens.errors import ConfigError, DataError
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
    = [n_layers][n_heads][n_probes] values, ``probes`` = the probe pairs' indices. ``via``:
    ``"auto"`` (direct for GPT-2-family models, else bridge), ``"direct"`` or ``"bridge"``.
    """

    name = "dla"

    def __init__(self, lm, pairs: Sequence, *, every: int = 10, batch_size: int = 32,
                 per_head_limit: int = 64, via: str = "auto") -> None:
        super().__init__(lm, every=every)
        if via not in ("auto", "direct", "bridge"):
            raise ConfigError("via", f"unknown value {via!r}", allowed=("auto", "direct", "bridge"))
        direct_ok = _gpt2_parts(lm.model) is not None
        if via == "direct" and not direct_ok:
            raise ConfigError("via", "the direct path needs a GPT-2-family HF model (transformer.h[*].attn."
                              "c_attn/c_proj, ln_1, ln_f); use via='bridge'")
        self.via = "direct" if via == "auto" and direct_ok else ("bridge" if via == "auto" else via)
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

    def settings(self):
        return {"via": self.via}

    def measure(self, lm, step):
        if self.via == "direct":
            per, logit_diff = self._direct(lm.model)
        else:
            bridge = lm.bridge(compat=True)  # a deep copy of the current weights
            try:
                per = head_logit_attribution(lm, self.prompts, bridge=bridge, per_prompt=True,
                                             batch_size=self.batch_size)  # lm: post-norm families
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
    def _direct(self, model) -> tuple[torch.Tensor, float]:
        """``([L, H, n] float64 DLA, mean logit difference)`` from ONE forward of the plain model.

        The compatibility-mode quantities written out for GPT-2 (what the bridge path computes):
        folding ln_1 into W_V and the value bias into b_O makes a head's z equal HF's z minus
        b_V* = β₁W_V + b_V (attention rows sum to 1); centring W_O and the frozen ln_final give
        r̃ = (r − mean r)/σ_T with r = (z − b_V*) W_O[h] and σ_T the ln_f scale of the residual at
        T; folding ln_f into W_U gives the direction γ_f ⊙ (W_U[y+_1] − W_U[y−_1]) (centring W_U
        does not change a difference of two columns).
        """
        parts = _gpt2_parts(model)
        blocks, ln_f = parts
        n_layers = len(blocks)
        n_heads = int(model.config.n_head)
        captured: dict = {}
        handles = [b.attn.c_proj.register_forward_pre_hook(
            lambda mod, args, l=l: captured.__setitem__(l, args[0])) for l, b in enumerate(blocks)]
        handles.append(ln_f.register_forward_pre_hook(lambda mod, args: captured.__setitem__("resid", args[0])))
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        out = torch.zeros(n_layers, n_heads, len(self.enc), dtype=torch.float64)
        total = 0.0
        try:
            for s in range(0, len(self.enc), self.batch_size):
                batch = collate(self.enc[s : s + self.batch_size], pad_id=self.lm.pad_id, device=device)
                hidden = final_hidden(model, batch)
                rows = torch.arange(hidden.shape[0], device=device)
                T = batch.prompt_lens.to(device) - 1
                ids = self.first[s : s + self.batch_size].to(device)
                logits = head_logits(model, hidden[rows, T], dtype=torch.float32)
                total += float((logits[rows, ids[:, 0]] - logits[rows, ids[:, 1]]).double().sum())
                resid = captured["resid"][rows, T].double()
                sigma = (resid.var(-1, unbiased=False) + ln_f.eps).sqrt()
                w_u = head.weight.double()
                direction = ln_f.weight.double() * (w_u[ids[:, 0]] - w_u[ids[:, 1]])  # [B, d]
                for l, block in enumerate(blocks):
                    d = block.attn.c_attn.weight.shape[0]
                    dh = d // n_heads
                    w_v = block.attn.c_attn.weight.double()[:, 2 * d:]
                    b_v = block.attn.c_attn.bias.double()[2 * d:] + block.ln_1.bias.double() @ w_v
                    z = (captured[l][rows, T].double() - b_v).view(-1, n_heads, dh)  # [B, H, dh]
                    w_o = block.attn.c_proj.weight.double().view(n_heads, dh, -1)   # [H, dh, d]
                    r = torch.einsum("bhk,hkd->bhd", z, w_o)
                    r = (r - r.mean(-1, keepdim=True)) / sigma[:, None, None]
                    out[l, :, s : s + len(ids)] = torch.einsum("bhd,bd->hb", r, direction).cpu()
        finally:
            for h in handles:
                h.remove()
        return out, total / len(self.enc)

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


def _gpt2_parts(model):
    """``(blocks, ln_f)`` of a GPT-2-family HF model whose attention is c_attn/c_proj, else None."""
    base = getattr(model, "transformer", None)
    blocks, ln_f = getattr(base, "h", None), getattr(base, "ln_f", None)
    if blocks is None or not isinstance(ln_f, torch.nn.LayerNorm) or not hasattr(model.config, "n_head"):
        return None
    for b in blocks:
        attn = getattr(b, "attn", None)
        if not (hasattr(attn, "c_attn") and hasattr(attn, "c_proj") and isinstance(getattr(b, "ln_1", None),
                                                                                      torch.nn.LayerNorm)):
            return None
        if getattr(attn.c_attn, "bias", None) is None or getattr(attn, "is_cross_attention", False):
            return None
    return blocks, ln_f
