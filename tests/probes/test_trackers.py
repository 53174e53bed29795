"""Probe-lens trackers (ranking, displacement, CHES) driven by a hand-written training state.

The state object carries exactly what the callback protocol documents (step, total_steps,
model, lm, rank, is_main, out_dir, metrics); "training" is a seeded perturbation of the weights.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from preflens.data import PreferencePair
from preflens.probes.ches import ches_for_pairs
from preflens.probes.displacement import peak_to_trough_drop
from preflens.probes.ranking import ranking_correct
from preflens.probes.trackers import ChesTracker, DisplacementTracker, RankingTracker
from preflens.scoring import response_logprobs
from preflens.tracking import ProbeSet, read_jsonl, sample_probe_pairs, spearman, truncate_jsonl
from tests.conftest import capital_pairs


def _pairs():
    multi = capital_pairs(10, start=1)
    single = [PreferencePair(f"Is {i} the capital? Answer:", " Paris", " Rome") for i in range(3)]
    return multi + single


def _state(lm, step, out_dir, total=6, main=True):
    return SimpleNamespace(step=step, total_steps=total, epoch=0, metrics={}, model=lm.model, lm=lm,
                           rank=0 if main else 1, world_size=2, is_main=main, out_dir=out_dir)


def _nudge(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture()
def lm(tiny):
    import copy

    return copy.deepcopy(tiny)


def _run(trackers, lm, out_dir, steps=range(1, 7), start=0, seed0=100, begin=True):
    rows = {}
    for t in trackers * begin:
        t.on_train_begin(_state(lm, start, out_dir))
    for step in steps:
        _nudge(lm.model, seed0 + step)
        row = {}
        for t in trackers:
            row.update(t.on_step(_state(lm, step, out_dir)) or {})
        rows[step] = row
    return rows


def test_ranking_tracker_values_schedule_and_files(lm, tmp_path):
    pairs = _pairs()
    tr = RankingTracker(lm, pairs, every=2)
    rows = _run([tr], lm, tmp_path, steps=range(1, 6), seed0=0)
    # records: baseline 0, every 2 steps, and the last step (total 6 is not reached: 5 is not last)
    assert [h["step"] for h in tr.history] == [0, 2, 4]
    assert rows[1] == {} and rows[3] == {} and set(rows[2]) == {
        "tracked/ranking/accuracy", "tracked/ranking/accuracy_mean", "tracked/ranking/flipped_to_correct",
        "tracked/ranking/flipped_to_incorrect"}
    prompts = [p.prompt for p in pairs]
    s_w = response_logprobs(lm, prompts, [p.chosen for p in pairs], batch_size=64)
    s_l = response_logprobs(lm, prompts, [p.rejected for p in pairs], batch_size=64)
    # the model has moved on after step 4 (step 5 nudged it); recompute at step 5 weights
    row = tr.on_step(_state(lm, 6, tmp_path))  # 6 = total_steps: always recorded
    s_w = response_logprobs(lm, prompts, [p.chosen for p in pairs], batch_size=64)
    s_l = response_logprobs(lm, prompts, [p.rejected for p in pairs], batch_size=64)
    ok = ranking_correct(s_w.logp, s_l.logp)
    assert row["tracked/ranking/accuracy"] == float(ok.double().mean())
    base = torch.tensor(tr.baseline, dtype=torch.bool)
    assert row["tracked/ranking/flipped_to_correct"] == float((~base & ok).double().mean())
    assert row["tracked/ranking/flipped_to_correct"] + row["tracked/ranking/flipped_to_incorrect"] > 0
    lines = read_jsonl(tmp_path / "tracked" / "ranking.jsonl")
    assert [x["step"] for x in lines] == [0, 2, 4, 6]
    assert lines[-1]["correct"] == [int(x) for x in ok.tolist()]
    assert lines[-1]["margin"] == (s_w.logp - s_l.logp).tolist()


def test_trackers_do_not_perturb_rng_grads_or_mode(lm, tmp_path):
    pairs = _pairs()
    probes = ProbeSet(lm, pairs)
    trackers = [RankingTracker(lm, probes=probes, every=1), DisplacementTracker(lm, probes=probes, every=1),
                ChesTracker(lm, probes=probes, every=1)]
    for t in trackers:
        t.on_train_begin(_state(lm, 0, tmp_path))
    lm.model.train()
    loss = sum(p.float().pow(2).sum() for p in lm.model.parameters())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.model.named_parameters()}
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    for t in trackers:
        assert t.on_step(_state(lm, 1, tmp_path))
    assert torch.equal(torch.rand(4), expected)
    assert lm.model.training
    for n, p in lm.model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    lm.model.eval()


def test_non_main_rank_records_nothing(lm, tmp_path):
    tr = RankingTracker(lm, _pairs(), every=1)
    tr.on_train_begin(_state(lm, 0, tmp_path, main=False))
    assert tr.on_step(_state(lm, 1, tmp_path, main=False)) is None
    assert tr.history == [] and not (tmp_path / "tracked").exists()


def _make(lm):
    probes = ProbeSet(lm, _pairs())
    return [RankingTracker(lm, probes=probes, every=2), DisplacementTracker(lm, probes=probes, every=2),
            ChesTracker(lm, probes=probes, every=2)]


def test_resume_from_state_dict_is_bit_identical(tiny, tmp_path):
    import copy

    lm_a = copy.deepcopy(tiny)
    full = _make(lm_a)
    rows_full = _run(full, lm_a, tmp_path / "a")
    # interrupted: run to step 4, "checkpoint" (weights + JSON state), then the file gets a stray line
    lm_b = copy.deepcopy(tiny)
    part = _make(lm_b)
    _run(part, lm_b, tmp_path / "b", steps=range(1, 5))
    saved = [json.loads(json.dumps(t.state_dict())) for t in part]
    weights = copy.deepcopy(lm_b.model.state_dict())
    _run(part, lm_b, tmp_path / "b", steps=range(5, 7), begin=False)  # killed later; redone on resume
    lm_c = copy.deepcopy(tiny)
    lm_c.model.load_state_dict(weights)
    resumed = _make(lm_c)
    for t, d in zip(resumed, saved):
        t.load_state_dict(d)
    rows_resumed = _run(resumed, lm_c, tmp_path / "b", steps=range(5, 7), start=4)
    assert {k: rows_full[k] for k in (5, 6)} == rows_resumed
    for name in ("ranking", "displacement", "ches"):
        a = (tmp_path / "a" / "tracked" / f"{name}.jsonl").read_text()
        b = (tmp_path / "b" / "tracked" / f"{name}.jsonl").read_text()
        assert a == b, name


def test_displacement_tracker_matches_peak_to_trough_and_top_tokens(lm, tmp_path):
    pairs = _pairs()
    tr = DisplacementTracker(lm, pairs, every=1, k=3)
    _run([tr], lm, tmp_path, steps=range(1, 5))
    lines = read_jsonl(tmp_path / "tracked" / "displacement.jsonl")
    traj = torch.tensor([x["logp_chosen"] for x in lines], dtype=torch.float64)  # [records, n]
    drops = [peak_to_trough_drop(traj[:, i]) for i in range(traj.shape[1])]
    assert tr.history[-1]["max_drop_logp"] == pytest.approx(sum(drops) / len(drops), abs=1e-12)
    delta = (traj[-1] - traj[0]).mean()
    assert tr.history[-1]["delta_chosen"] == pytest.approx(float(delta), abs=1e-12)
    assert tr.probes.single_token == [10, 11, 12]
    gains = lines[-1]["top_gaining"]
    assert [g["pair"] for g in gains] == [10, 11, 12] and all(len(g["ids"]) == 3 for g in gains)
    assert all(a >= b for g in gains for a, b in zip(g["delta_logp"], g["delta_logp"][1:]))
    probs = [[x["metrics"]["single_prob_chosen"]] for x in lines]
    assert len(probs) == 5 and lines[0]["metrics"]["single_max_drop_prob"] == 0.0


def test_ches_tracker_matches_ches_for_pairs(lm, tmp_path):
    pairs = _pairs()
    tr = ChesTracker(lm, pairs, every=1)
    _run([tr], lm, tmp_path, steps=range(1, 3))
    line = read_jsonl(tmp_path / "tracked" / "ches.jsonl")[-1]
    expected = ches_for_pairs(lm, pairs)
    assert torch.allclose(torch.tensor(line["ches"], dtype=torch.float64), expected, rtol=1e-6)
    ln = ches_for_pairs(lm, pairs, length_normalized=True)
    assert torch.allclose(torch.tensor(line["ln_ches"], dtype=torch.float64), ln, rtol=1e-6)
    assert line["metrics"]["spearman_current"] == pytest.approx(spearman(expected, line["delta_chosen"]), abs=1e-9)


def test_helpers(tmp_path):
    pairs = list(range(10))
    assert sample_probe_pairs(pairs, 4, seed=1) == sample_probe_pairs(pairs, 4, seed=1)
    assert sample_probe_pairs(pairs, 20) == pairs
    s = sample_probe_pairs(pairs, 4, seed=1)
    assert s == sorted(s) and len(set(s)) == 4
    path = tmp_path / "x.jsonl"
    path.write_text('{"step": 0}\n{"step": 2}\n{"step": 4}\n{"step": 6, "a"')
    assert [r["step"] for r in read_jsonl(path)] == [0, 2, 4]  # torn last line ignored
    truncate_jsonl(path, 2)
    assert [r["step"] for r in read_jsonl(path)] == [0, 2]
    truncate_jsonl(path, 0)
    assert path.read_text() == ""
