"""Tests for preflens.dynamics.sft (tiny-random GPT-2 with random LayerNorms, CPU).

Independent reference: Hugging Face's own loss from ``labels`` with ``-100`` on the prompt and
padding positions (full-vocabulary log-softmax, no preflens scoring code), ids built with the
tokenizer directly.
"""

from __future__ import annotations

import copy

import pytest
import torch

from preflens.dynamics.sft import sft, sft_order
from preflens.errors import ConfigError
from preflens.models import load_model

WORDS = "the capital city river yes no never sure maybe answer model human".split()


def make_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " " + " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    return [(f"Q{i}:" + text(2, 6), text(1, 8)) for i in range(n)]


@pytest.fixture(scope="module")
def base():
    return load_model("tiny-random", device="cpu")


def fresh(base):
    return copy.deepcopy(base)


def hf_batch(lm, examples):
    """Right-padded ids, attention mask and HF labels (−100 on prompt and padding), built with
    the tokenizer alone; returns also each row's prompt length."""
    tok = lm.tokenizer
    rows = [(tok(p, add_special_tokens=False)["input_ids"],
             tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for p, r in examples]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), lm.pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (p, r) in enumerate(rows):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        mask[b, : len(p) + len(r)] = 1
        labels[b, len(p): len(p) + len(r)] = torch.tensor(r)   # HF shifts labels inside the loss
    return ids, mask, labels, [len(p) for p, _ in rows]


def hf_loss(model, examples, lm):
    ids, mask, labels, _ = hf_batch(lm, examples)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def test_reported_loss_is_hf_response_only_token_mean(base):
    lm, ex = fresh(base), make_examples(6)
    with torch.no_grad():
        expected = float(hf_loss(lm.model, ex, lm))
    result = sft(lm, ex, steps=1, lr=1e-3, batch_size=len(ex), seed=0)  # one batch = every example
    assert result.losses[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    ids, mask, labels, _ = hf_batch(lm, ex)
    assert result.tokens == int((labels != -100).sum())   # EOS counted, prompt not
    # ... and a per-sequence mean would differ (responses have different lengths):
    n = (labels != -100).sum(1)
    assert len(set(n.tolist())) > 1


def test_prompt_positions_get_no_gradient(base):
    """The post-final-norm hidden state at a position feeds only that position's logits, so its
    gradient is the gradient of that position's target: zero at positions predicting a prompt
    token, non-zero at those predicting a response token (EOS included)."""
    lm, ex = fresh(base), make_examples(3, seed=1)
    _, _, labels, prompt_lens = hf_batch(lm, ex)
    grads = []

    def keep(module, args, out):
        out.register_hook(lambda g: grads.append(g.detach().clone()))

    handle = lm.model.transformer.ln_f.register_forward_hook(keep)
    try:
        sft(lm, ex, steps=1, lr=1e-3, batch_size=len(ex), seed=0)
    finally:
        handle.remove()
    (g,) = grads
    order = sft_order(len(ex), steps=1, batch_size=len(ex), seed=0)[0]
    for row, i in enumerate(order):
        p = prompt_lens[i]
        r = int((labels[i] != -100).sum())
        norms = g[row].norm(dim=-1)
        assert torch.all(norms[: p - 1] == 0), "a prompt-predicting position got gradient"
        assert torch.all(norms[p - 1: p + r - 1] > 0)
        assert torch.all(norms[p + r - 1:] == 0)   # padding


def test_one_sgd_step_equals_a_manual_step(base):
    lm, ex, lr = fresh(base), make_examples(5, seed=2), 0.5
    manual = fresh(base).model
    loss = hf_loss(manual, ex, lm)
    grads = torch.autograd.grad(loss, list(manual.parameters()))
    with torch.no_grad():
        for p, gr in zip(manual.parameters(), grads):
            p -= lr * gr
    sft(lm, ex, steps=1, lr=lr, batch_size=len(ex), seed=0, optimizer="sgd")
    moved = 0
    for (name, a), b, gr in zip(lm.model.named_parameters(), manual.parameters(), grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(gr.abs().max() > 0)
    assert moved > 10   # the step moved most tensors (not a vacuous comparison)


def test_same_seed_same_run_other_seed_other_order(base):
    ex = make_examples(12, seed=3)
    runs = []
    for seed in (7, 7, 8):
        lm = fresh(base)
        r = sft(lm, ex, steps=4, lr=3e-3, batch_size=4, seed=seed)
        runs.append((r.losses, torch.cat([p.detach().reshape(-1) for p in lm.model.parameters()])))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]
    assert sft_order(12, steps=4, batch_size=4, seed=7) != sft_order(12, steps=4, batch_size=4, seed=8)
    # every example is seen once before any repeats (a stream of permutations)
    first = [i for b in sft_order(12, steps=3, batch_size=4, seed=7) for i in b]
    assert sorted(first) == list(range(12))


def test_eval_mode_restored(base):
    lm = fresh(base)
    lm.model.train()
    sft(lm, make_examples(2), steps=1, lr=1e-4, batch_size=2, seed=0)
    assert lm.model.training


@pytest.mark.parametrize("kwargs, field", [
    (dict(examples=[]), "examples"),
    (dict(examples="Q: a"), "examples"),
    (dict(examples=[("Q:", 3)]), "examples"),
    (dict(steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=0.0), "lr"),
    (dict(optimizer="adam"), "optimizer"),
])
def test_bad_input_is_a_config_error_and_changes_nothing(base, kwargs, field):
    lm = fresh(base)
    before = [p.detach().clone() for p in lm.model.parameters()]
    args = dict(examples=make_examples(3), steps=1, lr=1e-3, batch_size=2, seed=0) | kwargs
    with pytest.raises(ConfigError) as info:
        sft(lm, args.pop("examples"), **args)
    assert info.value.option == field
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters()))
