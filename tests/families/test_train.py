"""One DPO update on every family runs through preflens' training loop and lowers the loss."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest

from preflens.data import PreferencePair
from preflens.dynamics.train import train_preference

PAIRS = [
    PreferencePair("The capital of France is", " Paris.", " Rome, said the fox."),
    PreferencePair("Q: What is the capital of Italy?\nA:", " Rome", " Never. No No"),
]


def test_one_dpo_step_lowers_the_loss(lm, tmp_path):
    """Two SGD updates on the same full batch: step 1's loss is log 2 (policy = reference), step
    2's loss is measured after one update and must be lower; the run writes its checkpoint."""
    policy = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    run = train_preference(policy, PAIRS, loss="dpo", loss_kwargs={"beta": 0.1}, optimizer="sgd",
                           lr=1e-2, steps=2, batch_size=2, seed=0, out_dir=tmp_path / "run")
    losses = [row["loss"] for row in run.history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[1] < losses[0]
    assert run.checkpoint_path is not None and run.checkpoint_path.exists()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2



@pytest.mark.parametrize("family", ["gpt2", "llama"], ids=["tiny-gpt2", "tiny-llama"])
def test_one_dpo_step_with_a_bf16_head(family_lms, family, tmp_path):
    """head_precision="bf16" in the loop: the reference is scored with the same head, so step 1's
    loss is log 2 exactly as in fp32; the update lowers the loss; the record names the head."""
    lm = family_lms[family]
    policy = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    run = train_preference(policy, PAIRS, loss="dpo", loss_kwargs={"beta": 0.1}, optimizer="sgd", lr=1e-2,
                           steps=2, batch_size=2, seed=0, head_precision="bf16", out_dir=tmp_path / "run")
    losses = [row["loss"] for row in run.history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-7)
    assert losses[1] < losses[0]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["head_precision"] == "bf16"


def test_sft_loss_is_the_hf_response_only_token_mean(lm):
    """dynamics.sft on every family (BOS, soft-capping, GQA, RMSNorm): its reported loss equals
    Hugging Face's own cross-entropy from ``labels`` (−100 on the prompt), summed over every
    example's response tokens (EOS included) and divided by their total count; computed one
    example at a time with the tokenizer's own special tokens, so no padding is involved."""
    import torch

    from preflens.dynamics.sft import sft

    policy = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    tok = lm.tokenizer
    examples = [(p.prompt, p.chosen) for p in PAIRS]
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in examples:
            p = tok(prompt)["input_ids"]                       # BOS exactly when the tokenizer adds it
            r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p + r])
            labels = torch.tensor([[-100] * len(p) + r])
            total += float(lm.model(input_ids=ids, labels=labels).loss.double()) * len(r)
            count += len(r)
    result = sft(policy, examples, steps=1, lr=1e-3, batch_size=len(examples), seed=0, optimizer="sgd")
    assert result.tokens == count
    assert result.losses[0] == pytest.approx(total / count, rel=1e-4, abs=1e-5)
