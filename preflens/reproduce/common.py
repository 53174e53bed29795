"""Shared plumbing for the reproduction recipes: paths, resumable steps, results, tables.

Layout under ``out`` (default: the current directory)::

    figures/<paper>/*.png          figures (atomic writes), drawn only from the results JSON
    results/<paper>.json           the JSON summary (atomic write; keys documented in README)
    results/.cache/<paper>/*.json  finished steps, keyed by the config fields each one reads

A recipe is a ``Config`` dataclass, step functions, ``run(ctx, cfg)`` that calls the steps in
order and writes the results JSON, and ``render(results, ctx)`` that draws every figure from
that JSON alone. Each step declares the config fields it reads with :func:`reads`;
:meth:`RecipeContext.step` hands it a view of only those fields and keys its cache on them, so
editing one field reruns exactly the steps that read it, and a killed run resumes from the
steps that finished. ``resume=False`` ignores the cache. The results file is only ever
replaced whole.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from preflens import plotting
from preflens.data.io import write_json
from preflens.data.toyworld.world import load_world
from preflens.errors import ConfigError, DataError
from preflens.models import DEFAULT_MODEL, load_model

__all__ = [
    "QUICK_NOTE", "RecipeContext", "StepConfig", "reads", "ProgressCallback", "format_table",
    "check_finite", "config_hash", "toyworld_world",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

QUICK_NOTE = ("smoke test: --quick runs tiny configs (few pairs, seeds and steps); its numbers "
              "check that the recipe runs end to end and are not the reproduction's results")
TOYWORLD_SPEC = Path(__file__).resolve().parents[1] / "toyworld" / "assets" / "world.json"


class ProgressCallback:
    """Training-loop callback drawing a tqdm bar over the run's steps."""

    name = "progress"

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def on_step(self, state) -> None:
        if self.bar is None:
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
    return load_world(TOYWORLD_SPEC)


def config_hash(obj: Any) -> str:
    """sha256 (16 hex digits) of a JSON-able configuration (dataclasses and step views allowed)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, StepConfig):
        obj = obj.as_dict()
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


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain monospace table (floats to 4 significant digits)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, sep, *body])


def reads(*fields: str):
    """Decorator for a recipe step ``fn(ctx, c, *args)``: the config fields it reads.

    Those fields (and nothing else of the config) key the step's cache, and ``c`` exposes only
    them, so a step cannot silently depend on a field that does not key it.
    """
    def mark(fn):
        fn.reads = tuple(fields)
        return fn
    return mark


class StepConfig:
    """Read-only view of the config fields one step declared with :func:`reads`.

    Reading any other field raises ``AttributeError`` naming the step, the field and the fix.
    """

    __slots__ = ("_step", "_values")

    def __init__(self, cfg: Any, fields: Sequence[str], *, step: str = "step") -> None:
        unknown = [f for f in fields if not hasattr(cfg, f)]
        if unknown:
            raise ValueError(f"step {step!r} reads {unknown}, which {type(cfg).__name__} does not have")
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_values", {f: getattr(cfg, f) for f in fields})

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"step {object.__getattribute__(self, '_step')!r} does not declare config "
                             f"field {name!r}; add it to the step's @reads(...) (it keys the cache)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a step's config view is read-only")

    def as_dict(self) -> dict:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"StepConfig({self._step!r}, {self._values!r})"


@dataclass
class RecipeContext:
    """Where a recipe writes, which model it uses, its resumable step cache and its figures.

    ``computed`` and ``reused`` list the names of the steps this context ran and took from the
    cache, in order.
    """

    paper: str
    model: str = DEFAULT_MODEL
    device: str | None = None
    out: Path = field(default_factory=Path.cwd)
    quick: bool = False
    resume: bool = True
    seed: int = 0
    dtype: str | None = None  # "fp32"/"bf16" for loading the model (None: load_model's default)
    computed: list = field(default_factory=list, repr=False)
    reused: list = field(default_factory=list, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError("out", f"{self.out} exists and is not a directory")
        try:
            self.figures_dir.mkdir(parents=True, exist_ok=True)
            self.results_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("out", f"cannot create output directories: {exc}") from exc
        # Temporary files of atomic writes killed before their rename (never read; safe to drop).
        stale = [*self.results_path.parent.glob(f".{self.results_path.name}.*.tmp"),
                 *self.cache_dir.glob(".*.tmp")]
        for path in stale:
            path.unlink(missing_ok=True)

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

    # -- models and in-memory reuse ------------------------------------------------------------
    def fresh_lm(self, **kwargs):
        """A newly loaded copy of the model under study, for a step that trains it."""
        if self.dtype is not None:
            kwargs.setdefault("dtype", self.dtype)
        return load_model(self.model, device=self.device, **kwargs)

    def memo(self, key: str, fn: Callable[[], T]) -> T:
        """``fn()`` computed once per context (models, bridges, pair lists shared by steps that
        only read them); never written to disk."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def model_fingerprint(self) -> str | None:
        """What identifies the weights behind ``model`` beyond its name, for the step cache:
        for a local directory (``toyworld`` is the shipped assets folder) a digest of its
        ``config.json`` and of each weight file's name, size and modification time, so that
        retrained weights never reuse steps cached for the old ones (a copied folder recomputes
        once). ``None`` for hub names and registered random models (their name fixes them)."""
        path = TOYWORLD_SPEC.parent if self.model == "toyworld" else Path(self.model)
        if not path.is_dir():
            return None
        h = hashlib.sha256()
        cfg = path / "config.json"
        if cfg.is_file():
            h.update(cfg.read_bytes())
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def shared_lm(self):
        """The model under study, loaded once per context, for steps that only read it."""
        return self.memo("lm", self.fresh_lm)

    # -- cached steps --------------------------------------------------------------------------
    def cached(self, name: str, key: Any, fn: Callable[[], T]) -> T:
        """Run ``fn()`` (returning JSON-able data) unless a finished copy with the same ``key``,
        model, quick flag and seed is cached; cache the result atomically. An unreadable cache
        file (corrupt, truncated, not UTF-8) is logged and recomputed."""
        ident = {"config": key, "model": self.model, "weights": self.memo("fingerprint", self.model_fingerprint),
                 "quick": self.quick, "seed": self.seed}
        if self.dtype is not None:
            ident["dtype"] = self.dtype
        digest = config_hash(ident)
        path = self.cache_dir / f"{self._check_name(name)}-{digest}.json"
        if self.resume and path.is_file():
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
                log.info("step %s: reusing %s", name, path)
                self.reused.append(name)
                return result
            except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                log.warning("step %s: cache file %s is corrupt; recomputing", name, path)
        result = fn()
        self.computed.append(name)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            write_json(path, result)
        except (DataError, OSError):
            log.warning("step %s: could not cache the result (continuing)", name)
        return result

    def step(self, name: str, fn: Callable[..., T], cfg: Any, *args: Any) -> T:
        """Run the recipe step ``fn(self, c, *args)`` or reuse its cached result.

        ``c`` is a :class:`StepConfig` of the fields ``fn`` declared with :func:`reads`; those
        fields and ``args`` (JSON-able) key the cache, with the model, the quick flag and the
        seed. Results must be JSON-able (what a rerun gets back is the JSON round trip).
        """
        fields = getattr(fn, "reads", None)
        if fields is None:
            raise TypeError(f"step {name!r}: {fn.__name__} must declare the config fields it reads with @reads(...)")
        view = StepConfig(cfg, fields, step=name)
        key = {"config": view.as_dict(), "args": list(args)}
        return self.cached(name, key, functools.partial(fn, self, view, *args))

    # -- results and figures -------------------------------------------------------------------
    def header(self, cfg: Any) -> dict:
        """The first keys of every results JSON: model, config, and the quick-run marker."""
        head = {"model": self.model, "config": dataclasses.asdict(cfg), "quick": self.quick}
        if self.quick:
            head["note"] = QUICK_NOTE
        return head

    def write_results(self, results: dict) -> Path:
        """Check every number is finite, then replace ``results/<paper>.json`` atomically."""
        check_finite(results)
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(self.results_path, results)

    def read_results(self) -> dict:
        """``results/<paper>.json`` as written by the recipe (ConfigError if absent or unreadable)."""
        path = self.results_path
        if not path.is_file():
            raise ConfigError("out", f"no {path}; run the recipe first (render_only needs its results)")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise ConfigError("out", f"{path} is not readable JSON: {exc}") from exc

    def figure(self, name: str) -> Path:
        return self.figures_dir / f"{self._check_name(name)}.png"

    def save_figure(self, fig, name: str, results: dict) -> Path:
        """Write ``fig`` as ``figures/<paper>/<name>.png``; a quick run's figure says so on it."""
        if results.get("quick"):
            fig.text(0.5, 0.005, "--quick smoke test: not the reproduction's numbers", ha="center",
                     va="bottom", fontsize=8, color="crimson")
        return plotting.save_figure(fig, self.figure(name))
