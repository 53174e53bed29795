"""``preflens train``: one flag <-> TrainConfig table, errors re-addressed to flags."""

from __future__ import annotations

import dataclasses

import pytest

from preflens.cli import build_parser, main
from preflens.cli.train import CONFIG_FLAGS, config_from_args
from preflens.dynamics.config import TrainConfig

BASE = ["train", "--data", "d.jsonl", "--out", "o", "--lr", "1e-3", "--steps", "3", "--batch-size", "2"]


def test_every_flag_in_the_table_exists_and_fills_its_field():
    parser = build_parser()
    args = parser.parse_args(BASE + ["--schedule", "cosine", "--warmup-steps", "2", "--grad-accum", "2",
                                     "--beta", "0.3", "--loss-kwarg", "gamma=0.5", "--loss", "dpo_gamma",
                                     "--no-resume", "--pairwise-normalized", "--device", "cpu"])
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    assert set(CONFIG_FLAGS.values()) <= flags
    assert set(CONFIG_FLAGS) <= {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = config_from_args(args)
    assert cfg == TrainConfig(loss="dpo_gamma", loss_kwargs={"beta": 0.3, "gamma": 0.5}, lr=1e-3, steps=3,
                              batch_size=2, seed=0, schedule="cosine", warmup_steps=2, grad_accum=2, resume=False,
                              pairwise_normalized=True, device="cpu")


@pytest.mark.parametrize("extra,flag", [
    (["--warmup-steps", "-1"], "--warmup-steps"), (["--schedule", "exp"], "--schedule"),
    (["--beta", "-1"], "--beta"), (["--loss-kwarg", "gamma=nan", "--loss", "dpo_gamma"], "--loss-kwarg gamma"),
    (["--optimizer", "adam"], "--optimizer"), (["--head-precision", "fp16"], "--head-precision"),
])
def test_config_errors_name_the_flag_before_any_work(extra, flag, tmp_path, capsys):
    argv = [a if a != "d.jsonl" else str(tmp_path / "missing.jsonl") for a in BASE] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"preflens train: error: {flag}:"), err  # not the missing data file: config first


def test_head_precision_flag_fills_the_field():
    args = build_parser().parse_args(BASE + ["--head-precision", "bf16", "--precision", "bf16"])
    cfg = config_from_args(args)
    assert (cfg.head_precision, cfg.precision) == ("bf16", "bf16")
    assert config_from_args(build_parser().parse_args(BASE)).head_precision == "fp32"
