"""The ranking recipe on a tiny config: its steps are keyed on the fields they read (editing the
learning rate reruns DPO, not the reference scoring; editing the β grid reruns nothing), a
``quick`` run says in its JSON and its printed output that its numbers are a smoke test, and
the results JSON holds the per-pair values its figures draw."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from preflens.reproduce import ranking_accuracy, run_paper

TINY = ranking_accuracy.Config(n_pairs=16, epochs=1, batch_size=8, track_every=1)


def _run(monkeypatch, capsys, out, cfg) -> tuple[dict, str]:
    monkeypatch.setattr(ranking_accuracy.Config, "quick", classmethod(lambda cls: cfg))
    results = run_paper("ranking-accuracy", out=out, quick=True, device="cpu")
    return results, capsys.readouterr().out


def _steps(printed: str) -> tuple[int, int]:
    m = re.search(r"\((\d+) steps computed, (\d+) reused", printed)
    return int(m.group(1)), int(m.group(2))


@pytest.mark.slow  # three tiny runs of the real recipe: ~5 s on an idle 2-core machine
def test_steps_rerun_only_for_the_fields_they_read_and_quick_runs_are_marked(tmp_path, monkeypatch, capsys):
    results, printed = _run(monkeypatch, capsys, tmp_path, TINY)
    assert _steps(printed) == (2, 0)
    on_disk = json.loads((tmp_path / "results" / "ranking_accuracy.json").read_text())
    assert on_disk == results and results["quick"] is True and "smoke test" in results["note"]
    assert printed.count("smoke test") >= 2   # before and after the summary table
    assert len(results["per_pair"]["c"]) == len(results["per_pair"]["final_dpo_loss"]) == 16
    assert sorted(p.name for p in (tmp_path / "figures" / "ranking_accuracy").iterdir()) == [
        "dpo_loss_vs_c.png", "observed_vs_idealized.png", "ranking_accuracy_during_dpo.png"]

    _, printed = _run(monkeypatch, capsys, tmp_path, dataclasses.replace(TINY, lr=1e-4))
    assert _steps(printed) == (1, 1)   # DPO reran, the reference scores were reused

    again, printed = _run(monkeypatch, capsys, tmp_path, dataclasses.replace(TINY, betas=(0.1, 1.0)))
    assert _steps(printed) == (0, 2)   # R* is computed from cached scores: nothing reruns
    assert set(again["reference"]["idealized"]["per_beta"]) == {"0.1", "1.0"}
    assert again["reference"]["ranking_accuracy"] == results["reference"]["ranking_accuracy"]


@pytest.mark.parametrize("field", ["n_pairs", "votes", "data_seed"])
def test_the_data_fields_key_both_steps(field):
    assert field in ranking_accuracy.reference.reads and field in ranking_accuracy.dpo.reads
