"""The common runner of ``preflens measure``: chunked, resumable ``scores.jsonl`` and ``summary.json``.

Layout of an output folder ``DIR``::

    DIR/scores.jsonl   one JSON line per input item, in input order: {"id": ..., <lens numbers>}
    DIR/summary.json   dataset, model, config, aggregate numbers, preflens version (atomic write)
    DIR/<lens>.png     the lens's figure (atomic write), drawn from the rows and the summary
    DIR/run.json       the run's identity: lens, configuration hash and item ids hash

Resumability: items are scored in chunks; each chunk's lines are appended with ONE write and
fsync'ed. A run killed mid-write leaves at most one partial trailing line: on restart the file is
truncated after its last complete line whose id matches the item at that position, and scoring
continues from the next item, so earlier lines are never rewritten. A folder holding a run of a
different configuration (lens, model, data selection or options) is refused unless
``resume=False``, which starts over. The summary is always recomputed from all rows of
``scores.jsonl``, so a resumed run and an uninterrupted one give the same summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from preflens.data.io import write_json
from preflens.errors import ConfigError, DataError

__all__ = ["SCORES", "SUMMARY", "RUN", "item_ids", "finite_or_none", "auto_batch_size",
           "ScoresFile", "run_chunks"]

log = logging.getLogger(__name__)

SCORES, SUMMARY, RUN = "scores.jsonl", "summary.json", "run.json"

#: default batch sizes (sequences for scoring, pairs for gradients) per device type and lens kind
_BATCH = {("cpu", "forward"): 16, ("cpu", "gradient"): 4,
          ("cuda", "forward"): 64, ("cuda", "gradient"): 16}


def auto_batch_size(lm, kind: str = "forward") -> int:
    """A batch size for ``lm``'s device: ``kind`` ``"forward"`` (scoring sequences) or
    ``"gradient"`` (pairs per ghost backward). CPU: 16 / 4 (the scoring functions also cap CPU
    batches at a token budget); CUDA: 64 / 16, halved for every 2 B parameters beyond 1 B and
    for devices under 40 GiB."""
    dev = lm.device.type
    base = _BATCH.get((("cuda" if dev == "cuda" else "cpu"), kind), 8)
    if dev == "cuda":
        import torch

        n_params = sum(p.numel() for p in lm.model.parameters())
        base = max(1, base >> max(0, int((n_params - 1e9) // 2e9) + (n_params > 1e9)))
        if torch.cuda.get_device_properties(lm.device).total_memory < 40 * 2**30:
            base = max(1, base // 2)
    return base


def item_ids(items: Sequence) -> list[str]:
    """Each item's ``id`` (or its 0-based index when it has none); DataError on duplicates."""
    ids, seen = [], {}
    for i, it in enumerate(items):
        raw = getattr(it, "id", None) if not isinstance(it, dict) else it.get("id")
        iid = str(raw) if raw is not None else str(i)
        if iid in seen:
            raise DataError(f"duplicate item id {iid!r} (items {seen[iid]} and {i})", field="id")
        seen[iid] = i
        ids.append(iid)
    return ids


def finite_or_none(obj: Any) -> Any:
    """Replace NaN/inf floats (e.g. a cosine of a zero gradient) by ``None``, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ScoresFile:
    """Append-only ``scores.jsonl`` with chunk appends and crash-safe resume (module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def resume(self, ids: Sequence[str]) -> list[dict]:
        """Rows already stored for the leading ``ids``; the file is truncated after them."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        rows: list[dict] = []
        keep = 0
        for raw in data.split(b"\n")[:-1]:   # the piece after the last newline is partial
            try:
                row = json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                break
            if not isinstance(row, dict) or len(rows) >= len(ids) or row.get("id") != ids[len(rows)]:
                break
            rows.append(row)
            keep += len(raw) + 1
        if keep != len(data):
            log.warning("%s: dropping %d byte(s) after the last complete row %d", self.path,
                        len(data) - keep, len(rows))
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())
        return rows

    def append(self, rows: Sequence[dict]) -> None:
        """Append ``rows`` as JSON lines in one write, then fsync."""
        text = "".join(json.dumps(finite_or_none(r), ensure_ascii=False, allow_nan=False) + "\n"
                       for r in rows)
        try:
            with open(self.path, "ab") as fh:
                fh.write(text.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise DataError(f"could not write scores: {exc.strerror or exc}", file=self.path) from exc


def _prepare_dir(out_dir: Path, identity: dict, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("out_dir", f"{out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("out_dir", f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    run_path = out_dir / RUN
    previous = None
    if run_path.is_file():
        try:
            previous = json.loads(run_path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            previous = None
    if resume and previous is not None and previous != identity:
        raise ConfigError("out_dir", f"{out_dir} holds a '{previous.get('lens')}' run with a different "
                          "configuration (lens, model, data or options); use another out_dir or "
                          "resume=False to start over")
    if not resume or previous is None:
        for name in (SCORES, SUMMARY):
            (out_dir / name).unlink(missing_ok=True)
        write_json(run_path, identity)


def run_chunks(
    items: Sequence,
    score_chunk: Callable[[Sequence], list[dict]],
    *,
    out_dir: str | Path,
    lens: str,
    config: dict,
    chunk_size: int = 256,
    resume: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Score ``items`` chunk by chunk into ``out_dir/scores.jsonl``; return all rows in order.

    Args:
        score_chunk: maps a list of items to one dict of numbers per item (same order); the
            runner adds ``"id"`` first.
        config: everything that determines the numbers (model, data selection, options); a
            folder with another configuration is refused while ``resume`` is on.
        chunk_size: items per append (and per resume step).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError("chunk_size", f"must be a positive integer, got {chunk_size!r}")
    if not items:
        raise DataError("no items to measure", field="data")
    out_dir = Path(out_dir)
    ids = item_ids(items)
    identity = {"lens": lens, "config": _hash(config), "ids": _hash(ids), "n_items": len(ids)}
    _prepare_dir(out_dir, identity, resume)
    store = ScoresFile(out_dir / SCORES)
    rows = store.resume(ids)
    if rows:
        log.info("%s: resuming after %d of %d items", out_dir / SCORES, len(rows), len(ids))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), initial=len(rows), desc=f"measure {lens}", unit="item")
    try:
        for start in range(len(rows), len(ids), chunk_size):
            chunk = items[start:start + chunk_size]
            scored = score_chunk(chunk)
            if len(scored) != len(chunk):  # pragma: no cover - a lens bug
                raise RuntimeError(f"lens {lens} returned {len(scored)} rows for {len(chunk)} items")
            new = [{"id": iid, **r} for iid, r in zip(ids[start:start + chunk_size], scored)]
            store.append(new)
            rows.extend(finite_or_none(new))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return rows
