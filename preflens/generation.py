"""One greedy decoder and one last-position-logits helper for every caller (factual-recall
generation through a hooked bridge, toyworld evaluation through a plain HF model).

Conventions: prompts are lists of token ids (the caller tokenizes; preflens adds no BOS). A batch
is **left-padded** with ``pad``, an attention mask (1 = real token) and position ids
``cumsum(mask) - 1`` (clamped at 0), so absolute-position models see the unpadded positions.
Greedy = argmax of the last position's logits (ties: the lowest token id, torch's argmax).
Generation stops at ``eos`` (once every row has produced it) or after ``max_new_tokens`` new
tokens; the returned ids exclude the EOS and everything after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["Forward", "hf_forward", "left_pad", "greedy_decode", "last_logits"]

#: ``forward(input_ids [B, S], attention_mask [B, S], position_ids [B, S]) -> logits [B, S, V]``
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hf_forward(model) -> Forward:
    """The :data:`Forward` of a plain Hugging Face causal LM (``model(...).logits``)."""
    return lambda ids, mask, pos: model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device=None):
    """``(input_ids, attention_mask, position_ids)`` of a left-padded batch (long tensors)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, row in enumerate(prompts):
        ids[b, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
        mask[b, width - len(row):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def last_logits(forward: Forward, prompts: Sequence[Sequence[int]], *, pad: int, device=None) -> torch.Tensor:
    """``[B, V]`` float32 next-token logits after each prompt (one left-padded batch)."""
    ids, mask, pos = left_pad(prompts, pad, device)
    return forward(ids, mask, pos)[:, -1].float()


@torch.no_grad()
def greedy_decode(
    forward: Forward | None,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos: int | None,
    pad: int,
    device=None,
    cache_model=None,
) -> list[list[int]]:
    """Greedy continuations of one batch of prompts; new token ids per prompt (EOS cut).

    Args:
        forward: full-sequence forward (re-run on the whole sequence every step, so hooks on a
            bridge apply at every step). Ignored when ``cache_model`` is given.
        cache_model: a plain (unhooked) Hugging Face causal LM: decode with its KV cache instead
            (one token per step); gives the same tokens as the uncached path.
        max_new_tokens: new-token budget (>= 1).
        eos: stop token (None: always ``max_new_tokens``); pad: the padding id.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids, mask, pos = left_pad(prompts, pad, device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    past = None
    step_ids, step_pos = ids, pos
    for _ in range(max_new_tokens):
        if cache_model is not None:
            out = cache_model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                              past_key_values=past, use_cache=True)
            logits, past = out.logits, out.past_key_values
        else:
            logits = forward(ids, mask, pos)
        nxt = logits[:, -1].argmax(-1)
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        new.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        step_ids, step_pos = nxt[:, None], pos[:, -1:]
        if eos is not None:
            done |= nxt == eos
            if bool(done.all()):
                break
    rows = torch.stack(new, 1).tolist()
    return [r[: r.index(eos)] if eos is not None and eos in r else r for r in rows]
