"""``preflens measure LENS``: one paper's lens on any model and preference dataset.

    preflens measure ranking --model gpt2 --data hf:Anthropic/hh-rlhf --sample 1000 --out runs/hh
    preflens measure ches --model toyworld --data pairs.jsonl --out runs/ches
    preflens measure entanglement --model toyworld --data pairs.jsonl --gradient-method exact --out runs/ent
    preflens measure displacement --model runs/dpo/final-model --reference toyworld --data pairs.jsonl --out runs/disp

Writes ``OUT/scores.jsonl`` (one line per item), ``OUT/summary.json`` and ``OUT/<lens>.png``; a
killed run continues where it stopped when rerun with the same command (``--no-resume`` starts
over). Library errors name Python parameters; ``preflens.cli.main`` re-addresses them to the
flags (the renamed ones are listed in :data:`OPTION_FLAGS`).
"""

from __future__ import annotations

import argparse
import json

from preflens.errors import ConfigError
from preflens.models import DEFAULT_MODEL

__all__ = ["register", "OPTION_FLAGS", "add_data_args"]

#: library parameter -> flag, where the names differ (the others map by name: batch_size -> --batch-size)
OPTION_FLAGS = {
    "lens": "LENS", "data": "--data", "source": "--data", "pairs": "--data", "on_error": "--skip-bad-rows",
    "out_dir": "--out", "method": "--gradient-method", "include_layernorm": "--no-layernorm",
    "loss_kwargs": "--beta", "scales": "--scale", "options": "lens options",
}
#: lens option (Options field) -> the flag that sets it, per lens
_LENS_FLAGS = {
    "ranking": {"betas": "betas"},
    "entanglement": {"gradient_method": "method", "params": "params", "layernorm": "include_layernorm",
                     "loss": "loss", "beta": "loss_kwargs"},
    "displacement": {"top_k": "top_k"},
    "dla": {"scale": "scales", "answer": "answer", "position": "position", "top_k": "top_k"},
}


def add_data_args(ap: argparse.ArgumentParser) -> None:
    """``--data``, ``--format``, ``--split``, ``--limit``/``--sample``, ``--seed``, ``--skip-bad-rows``."""
    from preflens.data.adapters import FORMATS

    ap.add_argument("--data", required=True,
                    help="JSONL/JSON/Parquet file, datasets.save_to_disk folder, or hf:<dataset id>[:config]")
    ap.add_argument("--format", choices=FORMATS, default=None, help="dataset format (default: detected)")
    ap.add_argument("--split", default=None, help="split of a folder/hub dataset (default: the evaluated one)")
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--limit", type=int, default=None, help="the first N items")
    pick.add_argument("--sample", type=int, default=None, help="N items drawn at random (seeded)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    ap.add_argument("--skip-bad-rows", action="store_true", help="leave out malformed rows (warns) instead of failing")
    ap.add_argument("--skip-long", action="store_true",
                    help="leave out items longer than the model context (default: fail before scoring)")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError("--betas", f"expected comma-separated numbers, got {text!r}") from None


def _lens_options(args) -> dict:
    allowed = _LENS_FLAGS.get(args.lens, {})
    out: dict = {}
    given = {"betas": args.betas, "gradient_method": args.gradient_method, "params": args.params,
             "layernorm": args.layernorm, "loss": args.loss, "beta": args.beta, "top_k": args.top_k,
             "scale": args.scale or None, "answer": args.answer, "position": args.position}
    for flag, value in given.items():
        if value is None:
            continue
        if flag not in allowed:
            name = "--" + flag.replace("_", "-")
            raise ConfigError(name, f"does not apply to the {args.lens} lens")
        key = allowed[flag]
        if flag == "betas":
            value = _floats(value)
        elif flag == "beta":
            value = {"beta": value}
        out[key] = value
    return out


def _cmd(args: argparse.Namespace) -> int:
    from preflens.measure import measure

    summary = measure(
        args.lens, model=args.model, reference=args.reference, data=args.data, out_dir=args.out,
        format=args.format, split=args.split, limit=args.limit, sample=args.sample, seed=args.seed,
        options=_lens_options(args), batch_size=args.batch_size, chunk_size=args.chunk_size,
        device=args.device, resume=args.resume, progress=not args.no_progress,
        on_error="skip" if args.skip_bad_rows else "raise", skip_long=args.skip_long,
    )
    print(json.dumps({"out": args.out, **summary["results"]}, ensure_ascii=False))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``measure`` sub-command; returns its parser."""
    from preflens.measure import LENSES

    ap = subparsers.add_parser("measure", help="measure one lens (ranking, ches, ...) of a model on a dataset",
                               description=__doc__.split("\n\n")[0])
    ap.add_argument("lens", choices=LENSES, help="what to measure")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"offline name (default {DEFAULT_MODEL}), hub id or directory")
    ap.add_argument("--reference", "--compare", dest="reference", default=None,
                    help="second model: ranking flips and R* from it; displacement baseline (required there)")
    add_data_args(ap)
    ap.add_argument("--out", required=True, help="output folder (scores.jsonl, summary.json, figure)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: chosen for the device")
    ap.add_argument("--chunk-size", type=int, default=256, help="items per resumable chunk (default 256)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--no-resume", dest="resume", action="store_false", help="start over in --out")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = ap.add_argument_group("lens options")
    g.add_argument("--betas", default=None, help="ranking: β grid of R*, comma-separated (default 0.01,0.1,1,5,10)")
    g.add_argument("--gradient-method", choices=("ghost", "exact"), default=None, help="entanglement: default ghost")
    g.add_argument("--params", default=None, help="entanglement: parameter selection (preset such as last_block, or a regex)")
    g.add_argument("--no-layernorm", dest="layernorm", action="store_const", const=False, default=None,
                   help="entanglement: leave LayerNorm parameters out")
    g.add_argument("--loss", default=None, help="entanglement: loss of the predicted case (default dpo)")
    g.add_argument("--beta", type=float, default=None, help="entanglement: that loss's beta (default 0.1)")
    g.add_argument("--top-k", type=int, default=None, help="displacement: gaining tokens per pair (default 5)")
    g.add_argument("--scale", action="append", default=[], metavar="L.H=ALPHA",
                   help="dla: scale head H of layer L by ALPHA (repeatable; a sweep point each)")
    g.add_argument("--answer", choices=("first-token", "full"), default=None,
                   help="dla: first-token logit difference (default) or full-answer log-prob difference")
    g.add_argument("--position", type=int, default=None, help="dla: prompt position (default -1)")
    ap.set_defaults(func=_cmd, option_flags=OPTION_FLAGS)
    return ap
