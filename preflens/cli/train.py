"""``preflens train``: the command-line face of :func:`preflens.dynamics.train.train_preference`.

    preflens train --model toyworld --data pairs.jsonl --loss dpo --beta 0.1 --lr 1e-5 \\
        --steps 200 --batch-size 16 --out runs/dpo [--resume/--no-resume] [--loss-kwarg lam=2]

Runs unchanged under ``torchrun --nproc_per_node=N -m preflens.cli train ...`` (DDP, or FSDP2
with ``--shard fsdp``; only rank 0 writes and shows the progress bar). ``--lora-r R`` trains LoRA
adapters (final adapter in ``DIR/final-adapter``; ``--lora-merge`` also writes the merged model). Writes ``DIR/metrics.jsonl``, ``DIR/config.json``,
``DIR/checkpoints/step-*`` and, unless ``--no-save-model``, the final model in Hugging Face format
in ``DIR/final-model`` (loadable with ``preflens.models.load_model``). Prints the final metrics
as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from preflens.errors import ConfigError, PreflensError, TrainingError
from preflens.models import DEFAULT_MODEL

__all__ = ["register", "run_train", "loss_help", "config_from_args", "CONFIG_FLAGS"]


def loss_help() -> str:
    """A table of the registered losses and their parameters with defaults (for ``--help``)."""
    from preflens.dynamics.losses import LOSSES

    width = max(map(len, LOSSES))
    rows = [f"  {name:<{width}}  " + (", ".join(f"{k}={v:g}" for k, v in spec.defaults.items()) or "-")
            for name, spec in LOSSES.items()]
    return ("losses (--loss NAME; change a parameter with --loss-kwarg KEY=VALUE; defaults shown):\n"
            + "\n".join(rows))


def _loss_kwargs(args) -> dict:
    out: dict[str, float] = {}
    if args.beta is not None:
        out["beta"] = args.beta
    for item in args.loss_kwarg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--loss-kwarg", f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError("--loss-kwarg", f"{key}: expected a number, got {value!r}") from None
    return out


class _Progress:
    """tqdm bar over optimizer steps (created at the first step, when the total is known)."""

    name = "progress"

    def __init__(self) -> None:
        self.bar = None

    def on_step(self, state) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=state.total_steps, initial=state.step - 1, desc="train", unit="step")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{state.metrics['loss']:.4f}",
                             acc=f"{state.metrics['rewards/accuracies']:.2f}")

    def on_end(self, state) -> None:
        if self.bar is not None:
            self.bar.close()


class _LastStep:
    """Remembers the last finished update, for the Ctrl-C message."""

    name = "last-step"

    def __init__(self) -> None:
        self.step = 0

    def on_step(self, state) -> None:
        self.step = state.step


def _interrupt_message(out: str | Path, step: int) -> str:
    """``interrupted at step N; ...`` naming the checkpoint a rerun resumes from."""
    from preflens.dynamics.checkpoint import list_checkpoints

    found = list_checkpoints(Path(out) / "checkpoints")
    if found:
        resume = f"rerun the same command to resume from checkpoint {found[-1].name}"
    else:
        resume = "no checkpoint was written yet, so a rerun starts from step 0"
    return f"interrupted at step {step}; {resume}"


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to an ``argparse`` sub-parser set; returns its parser."""
    p = subparsers.add_parser(
        "train", help="train a model on preference pairs (DPO and other pairwise losses)",
        description="Train a model on preference pairs with a pairwise loss (DPO by default). Writes "
                    "OUT/metrics.jsonl, OUT/config.json, OUT/checkpoints/step-* and OUT/final-model; "
                    "rerunning the same command resumes from the newest good checkpoint.",
        epilog=loss_help(),
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"offline name, HF directory or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--data", required=True,
                   help="TRL-format JSONL (prompt/chosen/rejected: strings, or message lists "
                        "rendered by the model's chat template)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="parameter dtype the model is loaded in (default fp32; see also --precision)")
    p.add_argument("--eval-data", help="JSONL of held-out pairs (eval/* metrics)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (and at the end)")
    p.add_argument("--loss", default="dpo", help="the pairwise loss (see the list below)")
    p.add_argument("--beta", type=float, help="the loss's beta (shorthand for --loss-kwarg beta=...)")
    p.add_argument("--loss-kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="loss parameter, repeatable (e.g. --loss-kwarg lam=2)")
    p.add_argument("--lr", type=float, required=True, help="peak learning rate")
    p.add_argument("--schedule", default=None, help="learning-rate schedule: constant (default), linear or cosine")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="linear learning-rate warm-up from 0, as transformers/TRL (the first update has lr 0)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer updates")
    length.add_argument("--epochs", type=int, help="passes over the data")
    p.add_argument("--batch-size", type=int, required=True, help="pairs per update (global)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per update")
    p.add_argument("--optimizer", default="adamw", help="adamw (default), sgd or rmsprop")
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or bf16 (autocast)")
    p.add_argument("--head-precision", default="fp32",
                   help="unembedding GEMMs: fp32 (default) or bf16 (bf16 operands, fp32 accumulation, fp32 "
                        "logits and log-softmax; faster on a GPU at large vocabularies, emulated on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and initialisation")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the newest good checkpoint in --out (default on)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="save every N steps")
    p.add_argument("--pairwise-normalized", action="store_true",
                   help="pairwise normalized gradient (gradient-entanglement mitigation)")
    p.add_argument("--shard", default="ddp", help="multi-process strategy under torchrun: ddp (default) or fsdp "
                   "(FSDP2, sharded checkpoints that resume into any number of processes)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward (less memory, same numbers)")
    p.add_argument("--lora-r", type=int, default=None, help="train LoRA adapters of this rank (default: full "
                   "fine-tuning); the reference is the base model")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha (default 2 x rank)")
    p.add_argument("--lora-targets", default=None, metavar="NAME,NAME",
                   type=lambda text: tuple(t.strip() for t in text.split(",") if t.strip()) or None,
                   help="modules to adapt (default per family: c_attn,c_proj for GPT-2, q/k/v/o_proj for Llama-like)")
    p.add_argument("--lora-merge", action="store_true",
                   help="with --lora-r: also save the merged model to OUT/final-model")
    p.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True,
                   help="save the final model to OUT/final-model (default on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    track = p.add_argument_group("tracking every lens during training (`preflens report OUT` draws them)")
    track.add_argument("--track", default=None, metavar="LENSES",
                       help="lenses recorded during training, comma-separated: ranking, displacement, ches, "
                            "entanglement, dla, or all (metrics.jsonl tracked/<lens>/*, OUT/tracked/<lens>.jsonl)")
    track.add_argument("--track-every", type=int, default=10, help="record every N steps (and at the start and end)")
    track.add_argument("--track-data", default=None,
                       help="JSONL probe pairs (default: a fixed seeded sample of --data)")
    track.add_argument("--track-n", type=int, default=32, help="probe pairs sampled, with --seed (default 32)")
    track.add_argument("--report-to", default="none",
                       help="also mirror each metrics row to: none (default), tensorboard (OUT/tensorboard), "
                            "wandb (offline, OUT/wandb); needs pip install 'preflens[track]'")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a hub model / directory run its own Python code (default off)")
    p.set_defaults(func=run_train, option_flags=_OPTION_FLAGS)
    return p


# The one flag <-> parameter table of `preflens train`: TrainConfig field -> flag (the flag's
# argparse dest is the field name), then train_preference's other parameters.
CONFIG_FLAGS = {
    "loss": "--loss", "optimizer": "--optimizer", "lr": "--lr", "schedule": "--schedule",
    "warmup_steps": "--warmup-steps", "steps": "--steps", "epochs": "--epochs", "batch_size": "--batch-size",
    "grad_accum": "--grad-accum", "precision": "--precision", "head_precision": "--head-precision",
    "seed": "--seed", "max_grad_norm": "--max-grad-norm",
    "pairwise_normalized": "--pairwise-normalized", "eval_every": "--eval-every",
    "checkpoint_every": "--checkpoint-every", "resume": "--resume", "device": "--device", "compile": "--compile",
    "shard": "--shard", "activation_checkpointing": "--activation-checkpointing", "lora_r": "--lora-r",
    "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets",
}
_OPTION_FLAGS = {**CONFIG_FLAGS, "dtype": "--dtype", "pairs": "--data", "eval_pairs": "--eval-data", "out_dir": "--out",
                 "loss_kwargs": "--loss-kwarg"}


def config_from_args(args):
    """The :class:`~preflens.dynamics.config.TrainConfig` of parsed ``args`` (:data:`CONFIG_FLAGS`)."""
    from preflens.dynamics.config import TrainConfig

    return TrainConfig(**{name: getattr(args, name) for name in CONFIG_FLAGS}, loss_kwargs=_loss_kwargs(args))


def _cli_error(exc: PreflensError, args) -> PreflensError:
    """Re-address an error of the library to what the user typed: a ConfigError's field becomes
    its flag (a loss parameter ``--beta`` or ``--loss-kwarg KEY``), ``resume=False`` becomes
    ``--no-resume``. Data errors already name the file and line (``PreferencePair.source``)."""
    if isinstance(exc, ConfigError):
        from preflens.dynamics.losses import LOSSES

        option, reason = exc.option, exc.reason.replace("resume=False", "--no-resume")
        if option == "beta" and args.beta is not None:
            option = "--beta"
        elif option not in _OPTION_FLAGS and (option in {i.partition("=")[0].strip() for i in args.loss_kwarg}
                                              or option in getattr(LOSSES.get(args.loss), "defaults", {})):
            option = f"--loss-kwarg {option}"
        return ConfigError(_OPTION_FLAGS.get(option, option), reason, allowed=exc.allowed)
    if isinstance(exc, TrainingError) and "resume=False" in str(exc):
        return TrainingError(str(exc).replace("resume=False", "--no-resume"))
    return exc


def _save_final_model(lm, out: Path) -> Path:
    """Write ``out/final-model`` (HF format, safetensors) atomically: a temporary sibling, renamed."""
    final, tmp, old = out / "final-model", out / f".tmp-final-model-{os.getpid()}", out / ".old-final-model"
    for stale in out.glob(".tmp-final-model-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        lm.model.save_pretrained(tmp)  # transformers 5: always safetensors
        lm.tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not write the final model to {final}: {exc.strerror or exc} "
                            "(the checkpoints are intact; rerun to retry)") from exc
    shutil.rmtree(old, ignore_errors=True)
    return final


def _save_final_adapter(peft_model, out: Path) -> Path:
    from preflens.dynamics.lora import save_adapter

    return save_adapter(peft_model, out / "final-adapter")


def run_train(args) -> int:
    """Execute ``preflens train`` for parsed ``args``; returns the exit code."""
    from preflens.data import read_pairs
    from preflens.dynamics.train import train_preference
    from preflens.models import load_model

    rank, last = int(os.environ.get("RANK", "0")), _LastStep()
    try:
        config = config_from_args(args)  # a bad option fails before the model is loaded
        lm = load_model(args.model, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
        # the tokenizer renders chat-format (message-list) pairs through its chat template
        pairs = read_pairs(args.data, tokenizer=lm.tokenizer)
        eval_pairs = read_pairs(args.eval_data, tokenizer=lm.tokenizer) if args.eval_data else None
        callbacks = [last] if args.no_progress or rank != 0 else [last, _Progress()]
        from preflens.report import run_callbacks

        callbacks += run_callbacks(lm, pairs, track=args.track, track_every=args.track_every,
                                   track_data=args.track_data, track_n=args.track_n, seed=config.seed,
                                   loss=config.loss, loss_kwargs=config.loss_kwargs, report_to=args.report_to,
                                   config=config.to_dict())
        result = train_preference(lm, pairs, config, eval_pairs=eval_pairs, callbacks=callbacks, out_dir=args.out)
    except PreflensError as exc:
        raise _cli_error(exc, args) from None
    except KeyboardInterrupt as exc:
        exc.preflens_message = _interrupt_message(args.out, last.step)  # read by preflens.cli.main
        raise
    if rank == 0:
        if args.save_model and result.peft_model is not None:
            _save_final_adapter(result.peft_model, Path(args.out))
            if args.lora_merge:  # last: merging folds the adapters into the base weights in place
                lm.model = result.peft_model.merge_and_unload()
                _save_final_model(lm, Path(args.out))
        elif args.save_model:
            _save_final_model(lm, Path(args.out))
        print(json.dumps({"steps": result.steps, "checkpoint": str(result.checkpoint_path),
                          **result.final_metrics}))
    return 0

