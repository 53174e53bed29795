"""The run directory: no checkpoints for throwaway runs, the user's umask, refused resumes write
nothing, unrelated directories refused, a directory in use refused (issue 13 item 8)."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest

from preflens.data import PreferencePair
from preflens.dynamics.config import TrainConfig
from preflens.dynamics.rundir import LOCK_NAME
from preflens.dynamics.train import train_preference
from preflens.errors import ConfigError


def _pairs(n: int = 6) -> list[PreferencePair]:
    return [PreferencePair(f"Q{i}: the capital is", f" Paris{' yes' * i}", " Rome") for i in range(n)]


CFG = TrainConfig(lr=1e-3, steps=2, batch_size=2, seed=0)


def _tree(path):
    """{relative path: (mode, bytes)} of every file under ``path``."""
    return {str(p.relative_to(path)): (p.stat().st_mode, p.read_bytes()) for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_throwaway_runs_write_no_checkpoints(tiny, tmp_path):
    res = train_preference(copy.deepcopy(tiny), _pairs(), CFG, out_dir=tmp_path / "run", checkpoint=False)
    assert res.checkpoint_path is None and not (tmp_path / "run" / "checkpoints").exists()
    assert [h["step"] for h in res.history] == [1, 2]
    res = train_preference(copy.deepcopy(tiny), _pairs(), CFG)  # no out_dir: nothing written at all
    assert res.metrics_path is None and [h["step"] for h in res.history] == [1, 2]


def test_keyword_form_equals_config_form(tiny, tmp_path):
    a = train_preference(copy.deepcopy(tiny), _pairs(), CFG, out_dir=tmp_path / "a")
    b = train_preference(copy.deepcopy(tiny), _pairs(), lr=1e-3, steps=2, batch_size=2, seed=0, out_dir=tmp_path / "b")
    drop = lambda h: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in h]  # noqa: E731
    assert drop(a.history) == drop(b.history)
    with pytest.raises(ConfigError) as exc:
        train_preference(tiny, _pairs(), CFG, lr=1.0)
    assert exc.value.option == "config"
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["model"] == "tiny-random" and saved["steps"] == 2 and saved["lr"] == 1e-3


def test_output_files_keep_the_umask(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        train_preference(copy.deepcopy(tiny), _pairs(), CFG, out_dir=tmp_path / "run")
    finally:
        os.umask(old)
    files = _tree(tmp_path / "run")
    assert {"config.json", "metrics.jsonl", "checkpoints/step-00000002/model.safetensors"} <= set(files)
    assert any(name.startswith("ref_cache/") for name in files)
    for name, (mode, _) in files.items():
        assert stat.S_IMODE(mode) == 0o644, name


def test_refused_resume_writes_nothing(tiny, tmp_path):
    out = tmp_path / "run"
    train_preference(copy.deepcopy(tiny), _pairs(), CFG, out_dir=out)
    before = _tree(out)
    with pytest.raises(ConfigError) as exc:  # a different lr: a new reference cache would have been written first
        train_preference(copy.deepcopy(tiny), _pairs(), CFG.replace(lr=2e-3, loss="ipo"), out_dir=out)
    assert exc.value.option == "resume" and "lr" in str(exc.value)
    assert _tree(out) == before


def test_unrelated_non_empty_directory_is_refused(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as exc:
        train_preference(copy.deepcopy(tiny), _pairs(), CFG, out_dir=tmp_path)
    assert exc.value.option == "out_dir" and "not a preflens run directory" in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    out = tmp_path / "run"
    train_preference(copy.deepcopy(tiny), _pairs(), CFG, out_dir=out)
    (out / "final-model").mkdir()  # a run directory with more in it is still a run directory
    res = train_preference(copy.deepcopy(tiny), _pairs(), CFG.replace(steps=3), out_dir=out)
    assert [h["step"] for h in res.history] == [1, 2, 3]


def test_directory_in_use_is_refused(tiny, tmp_path):
    out, seen = tmp_path / "run", {}

    class Intruder:
        """Starts a second run into the same directory while the first one holds it."""

        def on_step(self, state):
            if state.step == 1:
                with pytest.raises(ConfigError) as exc:
                    train_preference(copy.deepcopy(tiny), _pairs(), CFG, out_dir=out)
                seen["error"] = exc.value

    train_preference(copy.deepcopy(tiny), _pairs(), CFG, out_dir=out, callbacks=[Intruder()])
    assert seen["error"].option == "out_dir" and f"pid {os.getpid()}" in str(seen["error"])
    assert (out / LOCK_NAME).exists()  # left behind, but not held: the next run goes ahead
    res = train_preference(copy.deepcopy(tiny), _pairs(), CFG.replace(steps=3), out_dir=out)
    assert [h["step"] for h in res.history] == [1, 2, 3]
