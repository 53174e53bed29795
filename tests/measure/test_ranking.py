"""measure ranking: equal to the library on a small set; the full recipe reference reproduced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preflens.errors import ConfigError
from preflens.measure import measure
from preflens.probes.ranking import alphas_from_votes, flip_buckets, idealized_ranking_accuracy, ranking_correct
from preflens.scoring import response_logprobs

ROOT = Path(__file__).resolve().parents[2]


def _lib(lm, pairs):
    prompts = [p.prompt for p in pairs]
    w = response_logprobs(lm, prompts, [p.chosen for p in pairs], batch_size=64)
    l = response_logprobs(lm, prompts, [p.rejected for p in pairs], batch_size=64)
    return w, l


def test_equals_library_on_a_small_set(tmp_path, toy_pairs, tiny):
    s = measure("ranking", model=tiny, data=toy_pairs, out_dir=tmp_path, chunk_size=10, progress=False)
    w, l = _lib(tiny, toy_pairs)
    r = s["results"]
    assert r["ranking_accuracy"] == float(ranking_correct(w.logp, l.logp).double().mean())
    assert r["ranking_accuracy_mean"] == float(ranking_correct(w.mean_logp, l.mean_logp).double().mean())
    d = (w.logp - l.logp).double()
    alpha = torch.tensor([p.alpha for p in toy_pairs], dtype=torch.float64)
    ideal = idealized_ranking_accuracy(d, alpha)
    assert r["idealized"]["per_beta"] == {str(k): v for k, v in ideal["per_beta"].items()}
    votes = idealized_ranking_accuracy(d, alphas_from_votes([p.votes for p in toy_pairs]))
    assert r["idealized"]["from_votes"]["median"] == votes["median"]
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [x["id"] for x in rows] == [p.id for p in toy_pairs]
    assert torch.allclose(torch.tensor([x["logp_chosen"] for x in rows], dtype=torch.float64), w.logp, atol=1e-5)
    assert (tmp_path / "ranking.png").stat().st_size > 0
    assert s["model"] == "tiny-random" and s["preflens_version"]


def test_reference_gives_flips_and_idealized_from_the_reference(tmp_path, toy_pairs, tiny):
    from preflens.models import load_model

    toy = load_model("toyworld", device="cpu")
    s = measure("ranking", model=tiny, reference=toy, data=toy_pairs, out_dir=tmp_path, progress=False)
    r = s["results"]
    tw, tl = _lib(toy, toy_pairs)
    mw, ml = _lib(tiny, toy_pairs)
    ref_ok, now_ok = ranking_correct(tw.logp, tl.logp), ranking_correct(mw.logp, ml.logp)
    assert r["reference"]["ranking_accuracy"] == float(ref_ok.double().mean())
    assert r["flips"]["counts"] == flip_buckets(ref_ok, now_ok)["counts"]
    alpha = torch.tensor([p.alpha for p in toy_pairs], dtype=torch.float64)
    assert r["idealized"]["median"] == idealized_ranking_accuracy((tw.logp - tl.logp).double(), alpha)["median"]
    assert r["idealized_from"] == "reference"


def test_bad_options(tmp_path, toy_pairs, tiny):
    with pytest.raises(ConfigError, match="betas"):
        measure("ranking", model=tiny, data=toy_pairs, out_dir=tmp_path, options={"betas": [0.1, -1]})
    with pytest.raises(ConfigError, match="options: .*unexpected keyword.*; valid: betas"):
        measure("ranking", model=tiny, data=toy_pairs, out_dir=tmp_path, options={"beta": 1})
    with pytest.raises(ConfigError, match="lens: unknown value 'rank'"):
        measure("rank", model=tiny, data=toy_pairs, out_dir=tmp_path)


@pytest.mark.slow
def test_cli_reproduces_the_ranking_recipe_reference(tmp_path, capsys):
    """`preflens measure ranking --model toyworld --data <the recipe's pairs>` (1,000 toyworld
    multi-token pairs, 4 votes, seed 0) gives the committed reference R, R̃ and R* (exact, from
    votes, length-normalized) of results/ranking_accuracy.json exactly."""
    from preflens.cli import main
    from preflens.data import write_pairs
    from preflens.data.toyworld.prefs import multi_token_pairs
    from preflens.reproduce.common import toyworld_world
    from preflens.reproduce.ranking_accuracy import Config

    cfg = Config()
    pairs = multi_token_pairs(toyworld_world(), cfg.n_pairs, votes=cfg.votes, seed=cfg.data_seed)
    data = write_pairs(tmp_path / "multi.jsonl", pairs)
    rc = main(["measure", "ranking", "--model", "toyworld", "--data", str(data), "--device", "cpu",
               "--betas", ",".join(map(str, cfg.betas)), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "out" / "summary.json").read_text())["results"]
    ref = json.loads((ROOT / "results" / "ranking_accuracy.json").read_text())["reference"]
    assert r["n_pairs"] == 1000
    assert r["ranking_accuracy"] == ref["ranking_accuracy"]
    assert r["ranking_accuracy_mean"] == ref["ranking_accuracy_mean"]
    for block in (None, "from_votes", "length_normalized"):
        mine = r["idealized"] if block is None else r["idealized"][block]
        theirs = ref["idealized"] if block is None else ref["idealized"][block]
        for key in ("min", "median", "max", "per_beta"):
            assert mine[key] == theirs[key], (block, key)
