"""Tests for preflens.probes.ches (Razin et al. 2024, Definition 2; spec §2-§3)."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from preflens.errors import ConfigError, DataError
from preflens.probes.ches import (
    ches_scores,
    edit_similarity,
    lowest_fraction,
    normalized_edit_distance,
    quantile_subset,
)


def _ref_ches(hp: np.ndarray, hn: np.ndarray, ln: bool = False) -> float:
    """Per-example reference straight from Definition 2 (double loop, float64)."""
    hp, hn = hp.astype(np.float64), hn.astype(np.float64)
    cross = sum(hp[k] @ hn[j] for k in range(len(hp)) for j in range(len(hn)))
    self_ = sum(hp[k] @ hp[j] for k in range(len(hp)) for j in range(len(hp)))
    if ln:
        return cross / (len(hp) * len(hn)) - self_ / len(hp) ** 2
    return cross - self_


def _random_pairs(seed, n=6, d=8):
    g = torch.Generator().manual_seed(seed)
    hx = [torch.randn(d, generator=g) for _ in range(n)]
    def tail():  # 0-4 further positions
        return torch.randn(int(torch.randint(0, 5, (1,), generator=g)), d, generator=g)

    hp = [torch.cat([hx[i][None], tail()]) for i in range(n)]
    hn = [torch.cat([hx[i][None], tail()]) for i in range(n)]
    return hp, hn


# --------------------------------------------------------------------------- pure identities
def test_matches_definition_and_length_normalization():
    hp, hn = _random_pairs(0)
    got = ches_scores(hp, hn)
    got_ln = ches_scores(hp, hn, length_normalized=True)
    assert got.dtype == torch.float64 and got.shape == (len(hp),)
    for i in range(len(hp)):
        a, b = hp[i].numpy(), hn[i].numpy()
        assert math.isclose(got[i].item(), _ref_ches(a, b), rel_tol=1e-10, abs_tol=1e-10)
        want_ln = _ref_ches(a, b, ln=True)
        assert math.isclose(got_ln[i].item(), want_ln, rel_tol=1e-10, abs_tol=1e-10)


def test_single_token_and_identical_responses_give_zero():
    g = torch.Generator().manual_seed(1)
    hx = torch.randn(1, 16, generator=g)
    assert ches_scores([hx], [hx.clone()]).item() == 0.0
    assert ches_scores([hx], [hx.clone()], length_normalized=True).item() == 0.0
    h = torch.randn(7, 16, generator=g)
    assert ches_scores([h], [h.clone()]).item() == 0.0
    assert ches_scores([h], [h.clone()], length_normalized=True).item() == 0.0


def test_not_symmetric():
    hp, hn = _random_pairs(2)
    a, b = ches_scores(hp, hn), ches_scores(hn, hp)
    assert not torch.allclose(a, b)
    # the difference is exactly ||H-||^2 - ||H+||^2
    for i in range(len(hp)):
        sp, sn = hp[i].double().sum(0), hn[i].double().sum(0)
        want = (sn @ sn - sp @ sp).item()
        assert math.isclose((a[i] - b[i]).item(), want, rel_tol=1e-9, abs_tol=1e-9)


def test_fp64_accumulation_no_fp16_overflow():
    # fp16 rows of 100: sums are representable in fp16 but squared sums (~1e9) are not
    hp = torch.full((300, 4), 100.0, dtype=torch.float16)
    hn = torch.full((200, 4), 100.0, dtype=torch.float16)
    got = ches_scores([hp], [hn]).item()
    assert math.isfinite(got)
    assert got == 4 * 30000.0 * 20000.0 - 4 * 30000.0**2


def test_all_alphas_one_in_theorem6_gives_minus_ches():
    hp, hn = _random_pairs(3, n=1)
    hp, hn = hp[0].double(), hn[0].double()
    hidden_terms = -(hp @ hn.T).sum() + (hp @ hp.T).sum()  # Theorem 6 with every α = 1
    assert math.isclose(hidden_terms.item(), -ches_scores([hp], [hn]).item(), rel_tol=1e-12)


def test_bad_inputs_raise():
    with pytest.raises(DataError):
        ches_scores([torch.zeros(2, 3)], [])
    with pytest.raises(DataError):
        ches_scores([torch.zeros(0, 3)], [torch.zeros(1, 3)])
    with pytest.raises(DataError):
        ches_scores([torch.zeros(2, 3)], [torch.zeros(1, 4)])


# --------------------------------------------------------------------------- baselines
@functools.lru_cache(maxsize=None)
def _lev(a: tuple, b: tuple) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_lev(a[1:], b) + 1, _lev(a, b[1:]) + 1, _lev(a[1:], b[1:]) + (a[0] != b[0]))


def test_edit_distance_known_and_brute_force():
    assert math.isclose(normalized_edit_distance(list(b"kitten"), list(b"sitting")), 3 / 7)
    assert normalized_edit_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert normalized_edit_distance([], [4, 5]) == 1.0
    assert normalized_edit_distance([], []) == 0.0
    assert normalized_edit_distance([1, 2, 3, 4], [2, 3, 4, 5]) == 0.5
    assert edit_similarity([1, 2], [1, 3]) == -0.5
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = tuple(rng.integers(0, 4, rng.integers(0, 7)).tolist())
        b = tuple(rng.integers(0, 4, rng.integers(0, 7)).tolist())
        want = _lev(a, b) / max(len(a), len(b), 1)
        assert math.isclose(normalized_edit_distance(a, b), want)


def test_quantile_subset_windows():
    rng = np.random.default_rng(1)
    scores = torch.tensor(rng.permutation(10).astype(float))  # value v sits at index argsort
    order = torch.argsort(scores).tolist()

    def pos(idx):  # sorted positions of returned indices
        return [order.index(i) for i in idx.tolist()]

    assert pos(quantile_subset(scores, 0.0, 3)) == [0, 1, 2]
    assert pos(quantile_subset(scores, 1.0, 3)) == [7, 8, 9]
    assert pos(quantile_subset(scores, 0.5, 3)) == [4, 5, 6]  # centre round(4.5) = 5 (half up)
    assert pos(quantile_subset(scores, 0.5, 4)) == [3, 4, 5, 6]
    assert pos(quantile_subset(scores, 0.9, 4)) == [6, 7, 8, 9]  # centre 8, clipped
    assert pos(quantile_subset(scores, 0.95, 4)) == [6, 7, 8, 9]  # centre 9, clipped
    assert pos(quantile_subset(scores, 0.05, 4)) == [0, 1, 2, 3]  # centre 0, clipped
    assert pos(quantile_subset(scores, 0.0, 10)) == list(range(10))
    nine = torch.arange(9.0)
    assert quantile_subset(nine, 0.25, 3).tolist() == [1, 2, 3]  # centre 2
    assert quantile_subset(nine, 0.25, 4).tolist() == [0, 1, 2, 3]
    assert quantile_subset(nine, 0.75, 1).tolist() == [6]
    with pytest.raises(ConfigError):
        quantile_subset(nine, 1.5, 3)
    with pytest.raises(ConfigError):
        quantile_subset(nine, 0.5, 10)


def test_lowest_fraction():
    scores = torch.tensor(np.random.default_rng(2).normal(size=370))
    idx = lowest_fraction(scores, 0.05)
    assert len(idx) == 19  # the paper's 5% of 370
    assert set(idx.tolist()) == set(torch.argsort(scores)[:19].tolist())
    assert len(lowest_fraction(torch.arange(100.0), 0.15)) == 15
    with pytest.raises(ConfigError):
        lowest_fraction(scores, 0.0)


# --------------------------------------------------------------------------- with a model
@pytest.fixture(scope="module")
def tiny():
    import preflens.models as models
    from preflens.data import PreferencePair

    lm = models.load_model("tiny-random", dtype=torch.float32)
    texts = [
        ("The capital of France is", " Paris.", " a city in Europe that many people visit."),
        ("Q: 2+2?\nA:", " 4", " four, obviously"),
        ("Write a word", " a", " hello"),
        ("One two three four five six", " seven eight nine ten eleven twelve", " seven"),
        ("Hi", " yes", " no"),
        ("Tell me something long", " The quick brown fox jumps over the lazy dog again.", " Sure."),
        ("Alpha", " beta gamma", " beta gamma delta"),
        ("x", " y z w", " y"),
        ("Which is better, tea or coffee?", " Tea is lighter.", " Coffee wakes you up faster."),
    ]
    pairs = [PreferencePair(prompt=p, chosen=c, rejected=r) for p, c, r in texts]
    return lm, pairs


def _hf_hidden(lm, ids):
    out = lm.model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0].double()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def test_batching_and_convention_b(tiny):
    from preflens.probes.ches import ches_for_pairs

    lm, pairs = tiny
    tok = lm.tokenizer
    # convention (b): prompt + response WITHOUT EOS, unpadded,
    # keep last prompt token ... last response token
    conv_b = []
    for p in pairs:
        hs = []
        for resp in (p.chosen, p.rejected):
            pi, ri = _ids(tok, p.prompt), _ids(tok, resp)
            hs.append(_hf_hidden(lm, pi + ri)[len(pi) - 1 :])
            assert hs[-1].shape[0] == len(ri) + 1
        conv_b.append(hs)
    for ln in (False, True):
        one = ches_for_pairs(lm, pairs, batch_size=1, length_normalized=ln)
        eight = ches_for_pairs(lm, pairs, batch_size=8, length_normalized=ln)
        scale = max(one.abs().max().item(), 1.0)
        assert torch.allclose(one, eight, rtol=1e-6, atol=1e-6 * scale)
        for i, (hp, hn) in enumerate(conv_b):
            sp, sn = (hp.mean(0), hn.mean(0)) if ln else (hp.sum(0), hn.sum(0))
            ref = (sp @ sn - sp @ sp).item()
            assert math.isclose(one[i].item(), ref, rel_tol=1e-5, abs_tol=1e-5 * scale)
    same = SimpleNamespace(prompt="Alpha", chosen=" beta gamma", rejected=" beta gamma")
    assert ches_for_pairs(lm, [same], batch_size=1).item() == 0.0  # identical responses
    # in a padded batch only fp32 noise remains (relative to ||H+||^2)
    from preflens.scoring import response_hidden_states

    h_same = response_hidden_states(lm, ["Alpha"], [" beta gamma"])[0].double()
    h_norm2 = h_same.sum(0).square().sum()
    mixed = ches_for_pairs(lm, [same, pairs[0]], batch_size=2)[0].item()
    assert abs(mixed) < 1e-6 * h_norm2.item()


@torch.no_grad()
def test_convention_a_left_padded(tiny):
    """Convention (a): prompt+response+EOS, LEFT-padded (explicit GPT-2 position ids), zero
    positions before the last prompt token, drop the final (EOS) column, sum."""
    from preflens.probes.ches import ches_for_pairs

    lm, pairs = tiny
    tok, eos = lm.tokenizer, lm.tokenizer.eos_token_id
    seqs = {}
    for which in ("chosen", "rejected"):
        rows = [_ids(tok, p.prompt) + _ids(tok, getattr(p, which)) + [eos] for p in pairs]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), eos)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r) :] = torch.tensor(r)
            mask[b, width - len(r) :] = 1
        pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = lm.model(ids, attention_mask=mask, position_ids=pos_ids, output_hidden_states=True)
        h = out.hidden_states[-1].double()
        keep = torch.zeros_like(mask, dtype=torch.bool)
        for b, p in enumerate(pairs):
            start = width - len(rows[b]) + len(_ids(tok, p.prompt)) - 1
            keep[b, start:] = True
        h = (h * keep[..., None])[:, :-1]  # drop the final (EOS) column
        seqs[which] = h.sum(1)
    ref = (seqs["chosen"] * seqs["rejected"]).sum(-1) - (seqs["chosen"] ** 2).sum(-1)
    got = ches_for_pairs(lm, pairs, batch_size=4)
    scale = max(got.abs().max().item(), 1.0)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * scale)


@torch.no_grad()
def test_bridge_states_last_hidden_and_edit_similarity(tiny):
    from preflens.probes.ches import edit_similarity_for_pairs, last_hidden_for_pairs
    from preflens.probes.displacement import unembedding_alignment, unembedding_alignment_from_lm
    from preflens.scoring import response_hidden_states

    lm, pairs = tiny
    tok, eos = lm.tokenizer, lm.tokenizer.eos_token_id
    bridge = lm.bridge()  # raw (no compatibility mode)
    prompts, chosen = [p.prompt for p in pairs], [p.chosen for p in pairs]
    hs = response_hidden_states(lm, prompts, chosen, batch_size=4)
    for p, h in zip(pairs, hs):
        pi, ri = _ids(tok, p.prompt), _ids(tok, p.chosen) + [eos]
        logits, cache = bridge.run_with_cache(torch.tensor([pi + ri]))
        hb = cache["ln_final.hook_out"][0, len(pi) - 1 : len(pi) + len(ri) - 1]
        assert torch.allclose(hb, h, atol=1e-5)
        hf = _hf_hidden(lm, pi + ri)[len(pi) - 1 : len(pi) + len(ri) - 1]
        assert torch.allclose(hf.float(), h, atol=1e-5)
        # h @ W_U + b_U reproduces the logits (raw bridge weights)
        want = logits[0, len(pi) - 1 : len(pi) + len(ri) - 1]
        assert torch.allclose(h @ bridge.W_U + bridge.b_U, want, atol=1e-4)
    a, b = _ids(tok, " yes")[0], _ids(tok, " no")[0]
    from_lm = unembedding_alignment_from_lm(lm, a, b)
    assert torch.allclose(from_lm, unembedding_alignment(bridge.W_U, a, b))

    # last-hidden inner product: state at the final position of prompt+response without EOS
    got = last_hidden_for_pairs(lm, pairs, batch_size=3)
    for i, p in enumerate(pairs):
        hp = _hf_hidden(lm, _ids(tok, p.prompt) + _ids(tok, p.chosen))[-1]
        hn = _hf_hidden(lm, _ids(tok, p.prompt) + _ids(tok, p.rejected))[-1]
        assert math.isclose(got[i].item(), (hp @ hn).item(), rel_tol=1e-5, abs_tol=1e-5)

    sims = edit_similarity_for_pairs(lm, pairs)
    for i, p in enumerate(pairs):
        assert sims[i].item() == edit_similarity(_ids(tok, p.chosen), _ids(tok, p.rejected))
    assert (sims < 0).all() and (sims >= -1).all()
