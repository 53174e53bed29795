"""``python -m preflens.cli ...`` and ``torchrun -m preflens.cli train ...``."""

import sys

from preflens.cli import main

sys.exit(main())
