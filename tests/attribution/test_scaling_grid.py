"""Tests of preflens.attribution.scaling.scaling_grid: several heads, each with its own α (Yu et
al. 2023, Sec. 6), on a tiny random GPT-2 bridge with randomized LayerNorm weights."""

from __future__ import annotations

import pytest
import torch

from preflens.attribution.recall import LABELS, generate_continuations
from preflens.attribution.scaling import scaling_grid, scaling_sweep
from preflens.data.recall_prompts import counterfactual_prompts
from preflens.errors import ConfigError
from preflens.models import load_model
from tests.families.builders import _randomize_norms

PROMPTS = counterfactual_prompts(["Poland", "United Kingdom", "Chad", "Bolivia"], pairs=2)


@pytest.fixture(scope="module")
def tiny():
    """tiny-random with random LayerNorm weights and biases (folded into the compat bridge) and an
    untied random unembedding (varied greedy outputs)."""
    lm = load_model("tiny-random", device="cpu")
    g = torch.Generator().manual_seed(3)
    _randomize_norms(lm.model, g)
    lm.model.lm_head.weight = torch.nn.Parameter(torch.randn(lm.model.lm_head.weight.shape, generator=g))
    lm.model.config.tie_word_embeddings = False
    return lm, lm.bridge(compat=True)


def _manual_z(heads_alpha: dict[int, float]):
    """An independent per-head scaling of ``hook_z`` ``[batch, pos, head, d_head]``."""
    def f(z, hook):
        out = z.clone()
        for h, a in heads_alpha.items():
            out[:, :, h] = z[:, :, h] * a
        return out

    return f


def _recorded(bridge, run):
    """Every final residual stream (``blocks.{L-1}.hook_resid_post``) of every forward in ``run()``."""
    seen = []
    name = f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"
    with bridge.hooks(fwd_hooks=[(name, lambda x, hook: seen.append(x.detach().clone()))]):
        out = run()
    return out, seen


def _strip(row, *keys):
    return {k: v for k, v in row.items() if k not in keys}


def test_grid_equals_sweep_for_single_heads(tiny):
    lm, bridge = tiny
    alphas = [1.0, -2.0, 0.0]
    sweep = scaling_sweep(lm, PROMPTS, (1, 2), alphas, bridge=bridge, max_new_tokens=4)
    grid = scaling_grid(lm, PROMPTS, [{(1, 2): a} for a in alphas], bridge=bridge, max_new_tokens=4)
    assert [r["scales"] for r in grid] == [[[1, 2, a]] for a in alphas]
    assert [_strip(r, "alpha") for r in sweep] == [_strip(r, "scales") for r in grid]
    # and both equal an independent hook's labels
    for a, row in zip(alphas, grid):
        with bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_z", _manual_z({2: a}))]):
            conts = generate_continuations(bridge, PROMPTS, max_new_tokens=4)
        assert row["counts"] == {lab: sum(c.label == lab for c in conts) for lab in LABELS}
        assert row["n"] == len(PROMPTS) and sum(row[lab] for lab in LABELS) == pytest.approx(1.0)


def test_two_heads_get_their_own_alphas(tiny):
    """{(0, 1): −2, (1, 2): 3} scales exactly those heads by those αs at every generation step."""
    lm, bridge = tiny
    setting = {(0, 1): -2.0, (1, 2): 3.0}
    (row,), got = _recorded(bridge, lambda: scaling_grid(lm, PROMPTS[:3], [setting], bridge=bridge,
                                                           max_new_tokens=3, batch_size=8))
    assert row["scales"] == [[0, 1, -2.0], [1, 2, 3.0]]
    manual = [("blocks.0.attn.hook_z", _manual_z({1: -2.0})), ("blocks.1.attn.hook_z", _manual_z({2: 3.0}))]

    def reference():
        with bridge.hooks(fwd_hooks=manual):
            return generate_continuations(bridge, PROMPTS[:3], max_new_tokens=3, batch_size=8)

    _, want = _recorded(bridge, reference)
    assert len(got) == len(want) == 3  # one forward per new token
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    # the αs are per head: swapping them, or scaling only one head, changes the forward passes
    for other in ({(0, 1): 3.0, (1, 2): -2.0}, {(0, 1): -2.0}):
        _, alt = _recorded(bridge, lambda: scaling_grid(lm, PROMPTS[:3], [other], bridge=bridge,
                                                          max_new_tokens=3, batch_size=8))
        assert (alt[0] - got[0]).abs().max() > 1e-3


def test_empty_setting_is_the_baseline_and_triples_equal_dicts(tiny):
    lm, bridge = tiny
    base = generate_continuations(bridge, PROMPTS, max_new_tokens=4)
    rows = scaling_grid(lm, PROMPTS, [{}, [(0, 3, 0.0), (1, 0, 2.0)], {(1, 0): 2.0, (0, 3): 0.0}],
                        bridge=bridge, max_new_tokens=4)
    assert rows[0]["scales"] == [] and rows[0]["counts"] == {lab: sum(c.label == lab for c in base) for lab in LABELS}
    assert rows[1] == rows[2]


def test_bad_settings_rejected_before_any_generation(tiny):
    lm, bridge = tiny
    for bad, where in (([{}, {(2, 0): 1.0}], "settings[1]"), ([{(0, 4): 2.0}], "settings[0]"),
                       ([{}, {}, {(0, 0): float("inf")}], "settings[2]")):
        calls = []
        with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: calls.append(1))]):
            with pytest.raises(ConfigError) as err:
                scaling_grid(lm, PROMPTS, bad, bridge=bridge, max_new_tokens=2)
        assert where in str(err.value) and not calls, (bad, str(err.value))
