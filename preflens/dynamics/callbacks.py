"""The training loop's callback protocol and the :class:`TrainState` callbacks see.

A callback is any object with an attribute ``name: str`` and any of these optional methods
(the loop calls only those it has, on every rank; a callback that measures does so on rank 0,
``state.is_main``)::

    on_train_begin(state)                 once, before the first update (after a resume too)
    on_step(state) -> dict | None         after each update; returned scalars are merged into
                                          that step's metrics row (``metrics.jsonl``) under the
                                          names the callback chooses, e.g. "tracked/ranking/accuracy"
    on_end(state)                         once, after the last update
    state_dict() -> dict                  saved with every checkpoint ...
    load_state_dict(d)                    ... and restored on resume, before on_train_begin

A ``state_dict`` may hold JSON values and torch tensors (nested in dicts and lists), e.g. a
counter and a ``torch.Generator`` state. A callback without ``name`` is named after its class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from preflens.errors import ConfigError

__all__ = ["Callback", "TrainState", "CallbackList"]

HOOKS = ("on_train_begin", "on_step", "on_end", "state_dict", "load_state_dict")


@runtime_checkable
class Callback(Protocol):
    """Structural type of a training callback (every method is optional; see the module doc)."""

    name: str


@dataclass
class TrainState:
    """What callbacks see.

    ``step`` = updates done; ``epoch`` = the epoch of the last update (0-based); ``metrics`` =
    this step's logged scalars (read-only by convention: return new ones from ``on_step``);
    ``model`` = the plain HF module being trained (unwrapped from DDP/FSDP), ``lm`` its
    :class:`preflens.models.LM`; ``batch``/``batch_indices`` the step's global batch of pairs;
    ``ref_logps`` = ``(u_ref_w, u_ref_l)`` float64 [n] over the training set (None for
    reference-free losses); ``out_dir`` None for a run that writes no files.
    """

    step: int
    total_steps: int
    epoch: int
    metrics: dict
    model: torch.nn.Module
    lm: Any
    rank: int = 0
    world_size: int = 1
    out_dir: Path | None = None
    config: Any = None
    optimizer: Any = None
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None
    batch: list = field(default_factory=list)
    batch_indices: list = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def policy(self) -> torch.nn.Module:
        """Alias of ``model`` (earlier name)."""
        return self.model


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-ready copy of ``obj`` with each tensor moved to ``tensors`` and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): _flatten(v, tensors, prefix) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors, prefix) for v in obj]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


class CallbackList:
    """Calls the hooks of several callbacks in order; names them; saves and restores their state."""

    def __init__(self, callbacks) -> None:
        self.callbacks = list(callbacks)
        names: list[str] = []
        for cb in self.callbacks:
            if not any(callable(getattr(cb, h, None)) for h in HOOKS):
                raise ConfigError("callbacks", f"{cb!r} has none of the callback methods {', '.join(HOOKS)}")
            name = getattr(cb, "name", None) or type(cb).__name__
            names.append(name if name not in names else f"{name}#{names.count(name) + 1}")
        self.names = names

    def _call(self, hook: str, state: TrainState) -> list:
        return [getattr(cb, hook)(state) if callable(getattr(cb, hook, None)) else None
                for cb in self.callbacks]

    def on_train_begin(self, state: TrainState) -> None:
        self._call("on_train_begin", state)

    def on_step(self, state: TrainState) -> dict[str, float]:
        """Run every ``on_step``; return the scalars they returned (also merged into ``state.metrics``)."""
        added: dict[str, float] = {}
        for name, got in zip(self.names, self._call("on_step", state)):
            if got is None:
                continue
            if not isinstance(got, dict):
                raise ConfigError("callbacks", f"{name}.on_step returned {type(got).__name__}, expected a dict")
            added.update({str(k): (v.item() if isinstance(v, torch.Tensor) else v) for k, v in got.items()})
        state.metrics.update(added)
        return added

    def on_end(self, state: TrainState) -> None:
        self._call("on_end", state)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(json_part, tensors)`` of every callback's ``state_dict()``."""
        tensors: dict[str, torch.Tensor] = {}
        plain = {name: _flatten(cb.state_dict(), tensors, name) for name, cb in zip(self.names, self.callbacks)
                 if callable(getattr(cb, "state_dict", None))}
        json.dumps(plain)  # fail here, naming nothing half-written, if a state is not JSON + tensors
        return plain, tensors

    def load(self, plain: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the states saved by :meth:`state` (callbacks absent from it are left as they are)."""
        for name, cb in zip(self.names, self.callbacks):
            if name in plain and callable(getattr(cb, "load_state_dict", None)):
                cb.load_state_dict(_unflatten(plain[name], tensors))
