"""Calibration metrics and rank correlations (Chen et al. 2024; official distance_lib
definitions). References are hand-computed or brute-force definitional loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from preflens.errors import DataError
from preflens.probes import ranking as rk


def test_calibration_metrics_by_hand():
    # pair 1: a1 = 3/4 -> expected 3, model ratio e^0 = 1; pair 2: a1 = 1/4 -> 1/3, model e^{ln 3}
    # = 3; pair 3: a1 = 1 -> 1/eps = 1000, model ratio e^{ln 1000} = 1000 (perfect)
    lr = [0.0, math.log(3.0), math.log(1000.0)]
    m = rk.calibration_metrics(lr, [0.75, 0.25, 1.0])
    sq = [(3 - 1) ** 2, (1 / 3 - 3) ** 2, 0.0]
    assert m.n == 3 and m.n_dropped == 0 and m.n_decided == 3
    assert m.lr_mse == pytest.approx(sum(sq) / 3, rel=1e-9)
    mu = sum(sq) / 3
    assert m.lr_mse_std == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in sq) / 3), rel=1e-9)
    ad = [math.log(3), abs(math.log(1 / 3) - math.log(3)), 0.0]
    assert m.log_diff == pytest.approx(sum(ad) / 3, rel=1e-9)
    e, p = [3, 1 / 3, 1000], [1, 3, 1000]
    me, mp = sum(e) / 3, sum(p) / 3
    r = sum((a - me) * (b - mp) for a, b in zip(e, p)) / math.sqrt(
        sum((a - me) ** 2 for a in e) * sum((b - mp) ** 2 for b in p))
    assert m.pearson == pytest.approx(r, rel=1e-9)
    # ECE: probs sigma(lr) = 0.5, 0.75, 0.999; labels 1, 0, 1; bins [0.4,0.5] -> bin 4 (0.5 on
    # the edge goes to the lower bin), 0.75 -> bin 7, 0.999 -> bin 9
    want_ece = (abs(1 - 0.5) + abs(0 - 0.75) + abs(1 - 1000 / 1001)) / 3
    assert m.ece == pytest.approx(want_ece, rel=1e-9)


def test_calibration_drops_overflow_and_ties_skip_ece():
    m = rk.calibration_metrics([800.0, 0.1, -0.2], [0.75, 0.5, 0.5])
    assert m.n == 2 and m.n_dropped == 1 and m.n_decided == 1
    with pytest.raises(DataError):
        rk.calibration_metrics([0.0], [1.5])


def test_ece_edges():
    assert rk.expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0
    assert rk.expected_calibration_error([1, 1, 0, 0], [0.6] * 4) == pytest.approx(0.1)


def _brute_kendall_b(x, y):
    P = Q = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
        if sx and sy:
            P += sx == sy
            Q += sx != sy
        tx += sx == 0
        ty += sy == 0
    n0 = len(x) * (len(x) - 1) // 2
    return (P - Q) / math.sqrt((n0 - tx) * (n0 - ty))


def _brute_spearman(x, y):
    def ranks(v):
        return [sum(u < w for u in v) + (sum(u == w for u in v) + 1) / 2 for w in v]
    a, b = ranks(x), ranks(y)
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((p - ma) * (q - mb) for p, q in zip(a, b))
    return num / math.sqrt(sum((p - ma) ** 2 for p in a) * sum((q - mb) ** 2 for q in b))


def test_rank_correlations_with_ties_match_definitions():
    g = torch.Generator().manual_seed(0)
    model = [torch.randint(0, 4, (n,), generator=g).double() for n in (4, 5, 6, 4, 7)]
    human = [torch.randint(0, 3, (len(m),), generator=g).double() for m in model]
    res = rk.ranking_correlations(model, human)
    for k, (m, h) in enumerate(zip(model, human)):
        mm, hh = m.tolist(), h.tolist()
        if len(set(mm)) == 1 or len(set(hh)) == 1:
            assert math.isnan(res.spearman[k]) and math.isnan(res.kendall[k])
            continue
        assert res.kendall[k].item() == pytest.approx(_brute_kendall_b(mm, hh), abs=1e-12)
        assert res.spearman[k].item() == pytest.approx(_brute_spearman(mm, hh), abs=1e-12)
    assert rk.kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert rk.spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    r = rk.ranking_correlations(torch.tensor([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([[2.0, 1.0], [0.0, 1.0]]))
    assert r.n_undefined == 1 and r.mean_spearman == -1.0 and "N=2" in repr(r)
