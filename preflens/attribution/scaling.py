"""Steering factual recall by scaling one attention head's output at run time.

Source: Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language Models",
EMNLP 2023 (arXiv 2310.15910), Sec. 6 (scaling a memory head negatively raises in-context
answers to 88 % on Pythia-1.4b; the paper multiplies the head's value vectors).

Intervention: the hook on ``blocks.{L}.attn.hook_z`` (``[batch, pos, n_heads, d_head]``, one
slot per **query** head) returns a copy with ``[:, :, H, :]`` multiplied by alpha, at every
position and on every forward pass of generation. The attention pattern does not depend on the
values, so for multi-head attention this equals the paper's scaling of the head's values
(``hook_v``), and it scales exactly the head's output ``z @ W_O``. Under grouped-query attention
(Llama, Mistral, Qwen2, Gemma 2) ``hook_v`` has only ``n_kv_heads`` slots shared by a group of
query heads, so scaling it would scale the whole group: ``hook_z`` acts on the one query head.
On a compatibility-mode bridge the value bias is folded into b_O, so ``b_V @ W_O`` stays
unscaled (as in the paper); on a raw bridge it is scaled too (a different intervention, logged
as a warning). alpha = 1 reproduces the baseline exactly, alpha = 0 zero-ablates the head's
(bias-free) output, alpha < 0 reverses it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

from preflens.attribution.recall import LABELS, generate_continuations
from preflens.data.recall_prompts import CounterfactualPrompt
from preflens.errors import ConfigError, ModelError

__all__ = ["scale_heads", "scaling_grid", "scaling_sweep", "alpha_grid", "official_alpha_grid", "numpy_arange"]

log = logging.getLogger(__name__)

HeadScales = Mapping[tuple[int, int], float] | Iterable[tuple[int, int, float]]


def _normalise(bridge, scales: HeadScales, param: str = "scales") -> dict[int, dict[int, float]]:
    items = scales.items() if isinstance(scales, Mapping) else (((l, h), a) for l, h, a in scales)
    L, H = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    per_layer: dict[int, dict[int, float]] = {}
    for (layer, head), alpha in items:
        if not (isinstance(layer, int) and isinstance(head, int) and 0 <= layer < L and 0 <= head < H):
            raise ConfigError(param, f"head ({layer}, {head}) outside {L} layers x {H} heads")
        if not math.isfinite(float(alpha)):
            raise ConfigError(param, f"alpha for ({layer}, {head}) must be finite, got {alpha}")
        per_layer.setdefault(layer, {})[head] = float(alpha)
    return per_layer


def _hook(heads: dict[int, float], n_heads: int):
    def scale_z(z, hook):  # z: [batch, pos, n_heads (query heads), d_head]
        if z.ndim != 4 or z.shape[2] != n_heads:
            raise ModelError(f"{hook.name}: expected [batch, pos, {n_heads} query heads, d_head], "
                             f"got {tuple(z.shape)}; this bridge cannot scale single heads")
        z = z.clone()
        for h, a in heads.items():
            z[:, :, h, :] = z[:, :, h, :] * a
        return z

    return scale_z


@contextmanager
def scale_heads(lm=None, scales: HeadScales | None = None, *, bridge=None):
    """Context manager: multiply query head ``(layer, head)``'s ``hook_z`` by alpha for every
    ``(layer, head) -> alpha`` in ``scales`` (a dict, or an iterable of ``(layer, head, alpha)``)
    on every forward pass run inside the block (module docstring). Hooks are removed on exit,
    also on error. Yields the bridge.

    Args:
        lm: an :class:`~preflens.models.LM` (a compatibility-mode bridge is built) or ``None``
            with ``bridge=`` (a bridge passed first is accepted too).
    """
    from preflens.attribution.heads import resolve_bridge

    if scales is None:
        raise ConfigError("scales", "give {(layer, head): alpha}")
    bridge = resolve_bridge(lm, bridge=bridge, require_compat=False)
    per_layer = _normalise(bridge, scales)
    if not getattr(bridge, "compatibility_mode", False):
        log.warning("scale_heads on a raw bridge also scales the value bias b_V (not the paper's "
                    "intervention); use lm.bridge(compat=True)")
    n_heads = int(bridge.cfg.n_heads)
    hooks = [(f"blocks.{l}.attn.hook_z", _hook(h, n_heads)) for l, h in sorted(per_layer.items())]
    with bridge.hooks(fwd_hooks=hooks):
        yield bridge


def alpha_grid(lo: float, hi: float, step: float) -> list[float]:
    """``lo, lo+step, ..., hi`` (hi included) rounded to 6 decimals, with exactly 0 and 1 added.

    A cleaned-up grid for sweeps (α = 1 must reproduce the baseline, so it is always present).
    It is NOT the official grid of Yu et al. 2023: their code used ``np.arange(-5, 6, 0.1)``
    (memory head, −5 … 5.9) and ``np.arange(-10., 11., 0.5)`` (in-context head, −10 … 10.5), whose
    values neither stop at 5 / 10 nor hit 0 and 1 exactly; :func:`official_alpha_grid` gives those.
    """
    if step <= 0 or hi < lo:
        raise ConfigError("alpha_grid", f"need step > 0 and hi >= lo, got ({lo}, {hi}, {step})")
    n = int(math.floor((hi - lo) / step + 1e-9))
    vals = {round(lo + i * step, 6) for i in range(n + 1)} | {0.0, 1.0}
    return sorted(v + 0.0 for v in vals)


def numpy_arange(start: float, stop: float, step: float) -> list[float]:
    """The values of ``numpy.arange(start, stop, step)`` for floats, bit for bit, without numpy.

    numpy takes ``ceil((stop - start)/step)`` values ``start + i*delta`` with
    ``delta = (start + step) - start`` (not ``step``: e.g. ``(-5 + 0.1) + 5 = 0.09999999999999964``).
    """
    start, stop, step = float(start), float(stop), float(step)
    if step == 0 or not all(map(math.isfinite, (start, stop, step))):
        raise ConfigError("step", f"need finite start/stop and step != 0, got ({start}, {stop}, {step})")
    n = max(0, math.ceil((stop - start) / step))
    delta = (start + step) - start
    return [start + i * delta for i in range(n)]


OFFICIAL_ALPHA_GRIDS = {"memory": (-5.0, 6.0, 0.1), "in_context": (-10.0, 11.0, 0.5)}


def official_alpha_grid(head_kind: str) -> list[float]:
    """The α grid of Yu et al. 2023's official sweep scripts, as numpy produced it (110 / 42 values).

    ``"memory"``: ``np.arange(-5, 6, 0.1)`` = −5.0, −4.9, −4.800000000000001, …, 5.899999999999961;
    ``"in_context"``: ``np.arange(-10., 11., 0.5)`` = −10.0 … 10.5. Parity only: 0 and 1 are not
    exactly on the memory grid (use :func:`alpha_grid` for analysis).
    """
    if head_kind not in OFFICIAL_ALPHA_GRIDS:
        raise ConfigError("head_kind", f"unknown value {head_kind!r}", allowed=OFFICIAL_ALPHA_GRIDS)
    return numpy_arange(*OFFICIAL_ALPHA_GRIDS[head_kind])


def scaling_grid(
    lm,
    prompts: Sequence[CounterfactualPrompt],
    settings: Sequence[HeadScales],
    *,
    bridge=None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    keep_degenerate: bool = False,
) -> list[dict]:
    """Label rates of greedy generation under each head-scaling setting (Yu et al. 2023, Sec. 6).

    Each setting is what :func:`scale_heads` takes -- ``{(layer, head): alpha}`` or an iterable
    of ``(layer, head, alpha)`` -- so one setting may scale several heads by different alphas
    (``{}`` is the unscaled baseline). For each setting, in the given order:
    :func:`~preflens.attribution.recall.generate_continuations` under the hooks. Every setting
    is checked (heads inside ``bridge.cfg``, finite alphas) before anything is generated. The
    compatibility-mode bridge is built once (``lm.bridge(compat=True)``) unless ``bridge`` is
    given. Degenerate prompts are left out unless ``keep_degenerate``.

    Returns:
        one dict per setting: ``{"scales": [[layer, head, alpha], ...] (sorted by layer, head),
        "n", "memorized", "in_context", "neither"}`` (rates in [0, 1], denominator ``n``) plus
        ``"counts"`` (label -> count).
    """
    use = [p for p in prompts if keep_degenerate or not p.degenerate]
    if not use:
        raise ConfigError("prompts", "no prompts left (all degenerate)")
    from preflens.attribution.heads import resolve_bridge

    bridge = resolve_bridge(lm, bridge=bridge, require_compat=False)
    checked = [_normalise(bridge, s, f"settings[{i}]") for i, s in enumerate(settings)]
    rows = []
    for per_layer in checked:
        scales = {(l, h): a for l, heads in per_layer.items() for h, a in heads.items()}
        with scale_heads(bridge=bridge, scales=scales):
            conts = generate_continuations(bridge, use, max_new_tokens=max_new_tokens,
                                           batch_size=batch_size)
        counts = {lab: sum(c.label == lab for c in conts) for lab in LABELS}
        rows.append({"scales": [[l, h, a] for (l, h), a in sorted(scales.items())], "n": len(use),
                     **{lab: counts[lab] / len(use) for lab in LABELS}, "counts": counts})
    return rows


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
    """Label rates of greedy generation per alpha (Yu et al. 2023, Sec. 6).

    :func:`scaling_grid` with one setting ``{head: alpha}`` per alpha (several heads share the
    alpha); arguments as there.

    Returns:
        one dict per alpha, in the given order: ``{"alpha", "n", "memorized", "in_context",
        "neither"}`` (rates in [0, 1]) plus ``"counts"`` (label -> count).
    """
    heads = [tuple(head)] if isinstance(head[0], int) else [tuple(h) for h in head]
    rows = scaling_grid(lm, prompts, [{h: float(a) for h in heads} for a in alphas], bridge=bridge,
                        max_new_tokens=max_new_tokens, batch_size=batch_size,
                        keep_degenerate=keep_degenerate)
    return [{"alpha": float(a), **{k: v for k, v in r.items() if k != "scales"}}
            for a, r in zip(alphas, rows)]
