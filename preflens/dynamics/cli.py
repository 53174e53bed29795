"""``preflens train``: the command-line face of :func:`preflens.dynamics.train.train_preference`.

    preflens train --model toyworld --data pairs.jsonl --loss dpo --beta 0.1 --lr 1e-5 \\
        --steps 200 --batch-size 16 --out runs/dpo [--resume/--no-resume] [--loss-kwarg lam=2]

Runs unchanged under ``torchrun --nproc_per_node=N -m preflens.dynamics.cli train ...`` (DDP;
only rank 0 writes and shows the progress bar). Writes ``DIR/metrics.jsonl``, ``DIR/config.json``,
``DIR/checkpoints/step-*`` and, unless ``--no-save-model``, the final model in Hugging Face format
in ``DIR/final-model`` (loadable with ``preflens.models.load_model``). Prints the final metrics
as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from preflens.errors import ConfigError, PreflensError

__all__ = ["register", "run_train", "main"]


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


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to an ``argparse`` sub-parser set; returns its parser."""
    p = subparsers.add_parser(
        "train", help="train a model on preference pairs (DPO and other pairwise losses)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="offline name, HF directory or hub id")
    p.add_argument("--data", required=True, help="TRL-format JSONL (prompt/chosen/rejected)")
    p.add_argument("--eval-data", help="JSONL of held-out pairs (eval/* metrics)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (and at the end)")
    p.add_argument("--loss", default="dpo", help="a loss of preflens.dynamics.losses (default dpo)")
    p.add_argument("--beta", type=float, help="the loss's beta (shorthand for --loss-kwarg beta=...)")
    p.add_argument("--loss-kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="loss parameter, repeatable (e.g. --loss-kwarg lam=2)")
    p.add_argument("--lr", type=float, required=True, help="peak learning rate")
    p.add_argument("--schedule", default=None, help="constant (default), linear or cosine")
    p.add_argument("--warmup-steps", type=int, default=0)
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer updates")
    length.add_argument("--epochs", type=int, help="passes over the data")
    p.add_argument("--batch-size", type=int, required=True, help="pairs per update (global)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per update")
    p.add_argument("--optimizer", default="adamw", help="adamw (default), sgd or rmsprop")
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm")
    p.add_argument("--precision", default="fp32", help="fp32 (default) or bf16 (autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the newest good checkpoint in --out (default on)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="save every N steps")
    p.add_argument("--pairwise-normalized", action="store_true",
                   help="pairwise normalized gradient (gradient-entanglement mitigation)")
    p.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True,
                   help="save the final model to OUT/final-model (default on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)
    return p


def run_train(args) -> int:
    """Execute ``preflens train`` for parsed ``args``; returns the exit code."""
    from preflens.data import read_pairs
    from preflens.dynamics.train import train_preference
    from preflens.models import load_model

    kwargs = _loss_kwargs(args)
    pairs = read_pairs(args.data)
    eval_pairs = read_pairs(args.eval_data) if args.eval_data else None
    lm = load_model(args.model, device=args.device)
    rank = int(os.environ.get("RANK", "0"))
    callbacks = [] if args.no_progress or rank != 0 else [_Progress()]
    result = train_preference(
        lm, pairs, loss=args.loss, loss_kwargs=kwargs, optimizer=args.optimizer, lr=args.lr,
        schedule=args.schedule, warmup_steps=args.warmup_steps, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, precision=args.precision,
        compile=args.compile, seed=args.seed, eval_pairs=eval_pairs, eval_every=args.eval_every,
        callbacks=callbacks, out_dir=args.out, resume=args.resume,
        checkpoint_every=args.checkpoint_every, pairwise_normalized=args.pairwise_normalized,
        device=args.device, max_grad_norm=args.max_grad_norm,
    )
    if rank == 0:
        if args.save_model:
            final = os.path.join(args.out, "final-model")
            lm.model.save_pretrained(final)
            lm.tokenizer.save_pretrained(final)
        print(json.dumps({"steps": result.steps, "checkpoint": str(result.checkpoint_path),
                          **result.final_metrics}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m preflens.dynamics.cli train ...``) until wired into preflens.cli."""
    parser = argparse.ArgumentParser(prog="preflens")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PreflensError as exc:
        print(f"preflens {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
