"""Centered hidden embedding similarity (CHES) and the baselines it is compared against.

Source: Razin et al., *Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization*, ICLR 2025 (arXiv 2410.08847), Definition 2, Sec. 5 and App. H (implementation).

Conventions used throughout this module:

* A response ``y`` is tokenized without special tokens and EOS is appended and **counted**.
* ``h_{x, y_{<k}}`` is the final hidden state **after the final norm** (HF GPT-2:
  ``hidden_states[-1]``, which is post-``ln_f``; a raw TransformerBridge: ``ln_final.hook_out``),
  i.e. the vector the unembedding multiplies.  The ``|y|`` positions that predict
  ``y_1 ... y_|y|`` (EOS included) are the last prompt position ... the last response token,
  exactly the rows :func:`preflens.scoring.response_hidden_states` returns.  Row 0 is ``h_x``.
* Sums are accumulated in float64 (inputs are cast before summing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from preflens.errors import ConfigError, DataError
from preflens.scoring import Encoded, collate, encode, final_hidden, response_hidden_states

__all__ = [
    "ches_scores",
    "ches_for_pairs",
    "normalized_edit_distance",
    "edit_similarity",
    "edit_similarity_for_pairs",
    "last_hidden_inner_product",
    "last_hidden_for_pairs",
    "quantile_subset",
    "lowest_fraction",
]


def _check_pair_lists(h_chosen: Sequence[Tensor], h_rejected: Sequence[Tensor]) -> None:
    if len(h_chosen) != len(h_rejected):
        raise DataError(
            f"{len(h_chosen)} chosen vs {len(h_rejected)} rejected hidden-state matrices",
            field="h_rejected",
        )
    for i, (hp, hn) in enumerate(zip(h_chosen, h_rejected)):
        for name, h in (("h_chosen", hp), ("h_rejected", hn)):
            if h.ndim != 2 or h.shape[0] < 1:
                raise DataError(
                    f"pair {i}: expected a [T, d_model] matrix with T >= 1, got shape "
                    f"{tuple(h.shape)}",
                    field=name,
                )
        if hp.shape[1] != hn.shape[1]:
            raise DataError(
                f"pair {i}: d_model differs ({hp.shape[1]} vs {hn.shape[1]})", field="h_rejected"
            )


def ches_scores(
    h_chosen: Sequence[Tensor],
    h_rejected: Sequence[Tensor],
    *,
    length_normalized: bool = False,
) -> Tensor:
    """CHES (or LN-CHES) for each preference pair from its hidden-state matrices.

    Razin et al. 2024, Definition 2:
    ``CHES_x(y+, y-) = <H+, H-> - ||H+||^2`` with ``H± = sum_{k=1}^{|y±|} h_{x, y±_{<k}}``;
    length-normalized (Sec. 5 / Sec. 6 filtering):
    ``LN-CHES = <mean_k h+_k, mean_k h-_k> - ||mean_k h+_k||^2``.

    Args:
        h_chosen: ``n`` matrices ``[T+_i, d_model]``: post-final-norm hidden states at the
            positions that predict each chosen-response token, EOS included (row 0 = ``h_x``),
            as returned by :func:`preflens.scoring.response_hidden_states`.
        h_rejected: ``n`` matrices ``[T-_i, d_model]``, same convention.
        length_normalized: use means over positions instead of sums.

    Returns:
        ``Tensor[n]`` float64 on CPU.  Higher = more similar hidden representations = more
        likelihood displacement expected.  Not symmetric in (chosen, rejected); equals 0 when
        both matrices are the single row ``h_x`` (responses of one token *counting EOS*, i.e. an
        empty response + EOS, or a one-token response scored without EOS) or identical.  A
        one-token response with EOS appended has two rows (``h_x`` and the state after the
        token), so its CHES is generally not 0.

    Hidden states are cast to float64 **before** summing (raw CHES scales like
    ``|y|^2 ||h||^2`` and overflows in fp16; rank by LN-CHES when lengths vary).
    """
    _check_pair_lists(h_chosen, h_rejected)
    out = torch.empty(len(h_chosen), dtype=torch.float64)
    for i, (hp, hn) in enumerate(zip(h_chosen, h_rejected)):
        hp64 = hp.detach().to("cpu", torch.float64)
        hn64 = hn.detach().to("cpu", torch.float64)
        sp = hp64.mean(0) if length_normalized else hp64.sum(0)
        sn = hn64.mean(0) if length_normalized else hn64.sum(0)
        out[i] = torch.dot(sp, sn) - torch.dot(sp, sp)
    return out


def _hidden_for_pairs(lm, pairs, batch_size: int) -> tuple[list[Tensor], list[Tensor]]:
    prompts = [p.prompt for p in pairs]
    src = [getattr(p, "source", None) for p in pairs]
    h_pos = response_hidden_states(lm, prompts, [p.chosen for p in pairs], batch_size=batch_size,
                                   sources=src, response_field="chosen")
    h_neg = response_hidden_states(lm, prompts, [p.rejected for p in pairs],
                                   batch_size=batch_size, sources=src, response_field="rejected")
    return h_pos, h_neg


def _right_truncated_hidden(lm, pairs, max_tokens: int, batch_size: int):
    """Hidden rows of the official per-example script (Razin et al. 2024 code): prompt + response
    right-truncated to ``max_tokens`` tokens (no EOS); rows last prompt position ... last kept
    token. Untruncated responses give exactly the default rows (EOS-predicting row included)."""
    prompts = [p.prompt for p in pairs]
    out = []
    for texts in ([p.chosen for p in pairs], [p.rejected for p in pairs]):
        enc = encode(lm.tokenizer, prompts, texts, add_eos=True)
        kept = []
        for i, e in enumerate(enc):
            P = len(e.prompt_ids)
            k = min(len(e.response_ids) - 1, max_tokens - P)
            if k < 1:
                raise DataError(f"pair {i}: no response token left within max_tokens={max_tokens} (prompt "
                                f"{P} tokens, response {len(e.response_ids) - 1}; the official script skips such pairs; "
                                "drop them first)", field="pairs")
            kept.append(Encoded(e.prompt_ids, e.response_ids[:k]))
        rows: list[Tensor | None] = [None] * len(kept)
        was = lm.model.training
        lm.model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(kept), batch_size):
                    chunk = kept[s : s + batch_size]
                    hid = final_hidden(lm.model, collate(chunk, pad_id=lm.pad_id, device=lm.device))
                    for r, e in enumerate(chunk):
                        P, k = len(e.prompt_ids), len(e.response_ids)
                        rows[s + r] = hid[r, P - 1 : P + k].float().cpu().clone()
        finally:
            lm.model.train(was)
        out.append(rows)
    return out[0], out[1]


def ches_for_pairs(
    lm,
    pairs: Sequence,
    *,
    length_normalized: bool = False,
    batch_size: int = 16,
    truncate_right: int | None = None,
) -> Tensor:
    """CHES / LN-CHES of ``PreferencePair`` s scored with ``lm`` (Razin et al. 2024, Def. 2).

    Hidden states come from :func:`preflens.scoring.response_hidden_states` on the raw HF
    model (not a compatibility-mode bridge, whose folded/centered weights change ``h``): the
    post-``ln_f`` state at the last prompt position ... last response token, EOS appended to
    each response and counted.  Padding and batch composition do not change the result.
    A sequence longer than the model context is an error.

    ``truncate_right=512`` reproduces the official per-example script (Razin et al. 2024,
    Sec. 5: "prompt+response truncated to 512 tokens"): prompt + response without EOS are cut
    on the right to that many tokens and the rows run from the last prompt position to the
    last kept token (so a truncated response loses its EOS-predicting row; an untruncated one
    gives exactly the default rows). A prompt that leaves no response token is a DataError.

    Returns:
        ``Tensor[n]`` float64, one score per pair (see :func:`ches_scores`).
    """
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    if truncate_right is not None and (not isinstance(truncate_right, int) or truncate_right < 2):
        raise ConfigError("truncate_right", f"must be an integer >= 2 or None, got {truncate_right!r}")
    if len(pairs) == 0:
        return torch.empty(0, dtype=torch.float64)
    if truncate_right is None:
        h_pos, h_neg = _hidden_for_pairs(lm, pairs, batch_size)
    else:
        h_pos, h_neg = _right_truncated_hidden(lm, pairs, truncate_right, batch_size)
    return ches_scores(h_pos, h_neg, length_normalized=length_normalized)


def normalized_edit_distance(ids_a: Sequence[int], ids_b: Sequence[int]) -> float:
    """Token-level Levenshtein distance divided by ``max(len(a), len(b))``.

    Baseline of Razin et al. 2024, Sec. 5.  Inputs are response token ids **without**
    EOS.  Unit costs for insertion, deletion and substitution; O(len(a)·len(b)) dynamic
    programme.  Two empty sequences have distance 0.  Result in ``[0, 1]``.
    """
    a, b = list(ids_a), list(ids_b)
    if not a and not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, ta in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, tb in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ta != tb))
        prev = cur
    return prev[-1] / max(len(a), len(b))


def edit_similarity(ids_a: Sequence[int], ids_b: Sequence[int]) -> float:
    """``-normalized_edit_distance(a, b)``: the paper's stored form (higher = more similar)."""
    return -normalized_edit_distance(ids_a, ids_b)


def edit_similarity_for_pairs(tokenizer, pairs: Sequence) -> Tensor:
    """Negated normalized token edit distance between chosen and rejected responses.

    ``tokenizer`` is an HF tokenizer or an ``LM``.

    Responses are tokenized exactly as in :mod:`preflens.scoring` (separately, no special
    tokens) and **without** EOS.  Returns ``Tensor[n]`` float64 (higher = more similar).
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # an LM works too
    prompts = [p.prompt for p in pairs]
    # encode with EOS (so empty responses are allowed) and drop it again
    enc_p = encode(tokenizer, prompts, [p.chosen for p in pairs], add_eos=True)
    enc_n = encode(tokenizer, prompts, [p.rejected for p in pairs], add_eos=True)
    return torch.tensor(
        [edit_similarity(a.response_ids[:-1], b.response_ids[:-1]) for a, b in zip(enc_p, enc_n)],
        dtype=torch.float64,
    )


def last_hidden_inner_product(h_chosen: Sequence[Tensor], h_rejected: Sequence[Tensor]) -> Tensor:
    """Raw inner product of the hidden states at the EOS-predicting position.

    Baseline of Razin et al. 2024, Sec. 5: ``<h_{x,y+}, h_{x,y-}>``, post-final-norm
    states at the final position of prompt + response **without** EOS.  With the
    :func:`preflens.scoring.response_hidden_states` convention (rows predict each response
    token, EOS included) that position is the **last row** of each ``[T, d_model]`` matrix
    (for an empty response it is ``h_x``).  No cosine normalization.

    Returns:
        ``Tensor[n]`` float64.
    """
    _check_pair_lists(h_chosen, h_rejected)
    out = torch.empty(len(h_chosen), dtype=torch.float64)
    for i, (hp, hn) in enumerate(zip(h_chosen, h_rejected)):
        last_p = hp[-1].detach().to("cpu", torch.float64)
        last_n = hn[-1].detach().to("cpu", torch.float64)
        out[i] = torch.dot(last_p, last_n)
    return out


def last_hidden_for_pairs(lm, pairs: Sequence, *, batch_size: int = 16) -> Tensor:
    """:func:`last_hidden_inner_product` of ``PreferencePair`` s scored with ``lm``.

    Returns ``Tensor[n]`` float64.
    """
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    if len(pairs) == 0:
        return torch.empty(0, dtype=torch.float64)
    h_pos, h_neg = _hidden_for_pairs(lm, pairs, batch_size)
    return last_hidden_inner_product(h_pos, h_neg)


def _as_1d_scores(scores) -> Tensor:
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if s.ndim != 1:
        raise DataError(f"scores must be 1-D, got shape {tuple(s.shape)}", field="scores")
    if torch.isnan(s).any():
        raise DataError("scores contain NaN", field="scores")
    return s


QUANTILE_COMPAT = ("paper", "official")


def quantile_subset(scores, q: float, n: int, *, compat: str = "paper",
                    rounding: str | None = None, tie_order: str | None = None) -> Tensor:
    """Indices of ``n`` examples centred on quantile ``q`` of ``scores`` (Razin et al., Sec. 5).

    Sort ascending; the window of ``n`` sorted positions starts at ``round(q·(N-1)) - n // 2``
    and is shifted to stay inside ``[0, N)``. ``q = 0`` gives the ``n`` lowest, ``q = 1`` the
    ``n`` highest. Two named flags, whose defaults ``compat`` chooses:

    * ``rounding``: ``"half_up"`` (paper default: ``floor(x + 0.5)``) or ``"half_even"``
      (official code: ``int(np.round(x))``; differs when q·(N-1) ends in .5, e.g. q = 0.25, N = 7);
    * ``tie_order``: ``"stable"`` (paper default: equal scores keep input order) or
      ``"torch_default"`` (official code: ``torch.argsort(scores)`` without ``stable``, whose
      order among equal scores is an implementation detail; the scores keep their dtype).

    ``compat="official"`` sets both to the official behaviour.

    Returns:
        ``LongTensor[n]`` of indices into ``scores``, in ascending score order.
    """
    if compat not in QUANTILE_COMPAT:
        raise ConfigError("compat", f"unknown value {compat!r}", allowed=QUANTILE_COMPAT)
    official = compat == "official"
    rounding = rounding or ("half_even" if official else "half_up")
    tie_order = tie_order or ("torch_default" if official else "stable")
    if rounding not in ("half_up", "half_even"):
        raise ConfigError("rounding", f"unknown value {rounding!r}", allowed=("half_up", "half_even"))
    if tie_order not in ("stable", "torch_default"):
        raise ConfigError("tie_order", f"unknown value {tie_order!r}", allowed=("stable", "torch_default"))
    s = _as_1d_scores(scores)
    N = s.numel()
    if not 0.0 <= q <= 1.0:
        raise ConfigError("q", f"quantile must be in [0, 1], got {q}")
    if not 1 <= n <= N:
        raise ConfigError("n", f"subset size must be in [1, {N}] (number of scores), got {n}")
    if tie_order == "stable":
        order = torch.argsort(s, stable=True)
    else:
        raw = scores.detach().cpu() if isinstance(scores, Tensor) else torch.as_tensor(scores)
        order = torch.argsort(raw.reshape(-1))
    x = q * (N - 1)
    centre = math.floor(x + 0.5) if rounding == "half_up" else int(round(x))
    start = min(max(centre - n // 2, 0), N - n)
    return order[start : start + n].clone()


def lowest_fraction(scores, fraction: float) -> Tensor:
    """Indices of the ``ceil(fraction·N)`` lowest scores (Razin et al. 2024, Sec. 6 filtering).

    The paper keeps the 5% lowest-LN-CHES samples of 370 (19 = ceil(18.5)).  Ties broken by
    position (stable sort).  Returns ``LongTensor[k]`` in ascending score order.
    """
    s = _as_1d_scores(scores)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError("fraction", f"must be in (0, 1], got {fraction}")
    k = max(1, math.ceil(fraction * s.numel() - 1e-9))
    return torch.argsort(s, stable=True)[:k].clone()
