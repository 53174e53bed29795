"""Exact DLA on post-norm blocks (Gemma 2/3, OLMo 2): the components sum to the pre-cap logits
(fp64), and each head's value equals an independent computation from the HF attention
probabilities, value projection and the norms' own input/output ratios."""

from __future__ import annotations

import copy

import pytest
import torch

from preflens.attribution.heads import head_logit_attribution
from preflens.attribution.postnorm import decompose, post_norm_model
from preflens.data.recall_prompts import counterfactual_prompts
from tests.families.builders import _randomize_norms, build_family

PROMPTS = counterfactual_prompts(["Poland", "France"])[:3]


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from preflens.models import load_model

    d = build_family("gemma2", tmp_path_factory.mktemp("g2") / "m", seed=3, logit_scale=50.0)
    return load_model(str(d), device="cpu")


def _ids(lm, text):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])  # BOS as the tokenizer adds it


def _tiny(kind: str, seed: int = 0):
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    if kind == "gemma3":
        cfg = tf.Gemma3TextConfig(head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                  final_logit_softcapping=30.0, **small)
        cls = tf.Gemma3ForCausalLM
    else:
        cfg, cls = tf.Olmo2Config(**small), tf.Olmo2ForCausalLM
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    _randomize_norms(m, torch.Generator().manual_seed(seed + 1))
    return m


def _check_total(model, ids, rel=1e-6):  # Gemma norms compute in fp32 inside
    d = decompose(model, ids, torch.arange(ids.shape[1]))
    with torch.no_grad():
        h = model.base_model(input_ids=ids).last_hidden_state.double()
    want = h @ model.get_output_embeddings().weight.double().T  # pre-cap logits
    got = d.stack.sum(0) @ d.W_U.T + d.b_U
    assert float((got - want).abs().max()) <= rel * float(want.abs().max())
    torch.testing.assert_close(d.precap, want, rtol=0, atol=rel * float(want.abs().max()))
    return d


def test_total_is_the_precap_logits_fp64(gemma2):
    model = copy.deepcopy(gemma2.model).double()
    d = _check_total(model, _ids(gemma2, PROMPTS[0].text))
    assert d.labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    assert d.labels[-4:] == ["0_mlp_out", "1_mlp_out", "embed", "bias"]
    # soft-capping is after the decomposition: the model's own logits are capped
    with torch.no_grad():
        capped = model(input_ids=_ids(gemma2, PROMPTS[0].text)).logits.double()
    assert float(d.precap.abs().max()) > 30.0 >= float(capped.abs().max())


@pytest.mark.parametrize("kind", ["gemma3", "olmo2"])
def test_other_post_norm_families_sum_exactly(kind):
    model = _tiny(kind).double()
    _check_total(model, torch.tensor([[1, 5, 9, 2, 33, 7]]))


def _independent_heads(lm, ids, pos, t, f):
    """Per-head direct effect from HF tensors only: z_h = A_h @ V_{h // group} (eager attention
    probabilities, v_proj of the block's input norm), the post-attention and final norms frozen
    as the ratio of their own output to input."""
    model = lm.model
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    io = {}
    hooks = [b.post_attention_layernorm.register_forward_hook(
        lambda m, a, o, l=l: io.__setitem__(l, (a[0], o))) for l, b in enumerate(model.model.layers)]
    hooks.append(model.model.norm.register_forward_hook(
        lambda m, a, o: io.__setitem__("final", (a[0], o))))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    W = model.get_output_embeddings().weight.double()
    direction = W[t] - W[f]
    x, y = io["final"]
    final = (y / x)[0, pos].double()
    res = torch.zeros(len(model.model.layers), H, dtype=torch.float64)
    for l, b in enumerate(model.model.layers):
        attn = b.self_attn
        v = attn.v_proj(b.input_layernorm(out.hidden_states[l]))[0]          # [S, KV*d]
        d_head = v.shape[-1] // KV
        v = v.reshape(v.shape[0], KV, d_head)
        A = out.attentions[l][0]                                             # [H, S, S]
        xa, ya = io[l]
        post = (ya / xa)[0, pos].double()
        for h in range(H):
            z = A[h, pos] @ v[:, h // (H // KV)]                             # [d_head]
            r = z.double() @ attn.o_proj.weight[:, h * d_head:(h + 1) * d_head].double().T
            res[l, h] = float((r * post * final) @ direction)
    return res


def test_heads_match_an_independent_computation(gemma2):
    per = head_logit_attribution(gemma2, PROMPTS, per_prompt=True)        # [L, H, n]
    assert per.shape[:2] == (2, 4)
    for i, p in enumerate(PROMPTS):
        ids = _ids(gemma2, p.text)
        with torch.no_grad():
            h = gemma2.model.base_model(input_ids=ids).last_hidden_state[0, -1]
        pre = h @ gemma2.model.get_output_embeddings().weight.T
        t = gemma2.tokenizer(" " + p.in_context, add_special_tokens=False)["input_ids"][0]
        mems = [gemma2.tokenizer(" " + m, add_special_tokens=False)["input_ids"][0]
                for m in p.memorized]
        f = max(mems, key=lambda k: float(pre[k]))
        want = _independent_heads(gemma2, ids, ids.shape[1] - 1, t, f)
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(per[:, :, i].double(), want, rtol=0, atol=1e-4 * scale)
        assert float(per[:, :, i].abs().max()) > 1e-3  # the heads matter


def test_pre_norm_models_use_the_bridge_path(tmp_path):
    from preflens.models import load_model

    lm = load_model(str(build_family("llama", tmp_path / "l", seed=1)), device="cpu")
    assert post_norm_model(lm) is None
    assert post_norm_model(lm.bridge(compat=True)) is None  # a bridge alone: no HF path


def test_dla_tracker_runs_on_gemma2_and_restores_train_mode(gemma2, tmp_path):
    from types import SimpleNamespace

    from preflens.attribution.tracker import DlaTracker, probe_triples
    from preflens.data import PreferencePair

    pairs = [PreferencePair(f"Question {i}: the capital is", " Paris", " Rome") for i in range(3)]
    tr = DlaTracker(gemma2, pairs, every=1)
    assert tr.via == "bridge"
    def state(step):
        return SimpleNamespace(step=step, total_steps=1, epoch=0, metrics={}, model=gemma2.model,
                               lm=gemma2, rank=0, world_size=1, is_main=True, out_dir=tmp_path)

    gemma2.model.train()
    try:
        tr.on_train_begin(state(0))
        row = tr.on_step(state(1))
        assert gemma2.model.training
    finally:
        gemma2.model.eval()
    _, prompts = probe_triples(gemma2, pairs)
    want = head_logit_attribution(gemma2, prompts, per_prompt=True).double()
    assert row["tracked/dla/L0H1"] == pytest.approx(float(want[0, 1].mean()), abs=1e-5)
