"""Shared fixtures: offline models are loaded once per session; GPT-2 tests skip without weights."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def gpt2_weights_cached() -> bool:
    """True when the real GPT-2 small weights and tokenizer are in the local HF cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    have_weights = any(
        isinstance(try_to_load_from_cache("gpt2", f), str)
        for f in ("model.safetensors", "pytorch_model.bin")
    )
    have_tok = isinstance(try_to_load_from_cache("gpt2", "tokenizer.json"), str)
    return have_weights and have_tok


_MISSING = (
    "real GPT-2 small weights are not in the local Hugging Face cache (no hub here); run "
    "`python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('gpt2')\"` "
    "with network access to enable"
)


def pytest_collection_modifyitems(config, items):
    if gpt2_weights_cached() or os.environ.get("PREFLENS_REQUIRE_GPT2") == "1":
        return
    for item in items:
        if "gpt2" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=_MISSING))


def pytest_runtest_setup(item):
    """PREFLENS_REQUIRE_GPT2=1 turns the skip of a `gpt2` test into a failure with the reason."""
    if "gpt2" in item.keywords and os.environ.get("PREFLENS_REQUIRE_GPT2") == "1":
        if not gpt2_weights_cached():
            pytest.fail("PREFLENS_REQUIRE_GPT2=1 but " + _MISSING, pytrace=False)


@pytest.fixture(scope="session")
def tiny():
    from preflens.models import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def gpt2_random():
    from preflens.models import load_model

    return load_model("gpt2-small-random", device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def capital_pairs(n: int = 10, *, yes_every: int = 3, no_every: int = 4, start: int = 0) -> list:
    """The tests' standard preference pairs: ``Question i: the capital is`` with chosen
    `` Paris`` + `` yes`` * (i % yes_every) and rejected `` Rome`` + `` no`` * (i % no_every), so
    lengths vary and the first response token is shared within each side."""
    from preflens.data import PreferencePair

    return [PreferencePair(f"Question {i}: the capital is", f" Paris{' yes' * (i % yes_every)}",
                           f" Rome{' no' * (i % no_every)}") for i in range(start, start + n)]


def sigkill_when(proc, condition, *, timeout: float = 60.0, what: str = "the kill point") -> None:
    """The tests' SIGKILL harness: poll ``condition()`` every 50 ms while ``proc`` (a
    ``subprocess.Popen`` with ``stderr=PIPE``) runs, then SIGKILL it and reap it.

    Fails (AssertionError with the tail of its stderr) if the process ends first, and kills it
    and fails if ``condition`` is not met within ``timeout`` seconds.
    """
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"{what} not reached in {timeout} s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    assert proc.returncode == -signal.SIGKILL



def run_torchrun(tmp_path, worker: str, pairs, out, config: dict, *, nproc: int = 2, what: str = "run",
                 timeout: float = 240) -> None:
    """Run ``worker`` (Python source taking ``data out config_json``) under ``torch.distributed.run``
    with ``nproc`` CPU processes on ``pairs`` written as JSONL; fail the test with the tail of stderr
    on a non-zero exit, and kill the launcher and every worker (its process group) on a timeout."""
    import json
    import signal
    import subprocess
    import sys

    from preflens.data import write_pairs

    script, data = tmp_path / "worker.py", tmp_path / "pairs.jsonl"
    script.write_text(worker)
    write_pairs(data, pairs)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), str(data), str(out), json.dumps(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and all workers, no orphans
        _, stderr = proc.communicate()
        pytest.fail(f"{nproc}-process {what} timed out (deadlock?):\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
