"""``preflens info``: versions, device and the offline model names."""

from __future__ import annotations

import argparse
import platform

__all__ = ["register"]


def _info(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import torch
    import transformers

    from preflens import __version__
    from preflens.models import DEFAULT_MODEL, offline_models

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


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``info`` sub-command; returns its parser."""
    p = subparsers.add_parser("info", help="print versions, device and the offline model names")
    p.set_defaults(func=_info)
    return p
