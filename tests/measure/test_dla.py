"""measure dla: rows equal head_attribution; scaling α = 1 is the baseline; CLI --scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preflens.attribution.heads import head_attribution
from preflens.data.adapters import load_triples
from preflens.errors import ConfigError
from preflens.measure import measure

FIX = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "dla_triples.jsonl"


def test_rows_equal_library_and_scaling(tmp_path, tiny):
    s = measure("dla", model=tiny, data=str(FIX), out_dir=tmp_path, progress=False,
                options={"scales": ["1.2=1,0,-2"], "top_k": 2})
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    t = load_triples(FIX)
    res = head_attribution(tiny, [r["prompt"] for r in t], [r["target"] for r in t], [r["foil"] for r in t])
    assert [r["id"] for r in rows] == ["france", "1", "yes"]
    assert torch.allclose(torch.tensor([r["heads"] for r in rows]).permute(1, 2, 0), res.per_head, atol=1e-5)
    assert [r["difference"] for r in rows] == pytest.approx(res.difference.tolist(), abs=1e-5)
    for r in rows:
        assert r["scaled"]["1.2=1"] == pytest.approx(r["difference"], abs=1e-5)   # α = 1: no change
        top = max((abs(v), f"L{l}H{h}") for l, row in enumerate(r["heads"]) for h, v in enumerate(row))
        assert r["top_heads"][0][0] == top[1] and len(r["top_heads"]) == 2
    assert any(abs(r["scaled"]["1.2=0"] - r["difference"]) > 1e-6 for r in rows)  # ablation moves it
    res_sum = s["results"]
    assert res_sum["n_valid"] == 3 and set(res_sum["scaled"]) == {"1.2=1", "1.2=0", "1.2=-2"}
    assert len(res_sum["top_heads"]["promote_target"]) == 2 and (tmp_path / "dla.png").is_file()


def test_bad_options(tmp_path, tiny):
    with pytest.raises(ConfigError, match="scales: expected L.H=ALPHA"):
        measure("dla", model=tiny, data=str(FIX), out_dir=tmp_path, options={"scales": ["1:2=0"]})
    with pytest.raises(ConfigError, match="scales: head 5.0 outside 2 layers x 4 heads"):
        measure("dla", model=tiny, data=str(FIX), out_dir=tmp_path, options={"scales": ["5.0=0"]})
    with pytest.raises(ConfigError, match="format: the dla lens reads"):
        measure("dla", model=tiny, data=str(FIX), out_dir=tmp_path, format="trl")


def test_cli_scale_and_full_answer(tmp_path, capsys):
    from preflens.cli import main

    rc = main(["measure", "dla", "--model", "tiny-random", "--device", "cpu", "--data", str(FIX),
               "--out", str(tmp_path / "d"), "--answer", "full", "--scale", "0.0=0", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out.splitlines()[-1])["answer"] == "full"
    rc = main(["measure", "dla", "--model", "tiny-random", "--device", "cpu", "--data", str(FIX),
               "--out", str(tmp_path / "e"), "--scale", "0.0", "--no-progress"])
    assert rc == 2 and "--scale: expected L.H=ALPHA" in capsys.readouterr().err
