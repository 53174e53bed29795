"""``preflens toyworld {train,eval,prefs}``: train, evaluate and draw preference data (issue 3)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from preflens.errors import ConfigError

__all__ = ["register"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``toyworld`` with sub-commands ``train``, ``eval`` and ``prefs``; returns its parser."""
    p = subparsers.add_parser("toyworld", help="the synthetic world: train / evaluate / preference data")
    sub = p.add_subparsers(dest="toyworld_command", metavar="ACTION")

    t = sub.add_parser("train", help="train the toyworld GPT-2 from scratch (CPU, ~10 min on 2 idle cores)")
    t.add_argument("--out", required=True, help="output directory (HF layout)")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation and data")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2400)")
    t.add_argument("--minutes", type=float, default=None,
                   help="wall-clock cap; a run stopped by it is not deterministic (default: none)")
    t.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="closed-book, in-context, counterfactual and yes/no metrics")
    e.add_argument("--model", default=None, help="toyworld model directory (default: the shipped one)")
    e.add_argument("--out", required=True, help="JSON file to write")
    e.add_argument("--quick", action="store_true", help="fixed subset: 5 counterfactual cities per country")
    e.set_defaults(func=_eval)

    r = sub.add_parser("prefs", help="write preference pairs drawn from the world as JSONL")
    r.add_argument("--kind", required=True, help="single or multi")
    r.add_argument("--out", required=True, help="JSONL file to write")
    r.add_argument("--n", type=int, default=200, help="number of pairs")
    r.add_argument("--votes", type=int, default=4, help="annotator votes per pair (multi)")
    r.add_argument("--seed", type=int, default=0, help="seed of the draw")
    r.add_argument("--world", default=None, help="world.json (default: the shipped checkpoint's)")
    r.set_defaults(func=_prefs)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


def _train(args) -> int:
    from preflens.toyworld.train import train_toyworld

    s = train_toyworld(args.out, seed=args.seed, steps=args.steps, minutes=args.minutes,
                       progress=not args.no_progress, device=args.device)
    print(json.dumps({k: v for k, v in s.items() if k != "loss_every_50"}, indent=1))
    return 0


def _eval(args) -> int:
    from preflens.data import write_json
    from preflens.toyworld.evaluate import evaluate_toyworld

    res = evaluate_toyworld(args.model, subset=5 if args.quick else None)
    write_json(args.out, res)
    print(json.dumps(res["acceptance"], indent=1))
    return 0


def _prefs(args) -> int:
    from preflens.data import write_pairs
    from preflens.data.toyworld.prefs import multi_token_pairs, single_token_pairs
    from preflens.data.toyworld.world import load_world
    from preflens.toyworld import ASSETS_DIR

    world = load_world(Path(args.world) if args.world else ASSETS_DIR / "world.json")
    if args.kind == "single":
        pairs = single_token_pairs(world, args.n, seed=args.seed)
    elif args.kind == "multi":
        pairs = multi_token_pairs(world, args.n, votes=args.votes, seed=args.seed)
    else:
        raise ConfigError("--kind", f"unknown value {args.kind!r}", allowed=["single", "multi"])
    write_pairs(args.out, pairs)
    print(f"wrote {len(pairs)} pairs to {args.out}")
    return 0
