"""Exact response scoring: the one place in preflens that turns text into log-probabilities.

Conventions (every probe, the training loop and the reproduction scripts share them):

* **Tokenization.** Prompt and response are tokenized *separately* (``add_special_tokens=False``)
  and their ids concatenated. Tokenizing ``prompt + response`` as one string would let BPE merge
  across the boundary, so the response's first token -- and therefore its log-prob and the
  response mask -- would depend on the prompt's last characters (the pitfall in the official code
  of Chen et al. 2024 and Yuan et al. 2024).
* **EOS** is appended to the response by default (``add_eos=True``) and counted as a response
  token, as in Razin et al. 2024 (§1 of the likelihood-displacement spec).
* **BOS.** BOS is prepended exactly when the model's tokenizer adds it to plain text
  (``tokenizer("a")`` starts with ids that ``tokenizer("a", add_special_tokens=False)`` lacks:
  Llama, Mistral, Gemma yes; GPT-2, GPT-NeoX, Qwen2, OLMo no), as the model saw it in training
  (:func:`bos_prefix`). The prefix belongs to ``Encoded.prompt_ids``. Without a BOS the prompt must
  be non-empty: the first response token is predicted at the last prompt position.
* **Unknown words.** A word-level tokenizer that maps a word it does not know to its unknown token
  would silently score another text; :func:`text_ids` raises :class:`~preflens.errors.DataError`
  naming the word (and ``file:line`` when the text came from a data file).
* **Positions.** Logits at position j predict token j + 1. For prompt length P and response length
  R (EOS included) the response is predicted at positions P − 1 … P + R − 2.
* **Sequence log-prob** ``logp`` = Σ over those R positions of log π(token | prefix): a *sum*,
  never a mean; ``mean_logp`` = logp / R. Log-softmax is taken in fp32 (accumulated in fp64)
  even when the model runs in bf16.
* **Head.** Log-probs are the model's own ``log_softmax(logits)``: whatever the model does to
  ``h Wᵀ (+ b)`` after the final norm (Gemma 2/3 final-logit soft-capping ``c·tanh(z/c)``,
  Cohere's ``logit_scale``, Granite's ``logits_scaling``) is part of the fused head
  (:class:`LogitHead`); :func:`verify_head` checks it against the model's own logits when a
  model is loaded and raises :class:`~preflens.errors.ModelError` if they differ. Its GEMMs run
  in fp32 by default; ``head_precision="bf16"`` (training speed on a GPU) rounds only their
  operands to bf16 and keeps the logits and log-softmax fp32 (:func:`target_logprobs`).
* **Padding.** Batches are right-padded; GPT-2's absolute positions then equal the unpadded ones
  and, under the causal mask, no real position sees a pad, so batched scores equal per-example
  unpadded scores (tested ≤ 1e-5) without a padding mask (see :func:`final_hidden`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preflens.errors import ConfigError, DataError, ModelError, ScoringError

__all__ = [
    "Encoded",
    "Batch",
    "ResponseScores",
    "LogitHead",
    "bos_prefix",
    "text_ids",
    "encode",
    "collate",
    "logit_head",
    "verify_head",
    "final_hidden",
    "head_logits",
    "target_logprobs",
    "HEAD_PRECISIONS",
    "check_head_precision",
    "token_logprobs",
    "response_logprobs",
    "response_hidden_states",
    "length_buckets",
    "EncodedPairs",
    "ChosenRejectedLogps",
    "SequenceLogps",
    "encode_pairs",
    "concatenated_logps",
    "autocast_for",
    "tf32_for",
    "precision_context",
    "eval_mode",
]

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids of one (prompt, response); ``response_ids`` includes EOS when it was added."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(repr=False)
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

    def __repr__(self) -> str:
        return (f"Batch(rows={self.input_ids.shape[0]}, seq_len={self.input_ids.shape[1]}, "
                f"response_tokens={int(self.response_mask.sum())}, device={self.input_ids.device})")

    @property
    def response_mask(self) -> torch.Tensor:
        """``[B, S]`` bool: positions that predict a response token."""
        return self.targets != IGNORE


@dataclass(frozen=True, repr=False)
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

    def __repr__(self) -> str:
        n = int(self.logp.shape[0])
        mean = f", mean logp={float(self.logp.mean()):.4g}" if n else ""
        return f"ResponseScores(n={n}, longest={int(self.n_tokens.max()) if n else 0} tokens{mean})"


def bos_prefix(tokenizer) -> tuple[int, ...]:
    """The ids ``tokenizer`` puts before plain text: ``(bos,)`` for Llama/Mistral/Gemma, ``()``
    for GPT-2, GPT-NeoX, Qwen2, OLMo (module docstring, BOS).

    Detected by comparing ``tokenizer("a")`` with ``tokenizer("a", add_special_tokens=False)``
    (the tokenizer's ``add_bos_token`` flag is not reliable: a ``tokenizer.json`` post-processor
    can add BOS while the flag reads False). Ids the tokenizer appends (an EOS) are ignored.
    """
    key = id(tokenizer)
    cached = _BOS_CACHE.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    full = list(tokenizer("a")["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    prefix: tuple[int, ...] = ()
    for k in range(len(full) - len(bare) + 1):
        if full[k: k + len(bare)] == bare:
            prefix = tuple(int(i) for i in full[:k])
            break
    _BOS_CACHE[key] = (tokenizer, prefix)
    return prefix


_BOS_CACHE: dict[int, tuple[object, tuple[int, ...]]] = {}


def _unknown_words(tokenizer, text: str, ids: Sequence[int]) -> list[str]:
    """Words of ``text`` the tokenizer mapped to its unknown token (a literal unk string in the
    text is not unknown). Byte-level BPE never produces the unknown token; word-level does."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk not in ids:
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    unk_text = tokenizer.unk_token
    words = []
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tid == unk and text[a:b].strip() != unk_text:
            words.append(text[a:b].strip() or text[a:b])
    return words


def text_ids(tokenizer, text: str, *, bos: bool = False, field: str = "text",
             source: tuple[str, int] | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens, with :func:`bos_prefix` first when ``bos``.

    Raises:
        DataError: a word the tokenizer does not know (it would silently become the unknown
            token, e.g. toyworld's word-level tokenizer); names the word, ``field`` and, when
            ``source = (file, line)`` is given, the data file's line.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    unknown = _unknown_words(tokenizer, text, ids)
    if unknown:
        file, line = source if source is not None else (None, None)
        names = ", ".join(repr(w) for w in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise DataError(
            f"{'word' if len(unknown) == 1 else 'words'} {names} not in the tokenizer's vocabulary "
            f"(would be scored as the unknown token {tokenizer.unk_token!r})",
            file=file, line=line, field=field)
    return (list(bos_prefix(tokenizer)) if bos else []) + ids


def encode(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    add_eos: bool = True,
    max_length: int | None = None,
    truncate: str | None = None,
    sources: Sequence[tuple[str, int] | None] | None = None,
    response_field: str = "response",
) -> list[Encoded]:
    """Tokenize prompt and response separately and concatenate (module docstring); the prompt
    starts with :func:`bos_prefix` when the tokenizer adds BOS to plain text.

    Args:
        max_length: the model context; longer sequences raise :class:`ScoringError` unless
            ``truncate="left"``, which drops prompt tokens from the left (after the BOS; at least
            one is kept).
        truncate: ``None`` (error) or ``"left"``.
        sources: per example the ``(file, line)`` it was read from (``PreferencePair.source``),
            so that an unknown word is reported at its line; ``response_field`` names the
            responses in that message (``"chosen"``, ``"rejected"``).

    Raises:
        DataError: a word the tokenizer does not know (:func:`text_ids`).
        ScoringError: empty prompt without BOS, or a sequence longer than ``max_length``.
    """
    if len(prompts) != len(responses):
        raise ScoringError(f"{len(prompts)} prompts but {len(responses)} responses")
    if truncate not in (None, "left"):
        raise ConfigError("truncate", f"unknown value {truncate!r}", allowed=["left", "None"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ScoringError("add_eos=True but the tokenizer has no EOS token")
    n_bos = len(bos_prefix(tokenizer))
    out = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        src = sources[i] if sources is not None else None
        p_ids = text_ids(tokenizer, prompt, bos=True, field="prompt", source=src)
        r_ids = text_ids(tokenizer, response, field=response_field, source=src)
        r_ids += [int(eos)] if add_eos else []
        if not p_ids:
            raise ScoringError(f"example {i}: empty prompt (the first response token needs one)")
        if not r_ids:
            raise ScoringError(f"example {i}: empty response and add_eos=False")
        if max_length is not None and len(p_ids) + len(r_ids) > max_length:
            if truncate != "left" or len(r_ids) + max(n_bos, 1) > max_length:
                raise ScoringError(
                    f"example {i}: prompt ({len(p_ids)}) + response ({len(r_ids)}) tokens exceed "
                    f"the model context of {max_length}"
                    + ("" if truncate else "; pass truncate='left' to drop prompt tokens")
                )
            drop = len(p_ids) + len(r_ids) - max_length
            p_ids = p_ids[:n_bos] + p_ids[n_bos + drop:]
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


@dataclass(frozen=True)
class LogitHead:
    """What a model does to its final hidden state ``h`` (after the final norm):

        z = h Wᵀ + b                      (the unembedding; ``W`` = ``lm_head.weight`` [V, d])
        logits = cap(scale · z),  cap(x) = c·tanh(x / c)  (identity when ``softcap`` is None)

    ``scale``: Cohere ``logit_scale`` (×), Granite ``logits_scaling`` (÷), Falcon-H1
    ``lm_head_multiplier`` (×); ``softcap``: Gemma 2/3 ``final_logit_softcapping`` (Gemma Team
    2024, "Gemma 2", §2: logits ← c·tanh(logits/c), c = 30). ``scale · z`` is the linear, pre-cap
    logit that direct logit attribution decomposes.
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_linear(self) -> bool:
        return self.softcap is None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Logits from the unembedding output ``z`` (any shape)."""
        x = z * self.scale if self.scale != 1.0 else z
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x

    def derivative(self, z: torch.Tensor) -> torch.Tensor | None:
        """d logits / d z elementwise, or ``None`` when it is the constant ``scale``."""
        if self.softcap is None:
            return None
        t = torch.tanh(z * (self.scale / self.softcap))
        return (1.0 - t * t) * self.scale

    def backward(self, z: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
        """∂/∂z given ∂/∂logits (in place on ``grad_logits`` when possible)."""
        d = self.derivative(z)
        if d is not None:
            return grad_logits.mul_(d)
        return grad_logits.mul_(self.scale) if self.scale != 1.0 else grad_logits


_SCALE_KEYS = (("logit_scale", False), ("logits_scaling", True), ("lm_head_multiplier", False))


def logit_head(model) -> LogitHead:
    """The :class:`LogitHead` of a HF causal LM, from its config (see :class:`LogitHead`).

    Raises:
        ModelError: a config value preflens cannot apply (non-numeric or non-positive).
    """
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = 1.0
    for key, divide in _SCALE_KEYS:
        value = getattr(cfg, key, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ModelError(f"model config {key}={value!r}: preflens' fused head cannot apply it")
        scale = scale / float(value) if divide else scale * float(value)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
        raise ModelError(f"model config final_logit_softcapping={cap!r} is not a positive number")
    return LogitHead(scale=scale, softcap=float(cap) if cap is not None else None)


def head_logits(model, hidden: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[..., V]`` full logits of ``hidden`` (post-final-norm) through the model's head
    (:func:`logit_head`), computed in ``dtype`` (default: the hidden's). Builds the whole
    vocabulary: for checks and small inputs; scoring uses the chunked :func:`target_logprobs`."""
    head = model.get_output_embeddings()
    dt = dtype or hidden.dtype
    bias = getattr(head, "bias", None)
    z = F.linear(hidden.to(dt), head.weight.to(dt), None if bias is None else bias.to(dt))
    return logit_head(model)(z)


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def verify_head(model, *, n_tokens: int = 8) -> LogitHead:
    """Check that preflens' head reproduces the model's own log-softmax; returns the head.

    Runs the model (eval mode, the previous mode restored) on ``n_tokens`` fixed ids and compares
    ``log_softmax`` of its ``logits`` with :func:`head_logits` of :func:`final_hidden`
    (tolerance 1e-4 relative to the largest |log-prob| for fp32/fp64, 2e-2 for half types).
    Done once per model object (``load_model`` calls it).

    Raises:
        ModelError: the model transforms its logits in a way the fused head does not reproduce.
    """
    if model in _VERIFIED:
        return logit_head(model)
    head = logit_head(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = (torch.arange(n_tokens, device=device) * 7919 + 11) % vocab
    batch = collate([Encoded(tuple(ids[:1].tolist()), tuple(ids[1:].tolist()))], pad_id=0,
                    device=device)
    was = model.training
    model.eval()
    try:
        own = model(input_ids=batch.input_ids, use_cache=False).logits.double().log_softmax(-1)
        ours = head_logits(model, final_hidden(model, batch), dtype=torch.float64).log_softmax(-1)
    finally:
        model.train(was)
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    err = float((own - ours).abs().max())
    tol = (2e-2 if half else 1e-4) * max(1.0, float(own.abs().max()))
    if not err <= tol:
        raise ModelError(
            f"{type(model).__name__}: preflens' fused head (final norm → unembedding → "
            f"{head}) differs from the model's own log-softmax by {err:.3g} nats; this family "
            "transforms its logits in a way preflens does not support")
    _VERIFIED[model] = True
    return head


HEAD_PRECISIONS = ("fp32", "bf16")


def check_head_precision(head_precision: str) -> str:
    """``head_precision`` if it is one of :data:`HEAD_PRECISIONS`, else :class:`ConfigError` naming it."""
    if head_precision not in HEAD_PRECISIONS:
        raise ConfigError("head_precision", f"unknown value {head_precision!r}", allowed=list(HEAD_PRECISIONS))
    return head_precision


# torch >= 2.8 on CUDA: ``torch.mm(a, b, out_dtype=torch.float32)`` of bf16 inputs writes the fp32
# accumulator without rounding it to bf16. Set to False after a first failure (then emulated).
_CUDA_OUT_DTYPE = {"ok": torch.torch_version.TorchVersion(torch.__version__) >= "2.8"}


def _mm_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bf16 ``a``, ``b`` with fp32 accumulation and an fp32 result (never rounded to bf16).

    CUDA (torch >= 2.8): one bf16 tensor-core GEMM with ``out_dtype=float32``. Elsewhere (CPU, older
    torch) the same numbers are emulated by an fp32 GEMM of the bf16-rounded operands (every
    product of two bf16 values is exact in fp32), so CPU tests check what the GPU computes, up to
    summation order; the emulation is not faster than the fp32 head.
    """
    if a.device.type == "cuda" and _CUDA_OUT_DTYPE["ok"]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError, TypeError) as exc:  # pragma: no cover - GPU only
            _CUDA_OUT_DTYPE["ok"] = False
            logging.getLogger(__name__).warning("bf16 GEMM with fp32 output unavailable (%s); emulating it", exc)
    return torch.mm(a.float(), b.float())


class _Unembedding:
    """The GEMMs of the fused head at one precision (:data:`HEAD_PRECISIONS`).

    ``"fp32"``: z = h Wᵀ + b with h, W, b in the accumulation dtype (fp32; fp64 for an fp64
    model), and the backward GEMMs likewise. ``"bf16"``: h, W and the logit gradient δ enter
    every GEMM rounded to bf16 (unit roundoff u = 2⁻⁸); each GEMM accumulates in fp32 and returns
    fp32 (:func:`_mm_bf16`); the bias, soft-cap, log-sum-exp, gather and δ stay in fp32; the
    weight gradient is accumulated in fp32 (then cast to the weight's dtype, fp32 for fp32
    master weights).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, precision: str) -> None:
        self.acc = _acc_dtype(weight)
        self.bf16 = precision == "bf16"
        self.w = weight.to(torch.bfloat16 if self.bf16 else self.acc)
        self.b = bias.to(self.acc) if bias is not None else None

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        """A row chunk of ``h``, or a logit gradient δ, as the GEMMs take it."""
        return x.to(torch.bfloat16 if self.bf16 else self.acc)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """z = x Wᵀ + b in the accumulation dtype, ``x`` from :meth:`operand`."""
        if not self.bf16:
            return F.linear(x, self.w, self.b)
        z = _mm_bf16(x, self.w.t()).to(self.acc)
        return z if self.b is None else z.add_(self.b)

    def grad_h(self, d: torch.Tensor) -> torch.Tensor:
        """δ W for the logit gradient ``d`` [rows, V] (from :meth:`operand`)."""
        return d @ self.w if not self.bf16 else _mm_bf16(d, self.w).to(self.acc)

    def add_grad_w(self, grad_w: torch.Tensor, d: torch.Tensor, x: torch.Tensor) -> None:
        """grad_w += δᵀ x (``d``, ``x`` from :meth:`operand`)."""
        if not self.bf16:
            grad_w.addmm_(d.t(), x)
        else:
            grad_w += _mm_bf16(d.t(), x)


class _TargetLogprob(torch.autograd.Function):
    """log softmax(head(h Wᵀ + b))[target] over row chunks, never holding [N, V] logits.

    Forward computes fp32 logits for ``chunk`` rows at a time and keeps only the log-sum-exp;
    backward recomputes each chunk's softmax: d/dlogits = g·(onehot − p), then through the
    :class:`LogitHead` (scale, soft-cap derivative) to d/dz. Memory O(chunk·V). The GEMMs run
    at ``precision`` (:class:`_Unembedding`).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk, head, precision):  # noqa: D401
        gemm = _Unembedding(weight, bias, precision)
        lse = torch.empty(h.shape[0], dtype=gemm.acc, device=h.device)
        tgt_logit = torch.empty_like(lse)
        for s in range(0, h.shape[0], chunk):
            logits = head(gemm.logits(gemm.operand(h[s : s + chunk])))
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            tgt_logit[s : s + chunk] = logits.gather(1, target[s : s + chunk, None]).squeeze(1)
        ctx.save_for_backward(h, weight, bias, target, lse)
        ctx.chunk, ctx.head, ctx.precision = chunk, head, precision
        return tgt_logit - lse

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, target, lse = ctx.saved_tensors
        chunk, head = ctx.chunk, ctx.head
        gemm = _Unembedding(weight, bias, ctx.precision)
        acc = gemm.acc
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
        for s in range(0, h.shape[0], chunk):
            x = gemm.operand(h[s : s + chunk])
            z = gemm.logits(x)
            d = torch.exp(head(z) - lse[s : s + chunk, None]).mul_(-grad_out[s : s + chunk, None])
            d.scatter_add_(1, target[s : s + chunk, None], grad_out[s : s + chunk, None].to(acc))
            d = head.backward(z, d)
            if grad_b is not None:
                grad_b += d.sum(0)
            d = gemm.operand(d)  # fp32: d itself
            if need_h:
                grad_h[s : s + chunk] = gemm.grad_h(d).to(h.dtype)
            if need_w:
                gemm.add_grad_w(grad_w, d, x)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def target_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    chunk_size: int = 2048,
    head: LogitHead | None = None,
    head_precision: str = "fp32",
) -> torch.Tensor:
    """``[N]`` log softmax(head(h Wᵀ + b))[target] for rows ``h`` ``[N, d]``; differentiable.

    ``weight`` is the HF ``lm_head.weight`` ``[V, d]``; ``head`` the model's post-unembedding
    transform (:func:`logit_head`; default identity). Logits are formed in fp32 from the stored
    weights (so a bf16 model still gets an fp32 log-softmax; an fp64 model gets fp64)
    ``chunk_size`` rows at a time.

    ``head_precision``: the unembedding GEMMs' operand precision (:data:`HEAD_PRECISIONS`).
    ``"fp32"`` (default): h, W in fp32 (TF32 on CUDA inside :func:`tf32_for`). ``"bf16"``: h, W
    (and, in the backward, the logit gradient) are rounded to bf16 for the GEMMs, which
    accumulate and return fp32, so the logits are never rounded to bf16; the bias, logit
    transform, log-sum-exp, gather and the weight gradient stay fp32. Why: at GPT-2's V = 50 257
    the four vocabulary-sized GEMMs (forward, backward recompute, ∂h, ∂W) dominate a DPO step
    (~57 ms of 192 ms on an H200 at 32 pairs × 512 tokens, even in TF32). Error: rounding h
    and W costs each logit at most (2u + u²)·Σ_k |h_k W_vk| (u = 2⁻⁸), each log-prob at most
    twice that times ``head.scale``. For comparison, TRL 1.16's fused head
    (``trl.kernels.ChunkedLogProbFunction``) under bf16 autocast writes the GEMM output to a
    bf16 tile, so its logits are rounded to bf16 (each by up to |z|·2⁻⁸) before an fp32 log-sum-exp,
    and its logit gradient is bf16 too; preflens' ``"bf16"`` keeps the logits fp32.
    """
    check_head_precision(head_precision)
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=_acc_dtype(weight))
    with torch.autocast(device_type=h.device.type, enabled=False):
        return _TargetLogprob.apply(h, weight, bias, target, max(1, int(chunk_size)),
                                    head or LogitHead(), head_precision)


def token_logprobs(model, batch: Batch, *, chunk_size: int = 2048, head_precision: str = "fp32") -> torch.Tensor:
    """``[B, S]`` fp32 (fp64 for an fp64 model) log π(token j+1 | tokens ≤ j) at response-predicting positions, 0 elsewhere.

    Differentiable with respect to the model's parameters; summing over S gives the summed
    sequence log-prob. Only response positions reach the unembedding (no ``[B, S, V]`` tensor);
    the model's own logit transform (:func:`logit_head`: soft-capping, logit scale) is applied.
    ``head_precision``: the unembedding GEMMs' precision (:func:`target_logprobs`).
    """
    hidden = final_hidden(model, batch)
    mask = batch.response_mask
    head = model.get_output_embeddings()
    lp = target_logprobs(
        hidden[mask], head.weight, getattr(head, "bias", None), batch.targets[mask],
        chunk_size=chunk_size, head=logit_head(model), head_precision=head_precision,
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


def _encode_for(lm, prompts, responses, add_eos, truncate, sources=None,
                response_field="response") -> list[Encoded]:
    return encode(
        lm.tokenizer, prompts, responses, add_eos=add_eos, max_length=lm.n_ctx, truncate=truncate,
        sources=sources, response_field=response_field,
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
    sources: Sequence[tuple[str, int] | None] | None = None,
    response_field: str = "response",
) -> ResponseScores:
    """Score ``responses`` given ``prompts`` with ``lm.model`` (module conventions), batched.

    Batches are length-bucketed and right-padded; results come back in input order and equal
    per-example unpadded scoring (≤ 1e-5 in fp32). The model is run in eval mode and put back
    in the mode it was in. ``sources``: per example the ``(file, line)`` it came from, named (with
    ``response_field``) by the error for a word the tokenizer does not know (:func:`encode`).
    """
    encoded = _encode_for(lm, prompts, responses, add_eos, truncate, sources, response_field)
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
    sources: Sequence[tuple[str, int] | None] | None = None,
    response_field: str = "response",
) -> list[torch.Tensor]:
    """Per example ``[R, d_model]`` fp32 (CPU): post-final-norm hidden states at the R positions
    that predict each response token -- last prompt position … second-to-last response token,
    EOS counted in the response (Razin et al. 2024, CHES positions). ``h @ W_Uᵀ (+ b)``
    reproduces the logits at those positions.
    """
    encoded = _encode_for(lm, prompts, responses, add_eos, truncate, sources, response_field)
    out: list[torch.Tensor | None] = [None] * len(encoded)
    for idx, batch in _eval_batches(lm, encoded, batch_size):
        hidden = final_hidden(lm.model, batch).float().cpu()
        for row, i in enumerate(idx):
            p, r = len(encoded[i].prompt_ids), len(encoded[i].response_ids)
            out[i] = hidden[row, p - 1 : p + r - 1].clone()
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- preference pairs
# One pair-scoring API: pairs are encoded once (:func:`encode_pairs`); a batch of pairs is ONE
# right-padded forward holding its chosen rows, then its rejected rows (:meth:`EncodedPairs.batch`);
# :func:`concatenated_logps` splits the summed log-probs back into chosen and rejected. The
# training loop, the reference cache and the measurements all score pairs this way.


@dataclass(frozen=True, repr=False)
class EncodedPairs:
    """Token ids of n preference pairs: ``chosen[i]`` and ``rejected[i]`` share pair i's prompt."""

    chosen: tuple[Encoded, ...]
    rejected: tuple[Encoded, ...]

    def __len__(self) -> int:
        return len(self.chosen)

    def __repr__(self) -> str:
        return f"EncodedPairs(n={len(self)}, longest={max(self.lengths, default=0)} tokens)"

    @property
    def lengths(self) -> list[int]:
        """Per pair, the longer of its two sequences (prompt + response), in tokens."""
        return [max(len(a), len(b)) for a, b in zip(self.chosen, self.rejected)]

    def batch(self, indices: Sequence[int], *, pad_id: int, device: torch.device | str | None = None) -> Batch:
        """One right-padded :class:`Batch`: the chosen rows of ``indices``, then their rejected rows."""
        return collate([self.chosen[i] for i in indices] + [self.rejected[i] for i in indices],
                       pad_id=pad_id, device=device)


def _encode_side(lm, pairs, side: str, add_eos: bool, split: str) -> list[Encoded]:
    """Encode one side; a record that cannot be scored raises DataError naming it (its
    file:line when the pair carries one, else its index in ``split``)."""
    sources = [getattr(p, "source", None) for p in pairs]
    try:
        return encode(lm.tokenizer, [p.prompt for p in pairs], [getattr(p, side) for p in pairs],
                      max_length=lm.n_ctx, add_eos=add_eos, sources=sources, response_field=side)
    except (ScoringError, DataError) as batch_exc:
        for i, p in enumerate(pairs):  # find the offending record (only on the error path)
            field = side
            try:
                (e,) = encode(lm.tokenizer, [p.prompt], [getattr(p, side)], add_eos=add_eos,
                              response_field=side)
                reason = None if len(e) <= lm.n_ctx else (
                    f"prompt ({len(e.prompt_ids)}) + {side} ({len(e.response_ids)}) tokens exceed the "
                    f"context of model '{lm.name}' ({lm.n_ctx})")
            except ScoringError as exc:
                reason = str(exc).removeprefix("example 0: ")
            except DataError as exc:
                reason, field = exc.reason, exc.field or side
            if reason is not None:
                raise _pair_error(reason, p, i, field, split) from None
        raise batch_exc


def _pair_error(reason: str, pair, index: int, side: str, split: str) -> DataError:
    source = getattr(pair, "source", None)
    if source is not None:
        err = DataError(reason, file=source[0], line=source[1], field=side)
    else:
        name = f"{split} pair {index}".lstrip() + (f" (id {pair.id!r})" if getattr(pair, "id", None) is not None else "")
        err = DataError(f"{reason} [{name}]", field=side)
    err.pair_index, err.split = index, split
    return err


def encode_pairs(lm, pairs: Sequence, *, add_eos: bool = True, split: str = "train") -> EncodedPairs:
    """Encode ``pairs`` (objects with ``prompt``/``chosen``/``rejected``) once, module conventions.

    Raises:
        DataError: a pair that cannot be scored (longer than ``lm.n_ctx``, empty response
            without EOS, ...), ``field`` = its side; ``pair_index`` and ``split`` attributes
            name it, and ``file``/``line`` when the pair was read from a file.
    """
    pairs = list(pairs)
    return EncodedPairs(*(tuple(_encode_side(lm, pairs, side, add_eos, split)) for side in ("chosen", "rejected")))


@dataclass(frozen=True, repr=False)
class ChosenRejectedLogps:
    """Summed response log-probs of n pairs (EOS counted), float64 ``[n]`` each.

    ``chosen``/``rejected`` = Σ_t log π(y_t | x, y_<t) (TRL's ``chosen_logps``); ``*_tokens`` =
    response lengths incl. EOS; :attr:`chosen_mean` = chosen / chosen_tokens (SimPO's ū).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens

    def __repr__(self) -> str:
        return (f"ChosenRejectedLogps(n={self.chosen.shape[0]}, mean chosen={float(self.chosen.mean()):.4g}, "
                f"mean rejected={float(self.rejected.mean()):.4g})")


class SequenceLogps(torch.nn.Module):
    """``model`` as a module mapping a :class:`Batch` to summed log-probs ``[B]`` float64.

    A module, so that a data-parallel wrapper (DDP, FSDP) sees the forward it must hook.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, head_precision: str = "fp32") -> torch.Tensor:
        return token_logprobs(self.model, batch, head_precision=head_precision).double().sum(1)


def concatenated_logps(model, batch: Batch, *, head_precision: str = "fp32") -> ChosenRejectedLogps:
    """Chosen and rejected summed log-probs of a pair batch (:meth:`EncodedPairs.batch`), ONE forward.

    ``model``: an HF causal LM, or a :class:`SequenceLogps` (possibly wrapped for data
    parallelism). Differentiable; the per-token log-probs are fp32 (fp64 for an fp64 model)
    summed in float64 (module conventions). ``head_precision``: the unembedding GEMMs'
    precision, "fp32" or "bf16" (:func:`target_logprobs`).
    """
    check_head_precision(head_precision)
    if hasattr(model, "get_output_embeddings"):
        u = token_logprobs(model, batch, head_precision=head_precision).double().sum(1)
    elif head_precision == "fp32":  # the call every data-parallel wrapper has always seen
        u = model(batch)
    else:
        u = model(batch, head_precision=head_precision)
    k = u.shape[0] // 2
    lens = batch.response_lens.to(device=u.device, dtype=torch.float64)
    return ChosenRejectedLogps(u[:k], u[k:], lens[:k], lens[k:])


# ----------------------------------------------------------------------------- precision, eval mode
def autocast_for(device: torch.device, precision: str):
    """The forward-pass autocast context: bf16 autocast for ``precision="bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def tf32_for(device: torch.device, precision: str):
    """With ``precision="bf16"`` on CUDA, let the matmuls that stay fp32 use TF32 (restored after).

    Under autocast the transformer runs in bf16, but :func:`target_logprobs` forms the
    unembedding logits in fp32 on purpose; TF32 (10-bit mantissa inputs, fp32 accumulation and
    output) is ~7× faster there on Hopper and still finer than the bf16 head TRL uses under
    autocast. ``precision="fp32"`` keeps exact fp32 (no-op).
    """
    if precision != "bf16" or torch.device(device).type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        old, new_api = matmul.fp32_precision, True
        matmul.fp32_precision = "tf32"
    except (AttributeError, RuntimeError):
        old, new_api = matmul.allow_tf32, False
        matmul.allow_tf32 = True
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision = old
        else:
            matmul.allow_tf32 = old


@contextmanager
def precision_context(device: torch.device, precision: str):
    """:func:`tf32_for` and :func:`autocast_for` together (scoring a whole pass at ``precision``)."""
    with ExitStack() as stack:
        stack.enter_context(tf32_for(device, precision))
        stack.enter_context(autocast_for(device, precision))
        yield


@contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in eval mode (dropout off) inside; its previous train/eval mode restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
