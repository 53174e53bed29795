"""measure displacement: Δ log π equals scoring differences; top gaining tokens from the probe."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from preflens.errors import ConfigError
from preflens.measure import measure
from preflens.probes.displacement import top_gaining_tokens
from preflens.scoring import response_logprobs


def test_delta_and_top_tokens(tmp_path, toy_pairs, tiny):
    pairs = toy_pairs[:8]
    moved = copy.deepcopy(tiny)
    with torch.no_grad():
        moved.model.lm_head.weight.add_(0.05 * torch.randn_like(moved.model.lm_head.weight))
    s = measure("displacement", model=moved, reference=tiny, data=pairs, out_dir=tmp_path,
                options={"top_k": 3}, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    prompts = [p.prompt for p in pairs]
    dw = (response_logprobs(moved, prompts, [p.chosen for p in pairs]).logp
          - response_logprobs(tiny, prompts, [p.chosen for p in pairs]).logp)
    assert torch.allclose(torch.tensor([r["delta_chosen"] for r in rows], dtype=torch.float64), dw, atol=1e-4)
    assert s["results"]["fraction_chosen_down"] == float((dw < 0).double().mean())
    # first pair's top gainers from the probe on full next-token distributions
    def dist(lm):
        ids = torch.tensor([lm.tokenizer(pairs[0].prompt)["input_ids"]])
        return torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1)
    ids, deltas = top_gaining_tokens(dist(tiny), dist(moved), 3, log_space=True)["by_logprob"]
    assert [t["token_id"] for t in rows[0]["top_gaining"]] == ids.tolist()
    assert torch.allclose(torch.tensor([t["delta_logprob"] for t in rows[0]["top_gaining"]],
                                       dtype=torch.float64), deltas, atol=1e-4)
    assert len(s["results"]["top_gaining_tokens"]) <= 10 and (tmp_path / "displacement.png").is_file()


def test_reference_required(tmp_path, toy_pairs, tiny):
    with pytest.raises(ConfigError, match="reference: the displacement lens compares two models"):
        measure("displacement", model=tiny, data=toy_pairs, out_dir=tmp_path)
