"""Head lenses on every family: DLA sums to the pre-cap logit difference computed on the HF
module; scale_heads acts on exactly one query head (GQA), α = 1 is the identity and α = 0 equals
zero-ablating that head's slice of the HF output-projection input."""

from __future__ import annotations

import pytest
import torch

from preflens.attribution.heads import head_logit_attribution, logit_decomposition
from preflens.attribution.recall import generate_continuations
from preflens.data.recall_prompts import counterfactual_prompts
from preflens.attribution.scaling import scale_heads
from preflens.errors import ModelError

PROMPTS = counterfactual_prompts(["Poland", "France", "Japan", "Italy"])[:5]
BIAS_V = ("gpt2", "gpt_neox", "qwen2")  # families with a value bias (folded into b_O in compat)


def _out_proj(model, family: str, layer: int):
    """The HF module whose input is the concatenation of the heads' z (head-major)."""
    if family == "gpt2":
        return model.transformer.h[layer].attn.c_proj
    if family == "gpt_neox":
        return model.gpt_neox.layers[layer].attention.dense
    return model.model.layers[layer].self_attn.o_proj


def _precap_logits(lm, ids):
    """Independent: HF final hidden state (after the final norm) times the unembedding."""
    with torch.no_grad():
        h = lm.model.base_model(input_ids=ids).last_hidden_state
    head = lm.model.get_output_embeddings()
    z = h @ head.weight.T
    return z + head.bias if getattr(head, "bias", None) is not None else z


def test_dla_total_is_the_precap_logit_difference(lm, family):
    d = logit_decomposition(lm, PROMPTS)
    per = head_logit_attribution(lm, PROMPTS, per_prompt=True)
    L, H = per.shape[:2]
    assert H == 4  # query heads, also under GQA (2 KV heads)
    torch.testing.assert_close(per.reshape(L * H, -1), d.components[: L * H])
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([lm.tokenizer(p.text)["input_ids"]])  # BOS as the tokenizer adds it
        z = _precap_logits(lm, ids)[0, -1]
        want = float(z[d.ic_ids[i]] - z[d.mem_ids[i]])
        scale = max(1.0, float(z.abs().max()))
        assert float(d.total()[i]) == pytest.approx(want, abs=2e-5 * scale)
        assert float(d.logit_diff[i]) == pytest.approx(want, abs=2e-5 * scale)


def test_post_norm_dla_needs_the_lm_not_only_a_bridge(family_lms):
    lm = family_lms["gemma2"]  # post-attention/post-MLP norms: TL's decomposition leaves them out
    with pytest.raises(ModelError, match="post-norms"):
        head_logit_attribution(None, PROMPTS, bridge=lm.bridge(compat=True))


@pytest.mark.parametrize("compat", [False, True])
def test_alpha_zero_ablates_one_query_head_alpha_one_is_identity(lm, family, compat):
    if compat and family in BIAS_V:
        pytest.skip("compat mode folds b_V into b_O: α = 0 keeps b_V·W_O (the paper's "
                    "intervention), so it is not the HF slice ablation")
    layer, head = 1, 3  # head 3 >= n_kv_heads = 2 under GQA
    bridge = lm.bridge(compat=compat)
    ids = torch.tensor([lm.tokenizer(PROMPTS[0].text)["input_ids"]])
    d_head = int(bridge.cfg.d_head)

    def zero_head(mod, args):
        x = args[0].clone()
        x[..., head * d_head: (head + 1) * d_head] = 0
        return (x,)

    with torch.no_grad():
        base = bridge(ids, return_type="logits")
        with scale_heads(bridge=bridge, scales={(layer, head): 1.0}):
            same = bridge(ids, return_type="logits")
        with scale_heads(bridge=bridge, scales={(layer, head): 0.0}):
            ablated = bridge(ids, return_type="logits")
        handle = _out_proj(lm.model, family, layer).register_forward_pre_hook(zero_head)
        try:
            hf = lm.model(input_ids=ids).logits
        finally:
            handle.remove()
    assert torch.equal(same, base)
    assert float((ablated - base).abs().max()) > 1e-3  # the head matters
    # compat mode centres the unembedding: compare log-probs (shift-invariant)
    torch.testing.assert_close(ablated.log_softmax(-1), hf.log_softmax(-1), rtol=1e-4, atol=2e-4)


def test_generation_prompts_start_with_bos_like_scoring(lm, family):
    from preflens.scoring import bos_prefix

    bridge = lm.bridge(compat=True)
    seen = []

    def record(x, hook):
        seen.append(x.shape[1])

    with bridge.hooks(fwd_hooks=[("hook_embed", record)]):
        generate_continuations(bridge, PROMPTS[:1], max_new_tokens=1)
    n_text = len(lm.tokenizer(PROMPTS[0].text, add_special_tokens=False)["input_ids"])
    assert seen[0] == n_text + len(bos_prefix(lm.tokenizer))


def test_bridge_with_other_bos_setting_is_refused(family_lms):
    lm = family_lms["llama"]
    bridge = lm.bridge(compat=True)
    bridge.cfg.default_prepend_bos = False
    with pytest.raises(ModelError, match="BOS"):
        head_logit_attribution(lm, PROMPTS, bridge=bridge)
