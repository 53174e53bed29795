"""Atomic, verifiable training checkpoints (safetensors) with fallback to the last good one.

A checkpoint is a directory ``<root>/step-00000012/`` holding

* ``model.safetensors``     the trainable weights (``named_parameters()``, tied weights once);
* ``optimizer.safetensors`` every tensor of the optimizer state (``state.<param>.<key>``);
* ``rng.safetensors``       torch CPU / CUDA generator states and numpy's key array;
* ``state.json``            step, data cursor, run config, optimizer param groups and non-tensor
                            state, Python ``random`` state, numpy's scalars;
* ``extra.safetensors``     optional: tensors of callers' extra state (e.g. callbacks' RNGs);
* ``manifest.json``         sha256 and size of each file above, written last.

Writing: files go to a temporary sibling directory, each is fsync'ed, the manifest is written,
the directory is fsync'ed and atomically renamed into place, then only the newest ``keep``
checkpoints are kept. A run killed mid-write therefore leaves a ``.tmp-*`` directory that the
next save or load removes, never a half-written ``step-*``. Loading verifies the manifest;
a corrupt or truncated checkpoint raises :class:`TrainingError` naming it, and
:func:`load_latest` logs that error and falls back to the previous good checkpoint.

Test hook: ``PREFLENS_CKPT_SLEEP="STEP:SECONDS"`` sleeps inside the writer of checkpoint STEP
(after the weights are written, before the rename) so tests can SIGKILL a run mid-write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from preflens.data.io import default_file_mode, truncate_jsonl
from preflens.errors import TrainingError

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_latest",
    "list_checkpoints",
    "verify_checkpoint",
    "load_weights",
    "rng_state",
    "set_rng_state",
    "truncate_metrics",
    "load_extra_tensors",
]

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
_EXTRA = "extra.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # a failed file fsync (EIO, ENOSPC) means lost data: never ignore it
            raise
        # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, json)``: torch CPU/CUDA, numpy and Python ``random`` generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    meta: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
        meta["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta and "numpy_keys" in tensors:
        import numpy as np

        name, pos, has_gauss, cached = meta["numpy"]
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((name, keys, pos, has_gauss, cached))


def _split_optimizer(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["plain_state"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _remove_partial(root: Path) -> None:
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _test_sleep(step: int) -> None:
    hook = os.environ.get("PREFLENS_CKPT_SLEEP")
    if hook:
        at, seconds = hook.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int = 2,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    trainable_only: bool = False,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root``; keep the newest ``keep``; return its path.

    ``meta`` (JSON-serializable: data cursor, config, ...) is stored in ``state.json`` together
    with the step, the optimizer's non-tensor state and the RNG states (captured here);
    ``extra_tensors`` (read back by :func:`load_extra_tensors`) in ``extra.safetensors``.
    ``trainable_only`` saves only parameters with ``requires_grad`` (LoRA: the adapters).

    Raises:
        TrainingError: naming the checkpoint when a write or fsync fails (disk full, I/O
            error); the temporary directory is removed and earlier checkpoints stay intact.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_partial(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
               if p.requires_grad or not trainable_only}
    opt_tensors, opt_meta = _split_optimizer(optimizer)
    rng_tensors, rng_meta = rng_state()
    state = {"step": step, "meta": meta, "optimizer": opt_meta, "rng": rng_meta}
    try:
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"))
        _test_sleep(step)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))
        files = _FILES
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / _EXTRA))
            files = (*_FILES, _EXTRA)
        mode = default_file_mode()  # safetensors writes 0600; keep the user's umask
        for name in files:
            os.chmod(tmp / name, mode)
            _fsync(tmp / name)
        manifest = {
            "step": step,
            "files": {n: {"sha256": _sha256(tmp / n), "size": (tmp / n).stat().st_size} for n in files},
        }
        with open(tmp / "manifest.json", "w") as fh:
            os.fchmod(fh.fileno(), mode)
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync(tmp)
        if final.exists():  # re-saving a step (e.g. after a fallback): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except (OSError, SafetensorError) as exc:  # disk full, I/O error, read-only: keep older ones
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(
            f"could not write checkpoint {final}: {getattr(exc, 'strerror', None) or exc}; "
            "earlier checkpoints are kept"
        ) from exc
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check ``path`` against its manifest (presence, size, sha256); return the manifest.

    Raises:
        TrainingError: naming the checkpoint and the first problem found.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"checkpoint {path} is corrupt: unreadable manifest.json ({exc})") from exc
    if not isinstance(files, dict):
        raise TrainingError(f"checkpoint {path} is corrupt: unreadable manifest.json (no file table)")
    for name in (*_FILES, *([_EXTRA] if _EXTRA in files else [])):
        f = path / name
        want = files.get(name)
        if want is None or not f.is_file():
            raise TrainingError(f"checkpoint {path} is corrupt: {name} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise TrainingError(
                f"checkpoint {path} is corrupt: {name} has {size} bytes, manifest says {want['size']}"
            )
        if _sha256(f) != want["sha256"]:
            raise TrainingError(f"checkpoint {path} is corrupt: {name} sha256 mismatch")
    return manifest


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Copy the weights of checkpoint ``path`` into ``model`` (verified first)."""
    verify_checkpoint(path)
    _copy_weights(load_file(str(Path(path) / "model.safetensors")), model, Path(path))


def _copy_weights(weights: dict[str, torch.Tensor], model: torch.nn.Module, path: Path,
                  trainable_only: bool = False) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    if set(params) != set(weights):
        diff = sorted(set(params) ^ set(weights))[:5]
        raise TrainingError(f"checkpoint {path} does not match the model (parameters {diff})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def load_checkpoint(
    path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True, trainable_only: bool = False,
) -> dict[str, Any]:
    """Verify and load checkpoint ``path`` into ``model`` (and ``optimizer``); restore RNG states.

    Returns ``state.json`` (``step``, ``meta``, ...). Raises :class:`TrainingError` when corrupt.
    ``trainable_only``: the checkpoint holds (and must match) only the trainable parameters.
    """
    path = Path(path)
    verify_checkpoint(path)
    try:
        state = json.loads((path / "state.json").read_text())
        _copy_weights(load_file(str(path / "model.safetensors")), model, path, trainable_only)
        if optimizer is not None:
            opt = _join_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
            optimizer.load_state_dict(opt)
        if restore_rng:
            set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    except TrainingError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode failure means a bad checkpoint
        raise TrainingError(f"checkpoint {path} could not be loaded: {exc}") from exc
    return state


def load_extra_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``extra_tensors`` saved with checkpoint ``path`` ({} when it has none; verify first)."""
    f = Path(path) / _EXTRA
    try:
        return load_file(str(f)) if f.is_file() else {}
    except Exception as exc:  # noqa: BLE001 - any decode failure means a bad checkpoint
        raise TrainingError(f"checkpoint {path} could not be loaded: {exc}") from exc


def load_latest(
    root: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
    trainable_only: bool = False,
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest good checkpoint under ``root``; ``None`` when there is none.

    A corrupt checkpoint is reported (``logging.warning`` with the :class:`TrainingError` naming
    it) and the previous one is tried. When checkpoints exist but none is good, raises
    :class:`TrainingError` listing them (pass ``resume=False`` to start over).
    """
    root = Path(root)
    _remove_partial(root) if root.is_dir() else None
    return newest_good(root, lambda path: load_checkpoint(path, model=model, optimizer=optimizer,
                                                          trainable_only=trainable_only))


def newest_good(root: str | Path, load: Callable[[Path], dict[str, Any]], *,
                check: Callable[[Path], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """``(path, load(path))`` for the newest checkpoint under ``root`` that ``load`` accepts.

    Newest first: ``check(path)`` (if given) runs before each attempt and its errors propagate; a
    :class:`TrainingError` from ``load`` is logged and the previous checkpoint tried. When
    checkpoints exist but none loads, raises :class:`TrainingError` listing each failure; ``None``
    when there is no checkpoint.
    """
    errors = []
    for path in reversed(list_checkpoints(root)):
        if check is not None:
            check(path)
        try:
            return path, load(path)
        except TrainingError as exc:
            log.warning("%s; falling back to the previous checkpoint", exc)
            errors.append(str(exc))
    if errors:
        raise TrainingError("no good checkpoint to resume from: " + "; ".join(errors))
    return None


def truncate_metrics(path: str | Path, step: int) -> None:
    """Cut ``metrics.jsonl`` back to its records with ``step`` ≤ ``step`` before a resumed run
    redoes them (:func:`preflens.data.io.truncate_jsonl`; a torn last line ends the kept part)."""
    truncate_jsonl(path, step)
