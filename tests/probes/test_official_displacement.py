"""Token-level displacement tracking (Razin et al. 2024 official token tracker), tested against a
port of its rank computation (persona_experiments/train/token_logits_and_probs_tracker_callback.py)
written from reading it."""

from __future__ import annotations

import pytest
import torch

from preflens.errors import ConfigError, DataError
from preflens.probes.displacement import gain_rank, hidden_norms


def _official_rank(logp_now, logp_init, pref, prob=False):
    change = (logp_now.exp() - logp_init.exp()) if prob else (logp_now - logp_init)
    order = torch.argsort(change, dim=1, descending=True)
    return torch.where(order == pref.view(-1, 1))[1]


@pytest.mark.parametrize("space", ["logprob", "prob"])
def test_gain_rank_matches_official_port(space):
    g = torch.Generator().manual_seed(0)
    init = torch.log_softmax(torch.randn(5, 50, generator=g, dtype=torch.float64), -1)
    now = torch.log_softmax(torch.randn(5, 50, generator=g, dtype=torch.float64), -1)
    pref = torch.randint(0, 50, (5,), generator=g)
    got = gain_rank(init, now, pref, space=space)
    assert torch.equal(got, _official_rank(now, init, pref, prob=space == "prob"))
    assert gain_rank(init[0], now[0], int(pref[0]), space=space).item() == got[0].item()


def test_gain_rank_ties_share_best_rank_and_errors():
    init = torch.zeros(1, 4)
    now = torch.tensor([[1.0, 1.0, 0.5, 1.0]])
    assert gain_rank(init, now, [1]).tolist() == [0]
    assert gain_rank(init, now, [2]).tolist() == [3]
    with pytest.raises(ConfigError):
        gain_rank(init, now, [4])
    with pytest.raises(DataError):
        gain_rank(init, now[:, :3], [0])


def test_hidden_norms():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    out = hidden_norms(a, b)
    assert out["init"].tolist() == [5.0, 1.0]
    assert out["now"].tolist() == [4.0, 2 ** 0.5]
    assert out["change"].tolist() == [3.0, 1.0]
