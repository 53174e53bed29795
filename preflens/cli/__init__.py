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

from preflens.errors import ConfigError, PreflensError
from preflens.models import DEFAULT_MODEL
from preflens.quiet import quiet

__all__ = ["main", "build_parser", "DEFAULT_MODEL", "flag_for", "to_cli_error"]

# Modules that contribute subcommands, in help order. A module that fails to import is a bug,
# so the error is not swallowed.
_SUBCOMMAND_MODULES = (
    "preflens.cli.info",
    "preflens.cli.toyworld",
    "preflens.cli.train",
    "preflens.cli.reproduce",
    "preflens.cli.measure",
    "preflens.cli.filter",
    "preflens.cli.report",
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (unless it is None/False or the help already says it) and
    keeps descriptions and epilogs as written (tables of losses, examples)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS)
                or "default" in help_text):  # flags (store_true/false) say it in words
            return help_text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose sub-parsers (of any depth) all use :class:`_HelpFormatter`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def flag_for(option: str, args: argparse.Namespace) -> str | None:
    """The command-line flag for a library parameter name, or None if the command has none.

    A command lists renamed parameters in ``set_defaults(option_flags={"pairs": "--data"})``;
    otherwise a parameter named like a parsed option maps to it (``batch_size`` -> ``--batch-size``).
    """
    renamed = getattr(args, "option_flags", None) or {}
    if option in renamed:
        return renamed[option]
    if option.isidentifier() and option in vars(args) and option not in ("func", "command"):
        return "--" + option.replace("_", "-")
    return None


def to_cli_error(exc: PreflensError, args: argparse.Namespace) -> PreflensError:
    """Re-address a library :class:`ConfigError` (which names a Python parameter) to the flag the
    user typed; other errors are returned unchanged."""
    if isinstance(exc, ConfigError):
        flag = flag_for(exc.option, args)
        if flag is not None:
            return ConfigError(flag, exc.reason, allowed=exc.allowed)
    return exc


def build_parser() -> argparse.ArgumentParser:
    """The full ``preflens`` parser with every subcommand registered."""
    parser = _Parser(
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
        if getattr(args, "no_progress", False):  # also transformers' "Loading weights" bars
            with quiet():
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except PreflensError as exc:
        print(f"preflens {command}: error: {to_cli_error(exc, args)}", file=sys.stderr)
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
