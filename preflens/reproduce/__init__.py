"""``preflens reproduce``: one recipe per paper (see ``scripts/reproduce_<paper>.py``).

Each recipe module defines a ``Config`` dataclass (with a ``quick()`` variant), step functions,
``run(ctx, config) -> dict`` that computes and writes ``results/<paper>.json``, and
``render(results, ctx)`` that draws ``figures/<paper>/*.png`` from that JSON alone, so
``run_paper(..., render_only=True)`` redraws every figure in seconds without a model. The
recipes are importable modules so that the console script works from an installed package;
the files in ``scripts/`` are thin entry points to them. The command line itself
(``preflens reproduce``) is :mod:`preflens.cli.reproduce`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from pathlib import Path

from preflens.errors import ConfigError
from preflens.models import DEFAULT_MODEL
from preflens.quiet import quiet
from preflens.reproduce.common import QUICK_NOTE, RecipeContext

__all__ = ["PAPERS", "run_paper", "render_paper"]

log = logging.getLogger(__name__)

# CLI name -> module (and results/figures folder) name, in the order `all` runs them.
PAPERS = {
    "factual-recall": "factual_recall",
    "ranking-accuracy": "ranking_accuracy",
    "likelihood-displacement": "likelihood_displacement",
    "gradient-entanglement": "gradient_entanglement",
}


def _module(paper: str):
    name = PAPERS.get(paper, PAPERS.get(paper.replace("_", "-"), paper))
    if name not in PAPERS.values():
        raise ConfigError("paper", f"unknown paper {paper!r}", allowed=PAPERS)
    return importlib.import_module(f"preflens.reproduce.{name}")


def render_paper(paper: str, *, out: str | Path = ".") -> dict:
    """Redraw every figure of ``paper`` from ``out/results/<paper>.json`` (no model, no
    training) and return those results. Raises ConfigError (``out``) if the JSON is missing."""
    module = _module(paper)
    ctx = RecipeContext(paper=module.PAPER, out=Path(out))
    t0 = time.perf_counter()
    results = ctx.read_results()
    try:
        paths = module.render(results, ctx)
    except (KeyError, TypeError, IndexError) as exc:
        raise ConfigError("out", f"{ctx.results_path} lacks what the figures need ({exc!r}); "
                          "rerun the recipe without render_only") from exc
    print(f"[{module.PAPER}] {len(paths)} figures redrawn from {ctx.results_path} in "
          f"{time.perf_counter() - t0:.1f} s -> {ctx.figures_dir}")
    if results.get("quick"):
        print(f"[{module.PAPER}] NOTE: these results are a {QUICK_NOTE}")
    return results


def run_paper(
    paper: str,
    *,
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    out: str | Path = ".",
    quick: bool = False,
    resume: bool = True,
    render_only: bool = False,
    dtype: str | None = None,
    overrides: dict | None = None,
) -> dict:
    """Run one recipe (``paper`` is a CLI name or module name), draw its figures from the
    results JSON it wrote, print its summary and return the results.

    ``render_only`` skips the computation and redraws the figures from the existing
    ``results/<paper>.json`` (``model``, ``device``, ``quick`` and ``resume`` are then unused).
    ``dtype``: ``"fp32"``/``"bf16"`` for loading the model. ``overrides``: recipe ``Config``
    fields to replace, where the recipe has them (e.g. ``{"gradient_method": "exact"}``).
    """
    if render_only:
        return render_paper(paper, out=out)
    module = _module(paper)
    ctx = RecipeContext(paper=module.PAPER, model=model, device=device, out=Path(out), quick=quick,
                        resume=resume, dtype=dtype)
    config = module.Config.quick() if quick else module.Config()
    known = {f.name for f in dataclasses.fields(config)}
    config = dataclasses.replace(config, **{k: v for k, v in (overrides or {}).items() if k in known})
    t0 = time.perf_counter()
    with quiet():  # no "Loading weights" bars or transformers warnings between the recipe's output
        module.run(ctx, config)
    results = ctx.read_results()  # figures come from the JSON as written, exactly as render_only
    module.render(results, ctx)
    print(f"\n[{module.PAPER}] done in {time.perf_counter() - t0:.0f} s -> {ctx.results_path} "
          f"({len(ctx.computed)} steps computed, {len(ctx.reused)} reused from {ctx.cache_dir})")
    if quick:
        print(f"[{module.PAPER}] QUICK RUN: {QUICK_NOTE}")
    print(module.summary(results))
    if quick:
        print(f"[{module.PAPER}] (--quick: the numbers above are a smoke test, not a reproduction)")
    return results

