"""SIGKILL ``preflens train`` (the real CLI, in a subprocess) at six points, resume each time.

Kill points, in the order one run directory goes through them:

1. during the reference precompute (log-probs computed, cache not yet written);
2. mid-step (forward and loss of step 2 done, no backward, no update, no checkpoint yet);
3. right after checkpoint 2 was renamed into place;
4. between steps (step 3 logged, step 4 not started);
5. inside the writer of checkpoint 4 (weights written to the temporary directory; the
   ``PREFLENS_CKPT_SLEEP`` hook of :mod:`preflens.dynamics.checkpoint`);
6. inside the final-model save (weights written to the temporary ``final-model`` directory).

After the last resume, the metrics file (minus the wall-clock ``tokens_per_s``), the final
safetensors weights, the step-8 checkpoint (weights and optimizer state) and the printed
final metrics equal those of an uninterrupted run bit for bit. After every kill each listed
checkpoint verifies against its manifest (never half-written). A second test corrupts
checkpoints and resumes through the CLI: the corrupt one is named on stderr and the run falls
back to the previous good one; when none is good the CLI exits 2 with a one-line error.

The stall points are installed by a small launcher (``SHIM`` below) that wraps library
functions and then calls ``preflens.cli.main``; it does not change what the CLI does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preflens.data import PreferencePair, write_pairs
from preflens.dynamics.checkpoint import list_checkpoints, truncate_metrics, verify_checkpoint
from tests.conftest import capital_pairs, sigkill_when

SHIM = r'''
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
markers = Path(os.environ["SHIM_MARKERS"])
mode, _, at = os.environ.get("SHIM_STALL", "").partition(":")
at = int(at or 0)

def stall(tag):
    (markers / tag).write_text(str(os.getpid()))
    time.sleep(600)

def counting(orig, tag, before):
    count = [0]
    def wrapped(*a, **k):
        count[0] += 1
        if before and count[0] == at:
            stall(tag)
        out = orig(*a, **k)
        if not before and count[0] == at:
            stall(tag)
        return out
    return wrapped

if mode == "refcache":      # reference log-probs computed, not yet cached
    import preflens.dynamics.refcache as rc
    rc.pair_logprobs = counting(rc.pair_logprobs, mode, before=False)
elif mode == "midstep":     # loss of the at-th step computed; no backward, no update
    import preflens.dynamics.losses as losses
    losses.compute_loss = counting(losses.compute_loss, mode, before=False)
elif mode == "between":     # before the at-th step of this process sets its learning rate
    import preflens.dynamics.train as train
    train.lr_at = counting(train.lr_at, mode, before=True)
elif mode == "after_ckpt":  # checkpoint `at` renamed into place
    import preflens.dynamics.rundir as rundir
    orig = rundir.save_checkpoint
    def save(root, step, **k):
        out = orig(root, step, **k)
        if step == at:
            stall(mode)
        return out
    rundir.save_checkpoint = save
elif mode == "final":       # final-model weights written to the temporary directory
    import transformers
    transformers.PreTrainedModel.save_pretrained = counting(
        transformers.PreTrainedModel.save_pretrained, mode, before=False)

from preflens.cli import main
sys.exit(main(sys.argv[1:]))
'''

STEPS, CKPT_EVERY = 8, 2


def _pairs(n: int = 12) -> list[PreferencePair]:
    return capital_pairs(n, yes_every=4, no_every=3)


def _argv(data: Path, out: Path) -> list[str]:
    return ["train", "--model", "tiny-random", "--data", str(data), "--beta", "0.2", "--lr", "3e-3",
            "--steps", str(STEPS), "--batch-size", "3", "--seed", "11", "--schedule", "cosine",
            "--warmup-steps", "2", "--checkpoint-every", str(CKPT_EVERY), "--device", "cpu",
            "--no-progress", "--out", str(out)]


class Runner:
    """Launches the CLI through the shim; one data file, one markers folder per test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shim = root / "shim.py"
        self.shim.write_text(SHIM)
        self.data = root / "pairs.jsonl"
        write_pairs(self.data, _pairs())
        self.markers = root / "markers"
        self.markers.mkdir()

    def launch(self, out: Path, stall: str = "", **env) -> subprocess.Popen:
        full = dict(os.environ, OMP_NUM_THREADS="1", SHIM_MARKERS=str(self.markers), SHIM_STALL=stall,
                    HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
        return subprocess.Popen([sys.executable, str(self.shim), *_argv(self.data, out)], env=full,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def complete(self, out: Path, **env) -> tuple[int, str, str]:
        proc = self.launch(out, **env)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        return proc.returncode, stdout.decode(), stderr.decode()

    def kill_at(self, out: Path, condition, stall: str = "", timeout: float = 60.0, **env) -> None:
        proc = self.launch(out, stall, **env)
        sigkill_when(proc, condition, timeout=timeout, what=f"kill point {stall or env}")

    def marker(self, tag: str):
        return lambda: (self.markers / tag).exists()


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
            for x in path.read_text().splitlines()]


def _equal_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _final_line(stdout: str) -> dict:
    out = json.loads(stdout.strip().splitlines()[-1])
    return {k: v for k, v in out.items() if k not in ("tokens_per_s", "checkpoint")}


def _state(out: Path) -> tuple[list[int], int]:
    """(checkpoint steps, metrics lines); every listed checkpoint must verify."""
    ckpts = list_checkpoints(out / "checkpoints")
    for c in ckpts:
        verify_checkpoint(c)
    metrics = out / "metrics.jsonl"
    n = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    return [int(c.name.split("-")[1]) for c in ckpts], n


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted CLI run of the same configuration (same launcher, one thread)."""
    runner = Runner(tmp_path_factory.mktemp("reference"))
    out = runner.root / "run"
    rc, stdout, stderr = runner.complete(out)
    assert rc == 0, stderr[-2000:]
    return out, stdout


@pytest.mark.slow
def test_sigkill_at_six_points_then_resume_is_bit_identical(tmp_path, reference):
    ref_out, ref_stdout = reference
    run = Runner(tmp_path)
    out = tmp_path / "run"
    # 1. during the reference precompute: nothing durable yet, no cache file.
    run.kill_at(out, run.marker("refcache"), "refcache:1")
    assert _state(out) == ([], 0)
    assert not list((out / "ref_cache").glob("*.safetensors"))
    # 2. mid-step 2 (fresh start: no checkpoint to resume from).
    run.kill_at(out, run.marker("midstep"), "midstep:2")
    assert _state(out) == ([], 1)
    # 3. right after checkpoint 2.
    run.kill_at(out, run.marker("after_ckpt"), "after_ckpt:2")
    assert _state(out) == ([2], 2)
    # 4. between steps 3 and 4 (resumed at 2: this process's 2nd step is step 4).
    run.kill_at(out, run.marker("between"), "between:2")
    assert _state(out) == ([2], 3)
    # 5. inside the writer of checkpoint 4: only a .tmp-* directory, never a half step-*.
    partial = lambda: any((out / "checkpoints").glob(".tmp-step-00000004-*/model.safetensors"))  # noqa: E731
    run.kill_at(out, partial, PREFLENS_CKPT_SLEEP="4:600")
    assert _state(out) == ([2], 4)  # the 4th line is cut back on resume
    assert list((out / "checkpoints").glob(".tmp-step-*"))
    # 6. inside the final-model save: all steps done, final-model not yet in place.
    run.kill_at(out, run.marker("final"), "final:1")
    assert _state(out) == ([6, 8], 8)
    assert not (out / "final-model").exists() and list(out.glob(".tmp-final-model-*"))
    # A temp file as an atomic write killed before its rename leaves it (never read; dropped).
    (out / ".metrics.jsonl.k1ll3d.tmp").write_text('{"step": 1, "lo')
    # Resume to the end.
    rc, stdout, stderr = run.complete(out)
    assert rc == 0, stderr[-2000:]
    assert _metrics(out / "metrics.jsonl") == _metrics(ref_out / "metrics.jsonl")
    assert _final_line(stdout) == _final_line(ref_stdout)
    assert _equal_tensors(out / "final-model" / "model.safetensors", ref_out / "final-model" / "model.safetensors")
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert _equal_tensors(out / "checkpoints" / "step-00000008" / name,
                              ref_out / "checkpoints" / "step-00000008" / name)
    leftovers = [p for p in out.rglob("*") if p.name.startswith((".tmp", ".old", ".write-test"))
                 or p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.slow
def test_corrupt_checkpoints_through_the_cli(tmp_path, reference):
    ref_out, ref_stdout = reference
    run = Runner(tmp_path)
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    # Flip one byte of the newest weights (same size: only the sha256 can tell).
    newest = out / "checkpoints" / "step-00000008" / "model.safetensors"
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    rc, stdout, stderr = run.complete(out)
    assert rc == 0, stderr[-2000:]
    assert f"checkpoint {out / 'checkpoints' / 'step-00000008'} is corrupt: model.safetensors sha256 mismatch" \
        in stderr and "falling back" in stderr
    assert _metrics(out / "metrics.jsonl") == _metrics(ref_out / "metrics.jsonl")
    assert _final_line(stdout) == _final_line(ref_stdout)
    assert _equal_tensors(out / "final-model" / "model.safetensors", ref_out / "final-model" / "model.safetensors")
    verify_checkpoint(out / "checkpoints" / "step-00000008")  # re-written from step 6
    # Now no good checkpoint: step 8 truncated, step 6 without manifest -> exit 2, one line.
    opt = out / "checkpoints" / "step-00000008" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    (out / "checkpoints" / "step-00000006" / "manifest.json").unlink()
    final_before = (out / "final-model" / "model.safetensors").read_bytes()
    rc, stdout, stderr = run.complete(out)
    assert rc == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("preflens train: error: no good checkpoint to resume from")
    assert "step-00000008 is corrupt: optimizer.safetensors has 100 bytes" in last
    assert "step-00000006 is corrupt: unreadable manifest.json" in last
    assert "Traceback" not in stderr
    assert (out / "final-model" / "model.safetensors").read_bytes() == final_before  # earlier output kept


def test_torn_metrics_line_is_cut_on_resume(tmp_path):
    """A kill in the middle of a metrics line: resuming from step k keeps lines 1..k only."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i, "loss": 0.5}) for i in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')
    truncate_metrics(path, 5)
    assert path.read_text().splitlines() == lines
    truncate_metrics(path, 2)
    assert path.read_text().splitlines() == lines[:2]
    truncate_metrics(path, 0)
    assert path.read_text() == "" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_length"])
def test_damaged_reference_cache_is_recomputed(tiny, tmp_path, caplog, damage):
    """A damaged ref_cache file is never trusted: logged, recomputed, rewritten whole."""
    import logging

    from safetensors.torch import save

    from preflens.dynamics.refcache import reference_logprobs
    from preflens.scoring import encode_pairs

    enc = encode_pairs(tiny, _pairs(4))
    kw = dict(pad_id=tiny.pad_id, device=torch.device("cpu"), cache_dir=tmp_path)
    u_w, u_l = reference_logprobs(tiny.model, enc, **kw)
    (path,) = tmp_path.glob("*.safetensors")
    good = path.read_bytes()
    bad = {"truncate": good[: len(good) // 2], "garbage": b"\x00" * 64,
           "wrong_length": save({"u_ref_w": u_w[:2], "u_ref_l": u_l[:2]})}[damage]
    path.write_bytes(bad)
    with caplog.at_level(logging.INFO, logger="preflens.dynamics.refcache"):
        again = reference_logprobs(tiny.model, enc, **kw)
    assert torch.equal(again[0], u_w) and torch.equal(again[1], u_l)
    assert not any("read from" in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == good
