"""The training run's configuration (:class:`TrainConfig`) and its learning-rate schedule.

A :class:`TrainConfig` is frozen and validates itself when built: a bad value raises
:class:`~preflens.errors.ConfigError` naming the *Python field* and, for a finite choice, the
allowed values. :meth:`TrainConfig.to_dict` is the resume-compatibility record: a run directory
is only continued by a config whose record (plus the data digest) equals the saved one.
Execution options that may change between a run and its resumption (``device``, ``resume``,
``compile``, checkpoint and eval cadence, the reference-cache folder) are not in the record.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preflens.dynamics import losses
from preflens.errors import ConfigError
from preflens.scoring import HEAD_PRECISIONS

__all__ = ["TrainConfig", "OPTIMIZERS", "PRECISIONS", "HEAD_PRECISIONS", "SCHEDULES", "SHARDS", "lr_at"]

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("constant", "linear", "cosine")

# Fields that do not change what a step computes; they may differ between a run and its resume.
RUN_OPTIONS = ("steps", "epochs", "eval_every", "checkpoint_every", "keep_checkpoints", "resume",
               "device", "compile", "ref_cache_dir", "shard", "activation_checkpointing")
SHARDS = ("ddp", "fsdp")
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_targets")
# Record fields added after runs were saved, with the value a saved record without them computed.
RECORD_DEFAULTS = {"head_precision": "fp32"}


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, schedule: str | None,
          min_lr_frac: float = 0.0, warmup_offset: int = 0) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then constant/linear/cosine decay.

    Warm-up: ``lr · (step + warmup_offset) / warmup_steps`` for ``step < warmup_steps``.
    ``warmup_offset=0`` is transformers' ``get_*_schedule_with_warmup`` (the schedules TRL uses):
    the first update has lr 0. ``warmup_offset=1`` is nanoGPT's (the toy-world pre-training).
    After warm-up, with progress p = (step − warmup) / max(1, total − warmup): ``"linear"`` →
    1 − p, ``"cosine"`` → ½(1 + cos πp) (transformers' half-cycle cosine), ``None``/``"constant"``
    → 1; the decayed factor f is mapped to ``min_lr_frac + (1 − min_lr_frac) · f``.
    """
    if step < warmup_steps:
        return lr * (step + warmup_offset) / warmup_steps
    frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    decayed = {"linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}.get(schedule)
    if decayed is None:
        return lr
    return lr * (min_lr_frac + (1 - min_lr_frac) * decayed) if min_lr_frac else lr * decayed


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a preference-training run except the model, the data and the
    output folder (arguments of :func:`preflens.dynamics.train.train_preference`).

    Fields:
        loss: a name of :data:`preflens.dynamics.losses.LOSSES`; ``loss_kwargs`` its parameters
            (merged over the loss's defaults; ``cdpo`` without ``alpha`` uses the pairs' own
            ``alpha`` when every pair has one).
        lr, schedule, warmup_steps: peak learning rate; ``None``/"constant"/"linear"/"cosine"
            decay to 0 after ``warmup_steps`` of linear warm-up from 0 (:func:`lr_at`).
        steps, epochs: exactly one, the run length (optimizer updates or passes over the data).
        batch_size: pairs per update, global (over ``grad_accum`` micro-steps and the ranks).
        optimizer: "adamw" (weight decay 0 unless in ``optimizer_kwargs``; fused on CUDA),
            "sgd", "rmsprop" (torch defaults). ``max_grad_norm`` clips (None: no clipping).
        precision: "fp32" or "bf16" (autocast forward, fp32 master weights and log-probs).
        head_precision: the unembedding GEMMs: "fp32" (default; TF32 on CUDA under bf16
            ``precision``) or "bf16": hidden states, unembedding weights and the logit gradient
            rounded to bf16 for the GEMMs, which accumulate and return fp32, so logits, log-softmax
            and the weight gradient stay fp32 (:func:`preflens.scoring.target_logprobs`). At
            GPT-2's V = 50k these GEMMs dominate a bf16 step on a GPU; on a CPU "bf16" is emulated
            (same numbers, no faster). TRL 1.16 under bf16 autocast rounds the logits themselves
            to bf16. Reference and eval log-probs are scored at the same head precision.
        seed: the data order and torch's RNG. ``add_eos=False`` scores responses without EOS.
        pairwise_normalized: optimize −a_w·(u_w/n_w − u_l/n_l), n = detached per-pair gradient
            norms (Yuan et al. 2024, pairwise-normalized gradient descent); ``loss`` is still logged.
        eval_every, checkpoint_every, keep_checkpoints: cadence in steps (plus the last step).
        resume: continue from the newest good checkpoint (False: delete them and start over).
        device, compile, ref_cache_dir: where to run, ``torch.compile`` the transformer, where
            to cache reference log-probs (default ``<out_dir>/ref_cache``).
        shard: under ``torchrun``, "ddp" (replicated model, gradients all-reduced) or "fsdp"
            (FSDP2: parameters, gradients and optimizer state sharded per block, sharded DCP
            checkpoints that resume into any number of processes; :mod:`preflens.dynamics.fsdp`).
        activation_checkpointing: recompute each block's activations in the backward (saves
            memory, same numbers).
        lora_r, lora_alpha, lora_targets: LoRA adapters of rank ``lora_r`` (None: full
            fine-tuning), scale α/r (α default 2r), on the named modules (default per family);
            the reference is the base model (:mod:`preflens.dynamics.lora`).
    """

    loss: str = "dpo"
    loss_kwargs: dict = field(default_factory=dict)
    optimizer: str = "adamw"
    optimizer_kwargs: dict = field(default_factory=dict)
    lr: float | None = None
    schedule: str | None = None
    warmup_steps: int = 0
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    precision: str = "fp32"
    head_precision: str = "fp32"
    seed: int | None = None
    max_grad_norm: float | None = None
    pairwise_normalized: bool = False
    add_eos: bool = True
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = True
    device: str | None = None
    compile: bool = False
    ref_cache_dir: str | Path | None = None
    shard: str = "ddp"
    activation_checkpointing: bool = False
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss_kwargs", dict(self.loss_kwargs or {}))
        object.__setattr__(self, "optimizer_kwargs", dict(self.optimizer_kwargs or {}))
        if self.lora_targets is not None and not isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self._check_numbers()
        self._check_choices()
        losses.resolve_kwargs(self.loss, self.loss_kwargs)  # ConfigError naming a bad loss parameter

    def _check_numbers(self) -> None:
        for name in ("lr", "max_grad_norm"):
            v = getattr(self, name)
            if (v is not None or name == "lr") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                    or not math.isfinite(v) or v <= 0):
                raise ConfigError(name, f"must be a finite number > 0, got {v!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("steps", "give exactly one of steps and epochs")
        for name, low in (("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0), ("keep_checkpoints", 1),
                          ("steps", 1), ("epochs", 1), ("eval_every", 1), ("checkpoint_every", 1),
                          ("seed", -2**63)):
            v = getattr(self, name)
            if (v is not None or name in ("batch_size", "seed")) and (not _is_int(v) or v < low):
                raise ConfigError(name, f"must be an integer >= {low}, got {v!r}")
        if self.lora_r is not None and (not _is_int(self.lora_r) or self.lora_r < 1):
            raise ConfigError("lora_r", f"must be an integer >= 1, got {self.lora_r!r}")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool) or not isinstance(
                self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):
            raise ConfigError("lora_alpha", f"must be a finite number > 0, got {self.lora_alpha!r}")
        if self.lora_targets is not None and (isinstance(self.lora_targets, str) or not self.lora_targets
                                              or not all(isinstance(t, str) and t for t in self.lora_targets)):
            raise ConfigError("lora_targets", f"must be a non-empty list of module names, got {self.lora_targets!r}")
        if self.lora_r is None and (self.lora_alpha is not None or self.lora_targets is not None):
            raise ConfigError("lora_r", "lora_alpha/lora_targets given without lora_r")
        for name in ("pairwise_normalized", "add_eos", "resume", "compile", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be True or False, got {getattr(self, name)!r}")

    def _check_choices(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("precision", PRECISIONS), ("head_precision", HEAD_PRECISIONS),
                              ("schedule", (None, *SCHEDULES)), ("shard", SHARDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"unknown value {getattr(self, name)!r}",
                                  allowed=[a for a in allowed if a is not None])
        losses.get_loss(self.loss)
        if self.shard == "fsdp" and self.lora_r is not None:
            raise ConfigError("lora_r", "LoRA with shard='fsdp' is not supported; use shard='ddp' (the base model "
                              "is frozen, so only the adapters are all-reduced)")
        if self.shard == "fsdp" and self.pairwise_normalized:
            raise ConfigError("pairwise_normalized", "not supported with shard='fsdp' (its gradient norms need "
                              "the whole model on every rank)")

    @property
    def resolved_loss_kwargs(self) -> dict:
        """``loss_kwargs`` merged over the loss's defaults (:func:`losses.resolve_kwargs`)."""
        return losses.resolve_kwargs(self.loss, self.loss_kwargs)

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The resume-compatibility record: every field that changes what a step computes
        (not :data:`RUN_OPTIONS`), loss parameters resolved, JSON-ready (tensors as lists)."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUN_OPTIONS
                  and not (f.name in LORA_FIELDS and self.lora_r is None)}  # full fine-tuning: as before
        record["loss_kwargs"] = self.resolved_loss_kwargs
        return json.loads(json.dumps(record, default=lambda t: t.tolist()))
