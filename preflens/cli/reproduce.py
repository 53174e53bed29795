"""``preflens reproduce PAPER``: run one paper's recipe (or ``all``); see :mod:`preflens.reproduce`."""

from __future__ import annotations

import argparse
import sys

from preflens.errors import PreflensError
from preflens.models import DEFAULT_MODEL
from preflens.reproduce import PAPERS, run_paper

__all__ = ["register"]


def _paper_name(text: str) -> str:
    """``factual_recall`` and ``factual-recall`` name the same paper."""
    return text.replace("_", "-")


def _cmd(args: argparse.Namespace) -> int:
    """Run the recipe(s). With ``all``, a recipe that fails with a preflens error (e.g. a model
    whose tokenizer splits a single-token experiment's answers) is reported in one line and the
    others still run; the command then fails (exit 2) naming the failed recipes."""
    from preflens.cli import to_cli_error

    papers = list(PAPERS) if args.paper == "all" else [args.paper]
    overrides = {"gradient_method": args.gradient_method} if args.gradient_method else {}
    failed = []
    for paper in papers:
        try:
            run_paper(
                paper, model=args.model, device=args.device, out=args.out, quick=args.quick,
                resume=args.resume, render_only=args.render_only, dtype=args.dtype,
                overrides=overrides,
            )
        except PreflensError as exc:
            if len(papers) == 1:
                raise
            print(f"preflens reproduce: {paper}: error: {to_cli_error(exc, args)}", file=sys.stderr)
            failed.append(paper)
    if failed:
        raise PreflensError(f"{len(failed)} of {len(papers)} recipes failed ({', '.join(failed)}; "
                            "messages above); the others finished")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``reproduce`` sub-command; returns its parser."""
    ap = subparsers.add_parser(
        "reproduce", help="run a paper's reproduction: figures/<paper>/ and results/<paper>.json"
    )
    ap.add_argument("paper", type=_paper_name, choices=[*PAPERS, "all"],
                    help="which paper ('-' or '_' between words)")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"offline name (default: {DEFAULT_MODEL}), hub id such as gpt2, or a directory")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--out", default=".", help="folder for figures/ and results/ (default: .)")
    ap.add_argument("--quick", action="store_true", help="small version for smoke tests (≤ 3 min)")
    ap.add_argument("--no-resume", dest="resume", action="store_false", help="ignore finished steps")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="parameter dtype the model is loaded in (default fp32)")
    ap.add_argument("--gradient-method", choices=("ghost", "exact"), default=None,
                    help="gradient-entanglement: per-pair gradient inner products by ghost "
                         "(default) or exact per-example backward passes")
    ap.add_argument("--render-only", action="store_true",
                    help="only redraw figures/<paper>/*.png from results/<paper>.json under --out "
                         "(no model, no training; seconds)")
    ap.set_defaults(func=_cmd)
    return ap
