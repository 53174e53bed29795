"""``preflens reproduce``: one recipe per paper (see ``scripts/reproduce_<paper>.py``).

Each recipe module defines a ``Config`` dataclass (with a ``quick()`` variant) and
``run(ctx, config) -> dict`` that writes ``figures/<paper>/*.png`` and ``results/<paper>.json``
and returns the results. The recipes are importable modules so that the console script works
from an installed package; the files in ``scripts/`` are thin entry points to them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from pathlib import Path

from preflens.reproduce.common import RecipeContext

__all__ = ["PAPERS", "register", "run_paper", "script_main"]

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
    model: str = "toyworld",
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
    results = module.run(ctx, config)
    print(f"\n[{module_name}] done in {time.perf_counter() - t0:.0f} s -> {ctx.results_path}")
    print(module.summary(results))
    return results


def _add_common_args(ap: argparse.ArgumentParser) -> None:
    from preflens.cli import DEFAULT_MODEL

    ap.add_argument("--model", default=DEFAULT_MODEL, help="toyworld (default), gpt2, or a directory")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--out", default=".", help="folder for figures/ and results/ (default: .)")
    ap.add_argument("--quick", action="store_true", help="small version for smoke tests (≤ 3 min)")
    ap.add_argument("--no-resume", dest="resume", action="store_false", help="ignore finished steps")


def _cmd(args: argparse.Namespace) -> int:
    papers = list(PAPERS) if args.paper == "all" else [args.paper]
    for paper in papers:
        run_paper(
            paper, model=args.model, device=args.device, out=args.out, quick=args.quick,
            resume=args.resume,
        )
    return 0


def register(subparsers) -> None:
    ap = subparsers.add_parser(
        "reproduce", help="run a paper's reproduction: figures/<paper>/ and results/<paper>.json"
    )
    ap.add_argument("paper", choices=[*PAPERS, "all"])
    _add_common_args(ap)
    ap.set_defaults(func=_cmd)


def script_main(paper: str) -> int:
    """Entry point of ``scripts/reproduce_<paper>.py`` (same flags as ``preflens reproduce``)."""
    import sys

    from preflens.errors import PreflensError

    ap = argparse.ArgumentParser(description=f"Reproduce {paper} (see README)")
    _add_common_args(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_paper(paper, model=args.model, device=args.device, out=args.out, quick=args.quick,
                  resume=args.resume)
    except PreflensError as exc:
        print(f"preflens: error: {exc}", file=sys.stderr)
        return 2
    return 0
