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


# ----------------------------------------------------------------------------- head precision
HEAD_FAMILIES = ("gpt2", "llama")  # tied / untied unembedding; both with randomized norm weights


def _head_inputs(lm):
    from preflens.scoring import collate, final_hidden

    batch = collate(encode(lm.tokenizer, PROMPTS, RESPONSES), pad_id=lm.pad_id)
    with torch.no_grad():
        hidden = final_hidden(lm.model, batch)
    mask = batch.response_mask
    head = lm.model.get_output_embeddings()
    return batch, hidden[mask], head.weight.detach(), getattr(head, "bias", None), batch.targets[mask]


@pytest.mark.parametrize("family", HEAD_FAMILIES, ids=[f"tiny-{f}" for f in HEAD_FAMILIES])
def test_fp32_head_equals_the_previous_head_bit_for_bit(family_lms, family):
    from preflens.scoring import target_logprobs, token_logprobs
    from tests.test_scoring import old_fused_head

    lm = family_lms[family]
    batch, h, w, b, t = _head_inputs(lm)
    g = torch.linspace(-1, 1, h.shape[0])
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    lp = target_logprobs(*leaves, b, t, chunk_size=5)
    (lp * g).sum().backward()
    old = old_fused_head(h, w, b, t, 5, g)
    assert torch.equal(lp, old[0]) and torch.equal(leaves[0].grad, old[1]) and torch.equal(leaves[1].grad, old[2])
    with torch.no_grad():
        assert torch.equal(token_logprobs(lm.model, batch, chunk_size=5)[batch.response_mask], old[0])


@pytest.mark.parametrize("family", [*HEAD_FAMILIES, "gemma2"], ids=["tiny-gpt2", "tiny-llama", "tiny-gemma2"])
def test_bf16_head_logprobs_within_the_bf16_bound(family_lms, family):
    """Also through Gemma 2's soft-cap (1-Lipschitz, so the logit bound carries over)."""
    from preflens.scoring import logit_head, token_logprobs
    from tests.test_scoring import head_logit_bound

    lm = family_lms[family]
    batch, h, w, _, _ = _head_inputs(lm)
    with torch.no_grad():
        lp32 = token_logprobs(lm.model, batch)[batch.response_mask]
        lp16 = token_logprobs(lm.model, batch, head_precision="bf16")[batch.response_mask]
    err = (lp16 - lp32).abs().double()
    bound = 2 * head_logit_bound(h, w, logit_head(lm.model).scale)
    assert (err <= bound).all() and err.max() > 0


@pytest.mark.parametrize("family", HEAD_FAMILIES, ids=[f"tiny-{f}" for f in HEAD_FAMILIES])
def test_bf16_head_model_gradients_close_to_fp32(family_lms, family):
    """Every parameter's gradient through the whole model (the body's backward is the same linear
    map of ∂h in both): relative error ≤ 8u = 2⁻⁵, a few bf16 roundings of the head's inputs."""
    from preflens.scoring import token_logprobs

    lm = family_lms[family]
    batch = _head_inputs(lm)[0]
    grads = {}
    for precision in ("fp32", "bf16"):
        lm.model.zero_grad()
        token_logprobs(lm.model, batch, head_precision=precision).sum().backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in lm.model.parameters()])
    lm.model.zero_grad()
    rel = float((grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm())
    assert 0 < rel <= 8 * 2.0 ** -8, rel
