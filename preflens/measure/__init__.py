"""``preflens measure``: one lens of one paper on any model and any preference dataset.

Lenses (one module each; all numbers come from the library's probes/dynamics/attribution):

* ``ranking`` -- ranking accuracy R, R̃ and idealized R* (Chen et al. 2024), flips vs a reference;
* ``ches`` -- CHES, LN-CHES, edit-similarity and last-hidden baselines (Razin et al. 2025);
* ``entanglement`` -- per-pair gradient inner products, norms, cosines (Yuan et al. 2024);
* ``displacement`` -- per-pair Δ log π of chosen/rejected vs a reference, top gaining tokens
  (Razin et al. 2025);
* ``dla`` -- per-head direct logit attribution of target vs foil on ``{prompt, target, foil}``
  records, and head-scaling sweeps (Yu et al. 2023).

:func:`measure` loads the model(s) and the data (:func:`preflens.data.adapters.load_pairs`),
scores the items in resumable chunks (:mod:`preflens.measure.runner`) and writes
``DIR/scores.jsonl``, ``DIR/summary.json`` and ``DIR/<lens>.png``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any

from preflens.errors import ConfigError

__all__ = ["LENSES", "measure", "lens_module", "load_items", "fit_context"]

log = logging.getLogger(__name__)

LENSES = ("ranking", "ches", "entanglement", "displacement", "dla")


def lens_module(lens: str):
    """The module implementing ``lens`` (ConfigError naming the lenses otherwise)."""
    if lens not in LENSES:
        raise ConfigError("lens", f"unknown value {lens!r}", allowed=LENSES)
    return importlib.import_module(f"preflens.measure.{lens}")


def _model(spec, device):
    from preflens.models import LM, load_model

    if isinstance(spec, LM):
        return spec
    return load_model(spec, device=device)


def _model_name(spec) -> str | None:
    return None if spec is None else getattr(spec, "name", spec)


def load_items(mod, data, lm, *, format=None, split=None, limit=None, sample=None, seed=0,
               on_error="raise") -> tuple[list, dict]:
    """The lens's input items and a JSON description of where they came from.

    ``data`` is a source for :func:`preflens.data.adapters.load_pairs` (path or ``hf:...``) or an
    already loaded list of items (then the selection options must be left unset).
    """
    if isinstance(data, (list, tuple)):
        if any(v is not None for v in (format, split, limit, sample)):
            raise ConfigError("data", "format/split/limit/sample apply to a source, not to a list of items")
        return list(data), {"source": "<in-memory>", "n_items": len(data)}
    loader = getattr(mod, "load_items", None)
    if loader is None:
        from preflens.data.adapters import load_pairs as loader
    items = loader(data, format, split=split, tokenizer=lm.tokenizer, limit=limit, sample=sample,
                   seed=seed, on_error=on_error)
    return items, {"source": str(data), "format": format, "split": split, "limit": limit,
                   "sample": sample, "seed": seed, "n_items": len(items)}


def _texts(item) -> tuple[str, dict[str, str], tuple | None]:
    """(prompt, {field: continuation}, source) of a pair or a ``{prompt, target, foil}`` record."""
    if isinstance(item, dict):
        foils = [item["foil"]] if isinstance(item["foil"], str) else list(item["foil"])
        return item["prompt"], {"target": item["target"], **{f"foil[{k}]": f for k, f in enumerate(foils)}}, None
    return item.prompt, {"chosen": item.chosen, "rejected": item.rejected}, getattr(item, "source", None)


def fit_context(items: list, lm, *, skip_long: bool = False) -> tuple[list, int]:
    """Items whose prompt + longest continuation (+ BOS/EOS) fit ``lm``'s context.

    Over-long items raise a DataError naming the first one (its file and line when known), or
    are left out with ``skip_long``; returns ``(items kept, number left out)``. Texts whose UTF-8
    byte count already fits are not tokenized (a token covers at least one byte)."""
    from preflens.errors import DataError
    from preflens.scoring import bos_prefix, text_ids

    n_ctx, tok = lm.n_ctx, lm.tokenizer
    extra = len(bos_prefix(tok)) + 1
    kept, dropped = [], 0
    for i, it in enumerate(items):
        prompt, conts, source = _texts(it)
        longest = max(len(c.encode("utf-8")) for c in conts.values())
        if len(prompt.encode("utf-8")) + longest + extra <= n_ctx:
            kept.append(it)
            continue
        n_p = len(text_ids(tok, prompt, bos=True, field="prompt", source=source))
        n_r = max(len(text_ids(tok, c, field=k, source=source)) for k, c in conts.items()) + 1
        if n_p + n_r <= n_ctx:
            kept.append(it)
        elif skip_long:
            dropped += 1
        else:
            file, line = source if source is not None else (None, None)
            raise DataError(f"item {i}: prompt ({n_p}) + response ({n_r}) tokens exceed the model "
                            f"context of {n_ctx}; leave such items out with skip_long "
                            "(--skip-long)", file=file, line=line)
    if dropped:
        log.warning("left out %d item(s) longer than the model context (%d tokens)", dropped, n_ctx)
    return kept, dropped


def _options(mod, options: dict | None):
    try:
        return mod.Options(**(options or {}))
    except TypeError as exc:
        allowed = [f.name for f in dataclasses.fields(mod.Options)]
        raise ConfigError("options", f"{exc}", allowed=allowed) from None


def measure(
    lens: str,
    *,
    model,
    data,
    out_dir: str | Path,
    reference=None,
    format: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    options: dict | None = None,
    batch_size: int | None = None,
    chunk_size: int = 256,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
    on_error: str = "raise",
    skip_long: bool = False,
    figure: bool = True,
) -> dict[str, Any]:
    """Run ``lens`` on ``data`` with ``model``; write scores, summary and figure to ``out_dir``.

    Args:
        model, reference: an offline name, HF directory, hub id or a loaded
            :class:`~preflens.models.LM`. ``reference`` is required by ``displacement``, optional
            for ``ranking`` (R* from it, flips vs it) and ``entanglement`` (reference log-probs of
            the predicted case), unused by ``ches``.
        data: a source of :func:`preflens.data.adapters.load_pairs` or a list of items;
            ``format``, ``split``, ``limit``, ``sample``, ``seed``, ``on_error`` select from a source.
        options: the lens's options (its ``Options`` dataclass fields).
        skip_long: leave out items longer than the model context (default: a DataError naming
            the first one, before any scoring).
        batch_size: ``None`` picks one for the device (:func:`runner.auto_batch_size`).
        chunk_size: items per resumable chunk. resume: continue an interrupted run in ``out_dir``.

    Returns:
        The summary written to ``out_dir/summary.json``.
    """
    from preflens import __version__, plotting
    from preflens.data.io import write_json
    from preflens.measure.runner import SUMMARY, auto_batch_size, finite_or_none, run_chunks

    mod = lens_module(lens)
    opts = _options(mod, options)
    if mod.REFERENCE == "required" and reference is None:
        raise ConfigError("reference", f"the {lens} lens compares two models: give a reference")
    if mod.REFERENCE is None and reference is not None:
        raise ConfigError("reference", f"the {lens} lens does not use a reference model")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ConfigError("batch_size", f"must be a positive integer, got {batch_size!r}")
    lm = _model(model, device)
    ref = _model(reference, device) if reference is not None else None
    items, dataset = load_items(mod, data, lm, format=format, split=split, limit=limit,
                                sample=sample, seed=seed, on_error=on_error)
    items, n_long = fit_context(items, lm, skip_long=skip_long)
    if n_long:
        dataset["n_skipped_long"] = n_long
        dataset["n_items"] = len(items)
    if not items:
        raise ConfigError("skip_long", "every item is longer than the model context")
    bs = batch_size or auto_batch_size(lm, mod.KIND)
    opt_dict = dataclasses.asdict(opts)
    config = {"model": _model_name(model), "reference": _model_name(reference), "dataset": dataset,
              "options": opt_dict}
    extra = mod.prepare(lm, ref, opts) if hasattr(mod, "prepare") else {}
    rows = run_chunks(items, lambda chunk: mod.score_chunk(lm, ref, chunk, opts, bs, **extra),
                      out_dir=out_dir, lens=lens, config=config, chunk_size=chunk_size,
                      resume=resume, progress=progress)
    results = mod.summarize(rows, opts, ref is not None)
    summary = finite_or_none({
        "lens": lens, "preflens_version": __version__, "model": config["model"],
        "reference": config["reference"], "dataset": dataset,
        "config": {"options": opt_dict, "batch_size": bs, "chunk_size": chunk_size,
                   "device": str(lm.device)},
        "results": results,
    })
    out_dir = Path(out_dir)
    write_json(out_dir / SUMMARY, summary)
    if figure:
        plotting.save_figure(mod.figure(rows, results), out_dir / f"{lens}.png")
    return summary

