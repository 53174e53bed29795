"""Counterfactual-capitals conflicts: greedy generation, the paper's labels, logit differences,
rates by frequency (the prompts themselves: :mod:`preflens.data.recall_prompts`).

Source: Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language Models",
EMNLP 2023 (arXiv 2310.15910), Sec. 3-4 and the official scripts.

Conventions (every function):
* Prompts come from :mod:`preflens.data.recall_prompts` (the paper's template). Targets carry a
  leading space (``" " + city``).
* Tokenization: ``add_special_tokens=False``, then BOS first exactly when the model's tokenizer
  adds one to plain text (Llama, Gemma; not GPT-2), as :mod:`preflens.scoring` does.
* Generation is greedy, ``max_new_tokens = 16`` new tokens, stops at EOS, runs through a
  ``TransformerBridge`` (so hooks such as :func:`preflens.attribution.scaling.scale_heads`
  apply on every step) and re-runs the full sequence each step (no KV cache), through
  :func:`preflens.generation.greedy_decode`: batches are **left-padded** with an attention mask
  and position ids ``cumsum(mask) - 1``, so GPT-2's absolute positions equal the unpadded ones.
  ``generate_continuations(lm, ..., use_cache=True)`` decodes with the plain Hugging Face
  model's KV cache instead (the official code's cached ``HookedTransformer.generate``); it needs
  an :class:`~preflens.models.LM`, so no hook can be active, and gives the same tokens.
* Labels (paper rule, :func:`~preflens.data.capitals.classify_continuation`): continuation cut at
  the first ``"Q:"``; ``memorized`` if any memorized target is a substring, else ``in_context``
  if the in-context target is, else ``neither``. Memorized wins ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from preflens.data.capitals import classify_continuation
from preflens.data.recall_prompts import CounterfactualPrompt
from preflens.errors import ConfigError, DataError, ScoringError
from preflens.generation import greedy_decode, hf_forward, last_logits
from preflens.stats import label_rates, percentile_bins, spearman

__all__ = [
    "Continuation",
    "LABELS",
    "generate_continuations",
    "classify_continuations",
    "answer_logit_diff",
    "first_token_ids",
    "per_prompt_frequency",
    "rates_by_frequency",
]

LABELS = ("memorized", "in_context", "neither")


@dataclass(frozen=True)
class Continuation:
    """A greedy continuation: new token ids (EOS excluded), decoded text (not cut), paper label."""

    token_ids: tuple[int, ...]
    text: str
    label: str


# --------------------------------------------------------------------------- generation
def _bridge_of(lm_or_bridge):
    """An LM gets a compatibility-mode bridge (the pipeline scale_heads uses); a bridge is kept."""
    from preflens.models import LM

    return lm_or_bridge.bridge(compat=True) if isinstance(lm_or_bridge, LM) else lm_or_bridge


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError("prompt tokenizes to no tokens", field="text")
    return list(ids)


def bridge_bos(bridge) -> list[int]:
    """``[bos]`` when ``bridge`` prepends BOS (``cfg.default_prepend_bos``; ``LM.bridge`` sets it
    exactly when the model's tokenizer adds BOS to plain text, as :mod:`preflens.scoring`), else
    ``[]``. Prompt ids of every bridge lens start with it."""
    tok = bridge.tokenizer
    if getattr(bridge.cfg, "default_prepend_bos", True) and tok.bos_token_id is not None:
        return [int(tok.bos_token_id)]
    return []


def first_token_ids(tokenizer, cities: Sequence[str]) -> list[int]:
    """First sub-token id of ``" " + city`` for each city (Yu et al. 2023, Sec. 5: the answer token is the first sub-token)."""
    return [_encode(tokenizer, " " + c)[0] for c in cities]


def generate_continuations(
    lm_or_bridge,
    prompts: Sequence[CounterfactualPrompt],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    use_cache: bool = False,
) -> list[Continuation]:
    """Greedy continuations and their paper labels (Yu et al. 2023, Sec. 3), input order.

    Args:
        lm_or_bridge: an :class:`~preflens.models.LM` (a compatibility-mode bridge is built once)
            or a ``TransformerBridge`` (used as is, so active hooks apply at every step).
        prompts: :class:`CounterfactualPrompt` list.
        max_new_tokens: new-token budget (paper: 16); "neither" depends on it.
        batch_size: prompts per left-padded batch (sorted by length); ``1`` = unbatched.
        use_cache: parity option (the official code generated with a KV cache): decode with the
            plain Hugging Face model ``lm.model`` and its KV cache, one new token per forward,
            instead of re-running the full sequence through the bridge. Needs an ``LM``: a
            bridge raises ConfigError, because hooks on it (e.g.
            :func:`~preflens.attribution.scaling.scale_heads`) would not apply to the plain
            model -- hooked runs stay uncached. Gives the same tokens as the uncached path
            (tested on toyworld and on a grouped-query-attention Llama). TransformerLens 4.3's
            own ``bridge.generate(use_past_kv_cache=True)`` returns wrong tokens from the second
            (or third) new token on -- 10 of 10 toyworld prompts checked, while its uncached
            ``generate`` matches this function -- so preflens never uses it.

    The decoded text is ``tokenizer.decode(new_ids, clean_up_tokenization_spaces=False)``.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("max_new_tokens/batch_size", "must be >= 1")
    if use_cache:
        from preflens.models import LM
        from preflens.scoring import bos_prefix

        if not isinstance(lm_or_bridge, LM):
            raise ConfigError("use_cache", "needs an LM (its plain Hugging Face model's KV cache); a "
                              "bridge is decoded uncached so that its hooks apply at every step")
        tok, cache_model, n_ctx = lm_or_bridge.tokenizer, lm_or_bridge.model, lm_or_bridge.n_ctx
        dev, bos = lm_or_bridge.device, list(bos_prefix(tok))
    else:
        bridge = _bridge_of(lm_or_bridge)
        tok, cache_model, n_ctx = bridge.tokenizer, None, int(bridge.cfg.n_ctx)
        dev = torch.device(bridge.cfg.device) if getattr(bridge.cfg, "device", None) else None
        bos = bridge_bos(bridge)
    enc = [bos + _encode(tok, p.text) for p in prompts]
    for i, e in enumerate(enc):
        if len(e) + max_new_tokens > n_ctx:
            raise ScoringError(
                f"prompt {i}: {len(e)} tokens + {max_new_tokens} new exceed the context ({n_ctx})")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)

    def forward(ids, mask, pos):
        return bridge(ids, attention_mask=mask, position_ids=pos, return_type="logits")

    order = sorted(range(len(enc)), key=lambda i: (len(enc[i]), i))
    new_ids: dict[int, list[int]] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        rows = greedy_decode(None if use_cache else forward, [enc[i] for i in idx],
                             max_new_tokens=max_new_tokens, eos=eos, pad=pad, device=dev,
                             cache_model=cache_model)
        for i, row in zip(idx, rows):
            new_ids[i] = row
    out = []
    for i, p in enumerate(prompts):
        text = tok.decode(new_ids[i], clean_up_tokenization_spaces=False)
        out.append(Continuation(tuple(new_ids[i]), text,
                                classify_continuation(text, p.mem_targets, p.ic_target)))
    return out


def classify_continuations(
    lm_or_bridge,
    prompts: Sequence[CounterfactualPrompt],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    use_cache: bool = False,
) -> list[str]:
    """Paper labels (``memorized`` / ``in_context`` / ``neither``) of greedy continuations;
    see :func:`generate_continuations` for the conventions (BOS as scoring, 16 tokens, cut at "Q:")
    and ``use_cache``."""
    return [c.label for c in generate_continuations(
        lm_or_bridge, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        use_cache=use_cache)]


@torch.no_grad()
def answer_logit_diff(
    lm,
    prompts: Sequence[CounterfactualPrompt],
    *,
    answer_prefix: str | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """``[n]`` float32 next-token logit difference (a preflens variant of Yu et al. 2023, Sec. 3,
    not the paper's measure): ``logit[t_ic] - max_m logit[t_mem_m]`` with ``t_x`` the first
    sub-token of ``" " + x``.

    **Answer position.** By default the last prompt token (the ":" of "A:"), i.e. the model's
    very next token. GPT-2-family models often first restate (" The capital of ..."), so this is
    a relative preference and does not reproduce generation rates. With ``answer_prefix`` (e.g.
    ``" The capital of {country} is"``, formatted with the prompt's country and tokenized
    separately, then appended to the prompt ids) the difference is read at the prefix's last
    token: the city slot of the restatement. Identical first tokens give exactly 0.

    Runs ``lm.model`` (HF), left-padded (:func:`preflens.generation.last_logits`); the difference is invariant under compatibility
    mode (centring shifts all logits at a position equally).
    """
    from preflens.scoring import bos_prefix

    tok, model = lm.tokenizer, lm.model
    seqs = []
    for p in prompts:
        ids = list(bos_prefix(tok)) + _encode(tok, p.text)
        if answer_prefix:
            ids += _encode(tok, answer_prefix.format(country=p.country))
        seqs.append(ids)
    ic = torch.tensor(first_token_ids(tok, [p.in_context for p in prompts]))
    mems = [first_token_ids(tok, p.memorized) for p in prompts]
    out = torch.empty(len(seqs))
    forward = hf_forward(model)
    for s in range(0, len(seqs), batch_size):
        logits = last_logits(forward, seqs[s: s + batch_size], pad=lm.pad_id, device=lm.device)
        for b, last in enumerate(logits):
            i = s + b
            out[i] = last[ic[i]] - last[torch.tensor(mems[i])].max()
    return out


# --------------------------------------------------------------------------- frequency bins
def per_prompt_frequency(
    prompts: Sequence[CounterfactualPrompt], table: dict, *, by: str = "country"
) -> list[float]:
    """Per-prompt scalar from a caller's table (Yu et al. 2023, Sec. 4): ``by="country"`` reads
    ``table[prompt.country]`` (criterion ``abs_icl_country``, or ``bi_gt_capital`` when the table
    holds country-capital counts, e.g. toyworld's exact fact counts); ``by="in_context"`` reads
    ``table[prompt.in_context]`` (``abs_capital``); ``by="ic_country"`` reads
    ``table[prompt.ic_country]``. Missing keys raise DataError."""
    if by not in ("country", "in_context", "ic_country"):
        raise ConfigError("by", f"unknown value {by!r}", allowed=("country", "in_context", "ic_country"))
    out = []
    for p in prompts:
        key = getattr(p, by)
        if key not in table:
            raise DataError(f"no frequency for {key!r}", field=by)
        out.append(float(table[key]))
    return out


def rates_by_frequency(
    labels: Sequence[str],
    frequency: Sequence[float],
    *,
    bins: int = 10,
    degenerate: Sequence[bool] | None = None,
    keep_degenerate: bool = False,
) -> dict:
    """Label rates per frequency percentile bin (Yu et al. 2023, Sec. 4).

    Edges are the percentiles 0, 100/bins, ..., 100 of the per-prompt ``frequency`` values
    (linear interpolation). Bin k is the half-open ``[e_k, e_{k+1})``, the last bin closed
    ``[e_{bins-1}, e_bins]``, so each prompt lands in exactly one bin (the official code's
    inclusive edges double-counted boundary prompts). With tied edges a bin can be empty
    (n = 0, rates NaN); a value equal to repeated edges goes to the last bin starting at it.
    Prompts flagged in ``degenerate`` are dropped unless ``keep_degenerate``.

    Returns:
        ``{"edges": [bins+1], "n": int, "n_excluded": int, "bins": [{"bin", "lo", "hi", "n",
        "memorized", "in_context", "neither"}], "spearman": {label: rho}}`` where rho is the
        Spearman correlation of bin index with the label's rate over the non-empty bins.
    """
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ConfigError("bins", f"must be an int >= 1, got {bins!r}")
    if len(labels) != len(frequency):
        raise DataError(f"{len(labels)} labels but {len(frequency)} frequencies", field="frequency")
    if degenerate is not None and len(degenerate) != len(labels):
        raise DataError(f"{len(labels)} labels but {len(degenerate)} degenerate flags", field="degenerate")
    keep = [keep_degenerate or degenerate is None or not degenerate[i] for i in range(len(labels))]
    lab = [l for l, k in zip(labels, keep) if k]
    freq = [float(f) for f, k in zip(frequency, keep) if k]
    for l in lab:
        if l not in LABELS:
            raise DataError(f"unknown label {l!r}; valid: {', '.join(LABELS)}", field="labels")
    if any(math.isnan(f) for f in freq):
        raise DataError("frequency contains NaN", field="frequency")
    if not lab:
        raise DataError("no prompts left to bin", field="labels")
    index, edges = percentile_bins(freq, bins)
    members: list[list[str]] = [[] for _ in range(bins)]
    for l, k in zip(lab, index):
        members[k].append(l)
    rows = []
    for k, m in enumerate(members):
        rates = label_rates(m, LABELS)
        rows.append({"bin": k, "lo": edges[k], "hi": edges[k + 1], "n": len(m),
                     **{name: math.nan if rates[name] is None else rates[name] for name in LABELS}})
    full = [r for r in rows if r["n"]]
    rho = {name: spearman([r["bin"] for r in full], [r[name] for r in full]) for name in LABELS}
    return {"edges": edges, "n": len(lab), "n_excluded": len(labels) - len(lab), "bins": rows,
            "spearman": rho}
