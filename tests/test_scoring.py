"""scoring: batched == per-example, hidden states reproduce logits, fused log-prob gradients."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from preflens.errors import ScoringError
from preflens.scoring import (
    collate,
    encode,
    response_hidden_states,
    response_logprobs,
    target_logprobs,
    token_logprobs,
)

WORDS = "the capital of poland is warsaw yes no never sure maybe model prefers answer".split()


def _texts(n, lo, hi, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _reference_logp(lm, prompt, response):
    """Unpadded, batch-1, full-vocabulary log_softmax: the definition, computed independently."""
    p = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = lm.tokenizer(response, add_special_tokens=False)["input_ids"] + [lm.eos_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = lm.model(ids).logits[0].double()
    lp = logits.log_softmax(-1)
    return sum(lp[len(p) - 1 + k, tok].item() for k, tok in enumerate(r)), len(r)


@pytest.mark.parametrize("mix", [(1, 3, 1, 3), (1, 40, 1, 40), (30, 60, 1, 2), (1, 2, 50, 90)])
def test_batched_equals_per_example_tiny(tiny, mix):
    prompts = _texts(9, mix[0], mix[1], seed=1)
    responses = _texts(9, mix[2], mix[3], seed=2)
    batched = response_logprobs(tiny, prompts, responses, batch_size=4)
    for i in range(9):
        ref, n = _reference_logp(tiny, prompts[i], responses[i])
        assert batched.n_tokens[i] == n
        assert abs(batched.logp[i].item() - ref) <= 1e-5 * max(1.0, abs(ref))
        assert abs(batched.mean_logp[i].item() - ref / n) <= 1e-5 * max(1.0, abs(ref / n))


@pytest.mark.slow
def test_batched_equals_per_example_gpt2_small_random(gpt2_random):
    prompts = _texts(4, 2, 30, seed=3)
    responses = _texts(4, 1, 25, seed=4)
    batched = response_logprobs(gpt2_random, prompts, responses, batch_size=4)
    single = [response_logprobs(gpt2_random, [p], [r], batch_size=1) for p, r in zip(prompts, responses)]
    for i, s in enumerate(single):
        assert abs(batched.logp[i].item() - s.logp[0].item()) <= 1e-5 * max(1, abs(s.logp[0].item()))
        assert torch.allclose(batched.token_logprobs[i][batched.mask[i]], s.token_logprobs[0][s.mask[0]], atol=1e-5)


def test_tokenized_separately_no_boundary_merge(tiny):
    enc = encode(tiny.tokenizer, ["The capital of"], [" Poland"])[0]
    assert list(enc.prompt_ids) == tiny.tokenizer("The capital of", add_special_tokens=False)["input_ids"]
    assert enc.response_ids[-1] == tiny.eos_id
    no_eos = encode(tiny.tokenizer, ["a"], [" b"], add_eos=False)[0]
    assert tiny.eos_id not in no_eos.response_ids


def test_hidden_states_reproduce_logits(tiny):
    prompts, responses = _texts(5, 1, 12, 5), _texts(5, 1, 12, 6)
    hs = response_hidden_states(tiny, prompts, responses, batch_size=3)
    W = tiny.model.lm_head.weight.detach()
    for i, (p, r) in enumerate(zip(prompts, responses)):
        enc = encode(tiny.tokenizer, [p], [r])[0]
        ids = torch.tensor([enc.prompt_ids + enc.response_ids])
        with torch.no_grad():
            logits = tiny.model(ids).logits[0]
        P, R = len(enc.prompt_ids), len(enc.response_ids)
        assert hs[i].shape == (R, tiny.d_model)
        assert torch.allclose(hs[i] @ W.T, logits[P - 1 : P + R - 1], atol=1e-4)


def test_bf16_model_scores_in_fp32(tiny):
    import copy

    lm16 = copy.copy(tiny)
    lm16.model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    s = response_logprobs(lm16, ["The capital of"], [" Poland is Warsaw"])
    assert s.token_logprobs.dtype == torch.float32 and s.logp.dtype == torch.float64
    ref = response_logprobs(tiny, ["The capital of"], [" Poland is Warsaw"])
    assert torch.isfinite(s.logp).all() and abs(s.logp.item() - ref.logp.item()) < 0.5


def test_fused_target_logprobs_match_autograd():
    torch.manual_seed(0)
    h = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(17, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(17, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 17, (13,))
    g = torch.randn(13, dtype=torch.float64)
    (target_logprobs(h, w, b, t, chunk_size=4) * g).sum().backward()
    fused = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    ref = torch.log_softmax(h @ w.T + b, -1).gather(1, t[:, None]).squeeze(1)
    (ref * g).sum().backward()
    for a, x in zip(fused, (h, w, b)):
        assert torch.allclose(a, x.grad, atol=1e-5)


def test_token_logprobs_gradient_equals_full_softmax(tiny):
    enc = encode(tiny.tokenizer, ["The capital", "Q: What is"], [" of Poland", " the answer"])
    batch = collate(enc, pad_id=tiny.pad_id)
    model = tiny.model
    model.zero_grad()
    token_logprobs(model, batch, chunk_size=3).sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.response_mask
    lp = logits.float().log_softmax(-1)[mask].gather(1, batch.targets[mask][:, None])
    lp.sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-5), n
    model.zero_grad()


def test_too_long_raises_or_truncates_left(tiny):
    long_prompt = " ".join(["word"] * 400)
    with pytest.raises(ScoringError, match="exceed the model context of 256"):
        response_logprobs(tiny, [long_prompt], [" yes"])
    s = response_logprobs(tiny, [long_prompt], [" yes"], truncate="left")
    assert torch.isfinite(s.logp).all()
    with pytest.raises(ScoringError):
        response_logprobs(tiny, ["a"], [long_prompt], truncate="left")


def test_empty_prompt_is_an_error(tiny):
    with pytest.raises(ScoringError, match="empty prompt"):
        response_logprobs(tiny, [""], [" yes"])


def test_length_buckets_respect_batch_size_and_token_budget():
    from preflens.scoring import length_buckets

    lengths = [5, 300, 40, 41, 7, 120, 2, 600]
    batches = length_buckets(lengths, 3, max_tokens=256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 3 and (len(b) == 1 or len(b) * longest <= 256)
        # longest first within and across batches (similar lengths together)
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    assert length_buckets(lengths, 100) == [sorted(range(8), key=lambda i: -lengths[i])]


def test_pair_api_one_forward_equals_per_side_scoring(tiny):
    from preflens.data import PreferencePair
    from preflens.scoring import SequenceLogps, concatenated_logps, encode_pairs

    pairs = [PreferencePair(f"Q{i}: the capital is", " Paris" * (i + 1), " Rome" * (3 - i % 3)) for i in range(5)]
    enc = encode_pairs(tiny, pairs)
    batch = enc.batch([4, 0, 2], pad_id=tiny.pad_id)
    got = concatenated_logps(tiny.model, batch)
    prompts = [pairs[i].prompt for i in (4, 0, 2)]
    s_w = response_logprobs(tiny, prompts, [pairs[i].chosen for i in (4, 0, 2)])
    s_l = response_logprobs(tiny, prompts, [pairs[i].rejected for i in (4, 0, 2)])
    assert torch.allclose(got.chosen, s_w.logp, atol=1e-5) and torch.allclose(got.rejected, s_l.logp, atol=1e-5)
    assert torch.equal(got.chosen_tokens, s_w.n_tokens.double()) and got.chosen.dtype == torch.float64
    assert torch.equal(concatenated_logps(SequenceLogps(tiny.model), batch).chosen, got.chosen)  # wrapper: same
    assert len(repr(got)) < 120 and len(repr(enc)) < 80


def test_encode_pairs_names_the_file_line_or_the_pair(tiny):
    from preflens.data import PreferencePair
    from preflens.errors import DataError
    from preflens.scoring import encode_pairs

    long = PreferencePair("Q", " a", " b" * 400, source=("data.jsonl", 7))
    with pytest.raises(DataError) as exc:
        encode_pairs(tiny, [PreferencePair("Q", " a", " b"), long])
    assert (exc.value.file, exc.value.line, exc.value.field, exc.value.pair_index) == ("data.jsonl", 7, "rejected", 1)
    with pytest.raises(DataError, match=r"exceed the context .*\[eval pair 0\]"):
        encode_pairs(tiny, [PreferencePair("Q", " a", " b" * 400)], split="eval")


# ----------------------------------------------------------------------------- head precision
# bf16 head: h and W (and, backward, the logit gradient δ) are rounded to bf16 for the GEMMs, which
# accumulate and return fp32. Rounding to bf16 (8 significant bits) changes a value by a factor
# (1 + η), |η| ≤ u = 2⁻⁸, so a product h_k W_vk by at most (2u + u²)|h_k W_vk| and a logit by at
# most δ = scale · (2u + u² + 2dε) Σ_k |h_k W_vk| over the hidden size d (ε = 2⁻²⁴: the fp32
# accumulation of either GEMM). A log-prob z_y − lse(z) moves by at most 2δ.
U, EPS32 = 2.0 ** -8, 2.0 ** -24


def head_logit_bound(h: torch.Tensor, w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``[N]`` the bound δ above on max_v |Δ logit_v| of each row of ``h`` (float64)."""
    s = h.double().abs() @ w.double().abs().T
    return scale * (2 * U + U * U + 2 * h.shape[1] * EPS32) * s.max(1).values


def old_fused_head(h, w, b, t, chunk, grad_out):
    """The fused head as it was before ``head_precision`` existed (fp32 path), forward and
    backward written out: ``(log-probs, ∂h, ∂W, ∂b)``; the fp32 path must equal it bit for bit."""
    w32, b32 = w.float(), (b.float() if b is not None else None)
    lse, tgt = torch.empty(h.shape[0]), torch.empty(h.shape[0])
    gh, gw = torch.empty_like(h), torch.zeros_like(w32)
    gb = torch.zeros_like(b32) if b is not None else None
    for s in range(0, h.shape[0], chunk):
        logits = F.linear(h[s:s + chunk].float(), w32, b32)
        lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
        tgt[s:s + chunk] = logits.gather(1, t[s:s + chunk, None]).squeeze(1)
    for s in range(0, h.shape[0], chunk):
        h_c = h[s:s + chunk].float()
        z = F.linear(h_c, w32, b32)
        d = torch.exp(z - lse[s:s + chunk, None]).mul_(-grad_out[s:s + chunk, None])
        d.scatter_add_(1, t[s:s + chunk, None], grad_out[s:s + chunk, None].float())
        gh[s:s + chunk] = (d @ w32).to(h.dtype)
        gw.addmm_(d.t(), h_c)
        if gb is not None:
            gb += d.sum(0)
    return tgt - lse, gh, gw, gb


def _head_grads(h, w, b, t, g, precision, chunk=7):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    lp = target_logprobs(*leaves, t, chunk_size=chunk, head_precision=precision)
    (lp * g).sum().backward()
    return lp.detach(), [x.grad for x in leaves]


def _random_head(d=32, v=320, n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = 2 * torch.randn(n, d, generator=gen)
    w = 3 * torch.randn(v, d, generator=gen) / d ** 0.5
    return h, w, torch.randn(v, generator=gen), torch.randint(0, v, (n,), generator=gen), torch.randn(n, generator=gen)


def test_fp32_head_is_the_previous_fused_head_bit_for_bit():
    h, w, b, t, g = _random_head()
    lp, grads = _head_grads(h, w, b, t, g, "fp32")
    for got, want in zip([lp, *grads], old_fused_head(h, w, b, t, 7, g)):
        assert torch.equal(got, want)


def test_bf16_head_error_is_within_the_bf16_bound_and_not_zero():
    h, w, b, t, _ = _random_head()
    err = (target_logprobs(h, w, b, t, head_precision="bf16") - target_logprobs(h, w, b, t)).abs().double()
    bound = 2 * head_logit_bound(h, w)
    assert (err <= bound).all()
    assert err.max() > bound.max() / 100  # the bf16 path really rounds (measured: ~1/11 of the bound)


def test_bf16_head_keeps_logits_fp32():
    """Operands already bf16-exact: only fp32 accumulation order may differ, so a head that rounded
    the logits themselves to bf16 (up to |z|·2⁻⁸ each, as TRL's does) would fail by orders of magnitude."""
    h, w, b, t, _ = _random_head()
    h, w = h.bfloat16().float(), w.bfloat16().float()
    lp32 = target_logprobs(h, w, b, t)
    lp16 = target_logprobs(h, w, b, t, head_precision="bf16")
    assert torch.allclose(lp16, lp32, rtol=0, atol=1e-5) and not torch.equal(lp16.bfloat16().float(), lp16)


def test_bf16_head_gradients_are_within_the_bf16_bound():
    """∂ = Σ_t δ_t ⊗ x_t with δ_tv = g_t(1[v=y_t] − p_tv): p moves by a factor e^{±2δ_t} (logit
    bound above), and δ and x are each rounded once (1 + u)², so every element moves by at most
    Σ_t c_t M_tv |x_t|, M_tv = |g_t|(p_tv + 1[v=y_t]), c_t = (1 + e^{2δ_t} − 1)(1 + u)² − 1 (+ fp32
    accumulation)."""
    h, w, b, t, g = _random_head()
    _, grads32 = _head_grads(h, w, b, t, g, "fp32")
    _, grads16 = _head_grads(h, w, b, t, g, "bf16")
    assert all(x.dtype == torch.float32 for x in grads16)  # fp32 master weights get fp32 gradients
    with torch.no_grad():
        p = torch.softmax((h @ w.T + b).double(), -1)
        m = g.double().abs()[:, None] * (p + F.one_hot(t, w.shape[0]).double())
        c = torch.expm1(2 * head_logit_bound(h, w)).add(1) * (1 + U) ** 2 - 1 + 2 * sum(w.shape) * EPS32
        bounds = (c[:, None] * m @ w.double().abs(), (c[:, None] * m).T @ h.double().abs(), (c[:, None] * m).sum(0))
    for name, a, e, bound in zip("hWb", grads32, grads16, bounds):
        diff = (a.double() - e.double()).abs()
        assert (diff <= bound).all(), name
        assert diff.max() > 0, name


def test_head_precision_unknown_value_is_a_config_error():
    from preflens.errors import ConfigError

    h, w, b, t, _ = _random_head()
    with pytest.raises(ConfigError) as exc:
        target_logprobs(h, w, b, t, head_precision="fp16")
    assert exc.value.option == "head_precision" and sorted(exc.value.allowed) == ["bf16", "fp32"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 GEMM with fp32 output)")
def test_bf16_head_on_cuda_equals_the_cpu_emulation():
    """CUDA's bf16 GEMM with fp32 output and the CPU's fp32 GEMM of bf16-rounded operands compute
    the same exact products; only the fp32 summation order differs."""
    h, w, b, t, g = _random_head(d=64, v=1000, n=50)
    lp_cpu, grads_cpu = _head_grads(h, w, b, t, g, "bf16")
    lp_gpu, grads_gpu = _head_grads(*(x.cuda() for x in (h, w, b, t, g)), "bf16")
    assert torch.allclose(lp_gpu.cpu(), lp_cpu, rtol=0, atol=1e-4)
    for a, e in zip(grads_cpu, grads_gpu):
        assert torch.allclose(e.cpu(), a, rtol=1e-4, atol=1e-5)
