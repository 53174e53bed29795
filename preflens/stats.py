"""Small statistics shared by the lenses, recipes and evaluations: Spearman's rho, percentile
bins, label rates.

Conventions: inputs are sequences or tensors of real numbers, computed in float64; NaN signals
"undefined" (fewer than two points, or a constant side) and is never silently replaced.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

import torch

__all__ = ["average_ranks", "spearman", "percentile", "percentile_bins", "label_rates"]


def average_ranks(x) -> torch.Tensor:
    """1-based ranks in ascending order, float64; tied values get the mean of the ranks they span
    (the "fractional ranking" used by Spearman 1904 with ties; scipy.stats.rankdata "average")."""
    v = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    order = torch.argsort(v, stable=True)
    sv = v[order].tolist()
    ranks = torch.empty(len(sv), dtype=torch.float64)
    i = 0
    while i < len(sv):
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation rho (Spearman 1904): the Pearson correlation of the
    :func:`average_ranks` of ``x`` and ``y``, in float64.

    Returns NaN when the lengths differ, there are fewer than two points, or a side is constant.
    """
    a = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if a.numel() != b.numel() or a.numel() < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra @ ra) * (rb @ rb))
    return float(ra @ rb) / math.sqrt(den) if den > 0 else math.nan


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile of already sorted values (numpy's default "linear"
    method), ``q`` in [0, 100]."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def percentile_bins(values: Sequence[float], bins: int = 10) -> tuple[list[int], list[float]]:
    """Bin index per value and the ``bins + 1`` edges at the 0, 100/bins, ..., 100th percentiles
    (linear interpolation), as in Yu, Merullo & Pavlick 2023 Sec. 4.1 (frequency deciles).

    Bin k is the half-open ``[e_k, e_{k+1})``, the last bin closed, so each value lands in exactly
    one bin (the official code's inclusive edges counted boundary values twice). With tied edges
    a bin can be empty; a value equal to repeated edges goes to the last bin starting at it.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("percentile_bins needs at least one value")
    sv = sorted(vals)
    edges = [percentile(sv, 100.0 * k / bins) for k in range(bins + 1)]
    edges[0], edges[-1] = sv[0], sv[-1]
    index = [min(bisect.bisect_right(edges, v) - 1, bins - 1) for v in vals]
    return index, edges


def label_rates(labels: Iterable[str], names: Sequence[str]) -> dict:
    """``{"n": count, name: fraction of labels equal to name}`` for each of ``names``; the
    fractions are None when there are no labels."""
    labels = list(labels)
    n = len(labels)
    return {"n": n, **{k: (sum(x == k for x in labels) / n if n else None) for k in names}}
