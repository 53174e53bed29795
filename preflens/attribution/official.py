"""Pure functions reproducing the official code of Yu, Merullo & Pavlick 2023 where it departs from
the paper, for parity only.

Source: Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language Models",
EMNLP 2023 (arXiv 2310.15910), Sec. 5 (per-head direct logit attribution) and Sec. 6 (tuning
sets, α sweeps); official code yuqinan/CounterfactsRecall (``codes/generate_heads.py``,
``codes/rm_ffn_capitals_exp.py``, ``codes/scale_graph.py``). Each function names the departure it reproduces; the
corrected computations live in :mod:`preflens.attribution.heads` / :mod:`~.recall` (and the
official α grids in :func:`preflens.attribution.scaling.official_alpha_grid`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from preflens.errors import ConfigError, DataError

__all__ = ["head_attribution_batches", "memorized_capital_substring", "tuning_sets", "sweep_score",
           "sweep_rates", "official_sweep"]


def head_attribution_batches(scaled_components: Tensor, directions: Tensor, *, batch_size: int = 20,
                             batch_sum_direction: bool = False) -> Tensor:
    """Per-batch mean direct logit attribution of each component (Yu et al. 2023, Sec. 5).

    Args:
        scaled_components: ``[n, C, d_model]`` per prompt, each component's output at the last
            position already passed through the frozen final LayerNorm (TransformerLens
            ``cache.apply_ln_to_stack(stack_head_results(...), layer=-1, pos_slice=-1)``).
        directions: ``[n, d_model]`` per prompt, ``W_U[:, t_ic] − W_U[:, t_mem]``.
        batch_size: prompts per batch (official 20); the last batch may be smaller.
        batch_sum_direction: ``False`` (paper): score prompt i against its own direction,
            mean_i r̃_i·d_i. ``True`` (official code): each prompt was run alone (batch 1) but
            einsum'd against the whole batch's ``[B, d_model]`` directions; broadcasting the
            size-1 axis scores every prompt against Σ_j d_j, i.e. mean_i r̃_i·(Σ_{j∈batch} d_j)
            ≈ B·mean(r̃)·mean(d) -- a bug, reproduced for parity.

    Returns:
        ``[n_batches, C]`` float64: the batch means the official script ranked (top-3 / bottom-3
        per batch).
    """
    r = torch.as_tensor(scaled_components).detach().to(torch.float64)
    d = torch.as_tensor(directions).detach().to(torch.float64)
    if r.dim() != 3 or d.dim() != 2 or r.shape[0] != d.shape[0] or r.shape[2] != d.shape[1]:
        raise DataError(f"need scaled_components [n, C, d] and directions [n, d]; got "
                        f"{tuple(r.shape)} and {tuple(d.shape)}", field="directions")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive integer, got {batch_size!r}")
    out = []
    for s in range(0, r.shape[0], batch_size):
        rb, db = r[s:s + batch_size], d[s:s + batch_size]
        if batch_sum_direction:
            out.append(torch.einsum("ncd,d->nc", rb, db.sum(0)).mean(0))
        else:
            out.append(torch.einsum("ncd,nd->nc", rb, db).mean(0))
    return torch.stack(out)


def memorized_capital_substring(country: str, rows: Sequence[tuple[str, str]]) -> str:
    """The official "true capital" lookup (``build_open_prompt``): the capital of the LAST row whose
    country string *contains* ``country`` (plain, case-sensitive substring), with "Cocos Islands"
    forced to "West Island". Wrong for e.g. China (→ the Republic of China row), Niger (→ Nigeria),
    Guinea (→ Papua New Guinea) when those rows come later. Parity only; raises DataError when no
    row matches (the official code then failed or reused a stale value).

    ``rows``: (country, capital) pairs in CSV order.
    """
    hit = None
    for row_country, capital in rows:
        if country in row_country:
            hit = capital
    if country == "Cocos Islands":
        hit = "West Island"
    if hit is None:
        raise DataError(f"no row's country contains {country!r}", field="country")
    return hit


def tuning_sets(records_by_decile: Mapping[str, Sequence[Mapping]], label_key: str, *, n: int = 20,
                seed: int | None = 0, replace: bool = True) -> dict[str, list]:
    """Label-conditioned tuning sets of the official code (``get_tuning_data_gt/ct``, Sec. 6).

    For each frequency decile, draw ``min(len(records), n)`` records with ``record[label_key] == 1``
    (``"gt_correct"``: answered from memory; ``"correct"``: answered in context). Official
    (``replace=True``): repeated uniform draws over ALL records of the decile, keeping the
    qualifying ones -- sampling WITH replacement, so a prompt can appear twice, and the quota
    counts every record, qualifying or not. The official draws were unseeded; here ``seed``
    seeds a ``random.Random`` (the same draw sequence as ``random.choice(range(len(v)))``).
    ``replace=False`` draws distinct qualifying records instead. A decile with fewer
    qualifying records than the quota (the official loop then never ended) raises DataError
    when ``replace=False`` and is fine otherwise unless it has none.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError("n", f"must be a positive integer, got {n!r}")
    rng = random.Random(seed)
    out: dict[str, list] = {}
    for key, recs in records_by_decile.items():
        recs = list(recs)
        quota = min(len(recs), n)
        ok = [i for i, rec in enumerate(recs) if rec.get(label_key) == 1]
        if quota and not ok:
            raise DataError(f"decile {key!r}: no record with {label_key} == 1", field=label_key)
        if replace:
            picked: list = []
            while len(picked) < quota:
                rec = recs[rng.randrange(len(recs))]
                if rec.get(label_key) == 1:
                    picked.append(rec)
        else:
            if len(ok) < quota:
                raise DataError(f"decile {key!r}: {len(ok)} records with {label_key} == 1, need {quota}",
                                field=label_key)
            picked = [recs[i] for i in rng.sample(ok, quota)]
        out[key] = picked
    return out


# --------------------------------------------------------------------------- sweep scorer
def _search(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text) is not None
    except re.error as e:
        raise DataError(f"target {pattern!r} is not a valid regular expression ({e}); the official "
                        f"sweep scorer used targets as unescaped regexes", field="targets") from e


def sweep_score(text: str, in_context_target: str, memorized_target: str) -> tuple[int, int]:
    """The official α-sweep scorer (``scale_graph.intervention``, Yu et al. 2023, Sec. 6.2) on one
    generated text; returns ``(in_context, memorized)``, each 0 or 1.

    ``text`` is the decoded prompt + continuation (the official code decoded the full sequence).
    It departs from the paper's rule (:func:`preflens.data.capitals.classify_continuation`) in three
    ways, all reproduced here:

    1. the answer is ``text`` from the FIRST ``"A:"`` on (the prompt's own ``"A:"``), cut before
       the first ``"Q:"`` after it; no ``"A:"`` raised in the official code (DataError here);
    2. the two outcomes are counted **non-exclusively**: a text naming both cities scores
       ``(1, 1)`` (the paper's rule: memorized wins; neither is never counted);
    3. targets are used as **unescaped regular expressions** (``re.findall(target, answer)``):
       ``"."`` in e.g. ``" St. John's"`` matches any character, and a target that is not a valid
       pattern raised (DataError here).

    Targets carry the leading space (``" " + city``); the official memorized target was a single
    string (from :func:`memorized_capital_substring`).
    """
    if "A:" not in text:
        raise DataError(f"no 'A:' in the generated text {text[:60]!r}", field="text")
    answer = text[text.index("A:"):]
    if "Q:" in answer:
        answer = answer[:answer.index("Q:")]
    return int(_search(in_context_target, answer)), int(_search(memorized_target, answer))


def sweep_rates(texts: Sequence[str], in_context_targets: Sequence[str], memorized_targets: Sequence[str],
                *, denominator: int | None = 20) -> dict:
    """Official per-decile sweep rates (``scale_graph.run_all``): the counts of
    :func:`sweep_score` summed over a decile's prompts and divided by ``denominator``
    (official: a hard-coded 20, the tuning-set quota, even when a decile has fewer prompts, so
    small deciles are under-counted). ``denominator=None`` divides by the number of texts.
    The two rates need not sum to at most 1 (non-exclusive counting).

    Returns ``{"n", "in_context", "memorized", "both"}`` (``both``: texts scored (1, 1)).
    """
    if not (len(texts) == len(in_context_targets) == len(memorized_targets)):
        raise DataError(f"{len(texts)} texts, {len(in_context_targets)} in-context and "
                        f"{len(memorized_targets)} memorized targets", field="texts")
    if denominator is not None and (not isinstance(denominator, int) or denominator < 1):
        raise ConfigError("denominator", f"must be a positive integer or None, got {denominator!r}")
    if denominator is None and not texts:
        raise DataError("no texts to score", field="texts")
    scores = [sweep_score(t, ic, m) for t, ic, m in zip(texts, in_context_targets, memorized_targets)]
    div = len(texts) if denominator is None else denominator
    return {"n": len(texts), "in_context": sum(s[0] for s in scores) / div,
            "memorized": sum(s[1] for s in scores) / div,
            "both": sum(s[0] and s[1] for s in scores) / div}


def official_sweep(lm, prompts, head, alphas: Sequence[float], *, bridge=None, max_new_tokens: int = 16,
                   batch_size: int = 16, denominator: int | None = 20,
                   memorized_targets: Sequence[str] | None = None) -> list[dict]:
    """An α sweep scored the official way (Yu et al. 2023, Sec. 6.2; ``scale_graph.tune_curve_freq``):
    for each α, greedy continuations under :func:`preflens.attribution.scaling.scale_heads` (the
    same generation as :func:`preflens.attribution.scaling.scaling_sweep`), then
    :func:`sweep_rates` on ``prompt.text + continuation.text`` (the prompt ends in ``"A:"``).

    ``prompts`` is one decile's (or any) prompt list, used as given (degenerate ones included, as
    the official tuning sets). ``memorized_targets``: one string per prompt (e.g.
    ``" " + memorized_capital_substring(...)``); default ``" " + prompt.memorized[-1]`` (the last
    exact-match row, which the official "last hit" lookup also returns). Pass
    :func:`preflens.attribution.scaling.official_alpha_grid` values as ``alphas`` for the official
    grids. Returns one ``{"alpha", "n", "in_context", "memorized", "both"}`` row per α.
    """
    from preflens.attribution.recall import generate_continuations
    from preflens.attribution.scaling import scale_heads

    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts given", field="prompts")
    heads = [tuple(head)] if isinstance(head[0], int) else [tuple(h) for h in head]
    mems = list(memorized_targets) if memorized_targets is not None else [" " + p.memorized[-1] for p in prompts]
    if len(mems) != len(prompts):
        raise DataError(f"{len(mems)} memorized targets for {len(prompts)} prompts", field="memorized_targets")
    from preflens.attribution.heads import resolve_bridge

    bridge = resolve_bridge(lm, bridge=bridge, require_compat=False)
    rows = []
    for alpha in alphas:
        with scale_heads(bridge=bridge, scales={h: float(alpha) for h in heads}):
            conts = generate_continuations(bridge, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        texts = [p.text + c.text for p, c in zip(prompts, conts)]
        rows.append({"alpha": float(alpha), **sweep_rates(texts, [p.ic_target for p in prompts], mems,
                                                           denominator=denominator)})
    return rows
