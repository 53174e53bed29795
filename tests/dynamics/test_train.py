"""Tests for preflens.dynamics.train (in-process, tiny-random, CPU).

Independent references: float64 autograd through the plain HF logits (full-vocabulary
log-softmax, no preflens scoring code) for gradients and first-order predictions;
``preflens.scoring.response_logprobs`` for the loop's log-probs.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from preflens.data import PreferencePair, write_pairs
from preflens.dynamics import losses
from preflens.cli import main as cli_main
from preflens.dynamics.refcache import reference_logprobs
from preflens.dynamics.train import epoch_batches, train_preference
from preflens.errors import ConfigError, TrainingError
from preflens.models import load_model
from preflens.scoring import EncodedPairs, collate, encode, encode_pairs, response_logprobs

WORDS = "the capital city river yes no never sure maybe answer model human".split()


def make_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " " + " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    return [PreferencePair(f"Q{i}:" + text(2, 6), text(1, 8) + " a", text(1, 8) + " b") for i in range(n)]


@pytest.fixture(scope="module")
def base():
    return load_model("tiny-random", device="cpu")


def _u_and_grad(lm, pair, response, grad=True):
    """Float64 summed log-prob (EOS counted) via full HF logits, and its flat gradient."""
    b = collate(encode(lm.tokenizer, [pair.prompt], [response]), pad_id=lm.pad_id)
    logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double()
    mask = b.response_mask
    u = logits.log_softmax(-1)[mask].gather(1, b.targets[mask][:, None]).sum()
    if not grad:
        return u.detach(), None
    gs = torch.autograd.grad(u, list(lm.model.parameters()))
    return u.detach(), torch.cat([x.reshape(-1) for x in gs])


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_first_step_dpo_is_ln2_with_weight_beta_over_2(base, tmp_path):
    lm = copy.deepcopy(base)
    lm.model.double()
    pairs = make_pairs(2, seed=3)
    g = [(_u_and_grad(lm, p, p.chosen)[1], _u_and_grad(lm, p, p.rejected)[1]) for p in pairs]
    theta0, eta, beta = _flat(lm.model), 1e-2, 0.1
    res = train_preference(lm, pairs, loss="dpo", loss_kwargs={"beta": beta}, optimizer="sgd", lr=eta,
                           steps=1, batch_size=2, seed=0, out_dir=tmp_path)
    m = res.final_metrics
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # SGD is linear: Δθ = -η ∇mean ℓ = η (β/2) mean_i (g_w^i - g_l^i) at policy = reference.
    predicted = eta * (beta / 2) * sum(gw - gl for gw, gl in g) / len(g)
    delta = _flat(lm.model) - theta0
    assert torch.linalg.vector_norm(delta - predicted) < 1e-5 * torch.linalg.vector_norm(predicted)


@pytest.mark.parametrize("loss,kw", [("dpo", {"beta": 0.1}), ("cpo", {"beta": 0.1, "lam": 1.0})])
def test_one_sgd_step_moves_u_as_weights_predict(base, tmp_path, loss, kw):
    pair = PreferencePair("The capital of France is", " Paris, said the annotator.", " Rome. Never.")
    lm0 = copy.deepcopy(base)
    lm0.model.double()
    (u_w, g_w), (u_l, g_l) = _u_and_grad(lm0, pair, pair.chosen), _u_and_grad(lm0, pair, pair.rejected)
    lens = [torch.tensor([float(len(encode(base.tokenizer, [pair.prompt], [r])[0].response_ids))],
                         dtype=torch.float64) for r in (pair.chosen, pair.rejected)]
    a_w, a_l = losses.weights(loss, u_w[None], u_l[None], u_w[None], u_l[None], *lens, **kw)
    errors = []
    for eta in (4e-3, 2e-3, 1e-3):
        lm = copy.deepcopy(lm0)
        train_preference(lm, [pair], loss=loss, loss_kwargs=kw, optimizer="sgd", lr=eta, steps=1,
                         batch_size=1, seed=0, out_dir=tmp_path / f"{eta}")
        du_w = _u_and_grad(lm, pair, pair.chosen, grad=False)[0] - u_w
        du_l = _u_and_grad(lm, pair, pair.rejected, grad=False)[0] - u_l
        # Δu_w ≈ η(a_w‖g_w‖² − a_l⟨g_w,g_l⟩), Δu_l ≈ η(a_w⟨g_w,g_l⟩ − a_l‖g_l‖²) (GE spec §1)
        p_w = eta * (a_w * (g_w @ g_w) - a_l * (g_w @ g_l))
        p_l = eta * (a_w * (g_w @ g_l) - a_l * (g_l @ g_l))
        errors.append(max(float(abs(du_w - p_w) / abs(p_w)), float(abs(du_l - p_l) / abs(p_l))))
    assert errors[-1] < 0.05
    assert errors[0] > 1.5 * errors[1] > 2.25 * errors[2]  # shrinks at least linearly with η


def test_loop_logprobs_equal_scoring(base, tmp_path):
    lm = copy.deepcopy(base)
    pairs = make_pairs(6, seed=1)
    seen = {}

    class Record:
        def on_step(self, state):
            (i,) = state.batch_indices
            seen[i] = (state.metrics["logps/chosen"], state.metrics["logps/rejected"],
                       state.metrics["logps_mean/chosen"])
            state.metrics["custom/seen"] = len(seen)

    # lr 1e-30 leaves fp32 weights bit-unchanged, so every step scores the initial model.
    res = train_preference(lm, pairs, optimizer="sgd", lr=1e-30, epochs=1, batch_size=1, seed=0,
                           out_dir=tmp_path, callbacks=[Record()])
    prompts = [p.prompt for p in pairs]
    s_w = response_logprobs(base, prompts, [p.chosen for p in pairs])
    s_l = response_logprobs(base, prompts, [p.rejected for p in pairs])
    assert sorted(seen) == list(range(6))
    for i, (uw, ul, mw) in seen.items():
        assert uw == pytest.approx(float(s_w.logp[i]), abs=1e-5)
        assert ul == pytest.approx(float(s_l.logp[i]), abs=1e-5)
        assert mw == pytest.approx(float(s_w.mean_logp[i]), abs=1e-6)
    assert [h["custom/seen"] for h in res.history] == list(range(1, 7))  # callback metrics are logged
    assert [h["step"] for h in res.history] == list(range(1, 7))


def test_grad_accum_matches_one_big_batch(base, tmp_path):
    pairs = make_pairs(8, seed=2)
    runs = []
    for accum in (1, 2, 4):
        lm = copy.deepcopy(base)
        r = train_preference(lm, pairs, optimizer="sgd", lr=0.05, steps=3, batch_size=4, grad_accum=accum,
                             seed=5,
                             out_dir=tmp_path / str(accum))
        runs.append((r.history, _flat(lm.model)))
    for hist, theta in runs[1:]:
        assert torch.allclose(theta, runs[0][1], atol=1e-6)
        for a, b in zip(hist, runs[0][0]):
            for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6)


def test_nan_guard_keeps_last_good_checkpoint(base, tmp_path):
    from preflens.dynamics.checkpoint import list_checkpoints, load_weights

    lm = copy.deepcopy(base)

    class Poison:
        def on_step(self, state):
            if state.step == 3:
                with torch.no_grad():
                    state.policy.transformer.ln_f.weight[0] = float("nan")

    with pytest.raises(TrainingError, match="step 4: non-finite loss") as exc:
        train_preference(lm, make_pairs(8), lr=1e-3, steps=6, batch_size=2, seed=0, out_dir=tmp_path,
                         checkpoint_every=2, callbacks=[Poison()])
    assert "step-00000002" in str(exc.value)
    (ckpt,) = list_checkpoints(tmp_path / "checkpoints")
    assert ckpt.name == "step-00000002"
    fresh = copy.deepcopy(base)
    load_weights(ckpt, fresh.model)  # verifies the manifest too
    assert all(torch.isfinite(p).all() for p in fresh.model.parameters())
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_epoch_batches_deterministic_bucketed():
    lengths = [int(x) for x in torch.randint(3, 60, (50,), generator=torch.Generator().manual_seed(0))]
    a, b = epoch_batches(lengths, 4, seed=1, epoch=0), epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a == b and a != epoch_batches(lengths, 4, seed=1, epoch=1)
    assert sorted(i for batch in a for i in batch) == list(range(50))
    assert sum(len(x) < 4 for x in a) == 1 and len(epoch_batches(lengths, 4, 1, 0, min_size=4)) == 12
    spread = sum(max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in a)
    assert spread < 0.25 * sum(max(lengths) - min(lengths) for _ in a)  # buckets cut padding


def test_reference_cache_is_keyed_and_read(base, tmp_path):
    enc = encode_pairs(base, make_pairs(3))
    kw = dict(pad_id=base.pad_id, device=torch.device("cpu"), cache_dir=tmp_path)
    u_w, u_l = reference_logprobs(base.model, enc, **kw)
    (path,) = tmp_path.glob("*.safetensors")
    from safetensors.torch import save_file

    save_file({"u_ref_w": u_w + 1, "u_ref_l": u_l}, str(path))  # a hit must read the file
    assert torch.equal(reference_logprobs(base.model, enc, **kw)[0], u_w + 1)
    other = copy.deepcopy(base.model)
    with torch.no_grad():
        other.transformer.ln_f.bias += 1e-3
    assert reference_logprobs(other, enc, **kw, compute=False) is None
    fewer = EncodedPairs(enc.chosen[:2], enc.rejected[:2])
    assert reference_logprobs(base.model, fewer, **kw, compute=False) is None
    assert reference_logprobs(base.model, enc, **kw, precision="bf16", compute=False) is None
    assert reference_logprobs(base.model, enc, **kw, batches=[[0], [1, 2]], compute=False) is None


def test_eval_pairs_and_reference_free_loss(base, tmp_path):
    lm = copy.deepcopy(base)
    res = train_preference(lm, make_pairs(6), loss="simpo", lr=1e-3, steps=4, batch_size=3, seed=0,
                           out_dir=tmp_path, eval_pairs=make_pairs(3, seed=9), eval_every=2,
                           schedule="cosine", warmup_steps=1, optimizer="rmsprop")
    assert [("eval/loss" in h) for h in res.history] == [False, True, False, True]
    assert res.history[0]["lr"] == 0.0 and res.history[1]["lr"] == pytest.approx(1e-3)  # warm-up from 0 (TRL)
    assert res.history[-1]["lr"] < 1e-3
    assert not (tmp_path / "ref_cache").exists()  # SimPO needs no reference


@pytest.mark.parametrize("option,kwargs", [
    ("lr", {"lr": 0.0}), ("lr", {"lr": -1e-3}), ("lr", {"lr": float("nan")}),
    ("batch_size", {"batch_size": 0}), ("steps", {"steps": 0}), ("steps", {"epochs": 1}),
    ("steps", {"steps": None}), ("optimizer", {"optimizer": "adam"}),
    ("precision", {"precision": "fp16"}), ("loss", {"loss": "dpoo"}),
    ("beta", {"loss_kwargs": {"beta": 0.0}}), ("beta", {"loss_kwargs": {"beta": -1}}),
    ("pairs", {"pairs": []}), ("schedule", {"schedule": "exp"}), ("grad_accum", {"grad_accum": 0}),
    ("batch_size", {"batch_size": 3, "grad_accum": 2}), ("batch_size", {"batch_size": 16}),
    ("eval_every", {"eval_every": 2}), ("checkpoint_every", {"checkpoint_every": 0}),
    ("seed", {"seed": 1.5}), ("optimizer_kwargs", {"optimizer_kwargs": {"bogus": 1}}),
])
def test_bad_options_raise_config_error(base, tmp_path, option, kwargs):
    args = dict(lm=copy.deepcopy(base), pairs=make_pairs(4), lr=1e-3, steps=1, batch_size=2, seed=0,
                out_dir=tmp_path)
    args.update(kwargs)
    with pytest.raises(ConfigError) as exc:
        train_preference(args.pop("lm"), args.pop("pairs"), **args)
    assert exc.value.option == option


def test_pairwise_normalized_makes_both_move_right(base, tmp_path):
    pytest.importorskip("preflens.dynamics.entanglement",
                        reason="preflens.dynamics.entanglement (pair_gradient_norms) not written yet")
    pair = PreferencePair("The capital of France is", " Paris, said the annotator.",
                          " Paris, said the annotator!")
    lm = copy.deepcopy(base)
    lm.model.double()
    (u_w, g_w), (u_l, g_l) = _u_and_grad(lm, pair, pair.chosen), _u_and_grad(lm, pair, pair.rejected)
    eta = 1e-3
    train_preference(lm, [pair], optimizer="sgd", lr=eta, steps=1, batch_size=1, seed=0, out_dir=tmp_path,
                     pairwise_normalized=True)
    du_w = _u_and_grad(lm, pair, pair.chosen, grad=False)[0] - u_w
    du_l = _u_and_grad(lm, pair, pair.rejected, grad=False)[0] - u_l
    n_w, n_l, cos = g_w.norm(), g_l.norm(), (g_w @ g_l) / (g_w.norm() * g_l.norm())
    a = 0.1 / 2  # DPO weight at policy = reference
    # spec §7: Δu_w ≈ ηa·n_w(1 − cos) ≥ 0, Δu_l ≈ −ηa·n_l(1 − cos) ≤ 0
    assert float(du_w) == pytest.approx(float(eta * a * n_w * (1 - cos)), rel=0.05)
    assert float(du_l) == pytest.approx(float(-eta * a * n_l * (1 - cos)), rel=0.05)


def test_cli_train(tmp_path, capsys):
    write_pairs(tmp_path / "pairs.jsonl", make_pairs(4))
    argv = ["train", "--model", "tiny-random", "--data", str(tmp_path / "pairs.jsonl"), "--beta", "0.2",
            "--lr", "1e-3", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "run"),
            "--device", "cpu", "--no-progress"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and out["loss"] < math.log(2) + 1e-6
    trained = load_model(str(tmp_path / "run" / "final-model"), device="cpu")
    assert trained.model.transformer.wte.weight.shape[0] == trained.vocab_size
    assert cli_main(argv + ["--loss-kwarg", "tau=1"]) == 2
    assert "tau" in capsys.readouterr().err


REFERENCE_LOSSES = [name for name, spec in losses.LOSSES.items() if spec.uses_reference]


@pytest.mark.parametrize("loss", REFERENCE_LOSSES)
def test_step_one_rewards_are_exactly_zero_when_policy_is_reference(base, tmp_path, loss):
    """Issue 14 defect 1: the reference is scored in the loop's batch geometry, so at step 1
    u − u_ref is exactly 0 for every pair and the strict accuracy is 0 (TRL: exactly 0)."""
    pairs = make_pairs(40, seed=7)  # on the old code: accuracy 0.125 (2 of 16 pairs flipped by fp32 noise)
    res = train_preference(copy.deepcopy(base), pairs, loss=loss, lr=1e-3, steps=1, batch_size=16, grad_accum=4,
                           seed=4, out_dir=tmp_path)
    first = res.history[0]
    assert first["rewards/accuracies"] == 0.0
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0


@pytest.mark.parametrize("loss,kw,mean,scale", [
    ("simpo", {"beta": 2.0, "gamma": 0.5}, True, 2.0),  # TRL CPOTrainer(loss_type="simpo"): β·mean
    ("orpo", {"lam": 0.3}, True, 0.3),                   # TRL ORPOTrainer: β (= our λ)·mean
    ("cpo", {"beta": 0.2, "lam": 1.0}, False, 0.2),      # TRL CPOTrainer(loss_type="sigmoid"): β·sum
])
def test_reference_free_rewards_follow_trl(base, tmp_path, loss, kw, mean, scale):
    """Issue 14 defect 4: rewards/* and logps/* of reference-free losses are what TRL's trainer
    for that loss logs. Step-1 metrics are measured before the update, on the initial model."""
    pairs = make_pairs(4, seed=5)
    res = train_preference(copy.deepcopy(base), pairs, loss=loss, loss_kwargs=kw, lr=1e-3, steps=1, batch_size=4,
                           seed=0, out_dir=tmp_path)
    prompts = [p.prompt for p in pairs]
    s_w = response_logprobs(base, prompts, [p.chosen for p in pairs])
    s_l = response_logprobs(base, prompts, [p.rejected for p in pairs])
    u_w, u_l = (s_w.mean_logp, s_l.mean_logp) if mean else (s_w.logp, s_l.logp)
    m = res.history[0]
    assert m["logps/chosen"] == pytest.approx(float(u_w.mean()), abs=1e-5)
    assert m["logps/rejected"] == pytest.approx(float(u_l.mean()), abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(scale * float(u_w.mean()), abs=1e-5)
    assert m["rewards/margins"] == pytest.approx(scale * float((u_w - u_l).mean()), abs=1e-5)
    assert m["rewards/accuracies"] == float((u_w > u_l).double().mean())
    assert m["logps_mean/chosen"] == pytest.approx(float(s_w.mean_logp.mean()), abs=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_logged_lr_matches_transformers_warmup_schedules(base, tmp_path, schedule):
    """Issue 14 defect 4: TRL's first warm-up update has lr 0 (transformers' schedulers)."""
    from transformers import get_scheduler

    res = train_preference(copy.deepcopy(base), make_pairs(4), optimizer="sgd", lr=0.01, steps=6, batch_size=2,
                           seed=0, schedule=schedule, warmup_steps=2, out_dir=tmp_path)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = get_scheduler("constant_with_warmup" if schedule == "constant" else schedule, opt,
                          num_warmup_steps=2, num_training_steps=6)
    want = []
    for _ in range(6):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [h["lr"] for h in res.history] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert res.history[0]["lr"] == 0.0
