"""``preflens filter``: drop the pairs most likely to be displaced (CHES), write TRL JSONL.

    preflens filter --by ln-ches --drop-top 0.1 --data pairs.jsonl --model toyworld --out clean.jsonl
    preflens filter --by ches --keep-lowest 500 --data hf:Anthropic/hh-rlhf --limit 5000 --model gpt2 --out clean.jsonl

Razin et al. (ICLR 2025) Sec. 6: pairs with high (length-normalized) CHES are the ones DPO is most
likely to displace; training on the rest mitigates it. The output keeps the input order and is
ready for ``preflens train --data clean.jsonl`` or TRL's ``DPOTrainer``.
"""

from __future__ import annotations

import argparse
import json

from preflens.cli.measure import OPTION_FLAGS, add_data_args
from preflens.models import DEFAULT_MODEL

__all__ = ["register"]


def _cmd(args: argparse.Namespace) -> int:
    from preflens.data.adapters import load_pairs
    from preflens.measure import fit_context
    from preflens.measure.filtering import filter_pairs, select_lowest
    from preflens.models import load_model

    import torch

    # option errors before the model loads and the data is scored
    select_lowest(torch.zeros(max(1, args.keep_lowest or 1)), drop_top=args.drop_top,
                  keep_lowest=args.keep_lowest)
    lm = load_model(args.model, device=args.device)
    pairs = load_pairs(args.data, args.format, split=args.split, tokenizer=lm.tokenizer,
                       limit=args.limit, sample=args.sample, seed=args.seed,
                       on_error="skip" if args.skip_bad_rows else "raise")
    pairs, _ = fit_context(pairs, lm, skip_long=args.skip_long)
    info = filter_pairs(lm, pairs, args.out, by=args.by, drop_top=args.drop_top,
                        keep_lowest=args.keep_lowest, batch_size=args.batch_size,
                        progress=not args.no_progress)
    print(json.dumps({"out": args.out, **info}))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``filter`` sub-command; returns its parser."""
    from preflens.measure.filtering import FILTER_SCORES

    ap = subparsers.add_parser("filter", help="keep the pairs with the lowest CHES (TRL JSONL out)",
                               description=__doc__.split("\n\n")[0])
    ap.add_argument("--by", choices=list(FILTER_SCORES), default="ln-ches",
                    help="score to filter by (default ln-ches, the paper's choice; ches = raw CHES)")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop-top", type=float, help="drop this fraction of highest-scoring pairs (e.g. 0.1)")
    how.add_argument("--keep-lowest", type=int, help="keep the N lowest-scoring pairs")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"offline name (default {DEFAULT_MODEL}), hub id or directory")
    add_data_args(ap)
    ap.add_argument("--out", required=True, help="output TRL-format JSONL")
    ap.add_argument("--batch-size", type=int, default=None, help="default: chosen for the device")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.set_defaults(func=_cmd, option_flags=OPTION_FLAGS)
    return ap
