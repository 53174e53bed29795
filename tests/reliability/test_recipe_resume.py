"""Reproduction recipes restart cleanly: :class:`preflens.reproduce.common.RecipeContext`'s step
cache tested directly with a fake three-step recipe (the real recipes are too slow for this
suite; ``tests/reproduce`` checks how recipe steps are keyed).

A killed run reuses the steps that finished and recomputes the rest; a corrupt cache file is
recomputed; ``results/<paper>.json`` is only ever replaced whole (a kill or a full disk during
its write leaves the previous file intact).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preflens.errors import ConfigError, DataError
from preflens.reproduce.common import RecipeContext
from tests.conftest import sigkill_when

RECIPE = r'''
import json, os, sys, time
from pathlib import Path
from preflens.reproduce.common import RecipeContext

out, version = Path(sys.argv[1]), int(sys.argv[2])
stall = os.environ.get("STALL", "")
log = out / "calls.log"

def compute(name, value):
    def fn():
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {name}\n")
        if stall == name:
            (out / "stalled").write_text(name)
            time.sleep(600)
        return {"name": name, "value": value}
    return fn

if stall == "results":  # sleep inside the atomic write: temp file written, not yet renamed
    real_fsync = os.fsync
    def slow_fsync(fd):
        real_fsync(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".fake.json."):
            (out / "stalled").write_text("results")
            time.sleep(600)
    os.fsync = slow_fsync

ctx = RecipeContext(paper="fake", out=out)
a = ctx.cached("a", {"n": 1}, compute("a", 1.0))
b = ctx.cached("b", {"n": 2}, compute("b", 2.0))
c = ctx.cached("c", {"n": 3, "version": version}, compute("c", 3.0 * version))
ctx.write_results({"steps": [a, b, c], "version": version, "padding": "x" * 100000})
print("done")
'''


def _launch(tmp_path: Path, out: Path, version: int = 1, stall: str = "") -> subprocess.Popen:
    script = tmp_path / "recipe.py"
    script.write_text(RECIPE)
    env = dict(os.environ, OMP_NUM_THREADS="1", STALL=stall)
    return subprocess.Popen([sys.executable, str(script), str(out), str(version)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when_stalled(proc: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    sigkill_when(proc, (out / "stalled").exists, timeout=timeout, what="the recipe's stall point")
    (out / "stalled").unlink()


def _complete(proc: subprocess.Popen) -> None:
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()[-2000:]


def _calls(out: Path) -> list[tuple[int, str]]:
    return [(int(p), n) for p, n in (line.split() for line in (out / "calls.log").read_text().splitlines())]


@pytest.mark.slow
def test_killed_recipe_reuses_finished_steps_and_results_stay_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _launch(tmp_path, out, stall="b")  # killed inside step b: a is cached, b and c are not
    _kill_when_stalled(proc, out)
    results = out / "results" / "fake.json"
    assert not results.exists()
    first = _calls(out)
    assert [n for _, n in first] == ["a", "b"]
    _complete(_launch(tmp_path, out))
    second = [(p, n) for p, n in _calls(out) if (p, n) not in first]
    assert [n for _, n in second] == ["b", "c"]  # a reused, the rest recomputed
    v1 = json.loads(results.read_text())
    assert [s["value"] for s in v1["steps"]] == [1.0, 2.0, 3.0] and v1["version"] == 1
    # Killed while writing version 2's results: the previous file stays whole, only a temp exists.
    proc = _launch(tmp_path, out, version=2, stall="results")
    _kill_when_stalled(proc, out)
    assert json.loads(results.read_text()) == v1
    assert len(list(results.parent.glob(".fake.json.*.tmp"))) == 1
    n_before = len(_calls(out))
    _complete(_launch(tmp_path, out, version=2))
    assert [n for _, n in _calls(out)[n_before:]] == []  # a, b and c(version 2) were all cached
    v2 = json.loads(results.read_text())
    assert v2["version"] == 2 and v2["steps"][2]["value"] == 6.0
    assert not list(results.parent.glob(".*.tmp"))  # the stale temp file was cleaned up


@pytest.mark.parametrize("corruption", [b'{"name": "a", "val', b"", b"\xff\xfe\x00garbage", b"[1, 2"])
def test_corrupt_cache_file_is_recomputed(tmp_path, caplog, corruption):
    ctx = RecipeContext(paper="fake", out=tmp_path)
    calls = []

    def fn():
        calls.append(1)
        return {"x": [1, 2, 3]}

    assert ctx.cached("a", {"k": 1}, fn) == {"x": [1, 2, 3]}
    (path,) = ctx.cache_dir.glob("a-*.json")
    path.write_bytes(corruption)
    with caplog.at_level(logging.WARNING, logger="preflens.reproduce.common"):
        assert ctx.cached("a", {"k": 1}, fn) == {"x": [1, 2, 3]}
    assert len(calls) == 2 and any("is corrupt; recomputing" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text()) == {"x": [1, 2, 3]}  # rewritten whole
    assert ctx.cached("a", {"k": 1}, fn) == {"x": [1, 2, 3]} and len(calls) == 2


def test_cache_key_covers_config_model_quick_seed_and_no_resume(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return len(calls)

    base = dict(paper="fake", out=tmp_path)
    assert RecipeContext(**base).cached("s", {"k": 1}, fn) == 1
    assert RecipeContext(**base).cached("s", {"k": 1}, fn) == 1  # reused
    assert RecipeContext(**base).cached("s", {"k": 2}, fn) == 2
    assert RecipeContext(**base, model="tiny-random").cached("s", {"k": 1}, fn) == 3
    assert RecipeContext(**base, quick=True).cached("s", {"k": 1}, fn) == 4
    assert RecipeContext(**base, seed=1).cached("s", {"k": 1}, fn) == 5
    assert RecipeContext(**base, resume=False).cached("s", {"k": 1}, fn) == 6


def test_results_on_a_full_disk_keep_the_previous_file(tmp_path, monkeypatch):
    ctx = RecipeContext(paper="fake", out=tmp_path)
    ctx.write_results({"a": 1})

    def enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)  # simulated full disk on the output
    with pytest.raises(DataError) as exc:
        ctx.write_results({"a": 2, "big": list(range(1000))})
    assert str(ctx.results_path) in str(exc.value) and "No space left on device" in str(exc.value)
    assert json.loads(ctx.results_path.read_text()) == {"a": 1}
    assert sorted(p.name for p in ctx.results_path.parent.iterdir()) == ["fake.json"]
    # A step whose cache cannot be written still returns its result (logged, not fatal).
    assert ctx.cached("s", {}, lambda: {"v": 1}) == {"v": 1}
    assert not list(ctx.cache_dir.iterdir())


def test_non_finite_results_are_refused_before_writing(tmp_path):
    ctx = RecipeContext(paper="fake", out=tmp_path)
    ctx.write_results({"a": 1})
    with pytest.raises(ValueError, match=r"non-finite number at \$.curve\[1\]: nan"):
        ctx.write_results({"curve": [1.0, float("nan")]})
    assert json.loads(ctx.results_path.read_text()) == {"a": 1}


@pytest.mark.parametrize("name", ["../escape", "sub/x", "..", ".hidden", "", "a\\b"])
def test_step_and_figure_names_cannot_leave_their_folder(tmp_path, name):
    ctx = RecipeContext(paper="fake", out=tmp_path / "out")
    with pytest.raises(ConfigError, match="not a plain file name"):
        ctx.cached(name, {}, lambda: 1)
    with pytest.raises(ConfigError, match="not a plain file name"):
        ctx.figure(name)
    assert not (tmp_path / "escape").exists() and not list((tmp_path / "out").rglob("*.json"))


def test_out_under_a_regular_file_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(ConfigError, match="^out: "):
            RecipeContext(paper="fake", out=out)
    assert blocker.read_text() == "x"
