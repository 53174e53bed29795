"""Supervised fine-tuning (SFT) on (prompt, response) examples, loss on the response tokens only.

The first stage of the pipeline DPO papers start from (Rafailov et al. 2023, §4 "π_SFT"; Chen
et al. 2024, §4.1: "SFT on the chosen responses, completion-only"): next-token cross-entropy

    L = − Σ_{b, t ∈ response(b)} log π(y_{b,t} | x_b, y_{b,<t}) / Σ_b |y_b|

on a batch of examples: **one mean over all response tokens of the batch** (EOS included and
counted), not a mean of per-sequence means, so a long response weighs more than a short one.
This is what Hugging Face computes from ``labels`` with ``-100`` on the prompt (and padding)
positions, and TRL's ``SFTTrainer`` with ``completion_only_loss``. Prompt tokens are context
only: they are never a target, so no gradient comes from predicting them.

Tokenization, BOS, EOS and log-probs are those of :mod:`preflens.scoring` (prompt and response
encoded separately, BOS exactly when the tokenizer adds it, EOS appended; the fused fp32 head),
so the model is trained on exactly the token sequences the probes score afterwards.

Like :func:`preflens.dynamics.train.train_preference`, it trains the plain HF module ``lm.model``
in place (never a TransformerLens bridge) with dropout off (eval mode; the previous mode is
restored), and the run is a pure function of ``seed``: the data order is a stream of seeded
permutations of the examples, cut into consecutive batches of ``batch_size`` (a batch may span
two permutations; with ``batch_size`` > the number of examples an example repeats inside it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from preflens.dynamics.config import TrainConfig
from preflens.dynamics.train import make_optimizer, no_kv_cache
from preflens.errors import ConfigError, TrainingError
from preflens.scoring import collate, encode, eval_mode, token_logprobs

__all__ = ["SFTResult", "sft", "sft_order"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTResult:
    """``losses[t]`` = the loss of update t + 1's batch *before* that update (token mean, nats);
    ``steps`` = updates done; ``tokens`` = response tokens trained on (EOS counted)."""

    losses: list[float]
    steps: int
    tokens: int


def sft_order(n: int, *, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The example indices of every update: consecutive ``batch_size`` slices of a stream of
    permutations of ``range(n)`` drawn from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    need, stream = steps * batch_size, []
    while len(stream) < need:
        stream += torch.randperm(n, generator=g).tolist()
    return [stream[t * batch_size: (t + 1) * batch_size] for t in range(steps)]


def _check_examples(examples) -> list[tuple[str, str]]:
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) or not examples:
        raise ConfigError("examples", "need a non-empty list of (prompt, response) string pairs")
    out = []
    for i, ex in enumerate(examples):
        if (not isinstance(ex, (tuple, list)) or len(ex) != 2
                or not all(isinstance(s, str) for s in ex)):
            raise ConfigError("examples", f"item {i} is not a (prompt, response) pair of strings: {ex!r}")
        out.append((ex[0], ex[1]))
    return out


def sft(lm, examples: Sequence[tuple[str, str]], *, steps: int, lr: float, batch_size: int, seed: int,
        optimizer: str = "adamw", optimizer_kwargs: dict | None = None, add_eos: bool = True) -> SFTResult:
    """Fine-tune ``lm.model`` in place on ``examples`` with the response-only loss (module docstring).

    Args:
        examples: (prompt, response) string pairs.
        steps: optimizer updates (≥ 1); ``batch_size`` examples each (:func:`sft_order`).
        lr, optimizer, optimizer_kwargs: as in :class:`~preflens.dynamics.config.TrainConfig`
            ("adamw" with weight decay 0 unless given, "sgd", "rmsprop"; constant learning rate).
        seed: the data order (:func:`sft_order`); nothing else is random.
        add_eos: append EOS to each response and train on it (the scoring convention).

    Returns:
        :class:`SFTResult` with the loss of each update's batch, computed before the update.

    Raises:
        ConfigError: empty or malformed ``examples``; ``steps``, ``batch_size``, ``lr``, ``seed``,
            ``optimizer`` or ``optimizer_kwargs`` invalid (named).
        DataError / ScoringError: an example the tokenizer or the context cannot hold
            (:func:`preflens.scoring.encode`).
        TrainingError: a non-finite loss (raised before that update is applied).
    """
    examples = _check_examples(examples)
    # Validated (ConfigError naming the field) and the optimizer built as a training run's would be.
    cfg = TrainConfig(optimizer=optimizer, optimizer_kwargs=optimizer_kwargs or {}, lr=lr, steps=steps,
                      batch_size=batch_size, seed=seed)
    encoded = encode(lm.tokenizer, [p for p, _ in examples], [r for _, r in examples], add_eos=add_eos,
                     max_length=lm.n_ctx)
    model, device = lm.model, lm.device
    params = [p for p in model.requires_grad_(True).parameters()]
    opt = make_optimizer(params, cfg, device)
    losses, tokens = [], 0
    with eval_mode(model), no_kv_cache(model):  # eval = dropout off; gradients still flow
        for idx in sft_order(len(encoded), steps=steps, batch_size=batch_size, seed=seed):
            batch = collate([encoded[i] for i in idx], pad_id=lm.pad_id, device=device)
            n_tokens = int(batch.response_lens.sum())
            loss = -token_logprobs(model, batch).sum() / n_tokens
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"sft step {len(losses) + 1}: non-finite loss {value}; no update applied")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(value)
            tokens += n_tokens
    log.info("sft: %d steps, loss %.4f -> %.4f", steps, losses[0], losses[-1])
    return SFTResult(losses, steps, tokens)
