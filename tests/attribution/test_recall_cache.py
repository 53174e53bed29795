"""generate_continuations(use_cache=True): the plain model's KV cache gives the uncached
(bridge, full re-run) tokens, token for token; hooked runs cannot take the cached path."""

from __future__ import annotations

import pytest

from preflens.attribution.recall import generate_continuations
from preflens.attribution.scaling import scale_heads
from preflens.data.recall_prompts import counterfactual_prompts
from preflens.errors import ConfigError
from preflens.models import load_model
from tests.attribution.test_recall import require_toyworld, toyworld_capitals
from tests.families.builders import build_family


def test_cached_equals_uncached_on_toyworld():
    require_toyworld()
    _, world = toyworld_capitals()
    countries = list(dict.fromkeys(r.country for r in world.rows))[::16]
    ps = [p for p in counterfactual_prompts(countries, pairs=1, seed=3, world=world, aliases=False)
          if not p.degenerate]
    lm = load_model("toyworld", device="cpu")
    assert len({len(lm.tokenizer(p.text)["input_ids"]) for p in ps}) >= 2  # real left padding
    uncached = generate_continuations(lm, ps, max_new_tokens=6, batch_size=32)
    cached = generate_continuations(lm, ps, max_new_tokens=6, batch_size=32, use_cache=True)
    assert cached == uncached
    assert max(len(c.token_ids) for c in cached) >= 2  # the cache is read at least once


def test_cached_equals_uncached_on_gqa_llama(tmp_path):
    lm = load_model(str(build_family("llama", tmp_path / "llama", seed=3)), device="cpu")
    assert lm.model.config.num_key_value_heads < lm.model.config.num_attention_heads
    ps = counterfactual_prompts(["Poland", "United Kingdom", "Japan", "Italy"], pairs=1, seed=0)
    assert len({len(lm.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in ps}) >= 2
    uncached = generate_continuations(lm, ps, max_new_tokens=8, batch_size=4)
    cached = generate_continuations(lm, ps, max_new_tokens=8, batch_size=4, use_cache=True)
    assert cached == uncached
    assert all(len(c.token_ids) == 8 for c in cached) and len({c.token_ids for c in cached}) >= 2


def test_cached_path_refuses_a_bridge(tiny):
    ps = counterfactual_prompts(["Poland"], pairs=1, seed=0)
    bridge = tiny.bridge(compat=True)
    with scale_heads(bridge, {(0, 0): -1.0}):
        with pytest.raises(ConfigError, match="use_cache"):
            generate_continuations(bridge, ps, use_cache=True)
