"""preflens.stats: Spearman with average ranks (hand values), percentile bins, rates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preflens.stats import average_ranks, label_rates, percentile_bins, spearman


def test_average_ranks_ties_by_hand():
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_by_hand():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    # ties: ranks of y are [1.5, 1.5, 3, 4]; Pearson with [1, 2, 3, 4] by hand
    rx, ry = [1, 2, 3, 4], [1.5, 1.5, 3, 4]
    mx, my = 2.5, 2.5
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman([0, 1, 2, 3], [7, 7, 8, 9]) == pytest.approx(num / den)
    assert num / den == pytest.approx(0.9486832980505138)


def test_spearman_undefined_is_nan():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    assert math.isnan(spearman([1, 2], [1, 2, 3]))


def test_percentile_bins_match_numpy_and_put_each_value_in_one_bin():
    values = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    index, edges = percentile_bins(values, 10)
    assert edges == pytest.approx(np.percentile(values, np.arange(0, 101, 10)).tolist())
    assert index == np.searchsorted(np.array(edges[1:-1]), values, side="right").tolist()
    idx100, _ = percentile_bins(list(range(100)), 10)
    assert [idx100.count(k) for k in range(10)] == [10] * 10
    assert idx100[99] == 9 and idx100[0] == 0


def test_label_rates():
    assert label_rates(["a", "b", "a", "a"], ("a", "b", "c")) == {"n": 4, "a": 0.75, "b": 0.25, "c": 0.0}
    assert label_rates([], ("a",)) == {"n": 0, "a": None}
