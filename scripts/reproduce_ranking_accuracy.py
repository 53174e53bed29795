#!/usr/bin/env python
"""Reproduce ranking accuracy on toyworld (default) or GPT-2 small (`--model gpt2`).

The recipe itself -- its `Config` dataclass and steps in order -- is
`preflens/reproduce/ranking_accuracy.py`; this script and `preflens reproduce ranking-accuracy` both run it.
Writes figures/ranking_accuracy/*.png and results/ranking_accuracy.json under --out (default: the current directory).
"""

import sys

from preflens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["reproduce", "ranking-accuracy", *sys.argv[1:]]))
