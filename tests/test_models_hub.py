"""load_model with the Hugging Face hub unreachable: a one-line ModelError in seconds, naming
HF_HUB_OFFLINE (transformers alone retries for about a minute)."""

from __future__ import annotations

import time

import pytest

from preflens.errors import ModelError
from preflens.models import _hub_reachable, load_model

NOT_CACHED = "preflens-tests/no-such-model"  # never in any local cache


def test_offline_env_fails_fast_and_names_the_variable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_model(NOT_CACHED, device="cpu")
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "\n" not in msg and NOT_CACHED in msg and "HF_HUB_OFFLINE=1 is set" in msg


def test_unreachable_hub_without_offline_env_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_model(NOT_CACHED, device="cpu")
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "\n" not in msg and "could not be reached" in msg and "HF_HUB_OFFLINE=1" in msg


def test_probe_of_a_hanging_hub_is_bounded(monkeypatch):
    import urllib.request

    def hang(*args, **kwargs):  # DNS/connect hang, then a network error
        time.sleep(10)
        raise OSError("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    t0 = time.perf_counter()
    assert _hub_reachable(timeout=0.5) is False
    assert time.perf_counter() - t0 < 1.5
