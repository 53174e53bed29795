"""toyworld model layer: train the GPT-2-architecture model, evaluate it, CLI, shipped checkpoint.

``ASSETS_DIR`` is the shipped checkpoint directory, loadable with
``GPT2LMHeadModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).with_name("assets")
