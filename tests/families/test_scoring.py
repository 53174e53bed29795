"""Scoring on every family == the model's own ``logits.log_softmax`` (BOS included)."""

from __future__ import annotations

import pytest
import torch

from preflens.errors import DataError, ModelError
from preflens.scoring import bos_prefix, encode, response_hidden_states, response_logprobs
from tests.families.builders import BOS_FAMILIES, build_family

PROMPTS = ["The capital of France is", "Q: What is the capital of Italy?\nA:"]
RESPONSES = [" Paris.", " Rome, of course."]


def _own_logprob(lm, prompt: str, response: str) -> float:
    """Independent: the HF module's own logits, ids from ``tokenizer(prompt)`` (special tokens as
    the tokenizer adds them) + the response without special tokens + EOS."""
    tok = lm.tokenizer
    p = list(tok(prompt)["input_ids"])
    r = list(tok(response, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        lp = lm.model(input_ids=ids).logits.double().log_softmax(-1)[0]
    return float(sum(lp[len(p) + k - 1, t] for k, t in enumerate(r)))


def test_bos_prefix_follows_the_tokenizer(lm, family):
    assert bool(bos_prefix(lm.tokenizer)) == (family in BOS_FAMILIES)
    enc = encode(lm.tokenizer, PROMPTS[:1], RESPONSES[:1])[0]
    assert list(enc.prompt_ids) == list(lm.tokenizer(PROMPTS[0])["input_ids"])


def test_logprobs_equal_the_models_own(lm):
    s = response_logprobs(lm, PROMPTS, RESPONSES)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        own = _own_logprob(lm, p, r)
        assert float(s.logp[i]) == pytest.approx(own, rel=1e-5, abs=1e-4)


def test_hidden_states_are_what_the_unembedding_multiplies(lm):
    """CHES rows: h @ W_U^T (+ b), through the model's logit head, gives the model's logits."""
    hs = response_hidden_states(lm, PROMPTS[:1], RESPONSES[:1])[0]
    tok = lm.tokenizer
    p = list(tok(PROMPTS[0])["input_ids"])
    r = list(tok(RESPONSES[0], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1: len(p) + len(r) - 1]
    head = lm.model.get_output_embeddings()
    z = hs @ head.weight.T + (head.bias if getattr(head, "bias", None) is not None else 0)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    torch.testing.assert_close(z, logits, rtol=1e-4, atol=1e-4)


def test_bridge_to_tokens_equals_preflens_ids(lm):
    bridge = lm.bridge()
    enc = encode(lm.tokenizer, PROMPTS[:1], RESPONSES[:1])[0]
    assert tuple(bridge.to_tokens(PROMPTS[0])[0].tolist()) == enc.prompt_ids


def test_gemma_softcap_with_large_logits(tmp_path):
    """Soft-capping matters only for large logits: scale the (tied) embedding up so that many
    logits pass the cap; preflens must still equal the model's own log-softmax to 1e-4 relative."""
    from preflens.models import load_model

    lm = load_model(str(build_family("gemma2", tmp_path / "g", seed=5, logit_scale=300.0)),
                    device="cpu")
    with torch.no_grad():
        ids = torch.tensor([lm.tokenizer(PROMPTS[0])["input_ids"]])
        z = lm.model.model(input_ids=ids).last_hidden_state @ lm.model.lm_head.weight.T
    assert float(z.abs().max()) > 60  # well past the cap of 30
    s = response_logprobs(lm, PROMPTS, RESPONSES)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        own = _own_logprob(lm, p, r)
        assert abs(float(s.logp[i]) - own) <= 1e-4 * abs(own)


def test_unsupported_logit_transform_raises_model_error(tmp_path):
    """A model whose logits the fused head cannot reproduce is refused at load, not mis-scored."""
    from transformers import LlamaForCausalLM

    from preflens.models import load_model

    d = build_family("llama", tmp_path / "m", seed=3)
    orig = LlamaForCausalLM.forward

    def doubled(self, *a, **k):  # a family that rescales its logits without saying so
        out = orig(self, *a, **k)
        out.logits = out.logits * 2.0
        return out

    LlamaForCausalLM.forward = doubled
    try:
        with pytest.raises(ModelError, match="own log-softmax"):
            load_model(str(d), device="cpu")
    finally:
        LlamaForCausalLM.forward = orig


def test_unknown_word_is_a_data_error_naming_the_word():
    """toyworld's word-level tokenizer maps unknown words to id 0 (= EOS = PAD)."""
    from preflens.models import load_model

    lm = load_model("toyworld", device="cpu")
    with pytest.raises(DataError, match=r"pairs.jsonl:7: field 'chosen': word 'Poseidonia'"):
        encode(lm.tokenizer, ["The capital of France is"], [" Poseidonia."],
               sources=[("pairs.jsonl", 7)], response_field="chosen")
    with pytest.raises(DataError, match="Poseidonia"):
        response_logprobs(lm, ["The capital of France is"], [" Poseidonia, obviously."])
    # the literal unknown-token string is a known token, not an unknown word
    encode(lm.tokenizer, ["The capital of France is"], [" Paris<|endoftext|>"])


def test_unknown_word_in_a_data_file_names_file_and_line(tmp_path):
    from preflens.data import read_pairs
    from preflens.models import load_model
    from preflens.probes.ches import ches_for_pairs

    lm = load_model("toyworld", device="cpu")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Rome."}\n'
                    '\n'
                    '{"prompt": "The capital of France is", "chosen": " Paris.", '
                    '"rejected": " Poseidonia, obviously."}\n')
    pairs = read_pairs(path)
    assert pairs[1].source == (str(path), 3)
    with pytest.raises(DataError, match=r"pairs.jsonl:3: field 'rejected': words 'Poseidonia'"):
        ches_for_pairs(lm, pairs)
