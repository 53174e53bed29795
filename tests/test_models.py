"""load_model, the offline registry, and the bridge (raw and compatibility mode) vs plain HF."""

from __future__ import annotations

import copy

import pytest
import torch

from preflens.errors import ModelError
from preflens.models import load_model, offline_models


def _ids(lm, text):
    return torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_offline_registry_lists_names():
    names = offline_models()
    assert {"tiny-random", "gpt2-small-random", "toyworld"} <= set(names)


def test_tiny_random_is_seeded_and_has_random_layernorm(tiny):
    again = load_model("tiny-random", device="cpu")
    for (n, a), (_, b) in zip(tiny.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), n
    ln = tiny.model.transformer.ln_f
    assert not torch.allclose(ln.weight, torch.ones_like(ln.weight))
    assert not torch.allclose(ln.bias, torch.zeros_like(ln.bias))
    assert tiny.model.config.n_layer == 2 and tiny.vocab_size == len(tiny.tokenizer)


def test_gpt2_small_random_has_default_architecture(gpt2_random):
    from transformers import GPT2Config

    ref = GPT2Config()
    cfg = gpt2_random.model.config
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "n_inner"):
        assert getattr(cfg, key) == getattr(ref, key), key
    n_params = sum(p.numel() for p in gpt2_random.model.parameters())
    assert 124_000_000 < n_params < 125_000_000


def test_unknown_name_raises_model_error_listing_offline_names():
    with pytest.raises(ModelError) as err:
        load_model("no-such-model-xyz")
    msg = str(err.value)
    assert "no-such-model-xyz" in msg and "tiny-random" in msg and "toyworld" in msg


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights"):
        load_model(str(tmp_path))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


def test_local_directory_roundtrip_and_vocab_mismatch(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu")
    ids = _ids(tiny, "Hello world")
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, tiny.model(ids).logits, atol=1e-6)
    # A tokenizer larger than the model's vocabulary is refused.
    from preflens.models import build_offline_tokenizer

    build_offline_tokenizer(tmp_path / "m", vocab_size=1024)
    with pytest.raises(ModelError, match="mismatched tokenizer and model"):
        load_model(str(tmp_path / "m"), device="cpu")


def test_bridge_raw_logits_equal_hf_and_model_untouched(tiny):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    attn_before = tiny.model.config._attn_implementation
    bridge = tiny.bridge()
    ids = _ids(tiny, "The capital of Poland is Warsaw.\nQ: What?")
    eager = copy.deepcopy(tiny.model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        hf = eager(ids).logits
        br = bridge(ids)
    assert (hf - br).abs().max() < 1e-5
    assert tiny.model.config._attn_implementation == attn_before
    for n, p in tiny.model.named_parameters():
        assert torch.equal(p, before[n]), n
    # the bridge wraps a copy, not the LM's module
    bridge_ptrs = {p.data_ptr() for p in bridge.parameters()}
    assert tiny.model.lm_head.weight.data_ptr() not in bridge_ptrs


def test_compat_bridge_logprobs_equal_hf(tiny):
    bridge = tiny.bridge(compat=True)
    ids = _ids(tiny, "Is the following statement something you would say? Yes")
    with torch.no_grad():
        hf = tiny.model(ids).logits.log_softmax(-1)
        br = bridge(ids).log_softmax(-1)
    assert (hf - br).abs().max() < 1e-5
    # the LM's own embeddings stay tied
    assert tiny.model.lm_head.weight.data_ptr() == tiny.model.transformer.wte.weight.data_ptr()


@pytest.mark.gpt2
def test_real_gpt2_loads_and_bridges():
    lm = load_model("gpt2", device="cpu")
    ids = _ids(lm, "The capital of France is")
    with torch.no_grad():
        hf = lm.model(ids).logits.log_softmax(-1)
        br = lm.bridge(compat=True)(ids).log_softmax(-1)
    assert (hf - br).abs().max() < 1e-3
