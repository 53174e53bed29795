"""Shared inputs of the measure tests: small toyworld preference pairs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def toy_pairs():
    from preflens.data.toyworld.prefs import multi_token_pairs
    from preflens.reproduce.common import toyworld_world

    return multi_token_pairs(toyworld_world(), 24, votes=4, seed=0)
