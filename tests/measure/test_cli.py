"""`preflens measure` / `preflens filter` command lines: outputs, flag-named errors, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preflens.cli import main
from preflens.data import read_pairs, write_pairs

FIX = Path(__file__).resolve().parents[1] / "data" / "fixtures"


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_measure_writes_scores_summary_figure(tmp_path, capsys, toy_pairs):
    data = write_pairs(tmp_path / "pairs.jsonl", toy_pairs[:8])
    out = tmp_path / "run"
    rc, stdout, err = _run(capsys, "measure", "ranking", "--model", "tiny-random", "--data", str(data),
                           "--out", str(out), "--no-progress", "--device", "cpu", "--chunk-size", "3",
                           "--betas", "0.1,1")
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["source"] == str(data) and summary["model"] == "tiny-random"
    assert list(summary["results"]["idealized"]["per_beta"]) == ["0.1", "1.0"]
    assert json.loads(stdout.splitlines()[-1])["ranking_accuracy"] == summary["results"]["ranking_accuracy"]
    assert len((out / "scores.jsonl").read_text().splitlines()) == 8 and (out / "ranking.png").is_file()
    # a killed run (last line cut) resumes to the same summary
    scores = out / "scores.jsonl"
    text = scores.read_text()
    scores.write_text(text[: len(text) - 20])
    rc, _, err = _run(capsys, "measure", "ranking", "--model", "tiny-random", "--data", str(data),
                      "--out", str(out), "--no-progress", "--device", "cpu", "--chunk-size", "3",
                      "--betas", "0.1,1")
    assert rc == 0, err
    assert scores.read_text() == text
    assert json.loads((out / "summary.json").read_text())["results"] == summary["results"]
    # another configuration in the same folder is refused, naming the flag
    rc, _, err = _run(capsys, "measure", "ranking", "--model", "tiny-random", "--data", str(data),
                      "--out", str(out), "--no-progress", "--device", "cpu")
    assert rc == 2 and "--out: " in err and "different configuration" in err


@pytest.mark.parametrize("argv,message", [
    (["ches", "--limit", "0"], "preflens measure: error: --limit: must be a positive integer"),
    (["ches", "--betas", "1"], "--betas: does not apply to the ches lens"),
    (["displacement"], "--reference: the displacement lens compares two models"),
    (["ranking", "--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["ranking", "--format", "shp"], "synthetic_gptj.jsonl:1: field 'labels': missing key"),
    (["ranking", "--sample", "9"], "--sample: 9 items requested but the source has 2"),
])
def test_errors_name_flags(tmp_path, capsys, argv, message):
    rc, _, err = _run(capsys, "measure", *argv[:1], "--model", "tiny-random", "--device", "cpu",
                      "--data", str(FIX / "synthetic_gptj.jsonl"), "--out", str(tmp_path / "o"),
                      "--no-progress", *argv[1:])
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_measure_hh_fixture_and_filter(tmp_path, capsys):
    rc, _, err = _run(capsys, "measure", "ches", "--model", "tiny-random", "--device", "cpu",
                      "--data", str(FIX / "hh_rlhf.jsonl"), "--out", str(tmp_path / "c"), "--no-progress")
    assert rc == 0, err
    rows = [json.loads(x) for x in (tmp_path / "c" / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "2"] and all("ln_ches" in r for r in rows)
    clean = tmp_path / "clean.jsonl"
    rc, stdout, err = _run(capsys, "filter", "--by", "ln-ches", "--keep-lowest", "2", "--model", "tiny-random",
                           "--device", "cpu", "--data", str(FIX / "hh_rlhf.jsonl"), "--out", str(clean),
                           "--no-progress")
    assert rc == 0, err
    kept = read_pairs(clean)
    lowest = sorted(rows, key=lambda r: r["ln_ches"])[:2]
    assert sorted(p.id for p in kept) == sorted(r["id"] for r in lowest)
    assert json.loads(stdout)["n_kept"] == 2
    rc, _, err = _run(capsys, "filter", "--drop-top", "1.5", "--model", "tiny-random",
                      "--data", str(FIX / "hh_rlhf.jsonl"), "--out", str(clean))
    assert rc == 2 and "--drop-top: must be a fraction in [0, 1)" in err


def test_over_long_items_fail_before_scoring_or_are_skipped(tmp_path, capsys):
    rows = [json.loads(x) for x in (FIX / "synthetic_gptj.jsonl").read_text().splitlines()]
    rows.insert(1, {"prompt": "word " * 400, "chosen": " a", "rejected": " b"})   # > 256 tokens
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["measure", "ranking", "--model", "tiny-random", "--device", "cpu", "--data", str(data),
            "--out", str(tmp_path / "o"), "--no-progress"]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and f"{data}:2: item 1: prompt (" in err and "context of 256" in err, err
    assert not (tmp_path / "o" / "scores.jsonl").exists()
    rc, _, err = _run(capsys, *argv, "--skip-long")
    assert rc == 0, err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["dataset"]["n_skipped_long"] == 1 and summary["results"]["n_pairs"] == 2


def test_unknown_word_names_the_data_line(tmp_path, capsys):
    """toyworld's word-level tokenizer: a word it lacks is reported at its line, via the pair's source."""
    from preflens.data.toyworld.prefs import multi_token_pairs
    from preflens.reproduce.common import toyworld_world

    good = [p.to_dict() for p in multi_token_pairs(toyworld_world(), 2, seed=0)]
    good[1]["rejected"] = " Zanzibarquux"
    data = tmp_path / "u.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good))
    rc, _, err = _run(capsys, "measure", "ches", "--model", "toyworld", "--device", "cpu", "--data", str(data),
                      "--out", str(tmp_path / "o"), "--no-progress")
    assert rc == 2 and f"{data}:2: field 'rejected': word 'Zanzibarquux'" in err, err
