"""The one error hierarchy of preflens.

Every error a user can cause (bad data, bad options, unknown models, over-long sequences)
raises a subclass of :class:`PreflensError` with a message that names *what* is wrong and
*where* (file and line for data, the option for configuration). Library code never uses a
bare ``assert`` for user input.

    PreflensError
    ├── DataError      a data file or record is malformed (file, line, field, reason)
    ├── ConfigError    an option has a bad value (option, value, allowed values)
    ├── ModelError     a model name/directory cannot be loaded
    ├── ScoringError   a sequence cannot be scored as asked (e.g. longer than the context)
    └── TrainingError  a run cannot continue (non-finite loss, corrupt checkpoint, ...)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "PreflensError",
    "DataError",
    "ConfigError",
    "ModelError",
    "ScoringError",
    "TrainingError",
]


class PreflensError(Exception):
    """Base class of every error preflens raises on purpose."""


class DataError(PreflensError):
    """A data file or record is malformed.

    The message reads ``{file}:{line}: field '{field}': {reason}`` with the parts that are
    known; ``file``, ``line`` and ``field`` are also kept as attributes for programs.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        where = ""
        if self.file is not None:
            where = self.file + (f":{line}" if line is not None else "")
        elif line is not None:
            where = f"line {line}"
        parts = [p for p in (where, f"field '{field}'" if field else "") if p]
        super().__init__(": ".join(parts + [reason]))


class ConfigError(PreflensError):
    """An option has a bad value.

    The message names the option, the value given and, when the set is finite, the allowed
    values, e.g. ``--loss: unknown value 'dpoo'; valid: cdpo, dpo, ...``.
    """

    def __init__(
        self,
        option: str,
        reason: str,
        *,
        allowed: Iterable[object] | None = None,
    ) -> None:
        self.option = option
        self.reason = reason
        self.allowed = sorted(map(str, allowed)) if allowed is not None else None
        msg = f"{option}: {reason}"
        if self.allowed is not None:
            msg += f"; valid: {', '.join(self.allowed)}"
        super().__init__(msg)


class ModelError(PreflensError):
    """A model name or directory cannot be loaded (unknown, unreachable, or incomplete)."""


class ScoringError(PreflensError):
    """A prompt/response cannot be scored as asked (e.g. longer than the model context)."""


class TrainingError(PreflensError):
    """A training run cannot continue (non-finite loss or gradient, corrupt checkpoint, ...)."""
