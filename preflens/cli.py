"""The ``preflens`` command line.

Subcommands are registered by the modules that own them (each exposes ``register(subparsers)``);
this file only assembles them and turns :class:`~preflens.errors.PreflensError` into a one-line
message and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys

from preflens.errors import PreflensError

__all__ = ["main", "build_parser", "DEFAULT_MODEL"]

DEFAULT_MODEL = "toyworld"

# Modules that contribute subcommands, in help order. A module that fails to import is a bug,
# so the error is not swallowed.
_SUBCOMMAND_MODULES = (
    "preflens.toyworld.cli",
    "preflens.dynamics.cli",
    "preflens.reproduce",
)


def _info(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import torch
    import transformers

    from preflens import __version__
    from preflens.models import offline_models

    print(f"preflens          {__version__}")
    print(f"python            {platform.python_version()}")
    print(f"torch             {torch.__version__}")
    print(f"transformers      {transformers.__version__}")
    try:
        tl_version = version("transformer-lens")
    except PackageNotFoundError:  # pragma: no cover
        tl_version = "not installed"
    print(f"transformer-lens  {tl_version}")
    print(f"numpy             {numpy.__version__}")
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    print(f"device            {device}")
    print("offline models:")
    for name, desc in offline_models().items():
        default = "  [default]" if name == DEFAULT_MODEL else ""
        print(f"  {name:<18} {desc}{default}")
    print("hub models (need the Hugging Face hub or its local cache): e.g. gpt2")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preflens",
        description="Measure why preference learning behaves as it does (see README).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print versions, device and the offline model names")
    info.set_defaults(func=_info)
    for module_name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PreflensError as exc:
        print(f"preflens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
