"""preflens.quiet: silences transformers / huggingface_hub bars and warnings, then restores them."""

from __future__ import annotations

import huggingface_hub.utils as hub_utils
from transformers.utils import logging as tf_logging

from preflens.quiet import quiet


def test_quiet_silences_and_restores():
    tf_logging.set_verbosity_warning()
    tf_logging.enable_progress_bar()
    hub_utils.enable_progress_bars()
    with quiet():
        assert tf_logging.get_verbosity() == tf_logging.ERROR
        assert not tf_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
    assert tf_logging.get_verbosity() == tf_logging.WARNING
    assert tf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
