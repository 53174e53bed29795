"""TrainConfig validation and record; the learning-rate schedule against transformers' schedulers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

from preflens.dynamics.config import RUN_OPTIONS, TrainConfig, lr_at
from preflens.errors import ConfigError

BASE = dict(lr=1e-3, steps=4, batch_size=2, seed=0)


@pytest.mark.parametrize("field,change", [
    ("lr", {"lr": None}), ("lr", {"lr": True}), ("max_grad_norm", {"max_grad_norm": -1.0}),
    ("steps", {"epochs": 2}), ("warmup_steps", {"warmup_steps": -1}), ("keep_checkpoints", {"keep_checkpoints": 0}),
    ("schedule", {"schedule": "exp"}), ("loss", {"loss": "dpoo"}), ("tau", {"loss": "dpo", "loss_kwargs": {"tau": 1}}),
    ("add_eos", {"add_eos": "yes"}), ("seed", {"seed": None}), ("batch_size", {"batch_size": 2.0}),
])
def test_bad_field_names_the_python_field(field, change):
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**{**BASE, **change})
    assert exc.value.option == field
    assert "--" not in str(exc.value)  # library errors name Python fields, not command-line flags


def test_allowed_values_are_listed():
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**BASE, optimizer="adam")
    assert exc.value.allowed == ["adamw", "rmsprop", "sgd"]


def test_frozen_and_record():
    cfg = TrainConfig(**BASE, loss="cpo", loss_kwargs={"lam": 2.0}, device="cpu", eval_every=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    record = cfg.to_dict()
    assert not set(RUN_OPTIONS) & set(record)  # execution options may change on resume
    assert record["loss_kwargs"] == {"beta": 0.1, "lam": 2.0}  # resolved over the loss's defaults
    assert cfg.replace(device="cuda:1", steps=9).to_dict() == record
    assert cfg.replace(lr=2e-3).to_dict() != record


@pytest.mark.parametrize("schedule,make", [
    ("constant", lambda opt, w, n: get_constant_schedule_with_warmup(opt, w)),
    ("linear", get_linear_schedule_with_warmup),
    ("cosine", get_cosine_schedule_with_warmup),
])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_lr_matches_transformers_schedulers(schedule, make, warmup):
    """TRL steps these schedulers once per update: update t (0-based) uses lr_lambda(t)."""
    total, peak = 10, 0.5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = make(opt, warmup, total)
    for step in range(total):
        want = opt.param_groups[0]["lr"]
        assert lr_at(step, lr=peak, warmup_steps=warmup, total_steps=total, schedule=schedule) == pytest.approx(
            want, rel=1e-12, abs=1e-15), step
        opt.step()
        sched.step()
    if warmup:
        assert lr_at(0, lr=peak, warmup_steps=warmup, total_steps=total, schedule=schedule) == 0.0


def test_head_precision_is_in_the_record_and_a_saved_record_without_it_meant_fp32(tmp_path):
    import json

    from preflens.dynamics.rundir import RunDir

    cfg = TrainConfig(**BASE)
    assert cfg.to_dict()["head_precision"] == "fp32" and cfg.replace(head_precision="bf16").to_dict() != cfg.to_dict()
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**BASE, head_precision="tf32")
    assert exc.value.option == "head_precision" and sorted(exc.value.allowed) == ["bf16", "fp32"]
    run = RunDir(tmp_path, True, True)  # a run saved before the option existed: no head_precision key
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    old = {k: v for k, v in cfg.to_dict().items() if k != "head_precision"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    run.check_resume(cfg.to_dict(), True)  # fp32 head: the same computation, resumes
    with pytest.raises(ConfigError, match="head_precision"):
        run.check_resume(cfg.replace(head_precision="bf16").to_dict(), True)
