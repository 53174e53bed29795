"""Scale-out pieces on every family: decoder blocks found generically, activation checkpointing
exact, LoRA with the family's default targets trains and its ghost inner products equal exact."""

from __future__ import annotations

import copy
import dataclasses

import torch

from preflens.data import PreferencePair
from preflens.dynamics import fsdp, lora
from preflens.dynamics.entanglement import pair_gradient_stats
from preflens.dynamics.train import train_preference

PAIRS = [PreferencePair(f"Q: capital {i}?", " Paris." * (1 + i % 2), " Rome, said the fox." * (1 + i % 3))
         for i in range(4)]
CONFIG = dict(loss="dpo", optimizer="sgd", lr=0.1, steps=2, batch_size=2, seed=0, checkpoint_every=None)


def _fresh(lm):
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model))


def test_blocks_and_activation_checkpointing_are_exact(lm):
    blocks = fsdp.decoder_blocks(lm.model)
    assert len(blocks) >= 1 and type(blocks[0]).__name__ in lm.model._no_split_modules
    plain, ckpt = _fresh(lm), _fresh(lm)
    a = train_preference(plain, PAIRS, **CONFIG)
    b = train_preference(ckpt, PAIRS, activation_checkpointing=True, **CONFIG)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    wa, wb = dict(plain.model.named_parameters()), dict(ckpt.model.named_parameters())
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_lora_default_targets_train_and_ghost_equals_exact(lm):
    trained = _fresh(lm)
    res = train_preference(trained, PAIRS, lora_r=2, **{**CONFIG, "optimizer": "adamw", "lr": 0.05, "steps": 3})
    names = [n for n, p in trained.model.named_parameters() if p.requires_grad]
    assert names and all(lora.is_lora_parameter(n) for n in names)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    lm64 = dataclasses.replace(trained, model=trained.model.double())
    ghost = pair_gradient_stats(lm64, PAIRS, params="lora", method="ghost")
    exact = pair_gradient_stats(lm64, PAIRS, params="lora", method="exact")
    for k in ("inner", "norm_w_sq", "norm_l_sq"):
        torch.testing.assert_close(getattr(ghost, k), getattr(exact, k), rtol=1e-9, atol=1e-30)
