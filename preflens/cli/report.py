"""``preflens report RUN_DIR``: figures per tracked lens and ``RUN_DIR/report.md``.

    preflens report runs/dpo                 # RUN_DIR/figures/<lens>.png, RUN_DIR/report.md

Works on a run that is still going (it reads what is written so far).
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _report(args: argparse.Namespace) -> int:
    from preflens.errors import DataError
    from preflens.report import write_report

    try:
        out = write_report(args.run_dir, figures_dir=args.figures_dir)
    except DataError as exc:
        if exc.field == "run_dir":
            raise DataError(exc.reason, field="RUN_DIR") from None
        raise
    for name, path in out["figures"].items():
        print(f"{name:<14} {path}")
    print(f"{'report':<14} {out['report']}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``report`` to the ``preflens`` sub-parsers; returns its parser."""
    p = subparsers.add_parser(
        "report", help="figures and report.md of a (tracked) training run",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `preflens train --out` directory")
    p.add_argument("--figures-dir", default=None, help="where the PNGs go (default RUN_DIR/figures)")
    p.set_defaults(func=_report)
    return p
