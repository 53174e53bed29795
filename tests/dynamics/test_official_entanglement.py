"""Parity flag for Yuan et al. 2024 (gradient entanglement): the official Grad_Condition column,
tested against a port of analysis/grad_plot.py's per-checkpoint means (HumainLab/Understand_MarginPO)
written from reading it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from preflens.dynamics.entanglement import GradientStats
from preflens.errors import ConfigError


def _official_row(inner, norm_w, norm_l):
    """Port: per-pair lists of ip, ‖g_w‖, ‖g_l‖ -> the five logged means (norm_w squared twice)."""
    ip, gw, gl = (np.asarray(x, dtype=np.float64) for x in (inner, norm_w, norm_l))
    cos = ip / (gw * gl)
    cond = np.mean(ip / np.min([gw ** 2, gw ** 2], axis=0))
    return {"InnerProduct": np.mean(ip), "Correlation": np.mean(cos), "Grad_W_Norm": np.mean(gw),
            "Grad_L_Norm": np.mean(gl), "Grad_Condition": cond}


def _stats(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    nw2 = torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.1
    nl2 = torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.1
    cos = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    ip = cos * (nw2 * nl2).sqrt()
    z = torch.zeros(n)
    return GradientStats.from_dots(ip, nw2, nl2, z, z, z.long() + 3, z.long() + 4, ("a",), "exact")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_grad_condition_matches_port(seed):
    st = _stats(seed)
    want = _official_row(st.inner.numpy(), st.norm_w.numpy(), st.norm_l.numpy())
    got = st.logged_means(condition="official")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(float(want[k]), rel=1e-12, abs=1e-14)
    paper = st.logged_means()
    assert paper["Grad_Condition"] == pytest.approx(float(st.condition.mean()), rel=1e-12)
    assert paper["Grad_Condition"] != pytest.approx(got["Grad_Condition"], rel=1e-6)  # flag matters
    with pytest.raises(ConfigError):
        st.logged_means(condition="repo")


def test_gradient_stats_repr_is_short():
    st = _stats(0, n=5000)
    r = repr(st)
    assert len(r) < 300 and "n=5000" in r and "tensor(" not in r


def test_trl_style_names_and_factorization_dataclass():
    st = _stats(1, n=4)
    assert st.chosen_logps is st.u_w and st.rejected_lengths is st.len_l
    from preflens.dynamics.entanglement import LastLayerFactorization
    f = LastLayerFactorization(torch.ones(2, 3), torch.full((2, 3), 0.5), torch.full((2, 3), 0.5))
    hid, res, cos = f
    assert f[2] is cos and res is f.residual_cos and "shape=(2, 3)" in repr(f)
