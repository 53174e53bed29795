"""LoRA adapters (through ``peft``) for the preference-training loop.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3): a frozen
weight W0 [d_out, d_in] gets a trainable update h = W0 x + (α/r)·B A x with A [r, d_in]
(Kaiming-uniform init), B [d_out, r] (zero init), so the adapted model starts as the base model.
No dropout on the adapter path (the loop trains with dropout off).

The reference policy of a LoRA run is the base model itself -- the same module with the
adapters disabled (``with peft_model.disable_adapter():``), never a second copy, as TRL does. At
step 0 the adapted model equals the base model (B = 0), so the loop's cached reference
log-probs, scored before the adapters are attached, are exactly the base model's.

Targets default per model family (``config.model_type``): GPT-2 ``c_attn``/``c_proj`` (attention
and MLP output projections), Llama-like ``q_proj``/``k_proj``/``v_proj``/``o_proj``, GPT-NeoX
``query_key_value``/``dense``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from preflens.errors import ConfigError, TrainingError

__all__ = ["DEFAULT_TARGETS", "default_targets", "attach_lora", "save_adapter", "is_lora_parameter"]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj"),
    "gpt_neox": ("query_key_value", "dense"),
    **{family: _ATTN for family in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text",
                                    "olmo", "olmo2", "phi", "smollm3")},
}


def default_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """The LoRA target module names for ``model``'s family (``config.model_type``).

    Raises:
        ConfigError: ``lora_targets`` must be given for a family without a default.
    """
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in DEFAULT_TARGETS:
        raise ConfigError("lora_targets", f"no default LoRA targets for model type {family!r}; name the "
                          "modules to adapt", allowed=sorted(DEFAULT_TARGETS))
    return DEFAULT_TARGETS[family]


def is_lora_parameter(name: str) -> bool:
    """Whether parameter ``name`` belongs to a LoRA adapter (``lora_A`` / ``lora_B``)."""
    return ".lora_A." in name or ".lora_B." in name


def attach_lora(model: torch.nn.Module, *, r: int, alpha: float | None = None,
                targets: list[str] | tuple[str, ...] | None = None):
    """Inject LoRA adapters into ``model`` in place and freeze everything else; return the ``PeftModel``.

    ``model`` stays the module that is trained and scored (``peft_model.get_base_model()`` is
    ``model``); the returned ``PeftModel`` owns ``disable_adapter()``, ``save_pretrained`` and
    ``merge_and_unload``. ``alpha`` defaults to ``2·r``; A is initialized from the torch RNG (seed it).

    Raises:
        ConfigError: ``lora_r``/``lora_alpha`` out of range, or ``lora_targets`` matching no module.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora_r", "LoRA needs the peft package: pip install 'preflens[lora]'") from None
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError("lora_r", f"must be an integer >= 1, got {r!r}")
    alpha = 2 * r if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError("lora_alpha", f"must be a number > 0, got {alpha!r}")
    targets = list(targets) if targets else list(default_targets(model))
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in leaf_names]
    if unknown:
        raise ConfigError("lora_targets", f"no module named {unknown} in {type(model).__name__}")
    conv1d = getattr(model.config, "model_type", None) == "gpt2"  # Conv1D stores W as [d_in, d_out]
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                     fan_in_fan_out=conv1d)
    peft_model = get_peft_model(model, cfg)
    if peft_model.get_base_model() is not model:  # pragma: no cover - peft contract
        raise TrainingError("peft did not adapt the model in place")
    return peft_model


def save_adapter(peft_model, path: str | Path) -> Path:
    """Write the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) atomically to ``path``.

    Raises:
        TrainingError: the write failed (an existing ``path`` is kept).
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not write the adapter to {path}: {exc.strerror or exc}") from exc
    return path
