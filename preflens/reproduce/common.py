"""Shared plumbing for the reproduction recipes: paths, resumable steps, results, tables.

Layout under ``--out`` (default: the current directory)::

    figures/<paper>/*.png          figures (atomic writes)
    results/<paper>.json           the JSON summary (atomic write; keys documented in README)
    results/.cache/<paper>/*.json  finished steps, keyed by a hash of their configuration

A recipe wraps each expensive step in :meth:`RecipeContext.step`; a rerun after a kill reuses
every step that finished with the same configuration and recomputes the rest, and
``--no-resume`` ignores the cache. The results file is only ever replaced whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preflens.data.io import write_json
from preflens.errors import ConfigError, DataError
from preflens.models import DEFAULT_MODEL

__all__ = [
    "RecipeContext", "ProgressCallback", "format_table", "check_finite", "config_hash", "toyworld_world",
]

log = logging.getLogger(__name__)


class ProgressCallback:
    """Training-loop callback drawing a tqdm bar over the run's steps."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def on_step(self, state) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.total_steps, desc=self.desc, initial=state.step - 1)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{state.metrics.get('loss', float('nan')):.4f}", refresh=False)

    def on_end(self, state) -> None:
        if self.bar is not None:
            self.bar.close()


def toyworld_world():
    """The shipped toy world's spec (countries, frequencies, annotators).

    The recipes draw their text data from it whatever model is scored (``--model gpt2``
    included): the world only writes prompts and responses, the model under study scores them.
    """
    from preflens.data.toyworld.world import load_world

    path = Path(__file__).resolve().parents[1] / "toyworld" / "assets" / "world.json"
    return load_world(path)


def config_hash(obj: Any) -> str:
    """sha256 (16 hex digits) of a JSON-able configuration (dataclasses allowed)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_finite(obj: Any, path: str = "$") -> None:
    """Raise ValueError naming the first NaN/inf number inside a nested JSON-able object."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number at {path}: {obj}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{path}[{i}]")


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain monospace table (floats to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, sep, *body])


@dataclass
class RecipeContext:
    """Where a recipe writes, which model it uses, and its resumable step cache."""

    paper: str
    model: str = DEFAULT_MODEL
    device: str | None = None
    out: Path = field(default_factory=Path.cwd)
    quick: bool = False
    resume: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError("out", f"{self.out} exists and is not a directory")
        try:
            self.figures_dir.mkdir(parents=True, exist_ok=True)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("out", f"cannot create output directories: {exc}") from exc
        # Temporary files of atomic writes killed before their rename (never read; safe to drop).
        for stale in [*self.results_path.parent.glob(f".{self.results_path.name}.*.tmp"),
                      *self.cache_dir.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)

    @property
    def figures_dir(self) -> Path:
        return self.out / "figures" / self.paper

    @property
    def results_path(self) -> Path:
        return self.out / "results" / f"{self.paper}.json"

    @property
    def cache_dir(self) -> Path:
        return self.out / "results" / ".cache" / self.paper

    @staticmethod
    def _check_name(name: str) -> str:
        """A step/figure name must stay a plain file name inside its folder (no path parts)."""
        if (not isinstance(name, str) or not name or name.startswith(".")
                or any(c in name for c in "/\\\0")):
            raise ConfigError("name", f"{name!r} is not a plain file name (no '/', '\\', leading '.')")
        return name

    def figure(self, name: str) -> Path:
        return self.figures_dir / f"{self._check_name(name)}.png"

    def step(self, name: str, config: Any, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` (returning JSON-able data) unless a finished copy with the same config,
        model, quick flag and seed is cached; cache the result atomically. An unreadable cache
        file (corrupt, truncated, not UTF-8) is logged and recomputed."""
        key = config_hash({"config": config, "model": self.model, "quick": self.quick,
                           "seed": self.seed})
        path = self.cache_dir / f"{self._check_name(name)}-{key}.json"
        if self.resume and path.is_file():
            try:
                log.info("step %s: reusing %s", name, path)
                return json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                log.warning("step %s: cache file %s is corrupt; recomputing", name, path)
        result = fn()
        try:
            write_json(path, result)
        except DataError:
            log.warning("step %s: could not cache the result (continuing)", name)
        return result

    def write_results(self, results: dict) -> Path:
        """Check every number is finite, then replace ``results/<paper>.json`` atomically."""
        check_finite(results)
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(self.results_path, results)
