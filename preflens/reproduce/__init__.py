"""``preflens reproduce``: one recipe per paper (see ``scripts/reproduce_<paper>.py``).

Each recipe module defines a ``Config`` dataclass (with a ``quick()`` variant) and
``run(ctx, config) -> dict`` that writes ``figures/<paper>/*.png`` and ``results/<paper>.json``
and returns the results. The recipes are importable modules so that the console script works
from an installed package; the files in ``scripts/`` are thin entry points to them. The command
line itself (``preflens reproduce``) is :mod:`preflens.cli.reproduce`.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

from preflens.models import DEFAULT_MODEL
from preflens.quiet import quiet
from preflens.reproduce.common import RecipeContext

__all__ = ["PAPERS", "run_paper"]

log = logging.getLogger(__name__)

# CLI name -> module (and results/figures folder) name, in the order `all` runs them.
PAPERS = {
    "factual-recall": "factual_recall",
    "ranking-accuracy": "ranking_accuracy",
    "likelihood-displacement": "likelihood_displacement",
    "gradient-entanglement": "gradient_entanglement",
}


def run_paper(
    paper: str,
    *,
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    out: str | Path = ".",
    quick: bool = False,
    resume: bool = True,
) -> dict:
    """Run one recipe (``paper`` is a CLI name or module name) and return its results."""
    module_name = PAPERS.get(paper, paper)
    module = importlib.import_module(f"preflens.reproduce.{module_name}")
    ctx = RecipeContext(
        paper=module_name, model=model, device=device, out=Path(out), quick=quick, resume=resume
    )
    config = module.Config.quick() if quick else module.Config()
    t0 = time.perf_counter()
    with quiet():  # no "Loading weights" bars or transformers warnings between the recipe's output
        results = module.run(ctx, config)
    print(f"\n[{module_name}] done in {time.perf_counter() - t0:.0f} s -> {ctx.results_path}")
    print(module.summary(results))
    return results

