"""The ``preflens`` command line: parser assembly, help texts, flag mapping, exit statuses."""

from __future__ import annotations

import argparse

import pytest

import preflens.dynamics.train as train_mod
from preflens.cli import build_parser, flag_for, main, to_cli_error
from preflens.cli.train import loss_help
from preflens.data import PreferencePair, write_pairs
from preflens.dynamics.losses import LOSSES
from preflens.errors import ConfigError, DataError
from preflens.models import DEFAULT_MODEL


@pytest.mark.parametrize("typed", ["factual_recall", "factual-recall"])
def test_paper_names_accept_dash_or_underscore(typed):
    args = build_parser().parse_args(["reproduce", typed])
    assert args.paper == "factual-recall" and args.model == DEFAULT_MODEL


def test_train_help_lists_every_loss_with_its_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert loss_help() in out
    for name, spec in LOSSES.items():
        line = next(x for x in out.splitlines() if x.split()[:1] == [name])
        for key, value in spec.defaults.items():
            assert f"{key}={value:g}" in line, (name, line)


def test_help_shows_defaults_without_sphinx_markup(capsys):
    for argv in (["toyworld", "prefs", "--help"], ["train", "--help"], ["reproduce", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out and ":class:" not in out
    main_help = build_parser()._subparsers._group_actions[0].choices["toyworld"]
    prefs = main_help._subparsers._group_actions[0].choices["prefs"].format_help()
    assert "number of pairs (default: 200)" in " ".join(prefs.split())


def test_flag_for_maps_python_parameters_to_flags():
    args = argparse.Namespace(batch_size=4, out="x", option_flags={"pairs": "--data"}, func=None)
    assert flag_for("batch_size", args) == "--batch-size"
    assert flag_for("pairs", args) == "--data"
    assert flag_for("func", args) is None and flag_for("lr", args) is None
    err = to_cli_error(ConfigError("out", "cannot create", allowed=["a"]), args)
    assert str(err) == "--out: cannot create; valid: a"
    data_err = DataError("bad")
    assert to_cli_error(data_err, args) is data_err


def test_library_parameter_name_reaches_the_user_as_a_flag(tmp_path, capsys):
    rc = main(["toyworld", "prefs", "--kind", "single", "--n", "0", "--out", str(tmp_path / "p.jsonl")])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "preflens toyworld: error: --n: must be >= 1, got 0"]


def test_ctrl_c_in_train_names_step_and_checkpoint(tmp_path, capsys, monkeypatch):
    data = write_pairs(tmp_path / "pairs.jsonl", [PreferencePair("Q", " a", " b")] * 4)
    out = tmp_path / "run"

    def interrupted(lm, pairs, config=None, *, callbacks, out_dir, **kwargs):
        (out / "checkpoints" / "step-00000002").mkdir(parents=True)
        for cb in callbacks:
            cb.on_step(argparse.Namespace(step=3, total_steps=5, metrics={}))
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_preference", interrupted)
    rc = main(["train", "--model", "tiny-random", "--data", str(data), "--lr", "1e-3", "--steps", "5",
               "--batch-size", "2", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "preflens train: interrupted at step 3; rerun the same command to resume from checkpoint "
        "step-00000002"]


def test_ctrl_c_elsewhere_is_one_line(capsys, monkeypatch):
    import preflens.cli.info as info

    def boom(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "_info", boom)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["preflens info: interrupted"]


def test_no_progress_silences_transformers_during_the_command(tmp_path, monkeypatch):
    from transformers.utils import logging as tf_logging

    data = write_pairs(tmp_path / "pairs.jsonl", [PreferencePair("Q", " a", " b")] * 4)
    seen = []

    def record(lm, pairs, config=None, **kwargs):
        seen.append((tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()))
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_preference", record)
    argv = ["train", "--model", "tiny-random", "--data", str(data), "--lr", "1e-3", "--steps", "1",
            "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    tf_logging.set_verbosity_warning()
    assert main([*argv, "--no-progress"]) == 130 and main(argv) == 130
    assert seen == [(tf_logging.ERROR, False), (tf_logging.WARNING, True)]
