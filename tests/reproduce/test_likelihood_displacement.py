"""Likelihood-displacement recipe: the unembedding-geometry step (Razin et al. 2024, Table 13)."""

import numpy as np
import pytest

from preflens.reproduce.common import RecipeContext
from preflens.reproduce.likelihood_displacement import PAIR_TYPES, Config, pair_geometry


def test_pair_geometry_matches_an_independent_computation_on_the_hf_head(tmp_path):
    ctx = RecipeContext(paper="likelihood_displacement", out=tmp_path)
    geometry = ctx.step("unembedding-geometry", pair_geometry, Config.quick())
    lm = ctx.shared_lm()
    W = lm.model.lm_head.weight.detach().double().numpy()          # [vocab, d_model]
    for name, (chosen, rejected) in PAIR_TYPES.items():
        wp = W[lm.tokenizer.convert_tokens_to_ids(lm.tokenizer.tokenize(chosen))[0]]
        wn = W[lm.tokenizer.convert_tokens_to_ids(lm.tokenizer.tokenize(rejected))[0]]
        orth = (wp - wn) - ((wp - wn) @ wp) / (wp @ wp) * wp       # part of W⁺ − W⁻ orthogonal to W⁺
        g = geometry[name]
        assert g["orthogonal_norm"] == pytest.approx(np.linalg.norm(orth), rel=1e-12)
        assert g["signed_projection"] == pytest.approx(((wp - wn) @ wp) / np.linalg.norm(wp), rel=1e-12)
