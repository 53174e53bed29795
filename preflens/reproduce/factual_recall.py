"""Recipe: in-context vs memorized answers, per-head direct logit attribution, head scaling.

Yu, Merullo & Pavlick 2023, "Characterizing Mechanisms for Factual Recall in Language Models"
(spec: ``shared/research/factual_recall.md``). Steps:

1. counterfactual prompts in the paper's template (``"The capital of {country} is {ic}.\\nQ: What
   is the capital of {country}?\\nA:"``), a seeded sample of in-context cities per country;
2. greedy 16-token continuations classified by the paper's rule (memorized wins ties), rates
   overall and by decile of the query country's training frequency -- toyworld's exact count of
   the country–capital fact in its corpus (other models have no offline frequency table, so
   their ``by_decile`` is ``null``);
3. per-head DLA of (in-context − memorized) first-token logits on a tuning set through a
   compatibility-mode bridge, each prompt with its own direction; top-3 memory heads (most
   negative) and in-context heads (most positive);
4. α sweeps scaling ``hook_v`` of each top-3 memory head and of the top in-context head on the
   tuning set; the (memory head, negative α) with the highest in-context rate is then applied to
   a disjoint evaluation set (the paper's protocol, §5.3.4 and §6.2).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from preflens import plotting
from preflens.models import load_model
from preflens.reproduce.common import RecipeContext, format_table

PAPER = "factual_recall"


@dataclass(frozen=True)
class Config:
    pairs_per_country: int = 4      # in-context cities per country for the rates
    max_new_tokens: int = 16        # the paper's budget (official code's intent)
    tune_seed: int = 11
    eval_seed: int = 12
    prompt_seed: int = 0
    memory_alphas: tuple = (-3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 1.0, 2.0, 3.0)
    in_context_alphas: tuple = (-4.0, -2.0, 0.0, 1.0, 2.0, 4.0, 8.0)
    sweep_tokens: int = 8
    k_heads: int = 3
    max_countries: int | None = None

    @classmethod
    def quick(cls) -> Config:
        return cls(pairs_per_country=1, max_new_tokens=8, memory_alphas=(-2.0, -1.0, 1.0),
                   in_context_alphas=(0.0, 4.0), sweep_tokens=6, max_countries=48)


def _world_and_frequency(model: str):
    """The capitals world the model is tested on, and a per-country frequency table (or None).

    toyworld: its own countries and capitals with the exact number of corpus documents that
    state each country's capital fact; any other model: the shipped ``capitals.csv``, no table.
    """
    from preflens.data.capitals import CapitalRow, CapitalsWorld, load_capitals
    from preflens.data.toyworld.world import load_world

    if model == "toyworld":
        assets = Path(__file__).resolve().parents[1] / "toyworld" / "assets"
        spec = load_world(assets / "world.json")
        world = CapitalsWorld(tuple(CapitalRow(c, k) for c, k in zip(spec.countries, spec.capitals)), {})
        counts = json.loads((assets / "frequencies.json").read_text())["counts"]
        return world, {c: float(v["fact"]) for c, v in counts.items()}
    return load_capitals(), None


def _rates(labels) -> dict:
    n = max(1, len(labels))
    return {k: sum(lab == k for lab in labels) / n for k in ("in_context", "memorized", "neither")}


def run(ctx: RecipeContext, cfg: Config) -> dict:
    from preflens.attribution.heads import head_logit_attribution, select_heads
    from preflens.attribution.recall import (
        classify_continuations,
        counterfactual_prompts,
        per_prompt_frequency,
        rates_by_frequency,
    )
    from preflens.attribution.scaling import scaling_sweep

    world, freq = _world_and_frequency(ctx.model)
    countries = list(dict.fromkeys(r.country for r in world.rows))
    if cfg.max_countries:
        countries = countries[:: max(1, len(countries) // cfg.max_countries)][: cfg.max_countries]
    lm = load_model(ctx.model, device=ctx.device)
    bridge = lm.bridge(compat=True)

    def prompts(seed, pairs):
        ps = counterfactual_prompts(countries, pairs=pairs, seed=seed, world=world, aliases=False)
        return [p for p in ps if not p.degenerate]

    # -- 1-2. behaviour rates ------------------------------------------------------------------
    main = prompts(cfg.prompt_seed, cfg.pairs_per_country)

    def classify():
        return classify_continuations(bridge, main, max_new_tokens=cfg.max_new_tokens, batch_size=64)

    labels = ctx.step("classify", asdict(cfg), classify)
    by_decile = None
    if freq is not None:
        table = rates_by_frequency(labels, per_prompt_frequency(main, freq, by="country"), bins=10)
        by_decile = [{k: b[k] for k in ("bin", "lo", "hi", "n", "in_context", "memorized", "neither")}
                     for b in table["bins"] if b["n"] > 0]

    # -- 3. per-head DLA on a tuning set --------------------------------------------------------
    tune = prompts(cfg.tune_seed, 1)
    attribution = ctx.step("dla", asdict(cfg), lambda: head_logit_attribution(bridge, tune).tolist())
    heads = select_heads(torch.tensor(attribution), k=cfg.k_heads)

    # -- 4. alpha sweeps and the chosen intervention -------------------------------------------
    # As the paper chose its heads by hand from top-3 lists (§5.3.4), every top-k memory head is
    # swept on the tuning set and the (head, negative α) with the highest in-context rate wins.
    kw = dict(bridge=bridge, max_new_tokens=cfg.sweep_tokens, batch_size=64)
    mem_sweeps = {}
    for l, h, _ in heads["memory"]:
        mem_sweeps[(l, h)] = ctx.step(f"sweep-memory-L{l}H{h}", asdict(cfg), lambda: _clean(
            scaling_sweep(lm, tune, (l, h), cfg.memory_alphas, **kw)))
    candidates = [(r["in_context"], head, r["alpha"]) for head, rows in mem_sweeps.items()
                  for r in rows if r["alpha"] < 0]
    _, mem_head, best_alpha = max(candidates, key=lambda c: c[0])
    mem_sweep = mem_sweeps[mem_head]
    ic_head = tuple(heads["in_context"][0][:2])
    ic_sweep = ctx.step("sweep-in-context", asdict(cfg), lambda: _clean(
        scaling_sweep(lm, tune, ic_head, cfg.in_context_alphas, **kw)))
    held_out = prompts(cfg.eval_seed, 1)
    base, scaled = ctx.step("scaling-eval", asdict(cfg), lambda: _clean(
        scaling_sweep(lm, held_out, mem_head, [1.0, best_alpha], **kw)))

    results = {
        "model": ctx.model,
        "config": asdict(cfg),
        "n_prompts": len(main),
        "rates": _rates(labels),
        "by_decile": by_decile,
        "frequency_source": "toyworld exact fact counts" if freq is not None else None,
        "memory_heads": [{"layer": l, "head": h, "attribution": s} for l, h, s in heads["memory"]],
        "in_context_heads": [{"layer": l, "head": h, "attribution": s} for l, h, s in heads["in_context"]],
        "scaling": {"head": list(mem_head), "alpha": best_alpha,
                    "baseline_in_context_rate": base["in_context"], "in_context_rate": scaled["in_context"],
                    "baseline_memorized_rate": base["memorized"], "memorized_rate": scaled["memorized"],
                    "n_eval_prompts": base["n"]},
        "sweeps": {"memory_head": {"head": list(mem_head), "rows": mem_sweep},
                   "in_context_head": {"head": list(ic_head), "rows": ic_sweep},
                   "all_memory_heads": [{"head": list(k), "rows": v} for k, v in mem_sweeps.items()]},
    }
    _figures(ctx, results, np.asarray(attribution))
    ctx.write_results(results)
    return results


def _clean(rows):
    return [{k: v for k, v in r.items() if k != "counts"} for r in rows]


def _figures(ctx, results, attribution) -> None:
    fig = plotting.heatmap(
        attribution, xlabel="head", ylabel="layer",
        title="per-head DLA: in-context − memorized logit (blue = promotes the context)",
        cbar_label="mean direct logit attribution",
    )
    plotting.save_figure(fig, ctx.figure("head_attribution"))
    if results["by_decile"]:
        bins = results["by_decile"]
        fig = plotting.grouped_bars(
            [str(b["bin"] + 1) for b in bins],
            {k: [b[k] for b in bins] for k in ("in_context", "memorized", "neither")},
            ylabel="rate", xlabel="decile of the country's fact frequency (1 = rarest)",
            title="counterfactual answers by training frequency",
        )
        plotting.save_figure(fig, ctx.figure("rates_by_frequency"))
    panels, xs = {}, {}
    for name in ("memory_head", "in_context_head"):
        sweep = results["sweeps"][name]
        l, h = sweep["head"]
        rows = sorted(sweep["rows"], key=lambda r: r["alpha"])
        key = f"{name.replace('_', ' ')} L{l}H{h}"
        panels[key] = {k: [r[k] for r in rows] for k in ("in_context", "memorized", "neither")}
        xs[key] = [r["alpha"] for r in rows]
    fig = plotting.line_panels(panels, x=xs, xlabel="α (scale of the head's hook_v)",
                               title="scaling one head's hook_v by α (tuning prompts)")
    plotting.save_figure(fig, ctx.figure("head_scaling"))


def summary(results: dict) -> str:
    r = results["rates"]
    lines = [format_table([[results["n_prompts"], r["in_context"], r["memorized"], r["neither"]]],
                          ["prompts", "in-context", "memorized", "neither"])]
    if results["by_decile"]:
        rows = [[b["bin"] + 1, b["n"], b["in_context"], b["memorized"], b["neither"]] for b in results["by_decile"]]
        lines.append(format_table(rows, ["decile", "n", "in-context", "memorized", "neither"]))
    s = results["scaling"]
    heads = ", ".join(f"L{h['layer']}H{h['head']} ({h['attribution']:.2f})" for h in results["memory_heads"])
    lines.append(f"memory heads: {heads}")
    lines.append(f"scaling L{s['head'][0]}H{s['head'][1]} by α={s['alpha']}: in-context "
                 f"{s['baseline_in_context_rate']:.3f} → {s['in_context_rate']:.3f}")
    return "\n".join(lines)

