#!/usr/bin/env python
"""Reproduce factual recall on toyworld (default) or GPT-2 small (`--model gpt2`).

The recipe itself -- its `Config` dataclass and steps in order -- is
`preflens/reproduce/factual_recall.py`; this script and `preflens reproduce factual-recall` both run it.
Writes figures/factual_recall/*.png and results/factual_recall.json under --out (default: the current directory).
"""

import sys

from preflens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["reproduce", "factual-recall", *sys.argv[1:]]))
