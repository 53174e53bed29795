"""preflens.scoring.eval_mode restores the train/eval flag, also on error."""

from __future__ import annotations

import pytest
import torch

from preflens.scoring import eval_mode


@pytest.mark.parametrize("was_training", [True, False])
def test_eval_mode_restores_flag(was_training):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train(was_training)
    with eval_mode(model) as m:
        assert m is model and not model.training and not model[1].training
    assert model.training is was_training and model[1].training is was_training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training is was_training
