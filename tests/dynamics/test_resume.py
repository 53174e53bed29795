"""Checkpoint/resume tests: SIGKILL mid-run (twice, once inside the checkpoint writer), corrupt
checkpoints, config mismatch. The reference is an uninterrupted run of the same configuration;
"identical" means bit-identical weights and metrics files equal except ``tokens_per_s`` (timing).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preflens.data import PreferencePair, write_pairs
from preflens.dynamics.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint
from preflens.dynamics.train import train_preference
from preflens.errors import ConfigError, TrainingError
from preflens.models import load_model

CONFIG = dict(loss="dpo", loss_kwargs={"beta": 0.2}, optimizer="adamw", lr=3e-3, steps=8, batch_size=3,
              seed=11, checkpoint_every=2, schedule="cosine", warmup_steps=2)

WORKER = """
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from preflens.data import read_pairs
from preflens.dynamics.train import train_preference
from preflens.models import load_model

data, out, config = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
stall_at = int(os.environ.get("STALL_AT_STEP", "0"))

class Stall:
    def on_step(self, state):
        if state.step == stall_at:
            (out / "stalled").write_text(str(state.step))
            time.sleep(600)

CALLBACK

lm = load_model("tiny-random", device="cpu")
train_preference(lm, read_pairs(data), out_dir=out, callbacks=[Counter(), Stall()], **config)
(out / "done").write_text("ok")
"""


class Counter:
    """A callback with state: a counter and a private torch RNG, logged every step."""

    name = "counter"

    def __init__(self):
        self.count, self.began = 0, 0
        self.rng = torch.Generator().manual_seed(1234)

    def on_train_begin(self, state):
        self.began += 1

    def on_step(self, state):
        self.count += 1
        return {"cb/count": self.count, "cb/draw": float(torch.rand((), generator=self.rng)),
                "cb/main": float(state.is_main and state.world_size == 1 and state.model is state.lm.model)}

    def state_dict(self):
        return {"count": self.count, "rng": self.rng.get_state()}

    def load_state_dict(self, d):
        self.count = d["count"]
        self.rng.set_state(d["rng"])


WORKER = WORKER.replace("CALLBACK", inspect.getsource(Counter))


def _pairs(n: int = 12) -> list[PreferencePair]:
    return [PreferencePair(f"Question {i}: the capital is", f" Paris{' yes' * (i % 4)}",
                           f" Rome{' no' * (i % 3)}") for i in range(n)]


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted in-process run (1 thread, as the workers)."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train_preference(load_model("tiny-random", device="cpu"), _pairs(), out_dir=out, callbacks=[Counter()],
                               **CONFIG)
    finally:
        torch.set_num_threads(threads)
    return res


def _launch(tmp_path: Path, out: Path, **env) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_pairs(data, _pairs())
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([sys.executable, str(script), str(data), str(out), json.dumps(CONFIG)],
                            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker did not reach the kill point in time")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    # Kill 1: between checkpoints (after step 3's metrics line, before step 4's).
    proc = _launch(tmp_path, out, STALL_AT_STEP="4")
    _wait_for(proc, lambda: (out / "stalled").exists())
    _kill(proc)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    # Kill 2: inside the writer of checkpoint 6 (weights written, not yet renamed).
    proc = _launch(tmp_path, out, PREFLENS_CKPT_SLEEP="6:600")
    _wait_for(proc, lambda: any((out / "checkpoints").glob(".tmp-step-00000006-*/model.safetensors")))
    time.sleep(0.3)
    _kill(proc)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000004"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6  # lines 5-6 must be cut back
    # Resume to the end.
    proc = _launch(tmp_path, out)
    assert proc.wait(timeout=180) == 0, proc.stderr.read().decode()[-2000:]
    assert (out / "done").exists()
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert _metrics(out / "metrics.jsonl") == _metrics(reference.metrics_path)
    assert _same_weights(out / "checkpoints" / "step-00000008", reference.checkpoint_path)
    # the callback's counter and RNG resumed with the run (its logged values equal the reference's)
    assert [r["cb/count"] for r in _metrics(out / "metrics.jsonl")] == list(range(1, 9))
    assert len({r["cb/draw"] for r in _metrics(out / "metrics.jsonl")}) == 8
    assert all(r["cb/main"] == 1.0 for r in _metrics(out / "metrics.jsonl"))


def test_corrupt_checkpoint_falls_back_with_named_error(tmp_path, reference, caplog):
    out = tmp_path / "run"
    cfg = dict(CONFIG)
    lm = load_model("tiny-random", device="cpu")
    snapshot = copy.deepcopy(lm)
    # Run to the end, then truncate the newest checkpoint's weights: resume must detect it,
    # log a TrainingError naming it, fall back to step 6 and redo steps 7-8 identically.
    train_preference(lm, _pairs(), out_dir=out, callbacks=[Counter()], **cfg)
    newest = out / "checkpoints" / "step-00000008"
    blob = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(TrainingError, match="step-00000008 is corrupt: model.safetensors has"):
        verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="preflens.dynamics.checkpoint"):
        res = train_preference(snapshot, _pairs(), out_dir=out, callbacks=[Counter()], **cfg)
    assert any("step-00000008 is corrupt" in r.getMessage() for r in caplog.records)
    assert _metrics(res.metrics_path) == _metrics(reference.metrics_path)
    assert _same_weights(res.checkpoint_path, reference.checkpoint_path)


def test_checkpoint_roundtrip_and_no_good_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    torch.manual_seed(123)
    meta = {"cursor": {"epoch": 0, "position": 1}}
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, meta=meta)
    expected_draw = torch.rand(3)
    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    state = load_checkpoint(path, model=model2, optimizer=opt2)
    assert state["meta"]["cursor"] == {"epoch": 0, "position": 1} and state["step"] == 1
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert all(torch.equal(s1["state"][i][k], s2["state"][i][k]) for i in s1["state"] for k in s1["state"][i])
    (path / "state.json").write_text("{}")  # same size unlikely; sha256 catches it either way
    with pytest.raises(TrainingError, match=f"checkpoint {path} is corrupt"):
        load_checkpoint(path, model=model2)
    from preflens.dynamics.checkpoint import load_latest

    with pytest.raises(TrainingError, match="no good checkpoint"):
        load_latest(tmp_path, model=model2)


def test_resume_with_different_options_is_refused(tmp_path):
    lm = load_model("tiny-random", device="cpu")
    train_preference(lm, _pairs(6), lr=1e-3, steps=1, batch_size=2, seed=0, out_dir=tmp_path)
    with pytest.raises(ConfigError) as exc:
        train_preference(lm, _pairs(6), lr=2e-3, steps=2, batch_size=2, seed=0, out_dir=tmp_path)
    assert exc.value.option == "resume" and "lr" in str(exc.value)
    res = train_preference(lm, _pairs(6), lr=2e-3, steps=2, batch_size=2, seed=0, out_dir=tmp_path,
                           resume=False)
    assert [h["step"] for h in res.history] == [1, 2]
