"""Per-head direct logit attribution (DLA) of the in-context vs memorized answer.

Source: Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language Models",
EMNLP 2023 (arXiv 2310.15910), Sec. 5 / Fig. 4; spec ``shared/research/factual_recall.md`` §5
and the TransformerLens 4.x recipe of ``shared/research/ecosystem.md`` §1.4-1.5.

Definition (§5.1). For prompt n, position T (default the last prompt token, the ":" of "A:"),
head (l, h) and the first sub-tokens ``t_ic``, ``t_mem`` of ``" " + city``:

    r = z[l, h, T] @ W_O[l, h]                       (no b_O)
    r~ = (r - mean_d r) / sigma_T                    (sigma_T: cached ln_final scale, LN frozen)
    DLA[l, h](n) = r~ . (W_U[:, t_ic] - W_U[:, t_mem])

with W_U LN-folded and centred (a **compatibility-mode** bridge: raw-mode ``logit_attrs`` ignores
the ln_final weight and bias and is silently wrong). Positive = promotes the in-context answer.
Each prompt is dotted with **its own** direction (the official code summed the batch's
directions, §5.3.1). Invariant: the attributions of all components (embeddings, heads, biases,
MLPs) plus ``b_U[t_ic] - b_U[t_mem]`` equal ``logit[t_ic] - logit[t_mem]`` at T.

When a country has several memorized capitals (Bolivia), ``t_mem`` is the memorized first token
with the highest logit at T in the same forward pass (as in
:func:`~preflens.attribution.recall.answer_logit_diff`).

Batching: prompts are grouped by token length, so batches need no padding and position T is a
real token of every row; no BOS.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from preflens.attribution.recall import first_token_ids
from preflens.data.recall_prompts import CounterfactualPrompt
from preflens.errors import ConfigError, DataError, ModelError

__all__ = [
    "LogitDecomposition",
    "compat_bridge",
    "logit_decomposition",
    "head_logit_attribution",
    "select_heads",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitDecomposition:
    """Direct contributions to ``logit[t_ic] - logit[t_mem]`` at one position, per prompt.

    Attributes:
        components: ``[C, n]`` float32, one row per component named in ``labels``
            (``L{l}H{h}`` heads, ``{l}_mlp_out``, ``embed``, ``pos_embed``, ``bias`` = summed
            attention/MLP output biases), each after the frozen ln_final.
        labels: ``C`` component names (TransformerLens ``get_full_resid_decomposition`` order).
        unembed_bias: ``[n]`` ``b_U[t_ic] - b_U[t_mem]``.
        logit_diff: ``[n]`` the model's ``logit[t_ic] - logit[t_mem]`` from the same forward.
        ic_ids, mem_ids: ``[n]`` the token ids used.
    """

    components: torch.Tensor
    labels: list[str]
    unembed_bias: torch.Tensor
    logit_diff: torch.Tensor
    ic_ids: torch.Tensor
    mem_ids: torch.Tensor

    def total(self) -> torch.Tensor:
        """``[n]`` sum of all components plus the unembedding-bias term."""
        return self.components.sum(0) + self.unembed_bias


def compat_bridge(lm_or_bridge):
    """A compatibility-mode bridge: built from an :class:`~preflens.models.LM`, or checked.

    Raises:
        ModelError: a bridge not in compatibility mode (DLA would be wrong, ecosystem.md §1.5).
    """
    from preflens.models import LM

    if isinstance(lm_or_bridge, LM):
        return lm_or_bridge.bridge(compat=True)
    if not (getattr(lm_or_bridge, "compatibility_mode", False)
            and getattr(lm_or_bridge, "_weights_processed", True)):
        raise ModelError(
            "direct logit attribution needs a compatibility-mode bridge "
            "(lm.bridge(compat=True)); a raw bridge ignores the ln_final weight and bias")
    return lm_or_bridge


def _groups(bridge, prompts, batch_size: int, position: int):
    """Yield ``(indices, ids[B, S], ic[B], mem_lists)`` for equal-length prompt batches."""
    tok = bridge.tokenizer
    by_len: dict[int, list[int]] = defaultdict(list)
    enc = []
    for i, p in enumerate(prompts):
        ids = tok(p.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError("prompt tokenizes to no tokens", field="text")
        if not -len(ids) <= position < len(ids):
            raise ConfigError("position", f"{position} is outside prompt {i} ({len(ids)} tokens)")
        enc.append(ids)
        by_len[len(ids)].append(i)
    ic = first_token_ids(tok, [p.in_context for p in prompts])
    mems = [first_token_ids(tok, p.memorized) for p in prompts]
    dev = bridge.cfg.device
    for length in sorted(by_len):
        idx_all = by_len[length]
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s: s + batch_size]
            ids = torch.tensor([enc[i] for i in idx], device=dev)
            yield idx, ids, torch.tensor([ic[i] for i in idx], device=dev), [mems[i] for i in idx]


def _pick_mem(logits_T: torch.Tensor, mems: list[list[int]]) -> torch.Tensor:
    """Per row, the memorized first token with the highest logit."""
    out = []
    for b, m in enumerate(mems):
        m_t = torch.tensor(m, device=logits_T.device)
        out.append(m_t[logits_T[b, m_t].argmax()])
    return torch.stack(out)


@torch.no_grad()
def logit_decomposition(
    lm_or_bridge,
    prompts: Sequence[CounterfactualPrompt],
    *,
    position: int = -1,
    batch_size: int = 16,
) -> LogitDecomposition:
    """Full direct decomposition of ``logit[t_ic] - logit[t_mem]`` at ``position`` (module
    docstring), every component of ``cache.get_full_resid_decomposition(layer=-1,
    expand_neurons=False)`` passed through ``cache.logit_attrs`` (frozen ln_final scale).
    ``components.sum(0) + unembed_bias == logit_diff`` up to float rounding. Caches every hook:
    meant for checks and small prompt sets; use :func:`head_logit_attribution` at scale."""
    bridge = compat_bridge(lm_or_bridge)
    n = len(prompts)
    comps = ub = ld = ics = mms = None
    labels: list[str] = []
    for idx, ids, ic, mems in _groups(bridge, prompts, batch_size, position):
        logits, cache = bridge.run_with_cache(ids)
        lt = logits[:, position]
        mem = _pick_mem(lt, mems)
        stack, labels = cache.get_full_resid_decomposition(
            layer=-1, expand_neurons=False, apply_ln=False, pos_slice=position, return_labels=True)
        attr = cache.logit_attrs(stack, tokens=ic, incorrect_tokens=mem, pos_slice=position)
        if comps is None:
            comps = torch.zeros(attr.shape[0], n)
            ub, ld = torch.zeros(n), torch.zeros(n)
            ics, mms = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        rows = torch.tensor(idx)
        comps[:, rows] = attr.float().cpu()
        ub[rows] = (bridge.b_U[ic] - bridge.b_U[mem]).float().cpu()
        ar = torch.arange(len(idx), device=lt.device)
        ld[rows] = (lt[ar, ic] - lt[ar, mem]).float().cpu()
        ics[rows], mms[rows] = ic.cpu(), mem.cpu()
    if comps is None:
        raise DataError("no prompts given", field="prompts")
    return LogitDecomposition(comps, list(labels), ub, ld, ics, mms)


@torch.no_grad()
def head_logit_attribution(
    lm_or_bridge,
    prompts: Sequence[CounterfactualPrompt],
    *,
    position: int = -1,
    batch_size: int = 32,
    per_prompt: bool = False,
    skip_degenerate: bool = True,
) -> torch.Tensor:
    """``[n_layers, n_heads]`` float32: mean over prompts of each head's DLA (module docstring).

    One ``run_with_cache`` per equal-length batch caching only ``attn.hook_z`` and
    ``ln_final.hook_scale``; ``cache.stack_head_results(-1, pos_slice=position)`` rebuilds
    ``z @ W_O`` (no b_O) and ``cache.logit_attrs(..., tokens=ic[B], incorrect_tokens=mem[B])``
    dots each prompt with its own direction.

    Args:
        lm_or_bridge: an :class:`~preflens.models.LM` (a compatibility-mode bridge is built) or a
            compatibility-mode bridge (ModelError otherwise).
        position: token index into each prompt (negative counts from the end).
        per_prompt: return ``[n_layers, n_heads, n]`` (every prompt, none skipped) instead.
        skip_degenerate: leave out of the mean the prompts flagged ``degenerate`` and those whose
            in-context and memorized first tokens coincide (zero direction, §5.3.2).
    """
    bridge = compat_bridge(lm_or_bridge)
    L, H = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    names = {f"blocks.{l}.attn.hook_z" for l in range(L)} | {"ln_final.hook_scale"}
    out = torch.zeros(L * H, len(prompts))
    keep = torch.ones(len(prompts), dtype=torch.bool)
    for idx, ids, ic, mems in _groups(bridge, prompts, batch_size, position):
        logits, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in names)
        mem = _pick_mem(logits[:, position], mems)
        stack = cache.stack_head_results(layer=-1, pos_slice=position)  # [L*H, B, d_model]
        attr = cache.logit_attrs(stack, tokens=ic, incorrect_tokens=mem, pos_slice=position)
        rows = torch.tensor(idx)
        out[:, rows] = attr.float().cpu()
        keep[rows] = (ic != mem).cpu()
    if per_prompt:
        return out.reshape(L, H, len(prompts))
    if skip_degenerate:
        keep &= torch.tensor([not p.degenerate for p in prompts], dtype=torch.bool)
        if int((~keep).sum()):
            log.info("head_logit_attribution: %d prompts skipped (degenerate or zero direction)",
                     int((~keep).sum()))
    else:
        keep[:] = True
    if not bool(keep.any()):
        raise DataError("no prompt with a non-degenerate direction", field="prompts")
    return out[:, keep].double().mean(-1).float().reshape(L, H)


def select_heads(attribution: torch.Tensor, k: int = 3) -> dict[str, list[tuple[int, int, float]]]:
    """Top-k heads of a ``[n_layers, n_heads]`` attribution (factual_recall.md §5.1, official
    k = 3): ``"memory"`` = the k most negative (promote the memorized answer), ``"in_context"``
    = the k most positive, each as ``(layer, head, score)`` sorted by |score| descending; ties
    broken by (layer, head) order."""
    if attribution.ndim != 2:
        raise ConfigError("attribution", f"must be [n_layers, n_heads], got {tuple(attribution.shape)}")
    L, H = attribution.shape
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= L * H:
        raise ConfigError("k", f"must be an int in [1, {L * H}], got {k!r}")
    flat = [(float(attribution[l, h]), l, h) for l in range(L) for h in range(H)]
    lo = sorted(flat, key=lambda x: (x[0], x[1], x[2]))[:k]
    hi = sorted(flat, key=lambda x: (-x[0], x[1], x[2]))[:k]
    return {"memory": [(l, h, s) for s, l, h in lo], "in_context": [(l, h, s) for s, l, h in hi]}
