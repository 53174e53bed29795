"""Device and process-group setup for the training loop, as one context manager that owns teardown.

Under ``torchrun`` (env ``WORLD_SIZE`` > 1) :func:`distributed` joins (or creates) the process
group -- NCCL on CUDA, gloo on CPU -- and :func:`wrap_model` wraps the scoring module for data
parallelism. Strategies: ``"ddp"`` (``DistributedDataParallel``; gradients averaged over ranks),
``"fsdp"`` (FSDP2 per-block sharding, gradients averaged over ranks; :mod:`preflens.dynamics.fsdp`).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from preflens.errors import ConfigError

__all__ = ["DistEnv", "distributed", "wrap_model", "unwrap_model", "all_reduce_sum", "barrier", "no_sync",
           "is_sharded", "STRATEGIES"]

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``device``, ``rank`` of ``world_size`` (1 = single process)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device | None, default: torch.device, world_size: int) -> torch.device:
    """``device`` (or ``default``) as a concrete torch device; each torchrun rank gets ``cuda:LOCAL_RANK``."""
    if device is None and world_size > 1 and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        device = torch.device(device) if device is not None else torch.device(default)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError("device", f"not a torch device: {device!r} ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"'{device}' requested but CUDA is not available")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


@contextmanager
def distributed(device: str | torch.device | None, default: torch.device) -> Iterator[DistEnv]:
    """Yield the :class:`DistEnv` of this process; a process group created here is destroyed on exit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device, default, world)
    created = world > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield DistEnv(dev, dist.get_rank() if world > 1 else 0, world)
    finally:
        if created:
            # Let DDP's reducer be freed while the group is still registered, and let gloo's
            # worker threads finish releasing completed work (they need the GIL) before the
            # group's destructor joins them: otherwise teardown can deadlock (seen in CI).
            gc.collect()
            time.sleep(0.2)
            dist.destroy_process_group()


def wrap_model(module: torch.nn.Module, env: DistEnv, strategy: str = "ddp", *, bf16: bool = False
               ) -> torch.nn.Module:
    """``module`` ready for ``env``: itself on one process, else wrapped by ``strategy``.

    ``"fsdp"`` shards ``module`` in place (its ``.model``'s decoder blocks are the units; ``bf16``:
    bf16 compute parameters, fp32 gradient reduction) and returns it."""
    if strategy not in STRATEGIES:
        raise ConfigError("strategy", f"unknown value {strategy!r}", allowed=STRATEGIES)
    if env.world_size == 1:
        return module
    if strategy == "fsdp":
        from preflens.dynamics import fsdp

        return fsdp.shard_model(module, fsdp.decoder_blocks(module.model), bf16=bf16)
    ids = [env.device] if env.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The module :func:`wrap_model` was given."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` was sharded by FSDP2 (:func:`wrap_model` with ``"fsdp"``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def no_sync(module: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce of this backward unless ``sync`` (gradient accumulation)."""
    if is_sharded(module):
        module.set_requires_gradient_sync(sync)
        return nullcontext()
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op on one process); returns ``t``."""
    if env.world_size > 1:
        dist.all_reduce(t)
    return t


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op on one process)."""
    if env.world_size > 1:
        dist.barrier()
