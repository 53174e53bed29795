"""The run directory of :func:`preflens.dynamics.train.train_preference` and what it writes.

Layout: ``config.json`` (the resume-compatibility record plus model name, data path and run
length), ``metrics.jsonl`` (one line per update), ``checkpoints/step-*`` (:mod:`.checkpoint`),
``ref_cache/`` (:mod:`.refcache`) and ``.preflens.lock``. Rules:

* only the main rank writes; a run with ``out_dir=None`` writes nothing (history in memory);
* a non-empty directory that is not a preflens run directory is refused (ConfigError), so a
  typo in ``out_dir`` cannot litter or clobber an unrelated folder;
* a directory in use by another live run is refused: the run holds ``fcntl.flock`` on the lock
  file while it runs; the kernel drops the lock when the process dies, so a killed run never
  leaves a stale lock;
* a refused resume (different configuration) is detected before anything is written;
* files are created with the user's umask (no 0600 files).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from preflens.data.io import atomic_write_text
from preflens.dynamics.checkpoint import list_checkpoints, save_checkpoint, truncate_metrics
from preflens.dynamics.config import LORA_FIELDS, RECORD_DEFAULTS
from preflens.errors import ConfigError, TrainingError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None

__all__ = ["RunDir", "LOCK_NAME", "is_run_dir"]

LOCK_NAME = ".preflens.lock"
_MARKERS = (LOCK_NAME, "config.json", "metrics.jsonl", "checkpoints")


def is_run_dir(path: Path) -> bool:
    """True for a directory a preflens training run wrote (or is writing)."""
    return any((Path(path) / m).exists() for m in _MARKERS)


class RunDir:
    """Paths, checks and writers of one run directory (``out_dir`` may be None: nothing written)."""

    def __init__(self, out_dir, is_main: bool, checkpoint: bool = True) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.writes = is_main and self.out_dir is not None
        self.checkpointing = checkpoint and self.out_dir is not None
        self.record: dict = {}
        self._rows: list[dict] = []
        self._file = None
        self._lock_fd: int | None = None

    def _path(self, name: str) -> Path | None:
        return None if self.out_dir is None else self.out_dir / name

    @property
    def checkpoints(self) -> Path | None:
        return self._path("checkpoints")

    @property
    def metrics_path(self) -> Path | None:
        return self._path("metrics.jsonl")

    @property
    def ref_cache(self) -> Path | None:
        return self._path("ref_cache")

    # -------------------------------------------------------------------- checks (read only)
    def check_resume(self, record: dict, resume: bool) -> None:
        """ConfigError (option ``resume``) when the directory holds checkpoints of a run whose
        saved record differs from ``record``; TrainingError when the saved config is unreadable."""
        if not resume or self.out_dir is None or not list_checkpoints(self.checkpoints):
            return
        path = self.out_dir / "config.json"
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot resume: {path} is unreadable ({exc}); pass resume=False to start "
                                "over") from None
        diff = [k for k in record if saved.get(k, RECORD_DEFAULTS.get(k)) != record[k]]
        # A full fine-tuning record leaves the LoRA fields out: a saved LoRA run is still different.
        diff += [k for k in LORA_FIELDS if k not in record and saved.get(k) is not None]
        if diff:
            raise ConfigError("resume", f"{self.out_dir} holds a run with different {', '.join(diff)}; pass "
                              "resume=False to start over")

    def _check_target(self) -> None:
        d = self.out_dir
        if d.is_dir() and any(d.iterdir()) and not is_run_dir(d):
            raise ConfigError("out_dir", f"{d} is not empty and is not a preflens run directory; choose a new "
                              "or empty directory")

    # -------------------------------------------------------------------- open / lock
    @contextmanager
    def open(self):
        """Create the directory, prove it writable, drop stale temporary files and hold the lock."""
        if not self.writes:
            yield self
            return
        self._check_target()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.out_dir)
            os.close(fd)
            os.unlink(probe)
            for stale in self.out_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigError("out_dir", f"cannot write to {self.out_dir}: {exc.strerror or exc}") from None
        self._lock()
        try:
            yield self
        finally:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _lock(self) -> None:
        fd = os.open(self.out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ConfigError("out_dir", f"{self.out_dir} is in use by another run (pid {holder}); wait "
                                  "for it to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    # -------------------------------------------------------------------- writes
    def drop_checkpoints(self) -> None:
        """Delete every checkpoint (a run started over with ``resume=False``)."""
        if self.writes:
            for path in list_checkpoints(self.checkpoints):
                shutil.rmtree(path)

    def start(self, step: int, record: dict, info: dict) -> None:
        """Cut ``metrics.jsonl`` back to ``step`` (where the checkpoint ends) and write ``config.json``."""
        self.record = record
        if self.writes:
            truncate_metrics(self.metrics_path, step)
            atomic_write_text(self.out_dir / "config.json", json.dumps({**record, **info}, indent=1))

    @contextmanager
    def metrics_writer(self):
        """``metrics.jsonl`` open for appending while the loop runs."""
        self._file = open(self.metrics_path, "a") if self.writes else None  # noqa: SIM115
        try:
            yield
        finally:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:  # the write error was already raised as TrainingError
                    pass
            self._file = None

    def log(self, metrics: dict, last_ckpt) -> None:
        """Append one metrics line (TrainingError on a failed write: a resume cuts a torn line)."""
        self._rows.append(metrics)
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(metrics) + "\n")
            self._file.flush()
        except OSError as exc:  # disk full: stop
            raise TrainingError(f"step {metrics['step']}: could not write {self.metrics_path}: "
                                f"{exc.strerror or exc}; last good checkpoint: {last_ckpt or 'none'}") from exc

    def save(self, step: int, steps_per_epoch: int, model, optimizer, callbacks, keep: int, *,
             trainable_only: bool = False, sharded=None) -> Path | None:
        """Checkpoint ``step`` (data cursor, run record, callback state); its path, None when not
        checkpointing. Only the main rank writes, except ``sharded=(wrapped_model, env)``: every
        rank writes its shard (:func:`preflens.dynamics.fsdp.save_sharded_checkpoint`; call on
        every rank). ``trainable_only``: the weights of trainable parameters only (LoRA)."""
        if not self.checkpointing:
            return None
        epoch, position = divmod(step, steps_per_epoch)
        plain, tensors = callbacks.state()
        meta = {"cursor": {"epoch": epoch, "position": position}, "config": self.record, "callbacks": plain}
        if sharded is not None:
            from preflens.dynamics.fsdp import save_sharded_checkpoint

            wrapped, env = sharded
            return save_sharded_checkpoint(self.checkpoints, step, model=wrapped, optimizer=optimizer, meta=meta,
                                           keep=keep, rank=env.rank, world=env.world_size, extra_tensors=tensors)
        if self.writes:
            save_checkpoint(self.checkpoints, step, model=model, optimizer=optimizer, meta=meta, keep=keep,
                            extra_tensors=tensors, trainable_only=trainable_only)
        return self.checkpoints / f"step-{step:08d}"

    def history(self) -> list[dict]:
        """Every metrics line of the run directory (earlier runs' steps after a resume), else this
        process's rows."""
        path = self.metrics_path
        if path is not None and path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return list(self._rows)
