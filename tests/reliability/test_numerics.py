"""Numerics under stress: CHES and log-probs of 2,000-token responses on a bf16 model, and
non-finite values appearing mid-run (gradient only, activations via the CLI).

CHES (Razin et al. 2024, Def. 2) of a long response sums ~2,000 hidden states; done in bf16 the
sum keeps ~3 significant digits. The reference here is an fp64 Gram-matrix evaluation
(``1ᵀ H⁺ H⁻ᵀ 1``, a different summation order) of the SAME hidden states the probe used, so
the two agree to 1e-6 only if the probe accumulates in fp64.
"""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

import preflens.models as models_mod
from preflens.cli import main as cli_main
from preflens.data import PreferencePair, write_pairs
from preflens.dynamics.checkpoint import list_checkpoints, load_weights
from preflens.dynamics.train import train_preference
from preflens.errors import TrainingError
from preflens.models import LM, OFFLINE_TOKENIZER_DIR
from preflens.probes.ches import ches_for_pairs, ches_scores
from preflens.scoring import encode, response_hidden_states, response_logprobs
from tests.conftest import capital_pairs

WORDS = ["Paris", "Rome", "capital", "France", "Poland", "Warsaw", "annotator", "response", "bread",
         "model", "the", "of", "is", "yes", "no", "maybe", "quick", "brown", "fox"]


@pytest.fixture(scope="module")
def long_lm():
    """A 1-layer GPT-2 with 4,200 positions, run in bf16, with the shipped BPE tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(OFFLINE_TOKENIZER_DIR))
    cfg = GPT2Config(vocab_size=len(tok), n_positions=4200, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = GPT2LMHeadModel(cfg)
    return LM(model=model.to(torch.bfloat16).eval(), tokenizer=tok, name="long-bf16",
              tokenizer_dir=OFFLINE_TOKENIZER_DIR)


def _text(rng: random.Random, tok, n_tokens: int) -> str:
    words = []
    while len(tok(" " + " ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words += [rng.choice(WORDS) for _ in range(100)]
    while len(tok(" " + " ".join(words[:-1]), add_special_tokens=False)["input_ids"]) >= n_tokens:
        words.pop()
    return " " + " ".join(words)


@pytest.fixture(scope="module")
def long_pairs(long_lm):
    rng = random.Random(0)
    tok = long_lm.tokenizer
    return [PreferencePair("The capital of France is", _text(rng, tok, 2000), _text(rng, tok, 2100)),
            PreferencePair("Q: name a fox.\nA:", _text(rng, tok, 2050), _text(rng, tok, 2000))]


def _ches_fp64(hp: torch.Tensor, hn: torch.Tensor, normalized: bool) -> float:
    """<H+, H-> - ||H+||^2 via fp64 Gram matrices (1ᵀ A Bᵀ 1), a different order than the probe's."""
    a, b = hp.double().numpy(), hn.double().numpy()
    cross, own = (a @ b.T).sum(), (a @ a.T).sum()
    if normalized:
        cross, own = cross / (len(a) * len(b)), own / (len(a) * len(a))
    return float(cross - own)


def test_ches_on_2000_token_responses_in_bf16(long_lm, long_pairs):
    enc = encode(long_lm.tokenizer, [p.prompt for p in long_pairs], [p.chosen for p in long_pairs])
    assert all(2000 <= len(e.response_ids) <= 2001 + 100 for e in enc)
    assert next(long_lm.model.parameters()).dtype == torch.bfloat16
    prompts = [p.prompt for p in long_pairs]
    h_pos = response_hidden_states(long_lm, prompts, [p.chosen for p in long_pairs])
    h_neg = response_hidden_states(long_lm, prompts, [p.rejected for p in long_pairs])
    assert [h.shape[0] for h in h_pos] == [len(e.response_ids) for e in enc]
    for h in h_pos + h_neg:  # the model really ran in bf16: every value is bf16-representable
        assert torch.equal(h.to(torch.bfloat16).float(), h)
    for normalized in (False, True):
        got = ches_for_pairs(long_lm, long_pairs, length_normalized=normalized)
        assert got.dtype == torch.float64 and torch.isfinite(got).all()
        want = torch.tensor([_ches_fp64(a, b, normalized) for a, b in zip(h_pos, h_neg)], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)
        assert torch.equal(got, ches_scores(h_pos, h_neg, length_normalized=normalized))
    # The check can fail: the same sums accumulated in bf16 are off by far more than 1e-6.
    naive = []
    for a, b in zip(h_pos, h_neg):
        sa, sb = a.to(torch.bfloat16).sum(0, dtype=torch.bfloat16), b.to(torch.bfloat16).sum(0, dtype=torch.bfloat16)
        naive.append(float((sa * sb).sum(dtype=torch.bfloat16) - (sa * sa).sum(dtype=torch.bfloat16)))
    want = [_ches_fp64(a, b, False) for a, b in zip(h_pos, h_neg)]
    assert max(abs(n - w) / abs(w) for n, w in zip(naive, want)) > 1e-4


def test_logprobs_of_2000_token_responses_in_bf16(long_lm, long_pairs):
    """Summed log-probs stay finite and equal an fp64 log-softmax of the same hidden states."""
    prompts, responses = [p.prompt for p in long_pairs], [p.rejected for p in long_pairs]
    scores = response_logprobs(long_lm, prompts, responses)
    hidden = response_hidden_states(long_lm, prompts, responses)
    w = long_lm.model.get_output_embeddings().weight.detach().double()
    enc = encode(long_lm.tokenizer, prompts, responses)
    for i, (h, e) in enumerate(zip(hidden, enc)):
        lp = torch.log_softmax(h.double() @ w.T, dim=-1)
        ref = lp[torch.arange(len(e.response_ids)), torch.tensor(e.response_ids)].sum().item()
        assert np.isfinite(scores.logp[i].item())
        assert scores.logp[i].item() == pytest.approx(ref, rel=1e-6)
        assert int(scores.n_tokens[i]) == len(e.response_ids) >= 2000


# ------------------------------------------------------------------ non-finite values mid-run


def _pairs(n=8):
    return capital_pairs(n, yes_every=3, no_every=2)


class PoisonGradient:
    """From step ``at`` on, one gradient entry of wte becomes ``value`` (the loss stays finite)."""

    def __init__(self, at: int, value: float) -> None:
        self.at, self.value, self.snapshot = at, value, None

    def on_step(self, state):
        if state.step == self.at - 1:
            self.snapshot = [p.detach().clone() for p in state.policy.parameters()]

            def hook(g):
                g = g.clone()
                g[0, 0] = self.value
                return g

            state.policy.transformer.wte.weight.register_hook(hook)


@pytest.mark.parametrize("value,clip", [(float("nan"), None), (float("inf"), None), (float("nan"), 1.0)],
                         ids=["nan", "inf", "nan-clipped"])
def test_non_finite_gradient_only_stops_with_step_and_keeps_checkpoint(tiny, tmp_path, value, clip):
    lm = copy.deepcopy(tiny)
    poison = PoisonGradient(at=4, value=value)
    with pytest.raises(TrainingError) as exc:
        train_preference(lm, _pairs(), lr=1e-3, steps=6, batch_size=2, seed=0, out_dir=tmp_path,
                         checkpoint_every=2, max_grad_norm=clip, callbacks=[poison])
    msg = str(exc.value)
    assert msg.startswith("step 4: non-finite gradient") and "no update applied" in msg
    assert "loss nan" not in msg  # the loss itself was finite
    assert str(tmp_path / "checkpoints" / "step-00000002") in msg
    # no update: the weights are those after step 3, all finite
    for p, s in zip(lm.model.parameters(), poison.snapshot):
        assert torch.equal(p.detach(), s)
    (ckpt,) = list_checkpoints(tmp_path / "checkpoints")
    assert ckpt.name == "step-00000002"
    fresh = copy.deepcopy(tiny)
    load_weights(ckpt, fresh.model)
    assert all(torch.isfinite(p).all() for p in fresh.model.parameters())
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_inf_activation_through_the_cli(tmp_path, capsys, monkeypatch):
    """An inf in an activation at step 3 (the third forward with gradients: the reference
    precompute runs under no_grad)."""
    real_load = models_mod.load_model

    def load_with_fault(*args, **kwargs):
        lm = real_load(*args, **kwargs)
        calls = [0]

        def hook(module, inputs, output):
            calls[0] += torch.is_grad_enabled()
            if torch.is_grad_enabled() and calls[0] == 3:
                output = output.clone()
                output[0, 0, 0] = float("inf")
            return output

        lm.model.transformer.h[0].mlp.register_forward_hook(hook)
        return lm

    monkeypatch.setattr(models_mod, "load_model", load_with_fault)
    data = write_pairs(tmp_path / "pairs.jsonl", _pairs(6))
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-random", "--data", str(data), "--lr", "1e-3", "--steps", "5",
            "--batch-size", "2", "--checkpoint-every", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("preflens train: error: step 3: non-finite loss") and "Traceback" not in err
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-00000002'}" in last
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert not (out / "final-model").exists()
    monkeypatch.undo()  # the fault is gone: resuming finishes from step 2
    assert cli_main(argv) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
