"""Tiny torch helpers shared across preflens (no preflens imports, so any module can use them)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode (dropout off) for the block, then restore the train/eval flag it
    had, also when the block raises. Restores the top-level flag with ``model.train(was)``, so a
    submodule frozen in eval mode inside a training model is put back into training mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
