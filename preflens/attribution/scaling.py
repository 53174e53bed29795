"""Steering factual recall by scaling one attention head's value vectors at run time.

Source: Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language Models",
EMNLP 2023 (arXiv 2310.15910), Sec. 6 (scaling a memory head negatively raises in-context
answers to 88 % on Pythia-1.4b); spec ``shared/research/factual_recall.md`` §6.

Intervention (§6.1): the hook on ``blocks.{L}.attn.hook_v`` (``[batch, pos, n_heads, d_head]``)
returns a copy with ``[:, :, H, :]`` multiplied by alpha, at **every position** and on **every
forward pass** of generation. The attention pattern does not depend on v, so this equals scaling
the head's ``hook_z`` and hence its output ``z @ W_O``. On a compatibility-mode bridge the value
bias is folded into b_O, so ``b_V @ W_O`` stays unscaled (as in the paper); on a raw bridge it is
scaled too (a different intervention, logged as a warning). alpha = 1 reproduces the baseline
exactly, alpha = 0 zero-ablates the head's value path, alpha < 0 reverses it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

from preflens.attribution.recall import LABELS, CounterfactualPrompt, generate_continuations
from preflens.errors import ConfigError

__all__ = ["scale_heads", "scaling_sweep", "alpha_grid"]

log = logging.getLogger(__name__)

HeadScales = Mapping[tuple[int, int], float] | Iterable[tuple[int, int, float]]


def _normalise(bridge, scales: HeadScales) -> dict[int, dict[int, float]]:
    items = scales.items() if isinstance(scales, Mapping) else (((l, h), a) for l, h, a in scales)
    L, H = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    per_layer: dict[int, dict[int, float]] = {}
    for (layer, head), alpha in items:
        if not (isinstance(layer, int) and isinstance(head, int) and 0 <= layer < L and 0 <= head < H):
            raise ConfigError("scales", f"head ({layer}, {head}) outside {L} layers x {H} heads")
        if not math.isfinite(float(alpha)):
            raise ConfigError("scales", f"alpha for ({layer}, {head}) must be finite, got {alpha}")
        per_layer.setdefault(layer, {})[head] = float(alpha)
    return per_layer


def _hook(heads: dict[int, float]):
    def scale_v(v, hook):  # v: [batch, pos, n_heads, d_head]
        v = v.clone()
        for h, a in heads.items():
            v[:, :, h, :] = v[:, :, h, :] * a
        return v

    return scale_v


@contextmanager
def scale_heads(bridge, scales: HeadScales):
    """Context manager: multiply ``blocks.L.attn.hook_v[..., head, :]`` by alpha for every
    ``(layer, head) -> alpha`` in ``scales`` (a dict, or an iterable of ``(layer, head, alpha)``)
    on every forward pass run inside the block (module docstring). Hooks are removed on exit,
    also on error. Yields the bridge."""
    per_layer = _normalise(bridge, scales)
    if not getattr(bridge, "compatibility_mode", False):
        log.warning("scale_heads on a raw bridge also scales the value bias b_V (not the paper's "
                    "intervention); use lm.bridge(compat=True)")
    hooks = [(f"blocks.{l}.attn.hook_v", _hook(h)) for l, h in sorted(per_layer.items())]
    with bridge.hooks(fwd_hooks=hooks):
        yield bridge


def alpha_grid(lo: float, hi: float, step: float) -> list[float]:
    """``lo, lo+step, ..., hi`` rounded to 6 decimals, with exactly 0 and 1 included
    (factual_recall.md §6.2: memory head ``(-5, 5, 0.1)``, in-context head ``(-10, 10, 0.5)``)."""
    if step <= 0 or hi < lo:
        raise ConfigError("alpha_grid", f"need step > 0 and hi >= lo, got ({lo}, {hi}, {step})")
    n = int(math.floor((hi - lo) / step + 1e-9))
    vals = {round(lo + i * step, 6) for i in range(n + 1)} | {0.0, 1.0}
    return sorted(v + 0.0 for v in vals)


def scaling_sweep(
    lm,
    prompts: Sequence[CounterfactualPrompt],
    head: tuple[int, int] | Sequence[tuple[int, int]],
    alphas: Sequence[float],
    *,
    bridge=None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    keep_degenerate: bool = False,
) -> list[dict]:
    """Label rates of greedy generation per alpha (factual_recall.md §6.2).

    For each alpha: :func:`scale_heads` with ``{head: alpha}`` (several heads share the alpha),
    then :func:`~preflens.attribution.recall.generate_continuations` under the hook. The
    compatibility-mode bridge is built once (``lm.bridge(compat=True)``) unless ``bridge`` is
    given. Degenerate prompts are left out unless ``keep_degenerate``.

    Returns:
        one dict per alpha, in the given order: ``{"alpha", "n", "memorized", "in_context",
        "neither"}`` (rates in [0, 1]) plus ``"counts"`` (label -> count).
    """
    heads = [tuple(head)] if isinstance(head[0], int) else [tuple(h) for h in head]
    use = [p for p in prompts if keep_degenerate or not p.degenerate]
    if not use:
        raise ConfigError("prompts", "no prompts left (all degenerate)")
    if bridge is None:
        bridge = lm.bridge(compat=True)
    rows = []
    for alpha in alphas:
        with scale_heads(bridge, {h: float(alpha) for h in heads}):
            conts = generate_continuations(bridge, use, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size)
        counts = {lab: sum(c.label == lab for c in conts) for lab in LABELS}
        rows.append({"alpha": float(alpha), "n": len(use),
                     **{lab: counts[lab] / len(use) for lab in LABELS}, "counts": counts})
    return rows
