"""Family matrix fixtures: one tiny random model per family, saved to disk and loaded by
directory through ``preflens.models.load_model`` (the user's path), once per session."""

from __future__ import annotations

import pytest

from tests.families.builders import FAMILIES, build_family


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    # Gemma 2 with large logits (many past the soft-cap of 30), so every lens meets the cap
    return {f: build_family(f, root / f, seed=i, logit_scale=300.0 if f == "gemma2" else 1.0)
            for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def family_lms(family_dirs):
    from preflens.models import load_model

    return {f: load_model(str(d), device="cpu") for f, d in family_dirs.items()}


@pytest.fixture(params=FAMILIES, ids=[f"tiny-{f}" for f in FAMILIES])  # not "gpt2": that id marks real-GPT-2 tests
def family(request):
    return request.param


@pytest.fixture
def lm(family_lms, family):
    return family_lms[family]
