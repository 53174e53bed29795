"""The entanglement tracker, and every tracker inside the real training loop (single process,
DDP with two gloo processes, SIGKILL + resume)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from preflens.dynamics.entanglement import CASES, case_counts, entanglement_case, pair_gradient_stats, predict_first_order
from preflens.dynamics.trackers import EntanglementTracker
from preflens.tracking import read_jsonl
from tests.conftest import capital_pairs, run_torchrun, sigkill_when


_pairs = capital_pairs


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
                                    loss_kwargs={"beta": 0.5}, ref_chosen_logps=u0[0][:6], ref_rejected_logps=u0[1][:6])
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
    d_w, d_l = predict_first_order(st, "dpo", lr=1.0, loss_kwargs={"beta": 0.5}, ref_chosen_logps=u0[0][:6], ref_rejected_logps=u0[1][:6])
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


# ----------------------------------------------------------------------------------------------
# inside the real training loop
# ----------------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from preflens.data import read_pairs, write_pairs  # noqa: E402
from preflens.dynamics.train import train_preference  # noqa: E402
from preflens.report import LENSES, build_trackers  # noqa: E402

LOOP = dict(loss="dpo", loss_kwargs={"beta": 0.5}, optimizer="adamw", lr=3e-3, steps=6, batch_size=4, seed=3,
            checkpoint_every=2)


def _rows(path: Path, keep=lambda k: True) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s" and keep(k)}
            for x in path.read_text().splitlines()]


def test_tracked_run_trains_bit_identically_to_an_untracked_run(tiny, tmp_path):
    pairs = _pairs(12)
    plain = train_preference(copy.deepcopy(tiny), pairs, out_dir=tmp_path / "plain", **LOOP)
    lm = copy.deepcopy(tiny)
    trackers = build_trackers(lm, pairs, LENSES, every=2, n=8, ghost_n=4, loss="dpo", loss_kwargs={"beta": 0.5})
    tracked = train_preference(lm, pairs, out_dir=tmp_path / "tracked", callbacks=trackers, **LOOP)
    untracked_keys = lambda k: not k.startswith("tracked/")  # noqa: E731
    assert _rows(tracked.metrics_path, untracked_keys) == _rows(plain.metrics_path)
    rows = _rows(tracked.metrics_path)
    assert [("tracked/ranking/accuracy" in r) for r in rows] == [False, True, False, True, False, True]
    for lens in LENSES:
        recs = [json.loads(x) for x in (tmp_path / "tracked" / "tracked" / f"{lens}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [0, 2, 4, 6], lens
        assert recs[-1]["metrics"] == {k.split("/", 2)[2]: v for k, v in rows[-1].items()
                                       if k.startswith(f"tracked/{lens}/")}
    from safetensors.torch import load_file

    a, b = (load_file(str(r.checkpoint_path / "model.safetensors")) for r in (plain, tracked))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trackers_under_one_process_fsdp_match_an_unsharded_run(tiny, tmp_path):
    # shard="fsdp" on one process: the trackers measure the gathered replica, same numbers
    pairs, loop = _pairs(8), dict(LOOP, steps=2)
    got = {}
    for shard in ("ddp", "fsdp"):
        lm = copy.deepcopy(tiny)
        trackers = build_trackers(lm, pairs, ["ranking"], every=1, n=4)
        res = train_preference(lm, pairs, out_dir=tmp_path / shard, callbacks=trackers, shard=shard, **loop)
        got[shard] = [{k: v for k, v in r.items() if k.startswith("tracked/")} for r in _rows(res.metrics_path)]
    assert got["fsdp"][0] and len(got["fsdp"]) == 2
    for a, b in zip(got["fsdp"], got["ddp"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


DDP_WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from preflens.data import read_pairs
from preflens.dynamics.train import train_preference
from preflens.models import load_model
from preflens.report import LENSES, build_trackers

data, out, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
lm = load_model("tiny-random", device="cpu")
pairs = read_pairs(data)
lenses = config.pop("lenses", LENSES)
trackers = build_trackers(lm, pairs, lenses, every=2, n=8, ghost_n=4, loss="dpo", loss_kwargs={"beta": 0.5})
train_preference(lm, pairs, out_dir=out, callbacks=trackers, **config)
"""


def _torchrun_tracked(tmp_path, out, config, what):
    run_torchrun(tmp_path, DDP_WORKER, _pairs(12), out, config, what=f"{what} run with trackers")
    return _rows(out / "metrics.jsonl")


@pytest.mark.slow
def test_trackers_under_two_process_fsdp_measure_a_gathered_replica_like_one_process(tiny, tmp_path):
    # FSDP2 shards the parameters: rank 0 measures a plain replica loaded from a collective
    # full-state gather on record steps; the tracked numbers follow a single-process run
    lenses = ["ranking", "entanglement"]
    config = dict(LOOP, optimizer="sgd", lr=0.05)
    rows = _torchrun_tracked(tmp_path, tmp_path / "fsdp", dict(config, shard="fsdp", lenses=lenses), "FSDP")
    lm = copy.deepcopy(tiny)
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    trackers = build_trackers(lm, pairs, lenses, every=2, n=8, ghost_n=4, loss="dpo", loss_kwargs={"beta": 0.5})
    single = _rows(train_preference(lm, pairs, out_dir=tmp_path / "one", callbacks=trackers, **config).metrics_path)
    assert [r["step"] for r in rows] == [r["step"] for r in single] == [1, 2, 3, 4, 5, 6]
    tracked = [k for k in single[1] if k.startswith("tracked/")]
    assert any(k.startswith("tracked/ranking/") for k in tracked) and any("entanglement" in k for k in tracked)
    for a, b in zip(rows, single):
        assert sorted(k for k in a if k.startswith("tracked/")) == sorted(k for k in b if k.startswith("tracked/"))
        for k in b:
            if k.startswith("tracked/"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (a["step"], k)
    for lens in lenses:  # one record per record step: only rank 0 wrote
        recs = read_jsonl(tmp_path / "fsdp" / "tracked" / f"{lens}.jsonl")
        assert [r["step"] for r in recs] == [0, 2, 4, 6], lens
        ones = read_jsonl(tmp_path / "one" / "tracked" / f"{lens}.jsonl")
        assert recs[0]["metrics"] == pytest.approx(ones[0]["metrics"], rel=1e-5, abs=1e-5), lens  # the baseline


@pytest.mark.slow
def test_trackers_under_two_process_ddp_record_once_on_rank_0(tmp_path):
    rows = _torchrun_tracked(tmp_path, tmp_path / "ddp", dict(LOOP, optimizer="sgd", lr=0.05), "DDP")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(any(k.startswith(f"tracked/{lens}/") for k in rows[1]) for lens in LENSES)
    for lens in LENSES:  # one record per step: only rank 0 wrote
        steps = [json.loads(x)["step"] for x in (tmp_path / "ddp" / "tracked" / f"{lens}.jsonl").read_text().splitlines()]
        assert steps == [0, 2, 4, 6], lens


RESUME_WORKER = """
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from preflens.data import read_pairs
from preflens.dynamics.train import train_preference
from preflens.models import load_model
from preflens.report import LENSES, build_trackers

data, out, config = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
stall_at = int(os.environ.get("STALL_AT_STEP", "0"))

class Stall:
    name = "stall"
    def on_step(self, state):  # after the trackers: their line for this step is already written
        if state.step == stall_at:
            (out / "stalled").write_text(str(state.step))
            time.sleep(600)

lm = load_model("toyworld", device="cpu")
pairs = read_pairs(data)
trackers = build_trackers(lm, pairs, LENSES, every=1, n=6, ghost_n=3, loss="dpo", loss_kwargs={"beta": 0.5})
train_preference(lm, pairs, out_dir=out, callbacks=[*trackers, Stall()], **config)
(out / "done").write_text("ok")
"""


def _launch(tmp_path, data, out, **env):
    script = tmp_path / "resume_worker.py"
    script.write_text(RESUME_WORKER)
    return subprocess.Popen([sys.executable, str(script), str(data), str(out), json.dumps(RESUME)],
                            env=dict(os.environ, OMP_NUM_THREADS="1", **env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


RESUME = dict(LOOP, steps=6, checkpoint_every=2)


@pytest.mark.slow
def test_killed_and_resumed_tracked_run_is_bit_identical_and_reports(tmp_path):
    from preflens.cli import main
    from preflens.data.toyworld.prefs import multi_token_pairs
    from preflens.models import load_model
    from preflens.reproduce.common import toyworld_world

    pairs = multi_token_pairs(toyworld_world(), 16, seed=0)
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, pairs)
    # the uninterrupted reference, in this process (1 thread, as the workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = load_model("toyworld", device="cpu")
        trackers = build_trackers(lm, pairs, LENSES, every=1, n=6, ghost_n=3, loss="dpo", loss_kwargs={"beta": 0.5})
        train_preference(lm, pairs, out_dir=tmp_path / "ref", callbacks=trackers, **RESUME)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "run"
    proc = _launch(tmp_path, data, out, STALL_AT_STEP="5")  # checkpoint at 4; step 5 tracked, not logged
    sigkill_when(proc, (out / "stalled").exists, timeout=240)
    assert json.loads((out / "tracked" / "ranking.jsonl").read_text().splitlines()[-1])["step"] == 5
    proc = _launch(tmp_path, data, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert (out / "done").exists()
    assert _rows(out / "metrics.jsonl") == _rows(tmp_path / "ref" / "metrics.jsonl")
    assert any(k.startswith("tracked/dla/") for k in _rows(out / "metrics.jsonl")[-1])
    for lens in LENSES:
        a = (out / "tracked" / f"{lens}.jsonl").read_text()
        assert a == (tmp_path / "ref" / "tracked" / f"{lens}.jsonl").read_text(), lens
        assert [json.loads(x)["step"] for x in a.splitlines()] == list(range(7))
    assert main(["report", str(out)]) == 0
    assert {p.stem for p in (out / "figures").glob("*.png")} == {"training", *LENSES}
    assert "## Lens: dla" in (out / "report.md").read_text()
