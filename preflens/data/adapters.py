"""Adapters from the public preference datasets to :class:`PreferencePair` / :class:`RankedResponses`.

Sources (``source`` argument of :func:`load_pairs` / :func:`load_rankings`):

* a local ``.jsonl`` file (errors name ``file:line``, 1-based lines), a ``.json`` file holding
  one array of objects or JSON lines, a ``.parquet`` file, or a folder written by
  ``datasets.Dataset.save_to_disk`` (errors name ``file: row i``, the 0-based row index);
* ``hf:<dataset id>[:config]`` through ``datasets.load_dataset`` when the Hugging Face hub (or
  its local cache) is reachable.

Formats (``format``; detected from the columns when omitted) and the conversions of Chen et al.
2024, "Preference Learning Algorithms Do Not Learn Preference Rankings" (NeurIPS 2024), which
evaluated ranking accuracy on these datasets:

* ``trl`` -- ``prompt``/``chosen``/``rejected`` strings (standard) or ``{role, content}`` message
  lists (conversational, rendered with the tokenizer's chat template; an implicit prompt -- only
  ``chosen``/``rejected`` message lists sharing all but the last message -- is split off), plus
  preflens' optional ``id``, ``votes``, ``alpha``. ``synthetic-gptj`` (Dahoas/synthetic-instruct-
  gptj-pairwise) has the same columns and conversion and is detected as ``trl``.
* ``hh-rlhf`` -- ``chosen``/``rejected`` whole dialogues; the prompt is the text up to and
  including the last ``"\\n\\nAssistant:"``, the response the rest (its leading space stays with the
  response, the BPE-natural split), so ``prompt + chosen`` is the original text exactly.
* ``shp`` -- chosen = ``human_ref_A`` if ``labels == 1`` else ``human_ref_B``; prompt = ``history``.
  Rankings: per ``post_id``, the distinct replies ranked by (score, created_at) descending.
* ``ultrafeedback`` / ``stack-exchange`` -- one prompt with n scored responses (``overall_score`` /
  ``pm_score``): a pair for every two responses with strictly different scores (the higher
  chosen; ties give no pair); rankings by score, higher first.
* ``alpaca-farm`` -- one row per annotator vote (``preference`` 1 or 2); rows are grouped by
  (instruction, output_1, output_2), the majority output is chosen, ``votes`` records every vote
  and ``alpha`` the exact share for the chosen output (unset when unanimous: alpha must lie in
  (0, 1); derive it from ``votes`` with ``preflens.probes.ranking.alpha_from_votes``). 1:1 ties
  have no majority and are left out of :func:`load_pairs`.

Rankings give competition ranks (1 = best; ties share the better rank: scores 7.5, 2, 7.5, 9 ->
ranks 2, 4, 2, 1); the raw scores are kept in ``RankedResponses.extra["scores"]``. Prompts and
responses are used verbatim (no template, no separator). Ids are the 0-based source row index
(``"12"``), with ``":a-b"`` (chosen and rejected response indices) for n-way rows.

``limit`` / ``sample`` select source *items* before conversion, as the official evaluation did
(``numpy.random.default_rng(seed).choice(n, sample, replace=False)``, in that order): rows, or the
vote groups of AlpacaFarm and the posts of SHP rankings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from preflens.data.formats import (
    FORMATS,
    _alpaca_group,
    _need,
    _row_pairs,
    _row_ranking,
    _shp_post,
    _triple,
    competition_ranks,
)
from preflens.data.io import read_jsonl
from preflens.data.schemas import PreferencePair, RankedResponses
from preflens.errors import ConfigError, DataError

__all__ = ["FORMATS", "load_pairs", "load_rankings", "load_triples", "detect_format", "competition_ranks"]

log = logging.getLogger(__name__)

#: columns that identify each format (detection needs all of them)
SIGNATURES = {
    "trl": ("prompt", "chosen", "rejected"),
    "hh-rlhf": ("chosen", "rejected"),
    "shp": ("post_id", "history", "human_ref_A", "human_ref_B", "labels"),
    "ultrafeedback": ("instruction", "completions"),
    "alpaca-farm": ("instruction", "output_1", "output_2", "preference"),
    "stack-exchange": ("qid", "question", "answers"),
}
#: the split each dataset's evaluation used, for ``hf:`` sources without ``split``
DEFAULT_SPLITS = {"hh-rlhf": "test", "shp": "test", "ultrafeedback": "train",
                  "alpaca-farm": "validation", "synthetic-gptj": "train", "stack-exchange": "train"}


# --------------------------------------------------------------------------- sources
@dataclass
class _Rows:
    """Random access to a source's rows with error locations."""

    label: str                       # the file (or hf:id[split]) named in errors
    n: int
    get: Callable[[int], dict]
    columns: tuple[str, ...]
    lines: list[int] | None = None   # 1-based line numbers (JSONL); None: 0-based row indices

    def error(self, i: int, exc: DataError) -> DataError:
        if self.lines is not None:
            return DataError(exc.reason, file=self.label, line=self.lines[i], field=exc.field)
        out = DataError(exc.reason, file=f"{self.label}: row {i}", field=exc.field)
        out.file, out.row = self.label, i
        return out

    def source(self, i: int) -> tuple[str, int | None]:
        """``(file, line)`` for ``PreferencePair.source``: later errors (unknown words) name it."""
        return (self.label, self.lines[i]) if self.lines is not None else (f"{self.label}: row {i}", None)

    def column(self, name: str) -> list:
        return [self.get(i).get(name) for i in range(self.n)]


def _from_objects(label: str, objs: list[dict], lines: list[int] | None) -> _Rows:
    cols: dict[str, None] = {}
    for o in objs:
        cols.update(dict.fromkeys(o))
    return _Rows(label, len(objs), objs.__getitem__, tuple(cols), lines)


def _from_dataset(label: str, ds) -> _Rows:
    return _Rows(label, len(ds), lambda i: ds[int(i)], tuple(ds.column_names))


def _pick_split(dd, split: str | None, default: str | None, label: str):
    names = list(dd.keys())
    want = split or default
    if want is None and len(names) == 1:
        want = names[0]
    if want not in names:
        raise ConfigError("split", f"{label} has splits {names}; choose one" if want is None
                          else f"{label} has no split {want!r}", allowed=names)
    return dd[want], want


def _open(source: str | Path, split: str | None, fmt: str | None) -> _Rows:
    if isinstance(source, str) and source.startswith("hf:"):
        return _open_hub(source[3:], split, fmt)
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as exc:  # pragma: no cover
            raise ConfigError("source", "reading a save_to_disk folder needs `pip install datasets`") from exc
        if not any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise DataError("folder is not a datasets.save_to_disk folder (no dataset_info.json "
                            "or dataset_dict.json)", file=path)
        try:
            ds = load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(f"cannot read the saved dataset: {exc}", file=path) from exc
        if hasattr(ds, "keys"):  # a DatasetDict
            ds, _ = _pick_split(ds, split, DEFAULT_SPLITS.get(fmt or ""), str(path))
        return _from_dataset(str(path), ds)
    if not path.is_file():
        raise DataError("no such file or folder (or use hf:<dataset id> for the hub)", file=path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(str(path))
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises several types for bad files
            raise DataError(f"cannot read as Parquet: {exc}", file=path) from exc
        return _from_objects(str(path), table.to_pylist(), None)
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None  # JSON lines in a .json file: read below
        if isinstance(obj, list):
            if not obj:
                raise DataError("file is empty (no records)", file=path)
            for i, o in enumerate(obj):
                if not isinstance(o, dict):
                    raise DataError(f"expected a JSON object, got {type(o).__name__}", file=f"{path}: row {i}")
            return _from_objects(str(path), obj, None)
    elif suffix not in (".jsonl", ".ndjson"):
        raise DataError(f"unknown file type {suffix!r}: expected .jsonl, .json or .parquet "
                        "(or a datasets.save_to_disk folder)", file=path)
    rows = read_jsonl(path)
    return _from_objects(str(path), [o for _, o in rows], [n for n, _ in rows])


def _open_hub(spec: str, split: str | None, fmt: str | None) -> _Rows:
    name, _, config = spec.partition(":")
    if not name:
        raise ConfigError("source", "expected hf:<dataset id>[:config]")
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover
        raise ConfigError("source", "hf: sources need `pip install datasets`") from exc
    label = f"hf:{spec}"
    try:
        dd = load_dataset(name, config or None)
    except Exception as exc:  # noqa: BLE001 -- hub failures come in many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = ("HF_HUB_OFFLINE is set and the dataset is not in the local cache; unset "
                "HF_HUB_OFFLINE with network access, or pass a local file" if offline else
                "the hub could not be reached or the id is wrong (offline? set HF_HUB_OFFLINE=1 "
                "and pass a local file)")
        raise DataError(f"cannot load dataset: {hint} ({reason})", file=label) from exc
    ds, used = _pick_split(dd, split, DEFAULT_SPLITS.get(fmt or ""), label)
    return _from_dataset(f"{label}[{used}]", ds)


# --------------------------------------------------------------------------- detection
def detect_format(columns) -> str:
    """The format whose signature columns are all present (module docstring).

    ``prompt``/``chosen``/``rejected`` is ``trl`` (``synthetic-gptj`` shares it); ``chosen``/
    ``rejected`` without ``prompt`` is ``hh-rlhf``. Raises ConfigError (option ``format``) when no
    or several formats match, listing the candidates.
    """
    cols = set(columns)
    hits = [f for f, sig in SIGNATURES.items() if cols.issuperset(sig)]
    if "trl" in hits:
        hits.remove("hh-rlhf")
    if len(hits) == 1:
        return hits[0]
    if not hits:
        expected = "; ".join(f"{f}: {', '.join(s)}" for f, s in SIGNATURES.items())
        raise ConfigError("format", f"cannot detect the format from columns {sorted(cols)} "
                          f"(expected columns per format: {expected})", allowed=FORMATS)
    raise ConfigError("format", f"columns {sorted(cols)} match several formats {hits}; choose one",
                      allowed=hits)


# --------------------------------------------------------------------------- grouped formats
def _groups(rows: _Rows, key_cols: tuple[str, ...]) -> list[list[int]]:
    """Row indices grouped by the values of ``key_cols`` (first-appearance order)."""
    groups: dict[tuple, list[int]] = {}
    for i in range(rows.n):
        obj = rows.get(i)
        try:
            key = tuple(json.dumps(_need(obj, k), sort_keys=True) for k in key_cols)
        except DataError as exc:
            raise rows.error(i, exc) from None
        groups.setdefault(key, []).append(i)
    return list(groups.values())


# --------------------------------------------------------------------------- public API
def _select(n: int, limit: int | None, sample: int | None, seed: int) -> list[int]:
    for name, v in (("limit", limit), ("sample", sample)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(name, f"must be a positive integer, got {v!r}")
    if limit is not None and sample is not None:
        raise ConfigError("sample", "give at most one of limit and sample")
    if sample is not None:
        if sample > n:
            raise ConfigError("sample", f"{sample} items requested but the source has {n}")
        import numpy as np

        return [int(k) for k in np.random.default_rng(seed).choice(n, sample, replace=False)]
    return list(range(n if limit is None else min(limit, n)))


def _load(source, fmt, split, tokenizer, limit, sample, seed, on_error, rankings: bool) -> list:
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError("format", f"unknown value {fmt!r}", allowed=FORMATS)
    if on_error not in ("raise", "skip"):
        raise ConfigError("on_error", f"unknown value {on_error!r}", allowed=("raise", "skip"))
    rows = _open(source, split, fmt)
    fmt = fmt or detect_format(rows.columns)
    if fmt == "alpaca-farm" or (rankings and fmt == "shp"):
        keys = ("instruction", "output_1", "output_2") if fmt == "alpaca-farm" else ("post_id",)
        units = _groups(rows, keys)
    else:
        units = [[i] for i in range(rows.n)]
    out, skipped, seen = [], [], {}
    for u in _select(len(units), limit, sample, seed):
        idx = units[u]
        try:
            if fmt == "alpaca-farm":
                recs = [_alpaca_group(rows, idx, rankings=rankings)]
            elif fmt == "shp" and rankings:
                recs = [_shp_post(rows, idx)]
            else:
                try:
                    obj = rows.get(idx[0])
                    recs = ([_row_ranking(fmt, obj, idx[0], tokenizer)] if rankings
                            else _row_pairs(fmt, obj, idx[0], tokenizer))
                except DataError as exc:
                    raise rows.error(idx[0], exc) from None
                for r in recs:
                    if r.id in seen:
                        raise rows.error(idx[0], DataError(
                            f"duplicate id {r.id!r} (first seen at item {seen[r.id]})", field="id"))
                    seen[r.id] = idx[0]
        except DataError as exc:
            if on_error == "raise":
                raise
            skipped.append(str(exc))
            continue
        if not rankings:
            recs = [dataclasses.replace(r, source=rows.source(idx[0])) for r in recs if r is not None]
        out.extend(r for r in recs if r is not None)
    if skipped:
        log.warning("%s: skipped %d bad item(s); first: %s", rows.label, len(skipped), skipped[0])
    if not out:
        raise DataError(f"no {'rankings' if rankings else 'preference pairs'} in the selected "
                        f"items (format {fmt})", file=rows.label)
    return out


def load_pairs(source, format: str | None = None, *, split: str | None = None, tokenizer=None,
               limit: int | None = None, sample: int | None = None, seed: int = 0,
               on_error: str = "raise") -> list[PreferencePair]:
    """Preference pairs from a local file/folder or ``hf:<id>[:config]`` (module docstring).

    Args:
        source: path (``.jsonl``, ``.json``, ``.parquet``, ``save_to_disk`` folder) or ``hf:...``.
        format: one of :data:`FORMATS`; detected from the columns when ``None``.
        split: dataset split for folders/hub datasets with several (default: the split the
            dataset's evaluation used, see :data:`DEFAULT_SPLITS`, or the only one).
        tokenizer: renders conversational (message-list) TRL rows with its chat template.
        limit: the first ``limit`` source items. sample: ``sample`` items drawn without
            replacement with ``numpy.random.default_rng(seed)`` (exclusive with ``limit``).
        on_error: ``"raise"`` (default) a DataError naming ``file:line`` (JSONL) or ``file: row i``
            (0-based, other sources) and the field; ``"skip"`` leaves bad items out (a warning
            counts them).

    Raises:
        DataError: unreadable source, bad row, or no pairs; ConfigError: bad option.
    """
    return _load(source, format, split, tokenizer, limit, sample, seed, on_error, rankings=False)


def load_rankings(source, format: str | None = None, *, split: str | None = None, tokenizer=None,
                  limit: int | None = None, sample: int | None = None, seed: int = 0,
                  on_error: str = "raise") -> list[RankedResponses]:
    """Ranked responses (competition ranks, 1 = best) from the same sources as :func:`load_pairs`.

    n-way formats give one record per prompt with all responses; pairwise formats give
    ``[chosen, rejected]`` with ranks ``[1, 2]``; AlpacaFarm ranks its two outputs by vote count
    (a 1:1 tie shares rank 1); SHP groups the rows of each post. Same arguments as
    :func:`load_pairs`.
    """
    return _load(source, format, split, tokenizer, limit, sample, seed, on_error, rankings=True)


def load_triples(source, *, split: str | None = None, limit: int | None = None,
                 sample: int | None = None, seed: int = 0, on_error: str = "raise") -> list[dict]:
    """``{prompt, target, foil}`` records (plus optional ``id``) for direct logit attribution.

    ``target`` and ``foil`` are the continuations to compare, written as they follow the prompt
    (usually with a leading space, e.g. ``" Paris"``); ``foil`` may be a list of alternatives.
    Same sources, selection and error conventions as :func:`load_pairs`. Returns dicts with
    ``id`` (the given id or the 0-based row index), ``prompt``, ``target``, ``foil``.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError("on_error", f"unknown value {on_error!r}", allowed=("raise", "skip"))
    rows = _open(source, split, None)
    out, seen, skipped = [], {}, 0
    for i in _select(rows.n, limit, sample, seed):
        try:
            try:
                rec = _triple(rows.get(i), i)
                if rec["id"] in seen:
                    raise DataError(f"duplicate id {rec['id']!r}", field="id")
            except DataError as exc:
                raise rows.error(i, exc) from None
        except DataError:
            if on_error == "raise":
                raise
            skipped += 1
            continue
        seen[rec["id"]] = i
        out.append(rec)
    if skipped:
        log.warning("%s: skipped %d bad row(s)", rows.label, skipped)
    if not out:
        raise DataError("no (prompt, target, foil) records", file=rows.label)
    return out
