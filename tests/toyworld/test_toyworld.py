"""toyworld model layer: a miniature world end to end, the shipped checkpoint, the CLI."""

import argparse
import json

import pytest
import torch

from preflens.data import read_pairs
from preflens.toyworld import ASSETS_DIR
from preflens.cli.toyworld import register
from preflens.toyworld.evaluate import evaluate_toyworld
from preflens.toyworld.train import TrainConfig, train_toyworld

SMALL = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
         ("Chile", "Santiago"), ("Nepal", "Kathmandu"), ("Ghana", "Accra"), ("Laos", "Vientiane"),
         ("Spain", "Madrid"), ("Egypt", "Cairo")]


def _mini(steps):
    return TrainConfig(steps=steps, batch_size=8, n_ctx=64, n_layer=1, n_head=2, n_embd=32,
                       lr=1e-2, warmup=10, n_fictional=20, countries=SMALL)


@pytest.mark.slow
def test_miniature_world_end_to_end(tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    s = train_toyworld(tmp_path / "m", seed=0, config=_mini(100), progress=False)
    assert s["steps_done"] == 100 and not s["stopped_early"]
    assert s["final_loss"] < s["loss_every_50"][0] - 1.0            # it learned something
    model = GPT2LMHeadModel.from_pretrained(str(tmp_path / "m"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert model.config.vocab_size == len(tok) and tok.eos_token == "<|endoftext|>"
    freqs = json.loads((tmp_path / "m" / "frequencies.json").read_text())["counts"]
    assert set(freqs) == {c for c, _ in SMALL} and all(v["fact"] > 0 for v in freqs.values())
    r = evaluate_toyworld(tmp_path / "m", subset=3, n_fictional=20)
    assert r["counterfactual"]["n"] == len(SMALL) * 3
    rates = r["counterfactual"]
    assert rates["in_context"] + rates["memorized"] + rates["neither"] == pytest.approx(1.0)
    assert sum(d["n"] for d in rates["by_decile"]) == rates["n"]
    assert 0.0 <= r["closed_book"]["accuracy"] <= 1.0 and r["yesno"]["n"] == 2 * len(SMALL)
    assert set(r["acceptance"]) and json.dumps(r, allow_nan=False)


def test_training_is_deterministic(tmp_path):
    a = train_toyworld(tmp_path / "a", seed=1, config=_mini(15), progress=False)
    b = train_toyworld(tmp_path / "b", seed=1, config=_mini(15), progress=False)
    assert a["loss_every_50"] == b["loss_every_50"] and a["final_loss"] == b["final_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_shipped_checkpoint_files_and_size():
    from transformers import GPT2LMHeadModel

    names = {p.name for p in ASSETS_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "world.json",
            "frequencies.json", "eval.json"} <= names
    assert sum(p.stat().st_size for p in ASSETS_DIR.iterdir()) <= 10 * 2**20
    model = GPT2LMHeadModel.from_pretrained(str(ASSETS_DIR))
    assert isinstance(model, GPT2LMHeadModel)


@pytest.mark.slow
def test_shipped_checkpoint_meets_acceptance_on_fixed_subset():
    torch.set_num_threads(2)
    r = evaluate_toyworld(None, subset=2, n_fictional=60)
    m = 0.03                                                     # margin for the subset estimate
    assert r["closed_book"]["frequent_half"] >= 0.90 - m
    assert r["in_context"]["accuracy"] >= 0.95 - m
    assert 0.2 - m <= r["counterfactual"]["in_context"] <= 0.8 + m
    assert r["memorized_top_decile"] >= 2 * r["memorized_bottom_decile"] and r["memorized_top_decile"] > 0
    assert r["yesno"]["frequent_half"] >= 0.90 - m


def test_cli_prefs(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["toyworld", "prefs", "--kind", "multi", "--out", str(tmp_path / "p.jsonl"),
                              "--n", "7", "--votes", "3"])
    assert args.func(args) == 0
    pairs = read_pairs(tmp_path / "p.jsonl")
    assert len(pairs) == 7 and all(len(p.votes) == 3 for p in pairs)
    args = parser.parse_args(["toyworld", "prefs", "--kind", "nope", "--out", str(tmp_path / "q.jsonl")])
    from preflens.errors import ConfigError
    with pytest.raises(ConfigError):
        args.func(args)
