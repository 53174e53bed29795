"""measure ches and filtering: equal to preflens.probes.ches; filtered output trains unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from preflens.data import read_pairs
from preflens.errors import ConfigError
from preflens.measure import measure
from preflens.measure.filtering import filter_pairs, select_lowest
from preflens.probes.ches import ches_for_pairs, edit_similarity_for_pairs, last_hidden_for_pairs


def test_equals_library(tmp_path, toy_pairs, tiny):
    s = measure("ches", model=tiny, data=toy_pairs, out_dir=tmp_path, chunk_size=7, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    col = lambda k: torch.tensor([r[k] for r in rows], dtype=torch.float64)  # noqa: E731
    assert torch.allclose(col("ches"), ches_for_pairs(tiny, toy_pairs), rtol=1e-5, atol=1e-4)
    assert torch.allclose(col("ln_ches"), ches_for_pairs(tiny, toy_pairs, length_normalized=True),
                          rtol=1e-5, atol=1e-5)
    assert torch.equal(col("edit_similarity"), edit_similarity_for_pairs(tiny, toy_pairs))
    assert torch.allclose(col("last_hidden"), last_hidden_for_pairs(tiny, toy_pairs), rtol=1e-5, atol=1e-5)
    assert s["results"]["n_pairs"] == 24 and s["results"]["ln_ches"]["max"] == float(col("ln_ches").max())
    assert (tmp_path / "ches.png").is_file()
    with pytest.raises(ConfigError, match="reference: the ches lens does not use"):
        measure("ches", model=tiny, reference=tiny, data=toy_pairs, out_dir=tmp_path)


def test_select_lowest():
    s = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])
    assert select_lowest(s, drop_top=0.4) == [1, 2, 3]          # ceil(0.6 * 5) = 3 lowest, input order
    assert select_lowest(s, keep_lowest=2) == [1, 3]
    assert select_lowest(s, drop_top=0.0) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="drop_top: give exactly one"):
        select_lowest(s)
    with pytest.raises(ConfigError, match="drop_top: must be a fraction"):
        select_lowest(s, drop_top=1.0)
    with pytest.raises(ConfigError, match=r"keep_lowest: must be an integer in \[1, 5\]"):
        select_lowest(s, keep_lowest=6)


def test_filter_output_trains_with_preflens_train(tmp_path, toy_pairs, tiny):
    from preflens.cli import main

    out = tmp_path / "clean.jsonl"
    info = filter_pairs(tiny, toy_pairs, out, by="ln-ches", drop_top=0.25, progress=False)
    kept = read_pairs(out)
    assert info["n_kept"] == len(kept) == 18
    scores = ches_for_pairs(tiny, toy_pairs, length_normalized=True)
    kept_ids = {p.id for p in kept}
    dropped = [float(scores[i]) for i, p in enumerate(toy_pairs) if p.id not in kept_ids]
    assert min(dropped) >= info["threshold"] - 1e-6
    assert [p.id for p in kept] == [p.id for p in toy_pairs if p.id in kept_ids]   # input order
    assert kept[0].alpha is not None and kept[0].votes is not None
    rc = main(["train", "--model", "tiny-random", "--data", str(out), "--lr", "1e-3", "--steps", "2",
               "--batch-size", "4", "--out", str(tmp_path / "run"), "--device", "cpu",
               "--no-save-model", "--no-progress"])
    assert rc == 0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2
