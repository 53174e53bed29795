"""preflens.generation: the one greedy decoder (cached == uncached, padding-invariant) and
last-position logits."""

from __future__ import annotations

import torch

from preflens.generation import greedy_decode, hf_forward, last_logits

PROMPTS = ["The capital of France is", "Q: What is the capital of Poland?\nA:", "Yes"]


def _enc(lm):
    return [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def test_cached_equals_uncached_token_for_token(tiny):
    enc = _enc(tiny)
    kw = dict(max_new_tokens=12, eos=None, pad=tiny.pad_id)
    uncached = greedy_decode(hf_forward(tiny.model), enc, **kw)
    cached = greedy_decode(None, enc, cache_model=tiny.model, **kw)
    assert cached == uncached and all(len(r) == 12 for r in cached)


def test_batched_left_padding_equals_one_prompt_at_a_time(tiny):
    enc = _enc(tiny)
    fwd = hf_forward(tiny.model)
    batched = greedy_decode(fwd, enc, max_new_tokens=8, eos=None, pad=tiny.pad_id)
    single = [greedy_decode(fwd, [e], max_new_tokens=8, eos=None, pad=tiny.pad_id)[0] for e in enc]
    assert batched == single


def test_eos_cuts_and_stops(tiny):
    enc = _enc(tiny)
    fwd = hf_forward(tiny.model)
    free = greedy_decode(fwd, enc, max_new_tokens=8, eos=None, pad=tiny.pad_id)
    eos = free[0][2]  # pretend the third generated token of prompt 0 is the stop token
    cut = greedy_decode(fwd, enc, max_new_tokens=8, eos=eos, pad=tiny.pad_id)
    for f, c in zip(free, cut):
        assert c == (f[: f.index(eos)] if eos in f else f)


def test_last_logits_equal_unpadded_forward(tiny):
    enc = _enc(tiny)
    got = last_logits(hf_forward(tiny.model), enc, pad=tiny.pad_id)
    with torch.no_grad():
        want = torch.stack([tiny.model(input_ids=torch.tensor([e])).logits[0, -1] for e in enc])
    assert torch.allclose(got, want, atol=1e-4)
