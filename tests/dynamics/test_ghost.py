"""Ghost inner products (preflens.dynamics.ghost via entanglement.pair_gradient_stats) vs exact.

Independent reference: per-response gradients by ``.backward()`` through the plain HF logits
(full log-softmax of ``model(input_ids).logits``, no preflens scoring or ghost code), flattened
over the selected parameters, float64.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from preflens.data import PreferencePair
from preflens.dynamics.entanglement import (
    cross_pair_gram,
    pair_gradient_norms,
    pair_gradient_stats,
)
from preflens.dynamics.ghost import PRESETS, select_parameters
from preflens.errors import ConfigError, ModelError
from preflens.models import load_model
from preflens.scoring import encode

# several lengths: 1-word responses (2 tokens with EOS) up to ~20 tokens, repeated tokens
PAIRS = [
    PreferencePair("The capital of France is", " Paris.", " Rome, said the fox."),
    PreferencePair("Q: What is the capital of Italy?\nA:", " Rome", " Warsaw. The quick brown fox jumps"),
    PreferencePair("Human: How do I bake bread? Assistant:", " Mix flour, water, salt and yeast",
                   " Never."),
    PreferencePair("Yes", " No", " No No No"),
]


def as_f64(lm):
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model).double().eval())


def reference_grads(lm, pair, names):
    """(g_w, g_l, u_w, u_l) by plain autograd through HF logits; flattened float64 over ``names``."""
    model = lm.model
    params = dict(model.named_parameters())
    out = []
    for resp in (pair.chosen, pair.rejected):
        p_ids = lm.tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
        r_ids = lm.tokenizer(resp, add_special_tokens=False)["input_ids"] + [lm.eos_id]
        ids = torch.tensor([p_ids + r_ids])
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
        u = sum(logp[len(p_ids) - 1 + k, r] for k, r in enumerate(r_ids))
        model.zero_grad(set_to_none=True)
        u.backward()
        g = torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]))
                       .double().flatten() for n in names])
        out.append((g, u.item()))
    model.zero_grad(set_to_none=True)
    return out[0][0], out[1][0], out[0][1], out[1][1]


@pytest.fixture(scope="module")
def tiny64(tiny):
    return as_f64(tiny)


def test_exact_matches_independent_autograd(tiny64):
    stats = pair_gradient_stats(tiny64, PAIRS, method="exact")
    for i, pair in enumerate(PAIRS):
        gw, gl, uw, ul = reference_grads(tiny64, pair, stats.params)
        assert stats.inner[i].item() == pytest.approx((gw @ gl).item(), rel=1e-10)
        assert stats.norm_w_sq[i].item() == pytest.approx((gw @ gw).item(), rel=1e-10)
        assert stats.norm_l_sq[i].item() == pytest.approx((gl @ gl).item(), rel=1e-10)
        assert stats.u_w[i].item() == pytest.approx(uw, rel=1e-12)
        assert stats.u_l[i].item() == pytest.approx(ul, rel=1e-12)
    # all parameters: the tied wte/lm_head counted once
    assert len(stats.params) == len(list(tiny64.model.parameters()))
    assert stats.len_w.tolist() == [len(e.response_ids) for e in encode(
        tiny64.tokenizer, [p.prompt for p in PAIRS], [p.chosen for p in PAIRS])]


def _assert_close(a, b, tol):
    scale = (b.norm_w_sq * b.norm_l_sq).sqrt()
    assert ((a.inner - b.inner).abs() / scale).max() <= tol
    assert ((a.norm_w_sq - b.norm_w_sq).abs() / b.norm_w_sq).max() <= tol
    assert ((a.norm_l_sq - b.norm_l_sq).abs() / b.norm_l_sq).max() <= tol


@pytest.mark.parametrize("params", [None, "unembed", "last_block", "embeddings", "attention", "mlp",
                                    r"ln_", ["transformer.wpe.weight", "lm_head.weight"]])
@pytest.mark.parametrize("include_layernorm", [True, False])
def test_ghost_equals_exact_float64(tiny64, params, include_layernorm):
    if params == r"ln_" and not include_layernorm:
        with pytest.raises(ConfigError, match="norms excluded"):
            pair_gradient_stats(tiny64, PAIRS, params=params, include_layernorm=False)
        return
    kw = dict(params=params, include_layernorm=include_layernorm)
    ghost = pair_gradient_stats(tiny64, PAIRS, method="ghost", batch_size=3, **kw)
    exact = pair_gradient_stats(tiny64, PAIRS, method="exact", **kw)
    assert ghost.params == exact.params
    _assert_close(ghost, exact, 1e-11)
    assert torch.allclose(ghost.u_w, exact.u_w, rtol=0, atol=1e-11)
    assert (ghost.cos.abs() <= 1).all()


def test_layernorm_option_changes_the_quantity(tiny64):
    full = pair_gradient_stats(tiny64, PAIRS, method="exact")
    no_ln = pair_gradient_stats(tiny64, PAIRS, method="exact", include_layernorm=False)
    assert not any("ln_" in n for n in no_ln.params)
    assert len(full.params) - len(no_ln.params) == 10  # 2 blocks x 2 LNs + ln_f, weight + bias
    assert ((full.norm_w_sq - no_ln.norm_w_sq) > 0).all()


def test_ghost_untied_head_with_bias(tiny64):
    """Untied lm_head with an output bias: no cross terms, bias term (Σδ)·(Σδ')."""
    model = copy.deepcopy(tiny64.model)
    head = model.lm_head
    head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone() * 1.3)
    head.bias = torch.nn.Parameter(0.1 * torch.randn(head.weight.shape[0], dtype=torch.float64))
    lm = dataclasses.replace(tiny64, model=model)
    for params in (None, "unembed", "embeddings"):
        ghost = pair_gradient_stats(lm, PAIRS, method="ghost", params=params)
        exact = pair_gradient_stats(lm, PAIRS, method="exact", params=params)
        _assert_close(ghost, exact, 1e-11)
    assert set(select_parameters(model, "unembed")) == {"lm_head.weight", "lm_head.bias"}


def test_ghost_batching_invariant(tiny64):
    one = pair_gradient_stats(tiny64, PAIRS, batch_size=1)
    all_ = pair_gradient_stats(tiny64, PAIRS, batch_size=len(PAIRS))
    _assert_close(one, all_, 1e-12)


def test_norms_and_gram(tiny64):
    stats = pair_gradient_stats(tiny64, PAIRS, method="exact")
    prompts = [p.prompt for p in PAIRS]
    enc_w = encode(tiny64.tokenizer, prompts, [p.chosen for p in PAIRS])
    enc_l = encode(tiny64.tokenizer, prompts, [p.rejected for p in PAIRS])
    model = tiny64.model.train()  # must run in eval mode and restore the mode
    n_w, n_l = pair_gradient_norms(model, enc_w, enc_l, pad_id=tiny64.pad_id)
    assert model.training
    model.eval()
    assert all(p.grad is None for p in model.parameters())
    assert torch.allclose(n_w, stats.norm_w, rtol=1e-11) and torch.allclose(n_l, stats.norm_l, rtol=1e-11)
    gram = cross_pair_gram(tiny64, PAIRS[:3])
    refs = [reference_grads(tiny64, p, stats.params) for p in PAIRS[:3]]
    flat = torch.stack([r[0] for r in refs] + [r[1] for r in refs])
    assert torch.allclose(gram, flat @ flat.T, rtol=1e-10, atol=1e-9 * gram.abs().max())


def test_parameter_selection(tiny):
    m = tiny.model
    assert list(select_parameters(m, "unembed")) == ["transformer.wte.weight"]  # tied: one tensor
    assert list(select_parameters(m, ["lm_head.weight"])) == ["transformer.wte.weight"]
    assert set(select_parameters(m, "embeddings")) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(n.startswith("transformer.h.1.") for n in select_parameters(m, "last_block"))
    assert len(select_parameters(m, "last_block")) == 12
    assert all(".attn." in n for n in select_parameters(m, "attention"))
    assert all(".mlp." in n for n in select_parameters(m, "mlp"))
    for bad in ("no_such_param_xyz", "(", ["transformer.nope"], 3):
        with pytest.raises(ConfigError) as err:
            select_parameters(m, bad)
        assert all(p in str(err.value) for p in PRESETS)
    with pytest.raises(ConfigError, match="method"):
        pair_gradient_stats(tiny, PAIRS, method="vmap")
    frozen = copy.deepcopy(m)
    frozen.transformer.wpe.weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen"):
        select_parameters(frozen, ["transformer.wpe.weight"])
    assert "transformer.wpe.weight" not in select_parameters(frozen, None)


def test_ghost_rejects_unsupported_parameters(tiny64):
    model = copy.deepcopy(tiny64.model)
    model.transformer.extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    lm = dataclasses.replace(tiny64, model=model)
    with pytest.raises(ModelError, match="exact"):
        pair_gradient_stats(lm, PAIRS[:1], params=["transformer.extra"])


@pytest.mark.slow
def test_ghost_equals_exact_fp32_gpt2_small_random(gpt2_random):
    """Spec target: ≤ 1e-4 relative error in fp32 (2 short pairs: exact grads are 124M floats)."""
    pairs = [PAIRS[0], PreferencePair("Yes", " No", " Maybe")]
    ghost = pair_gradient_stats(gpt2_random, pairs, method="ghost")
    exact = pair_gradient_stats(gpt2_random, pairs, method="exact")
    _assert_close(ghost, exact, 1e-4)


def test_ghost_equals_exact_fp32_toyworld():
    lm = load_model("toyworld", device="cpu")  # shipped: a load failure is a failure, not a skip
    # in-vocabulary text (decoding arbitrary word-level ids does not round-trip: unknown words)
    pairs = [PreferencePair("Q: What is the capital of France?\nA:", " Paris.",
                            " The capital of France is Warsaw."),
             PreferencePair("The capital of Japan is", " Tokyo", " Rome.")]
    ghost = pair_gradient_stats(lm, pairs, method="ghost")
    exact = pair_gradient_stats(lm, pairs, method="exact")
    _assert_close(ghost, exact, 1e-4)


def _streamed_vs_stored(model, enc_w, enc_l, pad_id, params=None):
    """pair_dots (streaming, per-layer mixed form) vs run + dots (stored activations, Gram form)."""
    from preflens.dynamics.ghost import GhostCapture
    from preflens.scoring import collate

    sel = select_parameters(model, params)
    batch = collate(list(enc_w) + list(enc_l), pad_id=pad_id)
    k = len(enc_w)
    stored = GhostCapture(model, sel)
    stored.run(batch)
    W, L = slice(0, k), slice(k, 2 * k)
    want = [stored.dots(W, W), stored.dots(L, L), stored.dots(W, L)]
    got = GhostCapture(model, sel).pair_dots(batch, k)
    return got, want


def test_streaming_per_row_gradient_branch_and_vocab_chunks_match(monkeypatch):
    """Long rows make every tiny-random linear map take the per-row-gradient form
    (pairings·S²·(d_in+d_out) > rows·S·d_in·d_out); a small chunk streams the vocabulary."""
    import preflens.dynamics.ghost as ghost

    lm = as_f64(load_model("tiny-random", device="cpu"))
    words = " alpha beta gamma delta epsilon zeta eta theta" * 5
    enc_w = encode(lm.tokenizer, ["Start:", "Other start here"], [words, words[:120]])
    enc_l = encode(lm.tokenizer, ["Start:", "Other start here"], [words[:150], " short"])
    assert max(len(e) for e in enc_w + enc_l) > 90  # 3·S²·(64+64) > 4·S·64·64 for S > ~43
    calls = {"per_row": 0}
    real_matmul = torch.matmul

    def counting(a, b, *args, **kw):  # count per-row gradient products [rows, d_in, S] @ [rows, S, d_out]
        if a.dim() == 3 and b.dim() == 3 and a.shape[1] == 64 and a.shape[2] == b.shape[1] > 90:
            calls["per_row"] += 1
        return real_matmul(a, b, *args, **kw)

    monkeypatch.setattr(ghost, "HEAD_CHUNK_ELEMS", 1000)  # ~256-column vocabulary chunks
    monkeypatch.setattr(torch, "matmul", counting)
    got, want = _streamed_vs_stored(lm.model, enc_w, enc_l, lm.pad_id)
    monkeypatch.setattr(torch, "matmul", real_matmul)
    assert calls["per_row"] > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=0)


def test_token_budget_splits_batches_without_changing_results():
    from preflens.dynamics.entanglement import encoded_gradient_stats
    import preflens.dynamics.entanglement as ent

    lm = as_f64(load_model("tiny-random", device="cpu"))
    enc_w = encode(lm.tokenizer, [p.prompt for p in PAIRS], [p.chosen for p in PAIRS])
    enc_l = encode(lm.tokenizer, [p.prompt for p in PAIRS], [p.rejected for p in PAIRS])
    one = encoded_gradient_stats(lm.model, enc_w, enc_l, pad_id=lm.pad_id, batch_size=8)
    old = ent.GHOST_CPU_MAX_TOKENS
    try:
        ent.GHOST_CPU_MAX_TOKENS = 2 * max(max(len(a), len(b)) for a, b in zip(enc_w, enc_l))  # 1 pair each
        split = encoded_gradient_stats(lm.model, enc_w, enc_l, pad_id=lm.pad_id, batch_size=8)
    finally:
        ent.GHOST_CPU_MAX_TOKENS = old
    for f in ("inner", "norm_w_sq", "norm_l_sq", "u_w", "u_l"):
        torch.testing.assert_close(getattr(split, f), getattr(one, f), rtol=1e-12, atol=1e-12)
