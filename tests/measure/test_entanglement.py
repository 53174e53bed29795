"""measure entanglement: equal to pair_gradient_stats (ghost and exact) and its predicted cases."""

from __future__ import annotations

import json

import pytest
import torch

from preflens.dynamics.entanglement import entanglement_case, pair_gradient_stats, predict_first_order
from preflens.errors import ConfigError
from preflens.measure import measure


@pytest.mark.parametrize("method", ["ghost", "exact"])
def test_equals_library(tmp_path, toy_pairs, tiny, method):
    pairs = toy_pairs[:6] if method == "ghost" else toy_pairs[:3]
    s = measure("entanglement", model=tiny, data=pairs, out_dir=tmp_path, chunk_size=4,
                options={"method": method}, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    ref = pair_gradient_stats(tiny, pairs, method=method)
    for key in ("inner", "norm_w_sq", "norm_l_sq", "cos", "u_w"):
        got = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        assert torch.allclose(got, getattr(ref, key), rtol=1e-4, atol=1e-6), key
    d_w, d_l = predict_first_order(ref, "dpo", lr=1.0, loss_kwargs={"beta": 0.1},
                                   ref_chosen_logps=ref.u_w, ref_rejected_logps=ref.u_l)
    assert [r["case"] for r in rows] == entanglement_case(d_w, d_l)
    assert sum(s["results"]["predicted_cases"].values()) == len(pairs)
    assert s["results"]["method"] == method and (tmp_path / "entanglement.png").is_file()


def test_bad_method(tmp_path, toy_pairs, tiny):
    with pytest.raises(ConfigError, match="method: unknown value 'fast'"):
        measure("entanglement", model=tiny, data=toy_pairs, out_dir=tmp_path, options={"method": "fast"})
