"""Exact response scoring: the one place in preflens that turns text into log-probabilities.

Conventions (every probe, the training loop and the reproduction scripts share them):

* **Tokenization.** Prompt and response are tokenized *separately* (``add_special_tokens=False``)
  and their ids concatenated. Tokenizing ``prompt + response`` as one string would let BPE merge
  across the boundary, so the response's first token -- and therefore its log-prob and the
  response mask -- would depend on the prompt's last characters (the pitfall in the official code
  of Chen et al. 2024 and Yuan et al. 2024).
* **EOS** is appended to the response by default (``add_eos=True``) and counted as a response
  token, as in Razin et al. 2024 (§1 of the likelihood-displacement spec).
* **BOS.** GPT-2 has no separate BOS token; its ``<|endoftext|>`` is not prepended by the HF
  tokenizer and preflens does not prepend it either (``add_bos=False``), matching the factual-
  recall protocol. Prompts must therefore be non-empty: the first response token is predicted at
  the last prompt position.
* **Positions.** Logits at position j predict token j + 1. For prompt length P and response length
  R (EOS included) the response is predicted at positions P − 1 … P + R − 2.
* **Sequence log-prob** ``logp`` = Σ over those R positions of log π(token | prefix): a *sum*,
  never a mean; ``mean_logp`` = logp / R. Log-softmax is taken in fp32 (accumulated in fp64)
  even when the model runs in bf16.
* **Padding.** Batches are right-padded; GPT-2's absolute positions then equal the unpadded ones
  and, under the causal mask, no real position sees a pad, so batched scores equal per-example
  unpadded scores (tested ≤ 1e-5) without a padding mask (see :func:`final_hidden`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preflens.errors import ConfigError, ScoringError

__all__ = [
    "Encoded",
    "Batch",
    "ResponseScores",
    "encode",
    "collate",
    "final_hidden",
    "target_logprobs",
    "token_logprobs",
    "response_logprobs",
    "response_hidden_states",
    "length_buckets",
]

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids of one (prompt, response); ``response_ids`` includes EOS when it was added."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Batch:
    """A right-padded batch.

    ``input_ids``/``attention_mask``/``targets`` are ``[B, S]``; ``targets[b, j]`` is the id of
    token j + 1 when that token belongs to the response, else ``-100``. ``prompt_lens`` and
    ``response_lens`` are ``[B]`` (EOS counted in the response).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    prompt_lens: torch.Tensor
    response_lens: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in self.__dict__.values()))

    @property
    def response_mask(self) -> torch.Tensor:
        """``[B, S]`` bool: positions that predict a response token."""
        return self.targets != IGNORE


@dataclass(frozen=True)
class ResponseScores:
    """Per-response scores.

    ``token_logprobs`` ``[n, T]`` (fp32, 0 at padding; T = longest response incl. EOS), ``mask``
    ``[n, T]`` bool, ``logp`` ``[n]`` summed log-prob (fp64), ``mean_logp`` ``[n]`` = logp /
    ``n_tokens``, ``n_tokens`` ``[n]`` response length incl. EOS.
    """

    token_logprobs: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    mean_logp: torch.Tensor
    n_tokens: torch.Tensor


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    add_eos: bool = True,
    max_length: int | None = None,
    truncate: str | None = None,
) -> list[Encoded]:
    """Tokenize prompt and response separately and concatenate (module docstring).

    Args:
        max_length: the model context; longer sequences raise :class:`ScoringError` unless
            ``truncate="left"``, which drops prompt tokens from the left (at least one is kept).
        truncate: ``None`` (error) or ``"left"``.
    """
    if len(prompts) != len(responses):
        raise ScoringError(f"{len(prompts)} prompts but {len(responses)} responses")
    if truncate not in (None, "left"):
        raise ConfigError("truncate", f"unknown value {truncate!r}", allowed=["left", "None"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ScoringError("add_eos=True but the tokenizer has no EOS token")
    out = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        p_ids = _token_ids(tokenizer, prompt)
        r_ids = _token_ids(tokenizer, response) + ([int(eos)] if add_eos else [])
        if not p_ids:
            raise ScoringError(f"example {i}: empty prompt (the first response token needs one)")
        if not r_ids:
            raise ScoringError(f"example {i}: empty response and add_eos=False")
        if max_length is not None and len(p_ids) + len(r_ids) > max_length:
            if truncate != "left" or len(r_ids) + 1 > max_length:
                raise ScoringError(
                    f"example {i}: prompt ({len(p_ids)}) + response ({len(r_ids)}) tokens exceed "
                    f"the model context of {max_length}"
                    + ("" if truncate else "; pass truncate='left' to drop prompt tokens")
                )
            p_ids = p_ids[len(p_ids) + len(r_ids) - max_length :]
        out.append(Encoded(tuple(p_ids), tuple(r_ids)))
    return out


def collate(
    encoded: Sequence[Encoded], *, pad_id: int, device: torch.device | str | None = None
) -> Batch:
    """Right-pad a list of :class:`Encoded` into a :class:`Batch`."""
    if not encoded:
        raise ScoringError("cannot collate an empty batch")
    seq_len = max(len(e) for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    for b, e in enumerate(encoded):
        ids = e.prompt_ids + e.response_ids
        p, r = len(e.prompt_ids), len(e.response_ids)
        input_ids[b, : p + r] = torch.tensor(ids)
        attention[b, : p + r] = 1
        targets[b, p - 1 : p + r - 1] = torch.tensor(e.response_ids)
    batch = Batch(
        input_ids,
        attention,
        targets,
        torch.tensor([len(e.prompt_ids) for e in encoded]),
        torch.tensor([len(e.response_ids) for e in encoded]),
    )
    return batch.to(device) if device is not None else batch


def final_hidden(model, batch: Batch) -> torch.Tensor:
    """``[B, S, d_model]``: the last hidden state *after the final norm* (what ``lm_head`` multiplies).

    For GPT-2 this is ``GPT2Model``'s output (``ln_f`` applied), equal to HF ``hidden_states[-1]``
    and to the raw bridge's ``ln_final.hook_out``.

    The padding mask is not needed: batches are right-padded (:func:`collate`), so under the
    causal mask a real position only ever attends to earlier, real positions, and the default
    position ids 0 … S−1 are the unpadded ones. The outputs at real positions are therefore
    exactly those of per-example unpadded runs (pad positions produce values never read).
    """
    # An all-ones mask says "no padding to hide", which is exact here (see above) and keeps
    # transformers from warning that a pad id appears without a mask.
    ones = torch.ones_like(batch.input_ids)
    out = model.base_model(input_ids=batch.input_ids, attention_mask=ones, use_cache=False)
    return out.last_hidden_state


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 weights; fp64 for fp64 weights (exact tests)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class _TargetLogprob(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[target] over vocabulary chunks, never holding [N, V] logits.

    Forward computes fp32 logits for ``chunk`` rows at a time and keeps only the log-sum-exp;
    backward recomputes each chunk's softmax: d/dlogits = g·(onehot − p). Memory O(chunk·V).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk):  # noqa: D401
        acc = _acc_dtype(weight)
        lse = torch.empty(h.shape[0], dtype=acc, device=h.device)
        tgt_logit = torch.empty_like(lse)
        w32 = weight.to(acc)
        b32 = bias.to(acc) if bias is not None else None
        for s in range(0, h.shape[0], chunk):
            logits = F.linear(h[s : s + chunk].to(acc), w32, b32)
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            tgt_logit[s : s + chunk] = logits.gather(1, target[s : s + chunk, None]).squeeze(1)
        ctx.save_for_backward(h, weight, bias, target, lse)
        ctx.chunk = chunk
        return tgt_logit - lse

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, target, lse = ctx.saved_tensors
        chunk = ctx.chunk
        acc = _acc_dtype(weight)
        w32 = weight.to(acc)
        b32 = bias.to(acc) if bias is not None else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        grad_b = torch.zeros_like(b32) if (need_b and bias is not None) else None
        for s in range(0, h.shape[0], chunk):
            h_c = h[s : s + chunk].to(acc)
            logits = F.linear(h_c, w32, b32)
            d = torch.exp(logits - lse[s : s + chunk, None]).mul_(-grad_out[s : s + chunk, None])
            d.scatter_add_(1, target[s : s + chunk, None], grad_out[s : s + chunk, None].to(acc))
            if need_h:
                grad_h[s : s + chunk] = (d @ w32).to(h.dtype)
            if need_w:
                grad_w.addmm_(d.t(), h_c)
            if grad_b is not None:
                grad_b += d.sum(0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None


def target_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """``[N]`` log softmax(h Wᵀ + b)[target] for rows ``h`` ``[N, d]``; differentiable.

    ``weight`` is the HF ``lm_head.weight`` ``[V, d]``. Logits are formed in fp32 from the stored
    weights (so a bf16 model still gets an fp32 log-softmax; an fp64 model gets fp64)
    ``chunk_size`` rows at a time.
    """
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=_acc_dtype(weight))
    with torch.autocast(device_type=h.device.type, enabled=False):
        return _TargetLogprob.apply(h, weight, bias, target, max(1, int(chunk_size)))


def token_logprobs(model, batch: Batch, *, chunk_size: int = 2048) -> torch.Tensor:
    """``[B, S]`` fp32 (fp64 for an fp64 model) log π(token j+1 | tokens ≤ j) at response-predicting positions, 0 elsewhere.

    Differentiable with respect to the model's parameters; summing over S gives the summed
    sequence log-prob. Only response positions reach the unembedding (no ``[B, S, V]`` tensor).
    """
    hidden = final_hidden(model, batch)
    mask = batch.response_mask
    head = model.get_output_embeddings()
    lp = target_logprobs(
        hidden[mask], head.weight, getattr(head, "bias", None), batch.targets[mask],
        chunk_size=chunk_size,
    )
    out = torch.zeros(mask.shape, dtype=lp.dtype, device=hidden.device)
    return out.masked_scatter(mask, lp)


def length_buckets(
    lengths: Sequence[int], batch_size: int, *, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, longest first) to cut padding.

    A batch holds at most ``batch_size`` sequences and, when ``max_tokens`` is given, at most
    ``max_tokens`` padded tokens (rows × longest row; a single longer sequence still gets its
    own batch). On a CPU large padded batches fall out of cache and run slower per token than
    single sequences, so the scoring functions cap batches at :data:`CPU_MAX_TOKENS` there.
    """
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive integer, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError("max_tokens", f"must be a positive integer, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        too_many = len(current) >= batch_size
        too_big = max_tokens is not None and (len(current) + 1) * longest > max_tokens
        if current and (too_many or too_big):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


CPU_MAX_TOKENS = 1024


def _token_budget(lm) -> int | None:
    return CPU_MAX_TOKENS if lm.device.type == "cpu" else None


def _encode_for(lm, prompts, responses, add_eos, truncate) -> list[Encoded]:
    return encode(
        lm.tokenizer, prompts, responses, add_eos=add_eos, max_length=lm.n_ctx, truncate=truncate
    )


def _eval_batches(lm, encoded: Sequence[Encoded], batch_size: int):
    """Yield ``(indices, batch)`` over length buckets with ``lm.model`` in eval mode; the model's
    previous train/eval mode is restored afterwards."""
    was_training = lm.model.training
    lm.model.eval()
    try:
        lengths = [len(e) for e in encoded]
        for idx in length_buckets(lengths, batch_size, max_tokens=_token_budget(lm)):
            yield idx, collate([encoded[i] for i in idx], pad_id=lm.pad_id, device=lm.device)
    finally:
        lm.model.train(was_training)


@torch.no_grad()
def response_logprobs(
    lm,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 16,
    add_eos: bool = True,
    truncate: str | None = None,
) -> ResponseScores:
    """Score ``responses`` given ``prompts`` with ``lm.model`` (module conventions), batched.

    Batches are length-bucketed and right-padded; results come back in input order and equal
    per-example unpadded scoring (≤ 1e-5 in fp32). The model is run in eval mode and put back
    in the mode it was in.
    """
    encoded = _encode_for(lm, prompts, responses, add_eos, truncate)
    n = len(encoded)
    t_max = max((len(e.response_ids) for e in encoded), default=0)
    tok_lp = torch.zeros((n, t_max), dtype=torch.float32)
    mask = torch.zeros((n, t_max), dtype=torch.bool)
    for idx, batch in _eval_batches(lm, encoded, batch_size):
        lp = token_logprobs(lm.model, batch).cpu()
        for row, i in enumerate(idx):
            p, r = len(encoded[i].prompt_ids), len(encoded[i].response_ids)
            tok_lp[i, :r] = lp[row, p - 1 : p + r - 1]
            mask[i, :r] = True
    n_tokens = mask.sum(1)
    logp = tok_lp.double().sum(1)
    return ResponseScores(tok_lp, mask, logp, logp / n_tokens.clamp(min=1), n_tokens)


@torch.no_grad()
def response_hidden_states(
    lm,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 16,
    add_eos: bool = True,
    truncate: str | None = None,
) -> list[torch.Tensor]:
    """Per example ``[R, d_model]`` fp32 (CPU): post-final-norm hidden states at the R positions
    that predict each response token -- last prompt position … second-to-last response token,
    EOS counted in the response (Razin et al. 2024, CHES positions). ``h @ W_Uᵀ (+ b)``
    reproduces the logits at those positions.
    """
    encoded = _encode_for(lm, prompts, responses, add_eos, truncate)
    out: list[torch.Tensor | None] = [None] * len(encoded)
    for idx, batch in _eval_batches(lm, encoded, batch_size):
        hidden = final_hidden(lm.model, batch).float().cpu()
        for row, i in enumerate(idx):
            p, r = len(encoded[i].prompt_ids), len(encoded[i].response_ids)
            out[i] = hidden[row, p - 1 : p + r - 1].clone()
    return out  # type: ignore[return-value]
