"""The ``preflens`` command line.

Each subcommand lives in ``preflens/cli/<name>.py`` and exposes ``register(subparsers)``; this
module assembles them and is the one place that turns a :class:`~preflens.errors.PreflensError`
into a one-line ``preflens <command>: error: ...`` message with exit status 2, and Ctrl-C into a
one-line message with exit status 130. It is the only module of preflens that exits the process.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from preflens.errors import PreflensError
from preflens.models import DEFAULT_MODEL

__all__ = ["main", "build_parser", "DEFAULT_MODEL"]

# Modules that contribute subcommands, in help order. A module that fails to import is a bug,
# so the error is not swallowed.
_SUBCOMMAND_MODULES = (
    "preflens.cli.info",
    "preflens.cli.toyworld",
    "preflens.cli.train",
    "preflens.cli.reproduce",
    "preflens.cli.measure",
    "preflens.cli.filter",
)


def build_parser() -> argparse.ArgumentParser:
    """The full ``preflens`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="preflens",
        description="Measure why preference learning behaves as it does (see README).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``preflens`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 on success, 2 for a :class:`~preflens.errors.PreflensError` (one line on stderr, no
    traceback) or a usage error, 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = args.command
    try:
        return int(args.func(args) or 0)
    except PreflensError as exc:
        print(f"preflens {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # A command that knows where it stopped attaches the line (e.g. train: "interrupted at
        # step N; rerun the same command to resume from checkpoint step-M").
        message = getattr(exc, "preflens_message", None) or "interrupted"
        print(f"preflens {command}: {message}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `preflens info | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
