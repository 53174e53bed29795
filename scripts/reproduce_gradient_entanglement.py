#!/usr/bin/env python
"""Reproduce gradient entanglement on toyworld (default) or GPT-2 small (`--model gpt2`).

The recipe itself -- its `Config` dataclass and steps in order -- is
`preflens/reproduce/gradient_entanglement.py`; this script and `preflens reproduce gradient-entanglement` both run it.
Writes figures/gradient_entanglement/*.png and results/gradient_entanglement.json under --out (default: the current directory).
"""

import sys

from preflens.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["reproduce", "gradient-entanglement", *sys.argv[1:]]))
