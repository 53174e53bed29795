"""General DLA on any (prompt, target, foil) strings: equal to the capitals path, exact first-token
identity against the HF model, full-answer mode against scoring (randomized LayerNorm: tiny-random)."""

from __future__ import annotations

import pytest
import torch

from preflens.attribution.heads import head_attribution, head_logit_attribution
from preflens.data.recall_prompts import counterfactual_prompts
from preflens.errors import ConfigError
from preflens.models import load_model
from preflens.scoring import response_logprobs


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("tiny-random", device="cpu")  # LayerNorm weights/biases randomized
    return lm, lm.bridge(compat=True)


def _capitals():
    ps = counterfactual_prompts(["Poland", "France", "Japan", "Italy", "Bolivia"])
    return [p for p in ps if p.in_context in {"Warsaw", "Paris", "Tokyo", "Rome"}]


def test_strings_equal_the_capitals_form(tiny):
    _, bridge = tiny
    ps = _capitals()
    caps = head_logit_attribution(bridge, ps, per_prompt=True)
    strings = head_logit_attribution(bridge, [p.text for p in ps], [" " + p.in_context for p in ps],
                                     [[" " + m for m in p.memorized] for p in ps], per_prompt=True)
    assert torch.equal(caps, strings)
    assert torch.equal(head_logit_attribution(bridge, ps),
                       caps[:, :, [not p.degenerate for p in ps]].double().mean(-1).float())


def test_first_token_difference_is_the_hf_logit_difference(tiny):
    lm, bridge = tiny
    texts = ["The capital of France is", "Q: Is the sky blue?\nA:", "Hello"]
    res = head_attribution(bridge, texts, [" Paris", " Yes", " world"], [" Rome", [" No", " Never"], " there"])
    tok = lm.tokenizer
    for i, (t, y, fs) in enumerate(zip(texts, [" Paris", " Yes", " world"], [[" Rome"], [" No", " Never"], [" there"]])):
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            h = lm.model.base_model(input_ids=ids).last_hidden_state[0, -1]
            lg = h @ lm.model.get_output_embeddings().weight.T  # pre-cap (no lm_head bias here)
        first = lambda s: tok(s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
        want = float(lg[first(y)] - max(lg[first(f)] for f in fs))
        assert float(res.difference[i]) == pytest.approx(want, abs=1e-4)
    assert res.per_head.shape == (bridge.cfg.n_layers, bridge.cfg.n_heads, 3)


def test_full_answer_mode(tiny):
    lm, bridge = tiny
    tok = lm.tokenizer
    texts = [p.text for p in _capitals()[:3]]
    single = [s for s in (" a", " b", " the", " of", " is") if len(tok(s, add_special_tokens=False)["input_ids"]) == 1]
    one = head_attribution(bridge, texts, [single[0]] * 3, [single[1]] * 3)
    full = head_attribution(bridge, texts, [single[0]] * 3, [single[1]] * 3, answer="full")
    assert torch.allclose(one.per_head, full.per_head, atol=1e-5)      # single tokens: the same quantity
    multi = head_attribution(bridge, texts, [" Paris is nice"] * 3, [[" Rome", " Warsaw city"]] * 3, answer="full")
    lp = {y: response_logprobs(lm, texts, [y] * 3, add_eos=False).logp for y in (" Paris is nice", " Rome", " Warsaw city")}
    want = lp[" Paris is nice"] - torch.maximum(lp[" Rome"], lp[" Warsaw city"])
    assert torch.allclose(multi.difference.double(), want, atol=1e-3)
    assert multi.per_head.abs().sum() > 0


def test_bad_arguments(tiny):
    _, bridge = tiny
    with pytest.raises(ConfigError, match="targets: prompt 0 is a string"):
        head_attribution(bridge, ["hi"])
    with pytest.raises(ConfigError, match="targets: give one target"):
        head_attribution(bridge, ["hi", "ho"], [" a"], [" b"])
    with pytest.raises(ConfigError, match="answer: unknown value"):
        head_attribution(bridge, ["hi"], [" a"], [" b"], answer="last")
    with pytest.raises(ConfigError, match="position: full-answer"):
        head_attribution(bridge, ["hi"], [" a"], [" b"], answer="full", position=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bos_models_and_soft_cap(tmp_path, family):
    """A BOS-adding tokenizer (llama) and a soft-capped head (gemma2, logits past the cap): the
    first-token difference is the pre-cap HF logit difference (llama) and the full-answer
    difference is the scored log-prob difference (gemma2: exact post-norm DLA on the HF module)."""
    from preflens.scoring import bos_prefix
    from tests.families.builders import build_family

    lm = load_model(str(build_family(family, tmp_path / family, seed=3,
                                     logit_scale=300.0 if family == "gemma2" else 1.0)), device="cpu")
    texts = ["The capital of France is", "Q: What is the capital of Italy? A:"]
    targets, foils = [" Paris. Yes", " Rome"], [" Warsaw", [" Tokyo. No", " Sure"]]
    assert bos_prefix(lm.tokenizer)
    full = head_attribution(lm, texts, targets, foils, answer="full")
    lp = lambda ys: response_logprobs(lm, texts, ys, add_eos=False).logp  # noqa: E731
    want = lp(targets) - torch.maximum(lp([" Warsaw", " Tokyo. No"]), lp([" Warsaw", " Sure"]))
    assert torch.allclose(full.difference.double(), want, atol=1e-3)
    first = head_attribution(lm, texts, targets, foils)
    tok = lm.tokenizer
    for i, t in enumerate(texts):
        ids = torch.tensor([list(bos_prefix(tok)) + tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            h = lm.model.base_model(input_ids=ids).last_hidden_state[0, -1]
            lg = h @ lm.model.get_output_embeddings().weight.T  # pre-cap (no lm_head bias here)
        f1 = lambda s: tok(s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
        fs = [foils[i]] if isinstance(foils[i], str) else foils[i]
        assert float(first.difference[i]) == pytest.approx(
            float(lg[f1(targets[i])] - max(lg[f1(f)] for f in fs)), abs=1e-4)
