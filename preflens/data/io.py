"""JSONL readers and atomic writers for preference data and results.

Readers validate every line and raise :class:`~preflens.errors.DataError` with ``file:line``,
the field and the reason -- never a deep traceback. Writers are atomic: the text goes to a
temporary file in the target directory, is flushed and fsync'ed, then renamed over the target,
so an interrupted or failed write (disk full, read-only directory) leaves any earlier file intact
and no partial file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from preflens.data.schemas import PreferencePair, RankedResponses, render_messages
from preflens.errors import DataError

__all__ = [
    "read_jsonl",
    "read_pairs",
    "write_pairs",
    "read_ranked",
    "write_ranked",
    "atomic_write_text",
    "atomic_write_bytes",
    "write_json",
    "default_file_mode",
]

_PAIR_KEYS = ("prompt", "chosen", "rejected")


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process umask (0o666 & ~umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename).

    Raises :class:`DataError` naming the path when the directory is missing, not writable, or the
    write fails (e.g. disk full); the previous content of ``path``, if any, is kept.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise DataError(f"output directory {directory} does not exist", file=path)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600; keep the user's umask like open() does
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        try:  # make the rename durable
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    except OSError as exc:
        raise DataError(f"could not write output: {exc.strerror or exc}", file=path) from exc
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any):
    try:
        import numpy as np
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.tolist()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as pretty JSON (NaN/inf are rejected: results must be finite)."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line_number, object)`` for every non-blank line; DataError on bad bytes or JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", file=path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"invalid UTF-8 bytes at byte {exc.start}", file=path, line=line) from exc
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_reject_constant)
        except (json.JSONDecodeError, ValueError) as exc:
            raise DataError(f"invalid JSON: {exc}", file=path, line=lineno) from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"expected a JSON object, got {type(obj).__name__}", file=path, line=lineno
            )
        rows.append((lineno, obj))
    if not rows:
        raise DataError("file is empty (no records)", file=path)
    return rows


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name} is not allowed")


def _pair_from_obj(obj: dict, path: Path, lineno: int, tokenizer) -> PreferencePair:
    for key in _PAIR_KEYS:
        if key not in obj:
            raise DataError("missing key", file=path, line=lineno, field=key)
    # Keys other than the pair's own are ignored: TRL files often carry extra columns.
    values = {k: obj[k] for k in _PAIR_KEYS}
    try:
        if isinstance(values["prompt"], list):
            prompt_msgs = values["prompt"]
            values["prompt"] = render_messages(tokenizer, prompt_msgs, field_name="prompt")
            for key in ("chosen", "rejected"):
                if isinstance(values[key], list):
                    values[key] = render_messages(
                        tokenizer, values[key], field_name=key, prefix=prompt_msgs
                    )
        elif any(isinstance(values[k], list) for k in ("chosen", "rejected")):
            key = "chosen" if isinstance(values["chosen"], list) else "rejected"
            raise DataError("message list given but the prompt is a plain string", field=key)
        return PreferencePair(
            **values, id=obj.get("id"), votes=obj.get("votes"), alpha=obj.get("alpha"),
            source=(str(path), lineno),
        )
    except DataError as exc:
        raise DataError(exc.reason, file=path, line=lineno, field=exc.field) from None


def read_pairs(path: str | Path, *, tokenizer=None) -> list[PreferencePair]:
    """Read TRL-format JSONL (``prompt``/``chosen``/``rejected`` [+ ``id``, ``votes``, ``alpha``]).

    Message-list fields render through ``tokenizer``'s chat template (DataError without one).
    Checks: valid UTF-8 and JSON, required keys, string types, non-empty texts, chosen ≠
    rejected, alpha finite in (0, 1), votes a list of ``"chosen"``/``"rejected"``, unique ids,
    at least one record. Every error names ``file:line`` and the field.
    """
    path = Path(path)
    pairs: list[PreferencePair] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        pair = _pair_from_obj(obj, path, lineno, tokenizer)
        if pair.id is not None:
            if pair.id in seen:
                raise DataError(
                    f"duplicate id {pair.id!r} (first seen on line {seen[pair.id]})",
                    file=path, line=lineno, field="id",
                )
            seen[pair.id] = lineno
        pairs.append(pair)
    return pairs


def _to_jsonl(records: Iterable[Any]) -> str:
    lines = []
    for rec in records:
        obj = rec.to_dict() if hasattr(rec, "to_dict") else rec
        lines.append(json.dumps(obj, ensure_ascii=False, allow_nan=False))
    return "\n".join(lines) + ("\n" if lines else "")


def write_pairs(path: str | Path, pairs: Iterable[PreferencePair]) -> Path:
    """Atomically write pairs as TRL-format JSONL."""
    return atomic_write_text(path, _to_jsonl(pairs))


def read_ranked(path: str | Path) -> list[RankedResponses]:
    """Read JSONL of ``{"prompt", "responses", "scores"|"ranks", "id"?}`` records."""
    path = Path(path)
    out, seen = [], {}
    for lineno, obj in read_jsonl(path):
        for key in ("prompt", "responses"):
            if key not in obj:
                raise DataError("missing key", file=path, line=lineno, field=key)
        try:
            rec = RankedResponses(
                prompt=obj["prompt"], responses=obj["responses"], scores=obj.get("scores"),
                ranks=obj.get("ranks"), id=obj.get("id"),
            )
        except DataError as exc:
            raise DataError(exc.reason, file=path, line=lineno, field=exc.field) from None
        if rec.id is not None:
            if rec.id in seen:
                raise DataError(f"duplicate id {rec.id!r}", file=path, line=lineno, field="id")
            seen[rec.id] = lineno
        out.append(rec)
    return out


def write_ranked(path: str | Path, records: Iterable[RankedResponses]) -> Path:
    """Atomically write ranked-response records as JSONL."""
    return atomic_write_text(path, _to_jsonl(records))


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Cut a per-step JSONL file back to its leading records with ``step`` ≤ ``step`` (atomically).

    Used for ``metrics.jsonl`` and ``tracked/<lens>.jsonl`` on resume: a run killed after its last
    checkpoint has logged steps the resumed run will redo, and cutting them makes the final file
    equal an uninterrupted run's. A torn or unreadable line (killed mid-write) ends the kept part;
    ``step = 0`` empties (creates) the file.
    """
    path = Path(path)
    kept = []
    if step > 0 and path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not isinstance(record, dict) or record.get("step", float("inf")) > step:
                break
            kept.append(line + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(kept))
