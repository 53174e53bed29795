"""FSDP2: two gloo processes with ``shard="fsdp"`` follow single-process training; sharded
checkpoints resume, including into a different world size; activation checkpointing is exact.

As in ``test_ddp.py``: plain SGD (linear in the gradient), the 2-rank run splits each global
batch of 4 pairs into 2 × 2, so agreement is to float tolerance, not bitwise.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from preflens.data import PreferencePair
from preflens.dynamics import fsdp
from preflens.dynamics.train import train_preference
from preflens.models import load_model
from tests.conftest import run_torchrun

CONFIG = dict(loss="dpo", loss_kwargs={"beta": 0.5}, optimizer="sgd", lr=0.05, batch_size=4, seed=3,
              checkpoint_every=1)
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
        "logps_mean/chosen", "ranking_accuracy", "grad_norm", "eval/loss")

WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from preflens.data import read_pairs
from preflens.dynamics.train import train_preference
from preflens.models import load_model

data, out, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
lm = load_model("tiny-random", device="cpu")
pairs = read_pairs(data)
train_preference(lm, pairs[:8], eval_pairs=pairs[8:], eval_every=1, out_dir=out, **config)
if torch.distributed.is_available() and int(__import__("os").environ.get("RANK", "0")) == 0:
    save_file({k: v.detach().contiguous() for k, v in lm.model.named_parameters()}, out + "/final.safetensors")
"""


def _pairs() -> list[PreferencePair]:
    return [PreferencePair(f"Item {i} says", f" yes{' indeed' * (i % 3)}", f" no{' never' * (i % 5)}")
            for i in range(11)]


def _torchrun(tmp_path, out, config, nproc=2):
    run_torchrun(tmp_path, WORKER, _pairs(), out, config, nproc=nproc, what="FSDP run")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _single(out, **over):
    lm = load_model("tiny-random", device="cpu")
    pairs = _pairs()
    res = train_preference(lm, pairs[:8], eval_pairs=pairs[8:], eval_every=1, out_dir=out, **{**CONFIG, **over})
    return res, {k: v.detach().clone() for k, v in lm.model.named_parameters()}


def _close(hist_a, hist_b):
    assert [r["step"] for r in hist_a] == [r["step"] for r in hist_b]
    for a, b in zip(hist_a, hist_b):
        for k in KEYS:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


def _max_diff(wa, wb) -> float:
    assert set(wa) == set(wb)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wb)


def test_decoder_blocks_found_generically():
    lm = load_model("tiny-random", device="cpu")
    blocks = fsdp.decoder_blocks(lm.model)
    assert blocks == list(lm.model.transformer.h) and len(blocks) == 2


def test_activation_checkpointing_is_exact_and_keeps_names(tmp_path):
    plain, w_plain = _single(tmp_path / "plain", steps=2)
    ckpt, w_ckpt = _single(tmp_path / "ckpt", steps=2, activation_checkpointing=True)
    assert [r["loss"] for r in ckpt.history] == [r["loss"] for r in plain.history]
    assert _max_diff(w_ckpt, w_plain) == 0.0
    saved = load_file(str(ckpt.checkpoint_path / "model.safetensors"))  # plain checkpoint, same names
    assert set(saved) == set(load_file(str(plain.checkpoint_path / "model.safetensors")))


@pytest.mark.slow
def test_two_process_fsdp_matches_single_process_and_reshards(tmp_path):
    # 2 ranks, FSDP2 + activation checkpointing, 3 steps, sharded checkpoints every step
    hist2 = _torchrun(tmp_path, tmp_path / "fsdp2", {**CONFIG, "steps": 3, "shard": "fsdp",
                                                      "activation_checkpointing": True})
    single, w_one = _single(tmp_path / "single", steps=3)
    _close(hist2, single.history)
    assert single.history[-1]["loss"] < single.history[0]["loss"] - 1e-3  # it did train
    w_two = load_file(str(tmp_path / "fsdp2" / "final.safetensors"))
    print(f"2-rank FSDP2 vs 1 process: max |dw| {_max_diff(w_two, w_one):.2e}, max metric rel diff "
          f"{max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for a, b in zip(hist2, single.history) for k in KEYS):.2e}")
    assert _max_diff(w_two, w_one) < 1e-6
    ckpt = tmp_path / "fsdp2" / "checkpoints" / "step-00000003"
    assert fsdp.is_sharded_checkpoint(ckpt) and len(list((ckpt / "dcp").glob("*.distcp"))) == 2

    # 2 -> 1: one process resumes the 2-rank run's step-2 checkpoint and finishes step 3
    resumed = tmp_path / "resume21"
    resumed.mkdir()
    import shutil
    shutil.copytree(tmp_path / "fsdp2" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    shutil.copy(tmp_path / "fsdp2" / "config.json", resumed / "config.json")
    shutil.copy(tmp_path / "fsdp2" / "metrics.jsonl", resumed / "metrics.jsonl")
    r21, w21 = _single(resumed, steps=3, shard="fsdp")
    _close(r21.history, single.history)
    assert _max_diff(w21, w_one) < 1e-6

    # 1 -> 2: a one-process sharded run stops at step 2; two ranks resume it to step 3
    _single(tmp_path / "resume12", steps=2, shard="fsdp")
    hist12 = _torchrun(tmp_path, tmp_path / "resume12", {**CONFIG, "steps": 3, "shard": "fsdp"})
    _close(hist12, single.history)
    assert _max_diff(load_file(str(tmp_path / "resume12" / "final.safetensors")), w_one) < 1e-6


def test_single_process_sharded_resume_is_bit_identical(tmp_path):
    full, w_full = _single(tmp_path / "full", steps=3, optimizer="adamw", lr=1e-3)
    _single(tmp_path / "part", steps=2, optimizer="adamw", lr=1e-3, shard="fsdp")
    part, w_part = _single(tmp_path / "part", steps=3, optimizer="adamw", lr=1e-3, shard="fsdp")
    assert [r["loss"] for r in part.history] == [r["loss"] for r in full.history]
    assert _max_diff(w_part, w_full) == 0.0


def test_one_process_resumes_across_checkpoint_formats(tmp_path):
    """Plain -> sharded and sharded -> plain checkpoints resume on one process, bit for bit."""
    full, w_full = _single(tmp_path / "full", steps=3, optimizer="adamw", lr=1e-3)
    for first, second in (("ddp", "fsdp"), ("fsdp", "ddp")):
        out = tmp_path / f"{first}-{second}"
        _single(out, steps=2, optimizer="adamw", lr=1e-3, shard=first)
        res, w = _single(out, steps=3, optimizer="adamw", lr=1e-3, shard=second)
        assert [r["loss"] for r in res.history] == [r["loss"] for r in full.history], (first, second)
        assert _max_diff(w, w_full) == 0.0
