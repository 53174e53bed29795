"""`preflens report` and the TensorBoard / W&B mirrors of the metrics rows."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from preflens.errors import ConfigError, DataError
from preflens.report import LENSES, MetricsMirror, build_trackers, load_run, parse_lenses, write_report
from tests.conftest import capital_pairs


def _pairs(n=12):
    return capital_pairs(n)


def _state(lm, step, out_dir, metrics=None, total=4):
    return SimpleNamespace(step=step, total_steps=total, epoch=0, metrics=metrics if metrics is not None else {},
                           model=lm.model, lm=lm, rank=0, world_size=1, is_main=True, out_dir=out_dir)


def _fake_run(lm, out_dir, callbacks, steps=4):
    """Drive callbacks like the training loop: on_step results merged after all callbacks ran."""
    for cb in callbacks:
        cb.on_train_begin(_state(lm, 0, out_dir, total=steps))
    with open(out_dir / "metrics.jsonl", "a") as fh:
        for step in range(1, steps + 1):
            with torch.no_grad():
                for p in lm.model.parameters():
                    p.mul_(1.01)
            metrics = {"step": step, "loss": 0.7 - 0.01 * step, "rewards/margins": 0.1 * step}
            state = _state(lm, step, out_dir, metrics, total=steps)
            added = {}
            for cb in callbacks:
                added.update(cb.on_step(state) or {})
            metrics.update(added)
            fh.write(json.dumps(metrics) + "\n")
    for cb in callbacks:
        cb.on_end(_state(lm, steps, out_dir, total=steps))


def test_parse_lenses():
    assert parse_lenses("ches,ranking") == ["ranking", "ches"]
    assert parse_lenses("all") == list(LENSES)
    assert parse_lenses(None) == []
    with pytest.raises(ConfigError, match="track: unknown lens 'chess'"):
        parse_lenses("ranking,chess")


def test_report_on_a_tracked_run_and_on_a_run_still_going(tiny, tmp_path):
    lm = copy.deepcopy(tiny)
    lenses = ["ranking", "displacement", "ches", "entanglement"]  # dla: the end-to-end resume test
    trackers = build_trackers(lm, _pairs(), lenses, every=2, n=8, ghost_n=4)
    assert [t.name for t in trackers] == lenses
    assert trackers[0].probes is trackers[3].probes and len(trackers[0].probes) == 8
    _fake_run(lm, tmp_path, trackers)
    (tmp_path / "config.json").write_text(json.dumps({"loss": "dpo", "lr": 0.1, "total_steps": 6}))
    # the run is still being written: torn last lines are skipped
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 0.')
    with open(tmp_path / "tracked" / "ranking.jsonl", "a") as fh:
        fh.write('{"step": 6, "metr')
    run = load_run(tmp_path)
    assert [r["step"] for r in run["metrics"]] == [1, 2, 3, 4]
    assert [r["step"] for r in run["tracked"]["ranking"]] == [0, 2, 4]
    from preflens.cli import main

    assert main(["report", str(tmp_path)]) == 0
    figures = {p.stem: p for p in (tmp_path / "figures").glob("*.png")}
    assert set(figures) == {"training", *lenses}
    for path in figures.values():
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "report.md").read_text()
    assert "4 steps logged of 6" in text and "## Lens: entanglement" in text
    assert "| accuracy |" in text and "figures/entanglement.png" in text


def test_report_needs_a_run_directory(tmp_path, capsys):
    with pytest.raises(DataError, match="not a training run directory"):
        write_report(tmp_path)
    from preflens.cli import main

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preflens report: error:") and "RUN_DIR" in err and "\n" not in err


def test_tensorboard_mirror_writes_every_row(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lm = copy.deepcopy(tiny)
    trackers = build_trackers(lm, _pairs(), ["ranking"], every=2, n=6)
    _fake_run(lm, tmp_path, [*trackers, MetricsMirror("tensorboard")])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss" in tags and "tracked/ranking/accuracy" in tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in acc.Scalars("tracked/ranking/accuracy")] == [2, 4]
    assert acc.Scalars("tracked/ranking/accuracy")[-1].value == pytest.approx(rows[-1]["tracked/ranking/accuracy"])


def test_wandb_offline_mirror_creates_a_run(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    lm = copy.deepcopy(tiny)
    mirror = MetricsMirror("wandb", config={"loss": "dpo"})
    _fake_run(lm, tmp_path, [mirror], steps=2)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and mirror.run_id in runs[0].name
    assert list(runs[0].glob("run-*.wandb"))
    assert mirror.state_dict() == {"run_id": mirror.run_id}


def test_mirror_rejects_unknown_backend():
    with pytest.raises(ConfigError, match="report_to"):
        MetricsMirror("mlflow")


def test_run_callbacks_validates_and_orders(tiny, tmp_path):
    from preflens.data import write_pairs
    from preflens.report import run_callbacks

    assert run_callbacks(tiny, _pairs()) == []
    for kw, option in (({"track": "ranking", "track_every": 0}, "track_every"), ({"track": "x"}, "track"),
                       ({"track": "ranking", "track_n": 0}, "track_n"), ({"report_to": "mlflow"}, "report_to"),
                       ({"track_data": "p.jsonl"}, "track_data")):
        with pytest.raises(ConfigError) as exc:
            run_callbacks(tiny, _pairs(), **kw)
        assert exc.value.option == option
    probe_file = tmp_path / "probes.jsonl"
    write_pairs(probe_file, _pairs(5))
    cbs = run_callbacks(tiny, _pairs(), track="ches,ranking", track_data=str(probe_file), report_to="tensorboard")
    assert [c.name for c in cbs] == ["ranking", "ches", "report_to"]
    assert [p.prompt for p in cbs[0].pairs] == [p.prompt for p in _pairs(5)]


def test_saved_state_of_other_probes_is_refused(tiny):
    from preflens.probes.trackers import RankingTracker

    saved = RankingTracker(tiny, _pairs(6)).state_dict()
    RankingTracker(tiny, _pairs(6)).load_state_dict(saved)
    with pytest.raises(ConfigError, match="other probe pairs"):
        RankingTracker(tiny, _pairs(7)).load_state_dict(saved)


@pytest.mark.slow
def test_cli_tracked_training_run_then_report(tmp_path, capsys):
    from preflens.cli import main
    from preflens.data import write_pairs

    data = tmp_path / "pairs.jsonl"
    write_pairs(data, _pairs(12))
    out = tmp_path / "run"
    base = ["train", "--model", "tiny-random", "--data", str(data), "--lr", "1e-3", "--steps", "4",
            "--batch-size", "4", "--out", str(out), "--no-progress", "--no-save-model", "--device", "cpu"]
    assert main([*base, "--track", "chess"]) == 2
    assert "--track: unknown lens 'chess'" in capsys.readouterr().err
    assert main([*base, "--track", "ranking", "--track-every", "0"]) == 2
    assert "--track-every: must be an integer >= 1" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    assert main([*base, "--track", "all", "--track-every", "2", "--track-n", "6", "--report-to", "tensorboard"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(any(k.startswith(f"tracked/{lens}/") for k in rows[1]) for lens in LENSES)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert main(["report", str(out)]) == 0
    assert {p.stem for p in (out / "figures").glob("*.png")} == {"training", *LENSES}
