"""Silence the progress bars and warnings of transformers and huggingface_hub ("Loading weights",
"Writing model shards", ...), for ``--no-progress`` and the reproduction recipes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet"]


@contextmanager
def quiet() -> Iterator[None]:
    """Within the block, transformers logs errors only and neither transformers nor
    huggingface_hub draws progress bars; the previous settings are restored afterwards."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as tf_logging

    verbosity = tf_logging.get_verbosity()
    tf_bars = tf_logging.is_progress_bar_enabled()
    hub_bars = not hub_utils.are_progress_bars_disabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if tf_bars:
            tf_logging.enable_progress_bar()
        if hub_bars:
            hub_utils.enable_progress_bars()
