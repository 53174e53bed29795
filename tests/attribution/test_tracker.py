"""The DLA tracker: per-head attribution of the chosen vs rejected first token, on a deep copy."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from preflens.attribution.heads import head_logit_attribution
from preflens.attribution.tracker import DlaTracker, probe_triples
from preflens.data import PreferencePair
from preflens.errors import DataError
from preflens.tracking import read_jsonl


def _pairs():
    return [PreferencePair(f"Question {i}: the capital is", f" Paris{' yes' * (i % 3)}", f" Rome{' no' * (i % 4)}")
            for i in range(6)] + [PreferencePair("Same first token:", " Paris yes", " Paris no"),
                                  PreferencePair("No space:", "Paris", "Rome")]


def _state(lm, step, out_dir):
    return SimpleNamespace(step=step, total_steps=2, epoch=0, metrics={}, model=lm.model, lm=lm, rank=0,
                           world_size=1, is_main=True, out_dir=out_dir)


def test_dla_tracker_matches_head_attribution_and_leaves_model_alone(tiny, tmp_path):
    lm = copy.deepcopy(tiny)  # tiny-random has randomized LayerNorm weights and biases
    keep, prompts = probe_triples(lm, _pairs())
    assert keep == [0, 1, 2, 3, 4, 5]  # same first token, and no leading space, are left out
    tr = DlaTracker(lm, _pairs(), every=1)
    assert tr.via == "direct"  # GPT-2 family: the compatibility-mode formula on the plain module
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    impl = lm.model.config._attn_implementation
    tr.on_train_begin(_state(lm, 0, tmp_path))
    with torch.no_grad():
        lm.model.transformer.h[0].attn.c_attn.weight.mul_(1.5)
    row = tr.on_step(_state(lm, 1, tmp_path))
    expected = head_logit_attribution(lm.bridge(compat=True), prompts, per_prompt=True).double()
    line = read_jsonl(tmp_path / "tracked" / "dla.jsonl")[-1]
    assert torch.allclose(torch.tensor(line["per_probe"], dtype=torch.float64), expected, atol=1e-6)
    assert row["tracked/dla/L0H1"] == pytest.approx(float(expected[0, 1].mean()), abs=1e-6)
    diffs = []  # logit(y+_1) - logit(y-_1) at the last prompt position, one unpadded forward each
    with torch.no_grad():
        for p, (a, b) in zip(prompts, tr.first.tolist()):
            ids = torch.tensor([lm.tokenizer(p.text, add_special_tokens=False)["input_ids"]])
            logits = lm.model(ids).logits[0, -1]
            diffs.append(float(logits[a] - logits[b]))
    assert row["tracked/dla/logit_diff"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
    assert tr.history[-1]["logit_diff"] == row["tracked/dla/logit_diff"]
    assert lm.model.config._attn_implementation == impl
    for n, p in lm.model.named_parameters():
        if "h.0.attn.c_attn.weight" not in n:
            assert torch.equal(p, before[n]), n


def test_dla_tracker_needs_a_usable_probe(tiny):
    with pytest.raises(DataError, match="dla tracker"):
        DlaTracker(tiny, [PreferencePair("p:", "Paris", "Rome")])


def test_dla_direct_path_equals_the_bridge_path(tiny, tmp_path):
    lm = copy.deepcopy(tiny)
    with torch.no_grad():  # move away from the seeded init, LayerNorms included
        g = torch.Generator().manual_seed(3)
        for p in lm.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    direct = DlaTracker(lm, _pairs(), every=1, via="direct")
    bridge = DlaTracker(lm, _pairs(), every=1, via="bridge")
    a, b = direct.record(lm.model, 0), bridge.record(lm.model, 0)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    with pytest.raises(Exception, match="via"):
        DlaTracker(lm, _pairs(), via="fast")
