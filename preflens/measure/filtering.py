"""Filter a preference dataset by CHES before training (``preflens filter``).

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization", ICLR 2025 (arXiv 2410.08847), Sec. 6: pairs with high length-normalized CHES are
the ones whose chosen response DPO is most likely to displace; training on the lowest-scoring
pairs avoids it (the paper kept the 5 % lowest LN-CHES). Scores come from the ``ches`` lens
(:mod:`preflens.measure.ches`); selection from :func:`preflens.probes.ches.lowest_fraction`
(``drop_top``) and :func:`preflens.probes.ches.quantile_subset` at q = 0 (``keep_lowest``).
Kept pairs stay in their input order and are written as TRL JSONL (``prompt``/``chosen``/
``rejected`` plus ``id``, ``votes``, ``alpha`` when set), ready for ``preflens train`` or TRL's
``DPOTrainer``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from preflens.errors import ConfigError

__all__ = ["FILTER_SCORES", "filter_scores", "select_lowest", "filter_pairs"]

log = logging.getLogger(__name__)

#: ``by`` value -> key of a ``ches`` lens row ("ches" is the raw CHES of Definition 2)
FILTER_SCORES = {"ln-ches": "ln_ches", "ches": "ches", "edit-similarity": "edit_similarity",
                 "last-hidden": "last_hidden"}


def filter_scores(lm, pairs: Sequence, by: str = "ln-ches", *, batch_size: int | None = None,
                  chunk_size: int = 256, progress: bool = True) -> torch.Tensor:
    """``[n]`` float64 scores of ``pairs`` under ``lm`` (higher = more displacement expected)."""
    from preflens.measure import ches
    from preflens.measure.runner import auto_batch_size

    if by not in FILTER_SCORES:
        raise ConfigError("by", f"unknown value {by!r}", allowed=FILTER_SCORES)
    bs = batch_size or auto_batch_size(lm, ches.KIND)
    key = FILTER_SCORES[by]
    out: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc=f"filter: {by}", unit="pair")
    try:
        for s in range(0, len(pairs), chunk_size):
            chunk = pairs[s:s + chunk_size]
            out.extend(r[key] for r in ches.score_chunk(lm, None, chunk, ches.Options(), bs))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return torch.tensor(out, dtype=torch.float64)


def select_lowest(scores, *, drop_top: float | None = None, keep_lowest: int | None = None) -> list[int]:
    """Indices (ascending, i.e. input order) of the pairs to keep.

    ``drop_top=f`` keeps the ``ceil((1 - f)·N)`` lowest scores (drops the top fraction f, 0 ≤ f < 1);
    ``keep_lowest=k`` keeps the k lowest. Exactly one must be given. Ties broken by position.
    """
    from preflens.probes.ches import lowest_fraction, quantile_subset

    if (drop_top is None) == (keep_lowest is None):
        raise ConfigError("drop_top", "give exactly one of drop_top and keep_lowest")
    if drop_top is not None:
        if isinstance(drop_top, bool) or not isinstance(drop_top, (int, float)) or not 0.0 <= drop_top < 1.0:
            raise ConfigError("drop_top", f"must be a fraction in [0, 1), got {drop_top!r}")
        idx = lowest_fraction(scores, 1.0 - float(drop_top))
    else:
        n = len(scores)
        if isinstance(keep_lowest, bool) or not isinstance(keep_lowest, int) or not 1 <= keep_lowest <= n:
            raise ConfigError("keep_lowest", f"must be an integer in [1, {n}], got {keep_lowest!r}")
        idx = quantile_subset(scores, 0.0, keep_lowest)
    return sorted(int(i) for i in idx)


def filter_pairs(lm, pairs: Sequence, out: str | Path, *, by: str = "ln-ches",
                 drop_top: float | None = None, keep_lowest: int | None = None,
                 batch_size: int | None = None, progress: bool = True) -> dict:
    """Score ``pairs``, keep the lowest, write them to ``out`` (TRL JSONL, atomic).

    Returns ``{"n_in", "n_kept", "by", "threshold"}`` (threshold: the highest kept score).
    """
    from preflens.data.io import write_pairs

    if not pairs:
        raise ConfigError("pairs", "no preference pairs given")
    select_lowest(torch.zeros(len(pairs)), drop_top=drop_top, keep_lowest=keep_lowest)  # check options first
    scores = filter_scores(lm, pairs, by, batch_size=batch_size, progress=progress)
    keep = select_lowest(scores, drop_top=drop_top, keep_lowest=keep_lowest)
    write_pairs(out, [pairs[i] for i in keep])
    threshold = float(scores[keep].max())
    log.info("filter: kept %d of %d pairs (%s <= %.6g) -> %s", len(keep), len(pairs), by, threshold, out)
    return {"n_in": len(pairs), "n_kept": len(keep), "by": by, "threshold": threshold}
