"""Likelihood displacement: where probability mass goes, and the unembedding geometry behind it.

Source: Razin et al., *Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization*, ICLR 2025 (arXiv 2410.08847), Sec. 3-4 (Theorems 4-6, Table 13).

Conventions: ``W_U`` is ``[d_model, d_vocab]`` (TransformerLens), so the unembedding row of
token ``z`` in the paper's notation is ``W_z = W_U[:, z]``; HF ``lm_head.weight`` is the
transpose.  Sequence log-probs are **sums** over response tokens with EOS appended and counted
(computed by :mod:`preflens.scoring`).  Step ``t`` = the model after ``t`` updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from preflens.errors import ConfigError, DataError
from preflens.scoring import EncodedPairs, collate, concatenated_logps, encode

__all__ = [
    "unembedding_alignment",
    "unembedding_alignment_from_lm",
    "unembedding_geometry",
    "peak_to_trough_drop",
    "top_gaining_tokens",
    "overlap_at_k",
    "gain_rank",
    "hidden_norms",
    "DisplacementTracker",
]


def _check_tokens(W_U: Tensor, *tokens: int) -> None:
    if W_U.ndim != 2:
        raise DataError(
            f"W_U must be [d_model, d_vocab], got shape {tuple(W_U.shape)}", field="W_U"
        )
    for t in tokens:
        if not 0 <= int(t) < W_U.shape[1]:
            raise ConfigError("token", f"id {t} outside the vocabulary [0, {W_U.shape[1]})")


def unembedding_alignment(W_U: Tensor, chosen_token: int, rejected_token: int) -> Tensor:
    """Theorem-5 alignment ``a_z = <W_z, W+ - W->`` for every token ``z``.

    Razin et al. 2024, Theorem 5: for tokens other than y+ and y-, the instantaneous gain
    ``d/dt ln π(z|x)`` is ``-ℓ'(u)·(a_z + c)`` with ``c`` independent of ``z``, so tokens are
    ranked by ``a_z``.  Use raw weights (not a compatibility-mode bridge, which centers W_U).

    Args:
        W_U: ``[d_model, d_vocab]`` unembedding (TransformerLens convention).
        chosen_token, rejected_token: ids of y+ and y- (single tokens; TRL-style names).

    Returns:
        ``Tensor[d_vocab]`` float64.
    """
    _check_tokens(W_U, chosen_token, rejected_token)
    W = W_U.detach().to(torch.float64)
    return W.T @ (W[:, chosen_token] - W[:, rejected_token])


def unembedding_alignment_from_lm(lm, chosen_token: int, rejected_token: int) -> Tensor:
    """:func:`unembedding_alignment` from the raw HF output embedding of ``lm.model``.

    ``lm.model.get_output_embeddings().weight`` is ``[d_vocab, d_model]``; it is transposed to
    the ``[d_model, d_vocab]`` convention.  Returns ``Tensor[d_vocab]`` float64.
    """
    return unembedding_alignment(lm.model.get_output_embeddings().weight.T, chosen_token, rejected_token)


def unembedding_geometry(W_U: Tensor, chosen_token: int, rejected_token: int) -> dict[str, float]:
    """Table-13 geometry of the preferred and dispreferred unembedding rows.

    Razin et al. 2024, Table 13, with ``W± = W_U[:, y±]``:

    * ``norm_pos = ||W+||``, ``norm_neg = ||W-||``, ``inner = <W+, W->``;
    * ``proj_coef = <W+, W->/||W+||`` (length of W-'s projection on W+);
    * ``signed_projection = ||W+|| - <W+, W->/||W+||``: signed length of the projection of
      ``W+ - W-`` on ``W+`` (negative when ``<W+, W-> > ||W+||^2``, a Theorem-4 risk);
    * ``orthogonal_norm = ||W- - (<W+, W->/||W+||^2) W+||  = ||proj_{W+⊥}(W+ - W-)||``.

    A large orthogonal part relative to the projection lets mass flow to tokens unrelated or
    opposite to y+.  All values are Python floats computed in float64.
    """
    _check_tokens(W_U, chosen_token, rejected_token)
    W = W_U.detach().to(torch.float64)
    wp, wn = W[:, chosen_token], W[:, rejected_token]
    norm_pos = wp.norm()
    inner = torch.dot(wp, wn)
    if norm_pos == 0:
        raise DataError("the preferred token's unembedding row is zero", field="W_U")
    orth = wn - (inner / norm_pos**2) * wp
    return {
        "norm_pos": float(norm_pos),
        "norm_neg": float(wn.norm()),
        "inner": float(inner),
        "proj_coef": float(inner / norm_pos),
        "signed_projection": float(norm_pos - inner / norm_pos),
        "orthogonal_norm": float(orth.norm()),
    }


def peak_to_trough_drop(prob_trajectory) -> float:
    """Largest fall ``max_{t < t'} (p_t - p_t')`` of a probability trajectory; 0 if it never falls.

    Razin et al. 2024, Sec. 3 single-token metric: computed over the sequence
    init, after 1, ..., after T updates; not init-to-final, since y+ often rises first.
    One pass, O(T).  Accepts a list, array or 1-D tensor.
    """
    values = [float(v) for v in torch.as_tensor(prob_trajectory, dtype=torch.float64).reshape(-1)]
    best, peak = 0.0, float("-inf")
    for v in values:
        peak = max(peak, v)
        best = max(best, peak - v)
    return best


def _topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    k = min(k, values.numel())
    top = torch.topk(values, k)
    return top.indices, top.values


def top_gaining_tokens(p_start, p_now, k: int = 3, *, log_space: bool = False) -> dict:
    """Tokens that gained the most since initialization (Razin et al. 2024, Sec. 3, Tables 2-3).

    Args:
        p_start, p_now: next-token distributions ``[d_vocab]`` at the same prompt position,
            at init and now; probabilities, or log-probabilities when ``log_space=True``
            (preferred: small probabilities underflow).
        k: how many tokens to return.

    Returns:
        ``{"by_prob": (ids, deltas), "by_logprob": (ids, deltas)}`` with ``ids`` a LongTensor[k]
        and ``deltas`` float64 Tensor[k] (``p_now - p_start`` and ``ln p_now - ln p_start``),
        largest first.
    """
    if k < 1:
        raise ConfigError("k", f"must be >= 1, got {k}")
    a = torch.as_tensor(p_start).detach().to("cpu", torch.float64).reshape(-1)
    b = torch.as_tensor(p_now).detach().to("cpu", torch.float64).reshape(-1)
    if a.shape != b.shape:
        raise DataError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}", field="p_now")
    if log_space:
        la, lb = a, b
        pa, pb = a.exp(), b.exp()
    else:
        pa, pb = a, b
        tiny = torch.finfo(torch.float64).tiny
        la, lb = a.clamp_min(tiny).log(), b.clamp_min(tiny).log()
    return {"by_prob": _topk(pb - pa, k), "by_logprob": _topk(lb - la, k)}


def overlap_at_k(alignment, logprob_change, k: int = 10, exclude: Sequence[int] = ()) -> int:
    """Number of tokens in both the top-k by alignment and the top-k by log-prob change.

    Razin et al. 2024, Sec. 3 / Theorem 5 check: overlap of the top-10 tokens by
    ``<W_z, W+ - W->`` (:func:`unembedding_alignment`) with the top-10 by
    ``ln π_t(z|x) - ln π_0(z|x)``.  Tokens in ``exclude`` (normally ``(y+, y-)``, which
    Theorem 5 does not cover) are removed from both rankings first.
    """
    a = torch.as_tensor(alignment).detach().to("cpu", torch.float64).reshape(-1).clone()
    c = torch.as_tensor(logprob_change).detach().to("cpu", torch.float64).reshape(-1).clone()
    if a.shape != c.shape:
        raise DataError(
            f"shape mismatch {tuple(a.shape)} vs {tuple(c.shape)}", field="logprob_change"
        )
    if k < 1:
        raise ConfigError("k", f"must be >= 1, got {k}")
    for t in exclude:
        a[int(t)] = float("-inf")
        c[int(t)] = float("-inf")
    k = min(k, a.numel() - len(set(int(t) for t in exclude)))
    top_a = set(torch.topk(a, k).indices.tolist())
    top_c = set(torch.topk(c, k).indices.tolist())
    return len(top_a & top_c)


def gain_rank(logp_init, logp_now, token_ids, *, space: str = "logprob") -> Tensor:
    """Rank of each preferred token among all tokens' gains since init (Razin et al. 2024, Sec. 3).

    The official token tracker logs, per example and step, where y+ falls when all tokens are
    sorted by their increase ``ln π_t(z|x) − ln π_0(z|x)`` (``space="logprob"``) or
    ``π_t(z|x) − π_0(z|x)`` (``space="prob"``), largest first. Here rank = number of tokens with a
    strictly larger gain (0 = y+ gained most; 0-based like the official argsort position, but
    ties share the best rank instead of an arbitrary sort order).

    Args:
        logp_init, logp_now: ``[B, d_vocab]`` (or ``[d_vocab]``) next-token log-probabilities at
            the same prompt positions, at init and at step t.
        token_ids: ``[B]`` (or scalar) preferred token per row.

    Returns:
        ``LongTensor[B]`` (a 0-dim tensor for 1-D inputs).
    """
    if space not in ("logprob", "prob"):
        raise ConfigError("space", f"unknown value {space!r}", allowed=("logprob", "prob"))
    a = torch.as_tensor(logp_init).detach().to("cpu", torch.float64)
    b = torch.as_tensor(logp_now).detach().to("cpu", torch.float64)
    one = a.dim() == 1
    a, b = a.reshape(1, -1) if one else a, b.reshape(1, -1) if one else b
    if a.shape != b.shape or a.dim() != 2:
        raise DataError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} must both be [B, d_vocab]",
                        field="logp_now")
    t = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if t.numel() != a.shape[0] or ((t < 0) | (t >= a.shape[1])).any():
        raise ConfigError("token_ids", f"need {a.shape[0]} ids in [0, {a.shape[1]})")
    gain = b - a if space == "logprob" else b.exp() - a.exp()
    mine = gain[torch.arange(gain.shape[0]), t]
    ranks = (gain > mine[:, None]).sum(1)
    return ranks[0] if one else ranks


def hidden_norms(h_init, h_now) -> dict[str, Tensor]:
    """Norms of the hidden representation h_x at init and now, and of its change (Razin et al.
    2024, Theorem 4: a small ‖h_x‖ favours displacement; the official tracker logs all three).

    ``h_init``, ``h_now``: ``[B, d_model]`` post-final-norm states at the last prompt position.
    Returns ``{"init": [B], "now": [B], "change": [B]}`` float64.
    """
    a = torch.as_tensor(h_init).detach().to("cpu", torch.float64)
    b = torch.as_tensor(h_now).detach().to("cpu", torch.float64)
    if a.shape != b.shape or a.dim() != 2:
        raise DataError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} must both be [B, d_model]",
                        field="h_now")
    return {"init": a.norm(dim=1), "now": b.norm(dim=1), "change": (b - a).norm(dim=1)}


class DisplacementTracker:
    """Training-loop callback recording log π(y+|x), log π(y-|x) and next-token distributions.

    Records, at step 0 (call :meth:`record` before training) and every ``every`` updates
    (:meth:`on_step`), for each pair:

    * ``logp_chosen`` / ``logp_rejected``: **summed** log-probs, EOS appended and counted,
      computed with :func:`preflens.scoring.concatenated_logps` (chosen and rejected of a batch of
      pairs in one forward) in eval mode under ``no_grad``
      (the model's train/eval mode is restored afterwards);
    * for pairs whose chosen and rejected responses are each a single token (without EOS):
      ``first_logp_chosen`` / ``first_logp_rejected`` = ``ln π(y±_1|x)`` at the last prompt
      position (the paper's single-token quantity, no EOS) and, when ``record_distribution``,
      the full next-token log-distribution ``[d_vocab]`` float32 at that position
      (``next_token_logprobs``, rows in the order of :attr:`single_token_pairs`).

    Step semantics (paper Sec. 3): step ``t`` = the model after ``t`` updates.

    Args:
        lm_or_tokenizer: an ``LM`` (its ``.tokenizer`` is used) or an HF tokenizer.
        pairs: ``PreferencePair`` s to track.
        every: record when ``state.step % every == 0``.
        record_distribution: keep the full next-token distribution for single-token pairs.
        batch_size: scoring batch size.
    """

    def __init__(
        self,
        lm_or_tokenizer,
        pairs: Sequence,
        *,
        every: int = 1,
        record_distribution: bool = True,
        batch_size: int = 16,
    ) -> None:
        if every < 1:
            raise ConfigError("every", f"must be >= 1, got {every}")
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
        if len(pairs) == 0:
            raise DataError("no pairs to track", field="pairs")
        self.tokenizer = getattr(lm_or_tokenizer, "tokenizer", lm_or_tokenizer)
        self.pairs = list(pairs)
        self.every = every
        self.record_distribution = record_distribution
        self.batch_size = batch_size
        self.history: list[dict[str, Any]] = []
        prompts = [p.prompt for p in self.pairs]
        n_ctx = lm_or_tokenizer.n_ctx if hasattr(lm_or_tokenizer, "model") else None
        chosen, rejected = [p.chosen for p in self.pairs], [p.rejected for p in self.pairs]
        self._enc_pos = encode(self.tokenizer, prompts, chosen, max_length=n_ctx)
        self._enc_neg = encode(self.tokenizer, prompts, rejected, max_length=n_ctx)
        # single-token pair: each response is exactly one token before the appended EOS
        self.single_token_pairs: list[int] = [
            i
            for i, (a, b) in enumerate(zip(self._enc_pos, self._enc_neg))
            if len(a.response_ids) == 2 and len(b.response_ids) == 2
        ]
        self._first_tokens = [
            (self._enc_pos[i].response_ids[0], self._enc_neg[i].response_ids[0])
            for i in self.single_token_pairs
        ]

    # -- scoring -------------------------------------------------------------------------
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def _summed_logps(self, model, device) -> tuple[list[float], list[float]]:
        """Summed log-probs of chosen and rejected: one concatenated forward per batch of pairs."""
        enc, lp_pos, lp_neg = EncodedPairs(tuple(self._enc_pos), tuple(self._enc_neg)), [], []
        for s in range(0, len(enc), self.batch_size):
            idx = range(s, min(s + self.batch_size, len(enc)))
            got = concatenated_logps(model, enc.batch(idx, pad_id=self._pad_id(), device=device))
            lp_pos += got.chosen.tolist()
            lp_neg += got.rejected.tolist()
        return lp_pos, lp_neg

    def _next_token_logprobs(self, model, device) -> Tensor:
        enc = [self._enc_pos[i] for i in self.single_token_pairs]
        rows = []
        for s in range(0, len(enc), self.batch_size):
            batch = collate(enc[s : s + self.batch_size], pad_id=self._pad_id(), device=device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            last = torch.as_tensor(batch.prompt_lens, device=logits.device).long() - 1
            picked = logits[torch.arange(logits.shape[0], device=logits.device), last]
            rows.append(torch.log_softmax(picked.float(), dim=-1).cpu())
        return torch.cat(rows)

    def record(self, model, step: int) -> dict[str, Any]:
        """Score ``model`` now and append a history entry labelled ``step``; returns the entry."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                lp_pos, lp_neg = self._summed_logps(model, device)
                dist = self._next_token_logprobs(model, device) if self.single_token_pairs else None
        finally:
            model.train(was_training)
        entry: dict[str, Any] = {
            "step": int(step),
            "logp_chosen": lp_pos,
            "logp_rejected": lp_neg,
            "mean_logp_chosen": sum(lp_pos) / len(lp_pos),
            "mean_logp_rejected": sum(lp_neg) / len(lp_neg),
        }
        if dist is not None:
            idx = torch.arange(dist.shape[0])
            pos_ids = torch.tensor([a for a, _ in self._first_tokens])
            neg_ids = torch.tensor([b for _, b in self._first_tokens])
            entry["first_logp_chosen"] = dist[idx, pos_ids].double().tolist()
            entry["first_logp_rejected"] = dist[idx, neg_ids].double().tolist()
            if self.record_distribution:
                entry["next_token_logprobs"] = dist
        self.history.append(entry)
        return entry

    # -- callback protocol ---------------------------------------------------------------
    def on_step(self, state) -> None:
        """Record after update ``state.step`` when it is a multiple of ``every``.

        Adds ``displacement/mean_logp_chosen`` and ``displacement/mean_logp_rejected`` to
        ``state.metrics`` when it is a dict.
        """
        already = bool(self.history) and self.history[-1]["step"] == state.step
        if state.step % self.every != 0 or already:
            return
        entry = self.record(state.policy, state.step)
        metrics = getattr(state, "metrics", None)
        if isinstance(metrics, dict):
            metrics["displacement/mean_logp_chosen"] = entry["mean_logp_chosen"]
            metrics["displacement/mean_logp_rejected"] = entry["mean_logp_rejected"]

    def on_end(self, state) -> None:
        """Record the final model unless this step was already recorded."""
        if not self.history or self.history[-1]["step"] != state.step:
            self.record(state.policy, state.step)

    # -- read-outs -----------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        return [e["step"] for e in self.history]

    def prob_trajectory(self, pair_index: int, which: str = "chosen") -> list[float]:
        """π(y|x) of one pair over the recorded steps (input to :func:`peak_to_trough_drop`).

        Single-token pairs: ``π(y_1|x)`` at the last prompt position (no EOS, as in the
        paper's single-token experiments); other pairs: ``exp`` of the summed log-prob with EOS.
        """
        if which not in ("chosen", "rejected"):
            raise ConfigError("which", f"unknown value {which!r}", allowed=("chosen", "rejected"))
        if not 0 <= pair_index < len(self.pairs):
            raise ConfigError("pair_index", f"must be in [0, {len(self.pairs)}), got {pair_index}")
        if pair_index in self.single_token_pairs:
            row = self.single_token_pairs.index(pair_index)
            key = f"first_logp_{which}"
            return [float(torch.tensor(e[key][row]).exp()) for e in self.history]
        return [float(torch.tensor(e[f"logp_{which}"][pair_index]).exp()) for e in self.history]

    def to_dict(self, *, include_distributions: bool = False) -> dict[str, Any]:
        """JSON-ready summary: settings, pair ids and the history (distributions optional)."""
        hist = []
        for e in self.history:
            e2 = {k: v for k, v in e.items() if k != "next_token_logprobs"}
            if include_distributions and "next_token_logprobs" in e:
                e2["next_token_logprobs"] = e["next_token_logprobs"].tolist()
            hist.append(e2)
        return {
            "every": self.every,
            "pair_ids": [getattr(p, "id", None) for p in self.pairs],
            "single_token_pairs": list(self.single_token_pairs),
            "single_token_ids": [list(t) for t in self._first_tokens],
            "history": hist,
        }
