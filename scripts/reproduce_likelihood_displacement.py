#!/usr/bin/env python
"""Reproduce likelihood displacement on toyworld (default) or GPT-2 small (`--model gpt2`).

The recipe itself -- its `Config` dataclass and steps in order -- is
`preflens/reproduce/likelihood_displacement.py`; this script and `preflens reproduce likelihood-displacement` both run it.
Writes figures/likelihood_displacement/*.png and results/likelihood_displacement.json under --out (default: the current directory).
"""

import sys

from preflens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["reproduce", "likelihood-displacement", *sys.argv[1:]]))
