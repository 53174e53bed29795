"""Fully sharded data parallel (FSDP2), activation checkpointing and sharded (DCP) checkpoints.

The training loop's ``shard="fsdp"`` strategy (Zhao et al. 2023, "PyTorch FSDP", per-parameter
sharding of ``torch.distributed.fsdp.fully_shard``): every decoder block is its own FSDP unit
(all-gathered just before it runs, freed after), the rest of the model (embeddings, final norm,
unembedding, tied GPT-2 ``wte``/``lm_head`` once) is the root unit. Gradients are reduce-scattered
with the *mean* over ranks, the convention of DDP, so the loop's loss scaling is unchanged.
``bf16`` on CUDA = bf16 parameters for compute with fp32 gradient reduction (``MixedPrecisionPolicy``);
on CPU everything stays fp32, so 2 gloo processes reproduce one process to float tolerance.

Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
each block's forward runs under non-reentrant :func:`torch.utils.checkpoint.checkpoint`, so only
its inputs are kept and its activations are recomputed in the backward. The block's parameter
names do not change (no wrapper module), so plain and sharded checkpoints stay interchangeable.

Sharded checkpoints: ``<root>/step-00000012/`` holds ``dcp/`` (``torch.distributed.checkpoint``:
one file per rank plus ``.metadata``), ``rng.safetensors``, ``state.json`` and ``manifest.json``
(sha256 of every file, written last), renamed into place atomically like
:mod:`preflens.dynamics.checkpoint`. The state is keyed by parameter names, not by rank, so a
checkpoint written by N processes loads into M (resharded on load; M = 1 loads full tensors).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from preflens.dynamics.checkpoint import (_fsync, _remove_partial, _sha256, list_checkpoints, newest_good, rng_state,
                                          set_rng_state)
from preflens.errors import ConfigError, TrainingError

__all__ = ["decoder_blocks", "enable_activation_checkpointing", "shard_model", "save_sharded_checkpoint",
           "load_sharded_latest", "full_tensor", "is_sharded_checkpoint"]


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM, found generically, in order.

    The blocks are the children of the ``nn.ModuleList`` whose children are all of one class
    named in the model's ``_no_split_modules`` (HF's list of decoder-layer classes: ``GPT2Block``,
    ``LlamaDecoderLayer``, ``GPTNeoXLayer`` ...); without that list, the homogeneous
    ``ModuleList`` holding the most parameters (``transformer.h``, ``model.layers`` ...).

    Raises:
        ConfigError: no such list (the model is not a stack of blocks).
    """
    named = set(getattr(model, "_no_split_modules", None) or [])
    best, best_size = None, -1
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        rank = (next(iter(kinds)).__name__ in named, size)
        if best is None or rank > best_size:
            best, best_size = module, rank
    if best is None:
        raise ConfigError("shard", f"no list of transformer blocks found in {type(model).__name__}")
    return list(best)


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Run every decoder block under non-reentrant activation checkpointing; returns the count.

    Overrides each block's ``forward`` with one that calls the original through
    :func:`torch.utils.checkpoint.checkpoint` (``use_reentrant=False``, RNG state preserved), so
    parameter names are unchanged and hooks (FSDP's) still wrap the block. Idempotent.
    Numerics: the recomputation repeats the same kernels, so gradients equal the plain ones.
    """
    from torch.utils.checkpoint import checkpoint

    blocks = decoder_blocks(model)
    for block in blocks:
        if getattr(block, "_preflens_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._preflens_checkpointed = True
    return len(blocks)


def shard_model(module: torch.nn.Module, blocks: list[torch.nn.Module], *, bf16: bool) -> torch.nn.Module:
    """``fully_shard`` each of ``blocks`` (a unit each), then ``module`` as the root unit.

    ``module`` must be what the loop calls (its forward runs the whole model, so that the root's
    parameters are gathered around it). ``bf16=True`` (CUDA only): bf16 compute parameters,
    fp32 gradient reduction. Needs an initialized process group; returns ``module``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: call on every rank); other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether checkpoint directory ``path`` was written by :func:`save_sharded_checkpoint`."""
    return (Path(path) / "dcp").is_dir()


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def save_sharded_checkpoint(root: str | Path, step: int, *, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, meta: dict[str, Any], keep: int = 2,
                            rank: int = 0, world: int = 1,
                            extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` with every rank's shard (call on every rank); keep the newest ``keep``.

    Model and optimizer state come from :func:`torch.distributed.checkpoint.state_dict.get_state_dict`
    (keys are parameter names, values DTensor shards under FSDP, full tensors otherwise). Rank 0
    writes the RNG state, ``state.json``, ``extra.safetensors`` (``extra_tensors``, as
    :func:`preflens.dynamics.checkpoint.save_checkpoint`) and the manifest, then renames the
    directory into place.

    Raises:
        TrainingError: naming the checkpoint when a write fails; earlier checkpoints are kept.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    error = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_partial(root)
        tmp.mkdir()
    _barrier(world)
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it assumes so
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"),
                     no_dist=world == 1)
    except (OSError, RuntimeError) as exc:  # every rank reaches the collective below
        error = exc
    failed = torch.tensor([error is not None], dtype=torch.int32)
    if world > 1:
        dist.all_reduce(failed)
    if rank == 0 and not failed.item():
        try:
            tensors, rng_meta = rng_state()
            save_file(tensors, str(tmp / "rng.safetensors"))
            if extra_tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()},
                          str(tmp / "extra.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"step": step, "meta": meta, "rng": rng_meta,
                                                        "world_size": world}))
            files = _files(tmp)
            for name in files:
                _fsync(tmp / name)
            manifest = {"step": step, "files": {n: {"sha256": _sha256(tmp / n), "size": (tmp / n).stat().st_size}
                                                for n in files}}
            with open(tmp / "manifest.json", "w") as fh:
                json.dump(manifest, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync(tmp / "dcp")
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(root)
        except OSError as exc:
            error = exc
    if error is not None or failed.item():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not write checkpoint {final}: {getattr(error, 'strerror', None) or error or 'another rank failed'}; "
                            "earlier checkpoints are kept")
    if rank == 0:
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)
    return final


def _verify(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"checkpoint {path} is corrupt: unreadable manifest.json ({exc})") from exc
    if set(files) != set(_files(path)) or "state.json" not in files:
        raise TrainingError(f"checkpoint {path} is corrupt: files differ from its manifest")
    for name, want in files.items():
        f = path / name
        if f.stat().st_size != want["size"] or _sha256(f) != want["sha256"]:
            raise TrainingError(f"checkpoint {path} is corrupt: {name} does not match its manifest")
    return manifest


def _load(path: Path, model, optimizer, world: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _verify(path)
    try:
        state = json.loads((path / "state.json").read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optimizer": optim_sd}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=str(path / "dcp"), no_dist=world == 1)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    except Exception as exc:  # noqa: BLE001 - any decode failure means a bad checkpoint
        raise TrainingError(f"checkpoint {path} could not be loaded: {exc}") from exc
    return state


def load_sharded_latest(root: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        world: int = 1) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest good sharded checkpoint under ``root`` (call on every rank); ``None`` if none.

    Any world size may load a checkpoint written by any other. A corrupt checkpoint is logged and
    the previous one tried (every rank verifies the same files, so all ranks agree).

    Raises:
        TrainingError: checkpoints exist but none loads; a plain (non-sharded) checkpoint.
    """
    def sharded(path: Path) -> None:
        if not is_sharded_checkpoint(path):
            raise TrainingError(f"checkpoint {path} was not written with shard='fsdp'; resume with the "
                                "strategy that wrote it, or pass resume=False (--no-resume)")

    return newest_good(Path(root), lambda path: _load(path, model, optimizer, world), check=sharded)


def full_policy_state(policy: torch.nn.Module, wrapped: torch.nn.Module, *, cpu_offload: bool = False
                      ) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``policy`` inside the FSDP root ``wrapped``, names
    relative to ``policy`` (a collective: call on every rank). ``cpu_offload=True``: gathered
    to CPU, and only rank 0 gets the tensors (the other ranks an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))
    prefix = next(name for name, m in wrapped.named_modules() if m is policy)
    return {k[len(prefix) + 1:]: v for k, v in full.items() if k.startswith(prefix + ".")}


def plain_from_state(policy: torch.nn.Module, full: dict[str, torch.Tensor], plain: torch.nn.Module | None = None,
                     device: torch.device | None = None) -> torch.nn.Module:
    """``plain`` (a new plain module of ``policy``'s class when None) loaded with ``full`` (from
    :func:`full_policy_state`) and ``policy``'s buffers (FSDP shards parameters only), tied
    weights re-tied; on ``device`` (default ``policy``'s)."""
    if plain is None:
        dtype = next(iter(full.values())).dtype
        with torch.device("meta"):
            plain = type(policy)(policy.config)
        device = device or next((b.device for b in policy.buffers()), None) or full_tensor(
            next(policy.parameters())).device
        plain = plain.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, buf in policy.named_buffers():
            owner, _, attr = name.rpartition(".")
            target = plain.get_submodule(owner) if owner else plain
            setattr(target, attr, buf.detach().clone().to(next(plain.parameters()).device))
        _, unexpected = plain.load_state_dict(full, strict=False)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    bad = [k for k, _ in plain.named_parameters() if k not in full] + list(unexpected)
    if bad:
        raise TrainingError(f"gathering the sharded model failed: parameters {bad[:5]} do not match")
    return plain.eval()


def gather_plain_model(policy: torch.nn.Module, wrapped: torch.nn.Module) -> torch.nn.Module:
    """A plain (unsharded) copy of ``policy`` with the full trained weights (call on every rank).

    ``wrapped`` is the FSDP root holding ``policy``. The copy is built on the meta device, given
    storage on ``policy``'s device, filled from the full state dict (an all-gather) and from
    ``policy``'s buffers (FSDP shards parameters only), and its tied weights are re-tied.
    """
    return plain_from_state(policy, full_policy_state(policy, wrapped))
