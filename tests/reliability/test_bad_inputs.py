"""Bad-input matrix over the entry points: ``preflens train`` / ``preflens reproduce`` flags,
config values, JSONL data, model names and directories, checkpoint/run directories, and the
output directory (unwritable, disk full).

Every CLI case must exit with status 2 and end stderr with ONE line ``preflens <command>: error: ...``
that names the option / file:line / directory and the reason, with no traceback, and must leave
no file in the (fresh) output directory. API cases assert the ``PreflensError`` subclass and its
structured fields. The JSONL cases of ``tests/data/test_io.py`` (reader level) are not repeated
here; the data cases below go through the CLI.

Root ignores permission bits, so the "read-only output directory" case is simulated by making
``tempfile.mkstemp`` raise ``PermissionError`` for that directory (the same path a real
read-only directory takes); a real ``chmod 0o500`` variant runs only for non-root users.
A full disk is simulated by ``os.fsync`` / file writes raising ``ENOSPC``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import preflens.dynamics.rundir as rundir_mod
from preflens.cli import main as cli_main
from preflens.data import PreferencePair
from preflens.dynamics.checkpoint import list_checkpoints, save_checkpoint, verify_checkpoint
from preflens.dynamics.train import train_preference
from preflens.errors import ConfigError, DataError, TrainingError
from preflens.models import OFFLINE_TOKENIZER_DIR, load_model

GOOD = [{"prompt": f"Q{i}: the capital is", "chosen": f" Paris{' yes' * i}", "rejected": " Rome"}
        for i in range(6)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data files and model directories shared by the matrix (built once)."""
    root = tmp_path_factory.mktemp("inputs")
    d = {"root": root, "good": _jsonl(root / "good.jsonl", GOOD)}
    d["empty"] = root / "empty.jsonl"
    d["empty"].write_text("")
    d["blank"] = root / "blank.jsonl"
    d["blank"].write_text("\n  \n\n")
    d["nan_alpha"] = _jsonl(root / "nan_alpha.jsonl", [GOOD[0], '{"prompt": "p", "chosen": "a", '
                                                        '"rejected": "b", "alpha": NaN}'])
    d["inf_alpha"] = _jsonl(root / "inf_alpha.jsonl", [*GOOD[:2], '{"prompt": "p", "chosen": "a", '
                                                       '"rejected": "b", "alpha": 1e999}'])
    d["third_vote"] = _jsonl(root / "third_vote.jsonl",
                             [dict(GOOD[0], votes=["chosen", "rejected", "response_3"])])
    # record 2 of 6 is too long for tiny-random's 256 positions; a blank line makes it line 3
    long_rows = [GOOD[0], "", dict(GOOD[1], chosen=" Paris" * 300), *GOOD[2:]]
    d["too_long"] = _jsonl(root / "too_long.jsonl", long_rows)
    d["missing"] = root / "does_not_exist.jsonl"
    lm = load_model("tiny-random", device="cpu")
    full = root / "model_full"
    lm.model.save_pretrained(full)
    lm.tokenizer.save_pretrained(full)
    for name in ("no_weights", "no_tokenizer", "bad_weights"):
        shutil.copytree(full, root / name)
    (root / "no_weights" / "model.safetensors").unlink()
    for f in (root / "no_tokenizer").iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special")):
            f.unlink()
    blob = (root / "bad_weights" / "model.safetensors").read_bytes()
    (root / "bad_weights" / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    small = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_layer=1, n_embd=16, n_head=2, n_positions=64))
    small.save_pretrained(root / "vocab_mismatch")  # 100 rows vs the 512-token shipped tokenizer
    AutoTokenizer.from_pretrained(str(OFFLINE_TOKENIZER_DIR)).save_pretrained(root / "vocab_mismatch")
    lin = torch.nn.Linear(2, 2)
    d["ckpt"] = save_checkpoint(root / "ckpts", 1, model=lin, optimizer=torch.optim.SGD(lin.parameters(), lr=1),
                                meta={})
    d["a_file"] = root / "a_file.txt"
    d["a_file"].write_text("not a directory")
    d["models"] = root
    return d


def _train_argv(data, out, *extra, model="tiny-random", steps=("--steps", "2")):
    return ["train", "--model", str(model), "--data", str(data), "--lr", "1e-3", *steps, "--batch-size",
            "2", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def _run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = cli_main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


def _assert_one_line_error(rc, err, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r"preflens [a-z]+: error: ", last), err
    for f in fragments:
        assert str(f) in last, (f, last)


# (id, argv builder(env, out), fragments(env, out)) -- 35 CLI cases for `preflens train`
def T(*extra, **kw):
    return lambda e, out: _train_argv(e["good"], out, *extra, **kw)


TRAIN_CASES = [
    ("beta_zero", T("--beta", "0"), ["--beta: must be positive", "got 0.0"]),
    ("beta_negative", T("--beta", "-0.1"), ["--beta: must be positive", "got -0.1"]),
    ("beta_nan_kwarg", T("--loss-kwarg", "beta=nan"), ["--loss-kwarg beta: must be finite"]),
    ("lr_zero", T("--lr", "0"), ["--lr: must be a finite number > 0, got 0.0"]),
    ("lr_negative", T("--lr=-1e-4"), ["--lr: must be a finite number > 0, got -0.0001"]),
    ("lr_nan", T("--lr", "nan"), ["--lr: must be a finite number > 0, got nan"]),
    ("lr_inf", T("--lr", "inf"), ["--lr: must be a finite number > 0, got inf"]),
    ("batch_size_zero", T("--batch-size", "0"), ["--batch-size: must be an integer >= 1, got 0"]),
    ("batch_size_negative", T("--batch-size", "-4"), ["--batch-size: must be an integer >= 1, got -4"]),
    ("batch_size_over_dataset", T("--batch-size", "64"), ["--batch-size: 64", "dataset (6 pairs)"]),
    ("batch_not_divisible", T("--grad-accum", "2", "--batch-size", "3"), ["--batch-size: 3 must divide"]),
    ("grad_accum_zero", T("--grad-accum", "0"), ["--grad-accum: must be an integer >= 1, got 0"]),
    ("unknown_loss", T("--loss", "dpoo"), ["--loss: unknown loss 'dpoo'; valid: cdpo", "simpo"]),
    ("steps_zero", T(steps=("--steps", "0")), ["--steps: must be an integer >= 1, got 0"]),
    ("epochs_zero", T(steps=("--epochs", "0")), ["--epochs: must be an integer >= 1, got 0"]),
    ("warmup_negative", T("--warmup-steps", "-1"), ["--warmup-steps: must be an integer >= 0, got -1"]),
    ("checkpoint_every_zero", T("--checkpoint-every", "0"), ["--checkpoint-every: must be an integer >= 1"]),
    ("max_grad_norm_negative", T("--max-grad-norm", "-1"), ["--max-grad-norm: must be a finite number > 0"]),
    ("unknown_schedule", T("--schedule", "exp"), ["--schedule: unknown value 'exp'; valid: constant, cosine"]),
    ("unknown_optimizer", T("--optimizer", "adam"), ["--optimizer: unknown value 'adam'; valid: adamw"]),
    ("unknown_precision", T("--precision", "fp16"), ["--precision: unknown value 'fp16'; valid: bf16, fp32"]),
    ("eval_every_without_data", T("--eval-every", "2"), ["--eval-every: given without"]),
    ("loss_kwarg_no_equals", T("--loss-kwarg", "beta"), ["--loss-kwarg: expected KEY=VALUE, got 'beta'"]),
    ("loss_kwarg_not_number", T("--loss-kwarg", "beta=abc"), ["--loss-kwarg: beta: expected a number"]),
    ("loss_kwarg_unknown", T("--loss-kwarg", "tau=1"), ["--loss-kwarg tau: unknown option for loss 'dpo'"]),
    ("cdpo_alpha_nan", T("--loss", "cdpo", "--loss-kwarg", "alpha=nan"),
     ["--loss-kwarg alpha: must be finite for loss 'cdpo', got nan"]),
    ("cdpo_alpha_out_of_range", T("--loss", "cdpo", "--loss-kwarg", "alpha=1.5"),
     ["--loss-kwarg alpha: must be in [0, 1]"]),
    ("device_cuda_missing", T("--device", "cuda"), ["--device: 'cuda' requested but CUDA is not available"]),
    ("device_bogus", T("--device", "bogus"), ["--device: 'bogus' is not a torch device"]),
    # data files
    ("empty_dataset", lambda e, o: _train_argv(e["empty"], o), ["empty.jsonl: file is empty (no records)"]),
    ("blank_lines_only", lambda e, o: _train_argv(e["blank"], o), ["blank.jsonl: file is empty"]),
    ("missing_data_file", lambda e, o: _train_argv(e["missing"], o), ["does_not_exist.jsonl: no such file"]),
    ("alpha_nan_literal", lambda e, o: _train_argv(e["nan_alpha"], o),
     ["nan_alpha.jsonl:2: invalid JSON: non-finite number NaN"]),
    ("alpha_overflow_inf", lambda e, o: _train_argv(e["inf_alpha"], o),
     ["inf_alpha.jsonl:3: field 'alpha': must be finite, got inf"]),
    ("votes_third_response", lambda e, o: _train_argv(e["third_vote"], o),
     ["third_vote.jsonl:1: field 'votes': vote label 'response_3'"]),
    ("prompt_exceeds_context", lambda e, o: _train_argv(e["too_long"], o),
     ["too_long.jsonl:3: field 'chosen':", "exceed the context of model 'tiny-random' (256)"]),
    ("eval_exceeds_context", lambda e, o: _train_argv(e["good"], o, "--eval-data", str(e["too_long"])),
     ["too_long.jsonl:3: field 'chosen':", "exceed the context"]),
    # model names and directories
    ("unknown_model_name", lambda e, o: _train_argv(e["good"], o, model="no-such-model-xyz"),
     ["unknown or unreachable model 'no-such-model-xyz'", "Offline names: tiny-random"]),
    ("model_dir_without_weights", lambda e, o: _train_argv(e["good"], o, model=e["models"] / "no_weights"),
     ["no_weights has no weights (expected one of model.safetensors"]),
    ("model_dir_without_tokenizer", lambda e, o: _train_argv(e["good"], o, model=e["models"] / "no_tokenizer"),
     ["no_tokenizer has no tokenizer files"]),
    ("model_dir_truncated_weights", lambda e, o: _train_argv(e["good"], o, model=e["models"] / "bad_weights"),
     ["could not load the model in", "bad_weights"]),
    ("tokenizer_vocab_mismatch", lambda e, o: _train_argv(e["good"], o, model=e["models"] / "vocab_mismatch"),
     ["tokenizer has 512 tokens but the model's vocabulary has 100 rows"]),
    ("checkpoint_dir_as_model", lambda e, o: _train_argv(e["good"], o, model=e["ckpt"]),
     ["step-00000001 has no config.json"]),
    ("model_path_is_a_file", lambda e, o: _train_argv(e["good"], o, model=e["a_file"]),
     ["a_file.txt' is not a directory"]),
    # output directory
    ("out_under_a_regular_file", lambda e, o: _train_argv(e["good"], e["a_file"] / "run"),
     ["--out: cannot write to", "a_file.txt/run"]),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_cli_bad_input(case, env, tmp_path, capsys):
    _, argv_of, fragments = case
    out = tmp_path / "run"
    rc, err = _run_cli(argv_of(env, out), capsys)
    _assert_one_line_error(rc, err, *fragments)
    assert _files(out) == []
    assert env["a_file"].read_text() == "not a directory"


def test_argparse_rejects_non_numeric_values(env, tmp_path, capsys):
    """Non-numeric values are argparse's job: exit 2 naming the option, no traceback."""
    rc, err = _run_cli(_train_argv(env["good"], tmp_path / "run", "--lr", "fast"), capsys)
    assert rc == 2 and "argument --lr: invalid float value: 'fast'" in err and "Traceback" not in err
    rc, err = _run_cli(["reproduce", "no-such-paper"], capsys)
    assert rc == 2 and "invalid choice: 'no-such-paper'" in err


REPRODUCE_CASES = [
    ("unknown_model", ["--model", "no-such-model-xyz"], ["unknown or unreachable model 'no-such-model-xyz'"]),
    ("cuda_missing", ["--device", "cuda"], ["--device: 'cuda' requested but CUDA is not available"]),
    ("device_bogus", ["--device", "bogus"], ["--device: 'bogus' is not a torch device"]),
]


@pytest.mark.parametrize("case", REPRODUCE_CASES, ids=[c[0] for c in REPRODUCE_CASES])
def test_reproduce_cli_bad_input(case, tmp_path, capsys):
    _, extra, fragments = case
    out = tmp_path / "out"
    rc, err = _run_cli(["reproduce", "ranking-accuracy", "--out", str(out), *extra], capsys)
    _assert_one_line_error(rc, err, *fragments)
    assert _files(out) == []


def test_reproduce_out_under_a_regular_file(env, capsys):
    rc, err = _run_cli(["reproduce", "ranking-accuracy", "--out", str(env["a_file"] / "o")], capsys)
    _assert_one_line_error(rc, err, "--out: cannot create output directories", "a_file.txt/o")


@pytest.mark.slow
def test_subprocess_error_is_exactly_one_stderr_line(env, tmp_path):
    """The real console script: stderr is exactly the one error line (no log noise, no traceback)."""
    for argv, want in ((_train_argv(env["good"], tmp_path / "run", steps=("--steps", "0")),
                        "--steps: must be an integer >= 1, got 0"),
                       (_train_argv(env["good"], tmp_path / "run", "--lr", "-1"),
                        "--lr: must be a finite number > 0, got -1.0")):
        proc = subprocess.run([sys.executable, "-m", "preflens.cli", *argv], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [f"preflens train: error: {want}"]
    assert _files(tmp_path / "run") == []


# ------------------------------------------------------------------ output directory faults


def test_read_only_output_directory(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    real = tempfile.mkstemp

    def deny(*args, dir=None, **kw):  # what a read-only directory does to a non-root writer
        if dir is not None and Path(dir).resolve().is_relative_to(out.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", deny)
    rc, err = _run_cli(_train_argv(env["good"], out), capsys)
    _assert_one_line_error(rc, err, f"--out: cannot write to {out}: Permission denied")
    assert _files(out) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_output_directory_chmod(env, tmp_path, capsys):  # pragma: no cover - non-root only
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        rc, err = _run_cli(_train_argv(env["good"], out), capsys)
        _assert_one_line_error(rc, err, "--out: cannot write to", "Permission denied")
    finally:
        out.chmod(0o700)


def _enospc_for(fragment: str):
    real = os.fsync

    def fsync(fd):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if fragment in target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    return fsync


def test_disk_full_during_checkpoint_keeps_earlier_ones(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(os, "fsync", _enospc_for(".tmp-step-00000003"))
    argv = _train_argv(env["good"], out, "--checkpoint-every", "1", steps=("--steps", "3"))
    rc, err = _run_cli(argv, capsys)
    _assert_one_line_error(rc, err, f"could not write checkpoint {out / 'checkpoints' / 'step-00000003'}: "
                           "No space left on device; earlier checkpoints are kept")
    ckpts = list_checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000001", "step-00000002"]
    for c in ckpts:
        verify_checkpoint(c)
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / "final-model").exists()
    monkeypatch.undo()  # space is back: the rerun resumes from step 2 and finishes
    rc, err = _run_cli(argv, capsys)
    assert rc == 0, err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_disk_full_on_metrics_line(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_open = open

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.lines = fh, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(text)

        def flush(self):
            self.fh.flush()

        def close(self):
            self.fh.close()

    monkeypatch.setattr(rundir_mod, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    rc, err = _run_cli(_train_argv(env["good"], out, "--checkpoint-every", "1", steps=("--steps", "3")), capsys)
    _assert_one_line_error(rc, err, f"step 2: could not write {out / 'metrics.jsonl'}: No space left on device",
                           "last good checkpoint:", "step-00000001")
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-00000001"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.fixture(scope="module")
def finished_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli_main(_train_argv(env["good"], out, steps=("--steps", "1"))) == 0
    return out


def test_disk_full_on_final_model_keeps_the_previous_one(env, finished_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = {p.name: p.read_bytes() for p in (out / "final-model").iterdir()}
    import transformers

    def full(self, save_directory, *a, **k):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 10)  # partly written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    rc, err = _run_cli(_train_argv(env["good"], out, steps=("--steps", "1")), capsys)
    _assert_one_line_error(rc, err, f"could not write the final model to {out / 'final-model'}: "
                           "No space left on device")
    assert {p.name: p.read_bytes() for p in (out / "final-model").iterdir()} == before
    assert not list(out.glob(".tmp-final-model-*"))


def test_resume_with_unreadable_run_config(env, finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "config.json").write_text('{"loss": "dpo", "lr": ')  # damaged by hand
    rc, err = _run_cli(_train_argv(env["good"], out, steps=("--steps", "1")), capsys)
    _assert_one_line_error(rc, err, f"cannot resume: {out / 'config.json'} is unreadable",
                           "--no-resume")
    rc, err = _run_cli(_train_argv(env["good"], out, "--no-resume", steps=("--steps", "1")), capsys)
    assert rc == 0, err


def test_resume_with_different_options_names_them(env, finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    rc, err = _run_cli(_train_argv(env["good"], out, "--lr", "5e-3", steps=("--steps", "1")), capsys)
    _assert_one_line_error(rc, err, f"--resume: {out} holds a run with different lr")


# ------------------------------------------------------------------ API-level cases


def test_api_out_dir_under_a_file(env, tiny):
    pairs = [PreferencePair(**r) for r in GOOD]
    with pytest.raises(ConfigError) as exc:
        train_preference(tiny, pairs, lr=1e-3, steps=1, batch_size=2, seed=0, out_dir=env["a_file"] / "x")
    assert exc.value.option == "out_dir" and "a_file.txt/x" in str(exc.value)


def test_api_too_long_pair_is_a_data_error_naming_the_pair(env, tiny, tmp_path):
    pairs = [PreferencePair(**r) for r in GOOD]
    pairs[4] = PreferencePair("Q", " a", " b" * 400, id="p-4")
    with pytest.raises(DataError) as exc:
        train_preference(tiny, pairs, lr=1e-3, steps=1, batch_size=2, seed=0, out_dir=tmp_path / "o")
    assert exc.value.field == "rejected" and exc.value.pair_index == 4
    assert "train pair 4 (id 'p-4')" in str(exc.value) and "exceed the context" in str(exc.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs,field,reason", [
    (dict(alpha=float("nan")), "alpha", "must be finite"),
    (dict(alpha=float("inf")), "alpha", "must be finite"),
    (dict(votes=["chosen", "response_3"]), "votes", "'response_3' is not one of"),
])
def test_api_pair_records(kwargs, field, reason):
    with pytest.raises(DataError) as exc:
        PreferencePair("p", "a", "b", **kwargs)
    assert exc.value.field == field and reason in str(exc.value)


def test_api_cdpo_per_pair_alpha_with_nan(tiny, tmp_path):
    pairs = [PreferencePair(**r) for r in GOOD]
    alpha = torch.tensor([0.6, float("nan"), 0.6, 0.6, 0.6, 0.6], dtype=torch.float64)
    with pytest.raises(ConfigError) as exc:
        train_preference(tiny, pairs, loss="cdpo", loss_kwargs={"alpha": alpha}, lr=1e-3, steps=1,
                         batch_size=2, seed=0, out_dir=tmp_path / "o")
    assert exc.value.option == "alpha" and "finite" in str(exc.value)
    assert not (tmp_path / "o").exists()


def test_api_model_errors(env):
    from preflens.errors import ModelError

    for name, reason in (("", "non-empty string"), (str(env["models"] / "no_weights"), "has no weights"),
                         (str(env["models"] / "no_tokenizer"), "has no tokenizer files"),
                         (str(env["models"] / "vocab_mismatch"), "mismatched tokenizer and model")):
        with pytest.raises(ModelError, match=reason):
            load_model(name, device="cpu")


def test_training_error_type_for_failed_checkpoint_write(tmp_path, monkeypatch):
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    save_checkpoint(tmp_path, 1, model=lin, optimizer=opt, meta={})
    monkeypatch.setattr(os, "fsync", _enospc_for(".tmp-step-00000002"))
    with pytest.raises(TrainingError, match="could not write checkpoint .*step-00000002: No space left"):
        save_checkpoint(tmp_path, 2, model=lin, optimizer=opt, meta={})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    verify_checkpoint(tmp_path / "step-00000001")
