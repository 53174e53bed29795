"""LoRA through peft: training moves only the adapters and lowers the loss; the reference is the
base model (adapters disabled); checkpoints hold the adapters and resume bit for bit; ghost inner
products on the LoRA parameters equal the exact ones."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from preflens.data import PreferencePair
from preflens.dynamics import lora
from preflens.dynamics.entanglement import pair_gradient_stats
from preflens.dynamics.ghost import select_parameters
from preflens.dynamics.refcache import pair_logprobs
from preflens.dynamics.train import TrainConfig, reference_batches, train_preference
from preflens.errors import ConfigError
from preflens.models import load_model
from preflens.scoring import encode_pairs

CONFIG = dict(loss="dpo", loss_kwargs={"beta": 0.5}, optimizer="adamw", lr=2e-2, batch_size=4, seed=1,
              lora_r=4, checkpoint_every=1)


def _pairs(n=8) -> list[PreferencePair]:
    return [PreferencePair(f"Item {i} says", f" yes{' indeed' * (i % 3)}", f" no{' never' * (i % 5)}")
            for i in range(n)]


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not lora.is_lora_parameter(n)}


def test_lora_trains_adapters_only_and_reference_is_base(tmp_path):
    lm = load_model("tiny-random", device="cpu")
    base = {n.replace(".base_layer", ""): w for n, w in _base_weights(lm.model).items()}
    pairs = _pairs()
    res = train_preference(lm, pairs, steps=6, out_dir=tmp_path, **CONFIG)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05
    after = {n.replace(".base_layer", ""): w for n, w in _base_weights(lm.model).items()}
    assert set(after) == set(base) and all(torch.equal(after[n], base[n]) for n in base)
    trained = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trained and all(lora.is_lora_parameter(n) for n in trained)
    # checkpoints hold the adapters only
    saved = load_file(str(res.checkpoint_path / "model.safetensors"))
    assert set(saved) == set(trained)
    # the reference (cached before the adapters existed) == the adapted model with adapters disabled
    ref = load_file(str(next((tmp_path / "ref_cache").glob("*.safetensors"))))
    enc = encode_pairs(lm, pairs)
    geometry = dict(batches=reference_batches(enc.lengths, TrainConfig(steps=6, **CONFIG)), pad_id=lm.pad_id,
                    device=torch.device("cpu"))
    with res.peft_model.disable_adapter():
        u_w, u_l = pair_logprobs(lm.model, enc, **geometry)
    assert torch.equal(u_w, ref["u_ref_w"]) and torch.equal(u_l, ref["u_ref_l"])
    moved, _ = pair_logprobs(lm.model, enc, **geometry)
    assert not torch.allclose(moved, u_w)  # the adapters are live outside the context
    # the adapter saves and reloads onto a fresh base model with the same outputs
    path = lora.save_adapter(res.peft_model, tmp_path / "adapter")
    from peft import PeftModel

    fresh = PeftModel.from_pretrained(load_model("tiny-random", device="cpu").model, str(path))
    again, _ = pair_logprobs(fresh.get_base_model(), enc, **geometry)
    assert torch.allclose(again, moved, atol=1e-6)


def test_lora_resume_is_bit_identical(tmp_path):
    full_lm = load_model("tiny-random", device="cpu")
    full = train_preference(full_lm, _pairs(), steps=4, out_dir=tmp_path / "full", **CONFIG)
    train_preference(load_model("tiny-random", device="cpu"), _pairs(), steps=2, out_dir=tmp_path / "part", **CONFIG)
    part_lm = load_model("tiny-random", device="cpu")
    part = train_preference(part_lm, _pairs(), steps=4, out_dir=tmp_path / "part", **CONFIG)
    assert [r["loss"] for r in part.history] == [r["loss"] for r in full.history]
    a, b = dict(full_lm.model.named_parameters()), dict(part_lm.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_full_fine_tuning_does_not_resume_a_lora_run(tmp_path):
    """The full fine-tuning record omits the LoRA fields; resuming a LoRA run without them is
    still a different run and is refused before anything is written."""
    train_preference(load_model("tiny-random", device="cpu"), _pairs(), steps=2, out_dir=tmp_path / "run", **CONFIG)
    full = {k: v for k, v in CONFIG.items() if not k.startswith("lora_")}
    with pytest.raises(ConfigError, match="lora_r") as exc:
        train_preference(load_model("tiny-random", device="cpu"), _pairs(), steps=4, out_dir=tmp_path / "run", **full)
    assert exc.value.option == "resume"


def test_lora_config_errors(tmp_path):
    lm = load_model("tiny-random", device="cpu")
    with pytest.raises(ConfigError, match="lora_targets"):
        train_preference(lm, _pairs(), steps=1, out_dir=tmp_path, **{**CONFIG, "lora_targets": ["q_proj"]})
    with pytest.raises(ConfigError, match="lora_r"):
        lora.attach_lora(load_model("tiny-random", device="cpu").model, r=0)
    assert lora.DEFAULT_TARGETS["llama"] == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_ghost_equals_exact_on_lora_parameters():
    torch.manual_seed(0)
    lm = load_model("tiny-random", device="cpu")
    peft_model = lora.attach_lora(lm.model, r=3)
    with torch.no_grad():  # B = 0 at init would make every LoRA-A gradient vanish: randomize
        for n, p in lm.model.named_parameters():
            if lora.is_lora_parameter(n):
                p.normal_(0, 0.2)
    sel = select_parameters(lm.model, "lora")
    assert sel and all(lora.is_lora_parameter(n) for n in sel)
    assert len(sel) == len([n for n, _ in lm.model.named_parameters() if lora.is_lora_parameter(n)])
    pairs = _pairs(5)
    ghost = pair_gradient_stats(lm, pairs, params="lora", method="ghost", dtype=torch.float64)
    exact = pair_gradient_stats(lm, pairs, params="lora", method="exact", dtype=torch.float64)
    for k in ("inner", "norm_w_sq", "norm_l_sq"):
        torch.testing.assert_close(getattr(ghost, k), getattr(exact, k), rtol=1e-10, atol=0)
    assert (exact.norm_w_sq > 0).all()
    del peft_model


def test_cli_lora_and_shard_flags(tmp_path, capsys):
    from preflens.cli import main as cli_main
    from preflens.data import write_pairs

    write_pairs(tmp_path / "pairs.jsonl", _pairs())
    base = ["train", "--model", "tiny-random", "--data", str(tmp_path / "pairs.jsonl"), "--lr", "1e-2",
            "--steps", "2", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    out = tmp_path / "lora"
    assert cli_main(base + ["--out", str(out), "--lora-r", "2", "--lora-targets", "c_attn", "--lora-merge"]) == 0
    assert (out / "final-adapter" / "adapter_config.json").is_file()
    merged = load_model(str(out / "final-model"), device="cpu")  # plain HF weights, adapters folded in
    assert not any(lora.is_lora_parameter(n) for n, _ in merged.model.named_parameters())
    assert set(load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))) == {
        f"transformer.h.{i}.attn.c_attn.lora_{m}.default.weight" for i in (0, 1) for m in "AB"}
    out = tmp_path / "fsdp"
    assert cli_main(base + ["--out", str(out), "--shard", "fsdp", "--activation-checkpointing"]) == 0
    assert (out / "checkpoints" / "step-00000002" / "dcp").is_dir() and (out / "final-model").is_dir()
    capsys.readouterr()
    assert cli_main(base + ["--out", str(tmp_path / "bad"), "--shard", "zero3"]) == 2
    assert "--shard" in capsys.readouterr().err
