"""Distributed data parallel: the same entry point under ``torch.distributed.run`` with 2 CPU
processes (gloo) follows the single-process metric trajectory with the same global batch.

The 2-rank run splits each global batch of 4 pairs into 2 × 2 (different padding per forward),
so agreement is to float tolerance, not bitwise. Plain SGD keeps the comparison linear (Adam's
first step is ≈ lr·sign(g), which turns float noise in near-zero gradients into O(lr) changes).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from preflens.data import PreferencePair
from preflens.dynamics.train import train_preference
from preflens.models import load_model
from tests.conftest import run_torchrun

CONFIG = dict(loss="dpo", loss_kwargs={"beta": 0.5}, optimizer="sgd", lr=0.05, steps=3, batch_size=4,
              seed=3, checkpoint_every=3)
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
        "logps/rejected", "logps_mean/chosen", "ranking_accuracy", "grad_norm", "eval/loss")

WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from preflens.data import read_pairs
from preflens.dynamics.train import train_preference
from preflens.models import load_model

data, out, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
lm = load_model("tiny-random", device="cpu")
pairs = read_pairs(data)
train_preference(lm, pairs[:8], eval_pairs=pairs[8:], eval_every=1, out_dir=out, **config)
"""


def _pairs() -> list[PreferencePair]:
    return [PreferencePair(f"Item {i} says", f" yes{' indeed' * (i % 3)}", f" no{' never' * (i % 5)}")
            for i in range(11)]


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    run_torchrun(tmp_path, WORKER, _pairs(), tmp_path / "ddp", CONFIG, what="DDP run")
    pairs = _pairs()
    single = train_preference(load_model("tiny-random", device="cpu"), pairs[:8], eval_pairs=pairs[8:],
                              eval_every=1, out_dir=tmp_path / "single", **CONFIG)
    ddp = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp] == [1, 2, 3]
    assert ddp[0]["rewards/accuracies"] == 0.0 and ddp[0]["rewards/margins"] == 0.0  # reference in loop geometry
    for a, b in zip(ddp, single.history):
        for k in KEYS:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert single.history[-1]["loss"] < single.history[0]["loss"] - 1e-3  # it did train
    w_ddp = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000003" / "model.safetensors"))
    w_one = load_file(str(single.checkpoint_path / "model.safetensors"))
    for k in w_one:
        assert torch.allclose(w_ddp[k], w_one[k], atol=1e-6), k
