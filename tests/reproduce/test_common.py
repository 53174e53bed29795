"""Recipe steps are keyed only on the config fields they read (:mod:`preflens.reproduce.common`).

A fake recipe with three steps over a five-field config: editing one field reruns exactly the
steps that declared it; a step cannot read a field it did not declare; a results JSON carries
the quick-run marker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from preflens.reproduce.common import QUICK_NOTE, RecipeContext, StepConfig, reads


@dataclass(frozen=True)
class FakeConfig:
    n: int = 4
    lr: float = 0.1
    beta: float = 0.5
    seeds: tuple = (0, 1)
    plot_title: str = "t"   # read by no step (render/results only)


@reads("n")
def data(ctx, c):
    return list(range(c.n))


@reads("n", "lr")
def train(ctx, c):
    return [x * c.lr for x in range(c.n)]


@reads("n", "beta", "seeds")
def per_seed(ctx, c, seed):
    return c.beta * seed + c.n


@reads("n")
def greedy(ctx, c):
    return c.lr  # reads a field it did not declare


def _run(ctx, cfg):
    return {"data": ctx.step("data", data, cfg), "train": ctx.step("train", train, cfg),
            "seeds": [ctx.step(f"seed-{s}", per_seed, cfg, s) for s in cfg.seeds]}


def _computed(tmp_path, cfg):
    ctx = RecipeContext(paper="fake", out=tmp_path)
    _run(ctx, cfg)
    return ctx.computed


@pytest.mark.parametrize("field, value, expected", [
    ("lr", 0.2, ["train"]),
    ("beta", 0.7, ["seed-0", "seed-1"]),
    ("n", 5, ["data", "train", "seed-0", "seed-1"]),
    ("plot_title", "u", []),
    ("seeds", (0, 1, 2), ["seed-0", "seed-1", "seed-2"]),
])
def test_editing_one_field_reruns_only_the_steps_that_read_it(tmp_path, field, value, expected):
    cfg = FakeConfig()
    assert _computed(tmp_path, cfg) == ["data", "train", "seed-0", "seed-1"]
    assert _computed(tmp_path, cfg) == []   # everything reused
    assert _computed(tmp_path, dataclasses.replace(cfg, **{field: value})) == expected


def test_step_args_key_the_cache(tmp_path):
    ctx = RecipeContext(paper="fake", out=tmp_path)
    assert ctx.step("s", per_seed, FakeConfig(), 1) == 4.5
    assert ctx.step("s", per_seed, FakeConfig(), 2) == 5.0   # same name, other args: recomputed
    assert RecipeContext(paper="fake", out=tmp_path).step("s", per_seed, FakeConfig(), 1) == 4.5
    assert ctx.computed == ["s", "s"]


def test_retrained_weights_do_not_reuse_cached_steps(tmp_path):
    """A local model directory whose weights change (a retrain writes a new file) recomputes."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    weights.write_bytes(b"old")
    out = tmp_path / "out"
    first = RecipeContext(paper="fake", model=str(model), out=out)
    first.step("s", per_seed, FakeConfig(), 1)
    again = RecipeContext(paper="fake", model=str(model), out=out)
    again.step("s", per_seed, FakeConfig(), 1)
    assert again.reused == ["s"]
    weights.write_bytes(b"retrained")
    after = RecipeContext(paper="fake", model=str(model), out=out)
    after.step("s", per_seed, FakeConfig(), 1)
    assert after.computed == ["s"] and after.reused == []


def test_a_step_cannot_read_an_undeclared_field(tmp_path):
    ctx = RecipeContext(paper="fake", out=tmp_path)
    with pytest.raises(AttributeError, match=r"step 'g' does not declare config field 'lr'.*@reads"):
        ctx.step("g", greedy, FakeConfig())
    assert not ctx.cache_dir.exists() or not list(ctx.cache_dir.iterdir())  # nothing cached


def test_undeclared_steps_and_unknown_fields_are_refused(tmp_path):
    ctx = RecipeContext(paper="fake", out=tmp_path)
    with pytest.raises(TypeError, match="@reads"):
        ctx.step("x", lambda ctx, c: 1, FakeConfig())
    with pytest.raises(ValueError, match=r"reads \['nope'\]"):
        StepConfig(FakeConfig(), ["nope"], step="x")
    view = StepConfig(FakeConfig(), ["n"], step="x")
    with pytest.raises(AttributeError, match="read-only"):
        view.n = 3
    assert view.as_dict() == {"n": 4}


@pytest.mark.parametrize("quick", [True, False])
def test_results_header_marks_quick_runs(tmp_path, quick):
    head = RecipeContext(paper="fake", out=tmp_path, quick=quick).header(FakeConfig())
    assert head["quick"] is quick and head["config"]["lr"] == 0.1
    assert (head.get("note") == QUICK_NOTE) is quick
    assert "smoke test" in QUICK_NOTE
