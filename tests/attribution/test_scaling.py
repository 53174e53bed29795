"""Tests of preflens.attribution.scaling (factual_recall.md §6)."""

from __future__ import annotations

import pytest
import torch

from preflens.attribution.heads import head_logit_attribution, select_heads
from preflens.attribution.recall import generate_continuations
from preflens.attribution.scaling import alpha_grid, scale_heads, scaling_sweep
from preflens.data.capitals import CapitalRow, CapitalsWorld
from preflens.data.recall_prompts import counterfactual_prompts
from preflens.errors import ConfigError
from preflens.models import load_model
from preflens.toyworld import ASSETS_DIR as TOYWORLD_DIR


@pytest.fixture(scope="module")
def tiny():
    """tiny-random with an untied random unembedding (varied greedy outputs), compat bridge."""
    lm = load_model("tiny-random", device="cpu")
    g = torch.Generator().manual_seed(7)
    lm.model.lm_head.weight = torch.nn.Parameter(torch.randn(lm.model.lm_head.weight.shape, generator=g))
    lm.model.config.tie_word_embeddings = False
    return lm, lm.bridge(compat=True)


def _ids(lm, prompt):
    return torch.tensor([lm.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]])


PROMPTS = counterfactual_prompts(["Poland", "United Kingdom", "Chad", "Bolivia"], pairs=2)


def _z_hook(heads_alpha):
    def f(z, hook):  # z: [batch, pos, head, d_head]
        z = z.clone()
        for h, a in heads_alpha.items():
            z[:, :, h] = z[:, :, h] * a
        return z

    return f


def test_alpha_one_changes_nothing(tiny):
    lm, bridge = tiny
    base = generate_continuations(bridge, PROMPTS, batch_size=8)
    with scale_heads(bridge, {(1, 2): 1.0, (0, 0): 1.0}):
        same = generate_continuations(bridge, PROMPTS, batch_size=8)
    assert same == base  # token for token
    with torch.no_grad(), scale_heads(bridge, {(1, 2): 1.0}):
        assert torch.equal(bridge(_ids(lm, PROMPTS[0])), bridge(_ids(lm, PROMPTS[0])))


@pytest.mark.parametrize("alpha", [0.0, -1.5, 3.0])
def test_hook_v_scaling_equals_hook_z_scaling(tiny, alpha):
    lm, bridge = tiny
    ids = _ids(lm, PROMPTS[1])
    with torch.no_grad():
        base = bridge(ids)
        with scale_heads(bridge, [(1, 2, alpha), (0, 1, alpha)]):
            via_v = bridge(ids)
        hooks = [("blocks.1.attn.hook_z", _z_hook({2: alpha})), ("blocks.0.attn.hook_z", _z_hook({1: alpha}))]
        with bridge.hooks(fwd_hooks=hooks):
            via_z = bridge(ids)
    assert (via_v - base).abs().max() > 1e-3  # the intervention does something
    assert torch.allclose(via_v, via_z, atol=1e-5)


def test_alpha_zero_equals_zero_ablating_head_output(tiny):
    lm, bridge = tiny
    ids = _ids(lm, PROMPTS[2])
    with torch.no_grad():
        with scale_heads(bridge, {(0, 3): 0.0}):
            scaled = bridge(ids)
        # independent route: remove z @ W_O of head (0, 3) from attn's output projection input
        def zero_z(z, hook):
            z = z.clone()
            z[:, :, 3] = 0.0
            return z

        with bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_z)]):
            ablated = bridge(ids)
    assert torch.allclose(scaled, ablated, atol=1e-5)


def test_scaling_applies_at_every_generation_step(tiny):
    lm, bridge = tiny
    calls = []

    def count(v, hook):
        calls.append(v.shape[1])
        return v

    with bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_v", count)]):
        with scale_heads(bridge, {(1, 0): -2.0}):
            out = generate_continuations(bridge, PROMPTS[:1], max_new_tokens=5)
    assert len(out[0].token_ids) == 5 and len(calls) == 5  # every step, full sequence re-run
    assert calls == sorted(calls) and calls[-1] - calls[0] == 4


def test_hooks_removed_on_exit_and_error(tiny):
    lm, bridge = tiny
    ids = _ids(lm, PROMPTS[0])
    with torch.no_grad():
        base = bridge(ids)
        with pytest.raises(RuntimeError):
            with scale_heads(bridge, {(1, 1): -3.0}):
                raise RuntimeError("boom")
        assert torch.equal(bridge(ids), base)


def test_bad_heads_rejected(tiny):
    _, bridge = tiny
    for bad in ({(2, 0): 1.0}, {(0, 4): 1.0}, {(0, 0): float("nan")}):
        with pytest.raises(ConfigError):
            with scale_heads(bridge, bad):
                pass


def test_alpha_grid():
    g = alpha_grid(-5, 5, 0.1)
    assert 0.0 in g and 1.0 in g and g[0] == -5.0 and g[-1] == 5.0 and len(g) == 101
    assert all(str(a) == str(round(a, 6)) for a in g)
    assert alpha_grid(-10, -9, 0.5) == [-10.0, -9.5, -9.0, 0.0, 1.0]


def test_scaling_sweep_rows(tiny):
    lm, bridge = tiny
    rows = scaling_sweep(lm, PROMPTS, (1, 2), [1.0, 0.0], bridge=bridge, max_new_tokens=4)
    assert [r["alpha"] for r in rows] == [1.0, 0.0]
    for r in rows:
        assert r["n"] == len(PROMPTS) and sum(r["counts"].values()) == r["n"]
        assert r["memorized"] + r["in_context"] + r["neither"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- toyworld
@pytest.mark.slow
def test_toyworld_head_chosen_on_tuning_prompts_raises_held_out_in_context():
    """The recipe's protocol on disjoint seeded prompt sets (Yu et al. 2023 chose heads and α on
    a tuning set, §5.3.4 and §6.2): every head at α = ±3 on the tuning prompts, the best (head,
    α) by in-context rate; on held-out prompts it raises the in-context rate over α = 1 and
    lowers the memorized rate. Every head is tried, not only DLA's memory heads: on toyworld v2
    the head that steers best is not one DLA ranks as a memory head (README), so the test also
    checks that DLA's top memory head is not the winner here — both are properties of the
    shipped checkpoint, measured by the factual-recall recipe."""
    for f in ("config.json", "world.json"):
        assert (TOYWORLD_DIR / f).is_file(), f"the shipped toyworld checkpoint lacks {TOYWORLD_DIR / f}"
    from preflens.data.toyworld.world import load_world

    spec = load_world(TOYWORLD_DIR / "world.json")
    world = CapitalsWorld(tuple(CapitalRow(c, k) for c, k in zip(spec.countries, spec.capitals)), {})
    lm = load_model("toyworld", device="cpu")
    bridge = lm.bridge(compat=True)
    tune = counterfactual_prompts(world=world, pairs=1, seed=11)
    top_memory = select_heads(head_logit_attribution(bridge, tune), k=1)["memory"][0][:2]
    kw = dict(bridge=bridge, max_new_tokens=6, batch_size=64)
    heads = [(l, h) for l in range(bridge.cfg.n_layers) for h in range(bridge.cfg.n_heads)]
    best = max((r["in_context"], head, r["alpha"]) for head in heads
               for r in scaling_sweep(lm, tune, head, [-3.0, 3.0], **kw))
    held_out = counterfactual_prompts(world=world, pairs=1, seed=12)
    base, scaled = scaling_sweep(lm, held_out, best[1], [1.0, best[2]], **kw)
    assert scaled["in_context"] > base["in_context"] + 0.15, (best, base, scaled)
    assert scaled["memorized"] < base["memorized"], (best, base, scaled)
    assert best[1] != tuple(top_memory), (best, top_memory)
