"""The entanglement tracker, and every tracker inside the real training loop (single process,
DDP with two gloo processes, SIGKILL + resume)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from preflens.data import PreferencePair
from preflens.dynamics.entanglement import CASES, case_counts, entanglement_case, pair_gradient_stats, predict_first_order
from preflens.dynamics.trackers import EntanglementTracker
from preflens.tracking import read_jsonl


def _pairs(n=10):
    return [PreferencePair(f"Question {i}: the capital is", f" Paris{' yes' * (i % 3)}",
                           f" Rome{' no' * (i % 4)}") for i in range(n)]


def _state(lm, step, out_dir, total=4):
    return SimpleNamespace(step=step, total_steps=total, epoch=0, metrics={}, model=lm.model, lm=lm,
                           rank=0, world_size=1, is_main=True, out_dir=out_dir)


def test_entanglement_tracker_matches_direct_stats_and_leaves_grads(tiny, tmp_path):
    lm = copy.deepcopy(tiny)
    pairs = _pairs()
    tr = EntanglementTracker(lm, pairs, loss="dpo", loss_kwargs={"beta": 0.5}, every=1, ghost_n=6)
    tr.on_train_begin(_state(lm, 0, tmp_path))
    u0 = [torch.tensor(x, dtype=torch.float64) for x in tr.ref]
    prev_u = (u0[0][:6], u0[1][:6])
    prev_pred = predict_first_order(pair_gradient_stats(lm, pairs[:6], batch_size=16), "dpo", lr=1.0,
                                    loss_kwargs={"beta": 0.5}, u_ref_w=u0[0][:6], u_ref_l=u0[1][:6])
    opt = torch.optim.SGD(lm.model.parameters(), lr=0.05)
    lm.model.zero_grad()
    (-sum(p.float().pow(2).sum() for p in lm.model.parameters()) * 1e-3).backward()
    opt.step()
    grads = {n: p.grad.clone() for n, p in lm.model.named_parameters()}
    with torch.no_grad():  # a loop may call its callbacks under no_grad
        row = tr.on_step(_state(lm, 1, tmp_path))
    for n, p in lm.model.named_parameters():  # autograd.grad only: .grad untouched
        assert torch.equal(p.grad, grads[n]), n
    st = pair_gradient_stats(lm, pairs[:6], batch_size=16)
    d_w, d_l = predict_first_order(st, "dpo", lr=1.0, loss_kwargs={"beta": 0.5}, u_ref_w=u0[0][:6], u_ref_l=u0[1][:6])
    expected = case_counts(entanglement_case(d_w, d_l))
    assert row["tracked/entanglement/mean_cos"] == float(st.cos.mean())
    assert row["tracked/entanglement/mean_inner"] == float(st.inner.mean())
    assert {c: int(row[f"tracked/entanglement/cases/{c}"]) for c in CASES} == expected
    line = read_jsonl(tmp_path / "tracked" / "entanglement.jsonl")[-1]
    real_w = torch.tensor(line["realised_w"], dtype=torch.float64)
    assert torch.allclose(real_w, st.u_w - prev_u[0], atol=1e-4)
    agree = float(((real_w > 0) == (prev_pred[0] > 0)).double().mean())
    assert row["tracked/entanglement/sign_agreement_chosen"] == agree
    assert sum(row[f"tracked/entanglement/realised_cases/{c}"] for c in CASES) == 6
    assert tr.case_counts_at(-1) == expected


def test_entanglement_tracker_reference_free_loss_and_bad_ghost_n(tiny, tmp_path):
    lm = copy.deepcopy(tiny)
    tr = EntanglementTracker(lm, _pairs(4), loss="simpo", every=1)
    tr.on_train_begin(_state(lm, 0, tmp_path))
    assert sum(tr.history[0][f"cases/{c}"] for c in CASES) == 4
    from preflens.errors import ConfigError

    with pytest.raises(ConfigError, match="ghost_n"):
        EntanglementTracker(lm, _pairs(4), ghost_n=0)
