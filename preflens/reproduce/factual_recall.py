"""Recipe: in-context vs memorized answers, per-head direct logit attribution, head scaling.

Yu, Merullo & Pavlick 2023, "Characterizing Mechanisms for Factual Recall in Language Models".
Steps:

1. counterfactual prompts in the paper's template (``"The capital of {country} is {ic}.\\nQ: What
   is the capital of {country}?\\nA:"``), a seeded sample of in-context cities per country;
2. ``classify``: greedy 16-token continuations classified by the paper's rule (memorized wins
   ties), rates overall and by decile of the query country's training frequency -- toyworld's
   exact count of the country–capital fact in its corpus (other models have no offline
   frequency table, so their ``by_decile`` is ``null``);
3. ``dla``: per-head DLA of (in-context − memorized) first-token logits on a tuning set through
   a compatibility-mode bridge, each prompt with its own direction; top-k memory heads (most
   negative) and in-context heads (most positive);
4. ``sweep-*``: α sweeps scaling ``hook_z`` (the head's output before W_O; with one value head per
   query head, as in GPT-2, the same as scaling ``hook_v``, the paper's site) of each top-k memory head and of the top in-context
   head on the tuning set; ``scaling-eval``: the (memory head, negative α) with the highest
   in-context rate, applied to a second seeded prompt sample (the evaluation set: same
   countries, other in-context cities) -- the paper chose heads and α on a tuning set, §5.3.4
   and §6.2.

The results JSON keeps every value the figures draw (``head_attribution``: the full
``[layer][head]`` matrix; ``sweeps``: every α row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preflens import plotting
from preflens.attribution.heads import head_logit_attribution, select_heads
from preflens.attribution.recall import classify_continuations, per_prompt_frequency, rates_by_frequency
from preflens.attribution.scaling import scaling_sweep
from preflens.data.capitals import CapitalRow, CapitalsWorld, load_capitals
from preflens.data.recall_prompts import counterfactual_prompts
from preflens.data.toyworld.world import load_world
from preflens.reproduce.common import RecipeContext, format_table, reads

PAPER = "factual_recall"
TOYWORLD_ASSETS = Path(__file__).resolve().parents[1] / "toyworld" / "assets"
LABELS = ("in_context", "memorized", "neither")


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


# -- data and models shared by the steps ------------------------------------------------------
def world_and_frequency(model: str):
    """The capitals world the model is tested on, and a per-country frequency table (or None).

    toyworld: its own countries and capitals with the exact number of corpus documents that
    state each country's capital fact; any other model: the shipped ``capitals.csv``, no table.
    """
    if model == "toyworld":
        spec = load_world(TOYWORLD_ASSETS / "world.json")
        world = CapitalsWorld(tuple(CapitalRow(c, k) for c, k in zip(spec.countries, spec.capitals)), {})
        counts = json.loads((TOYWORLD_ASSETS / "frequencies.json").read_text())["counts"]
        return world, {c: float(v["fact"]) for c, v in counts.items()}
    return load_capitals(), None


def _prompts(ctx: RecipeContext, max_countries: int | None, seed: int, pairs: int) -> list:
    """Non-degenerate counterfactual prompts: ``pairs`` in-context cities per country."""
    world, _ = ctx.memo("world", lambda: world_and_frequency(ctx.model))
    countries = list(dict.fromkeys(r.country for r in world.rows))
    if max_countries:
        countries = countries[:: max(1, len(countries) // max_countries)][:max_countries]
    ps = counterfactual_prompts(countries, pairs=pairs, seed=seed, world=world, aliases=False)
    return [p for p in ps if not p.degenerate]


def _bridge(ctx: RecipeContext):
    """The compatibility-mode bridge (DLA needs it), built once per run; hooks never outlive a step."""
    return ctx.memo("bridge", lambda: ctx.shared_lm().bridge(compat=True))


def _sweep(ctx: RecipeContext, prompts, head, alphas, tokens: int) -> list[dict]:
    rows = scaling_sweep(ctx.shared_lm(), prompts, tuple(head), alphas, bridge=_bridge(ctx),
                         max_new_tokens=tokens, batch_size=64)
    return [{k: v for k, v in r.items() if k != "counts"} for r in rows]


# -- steps ------------------------------------------------------------------------------------
@reads("pairs_per_country", "max_new_tokens", "prompt_seed", "max_countries")
def classify(ctx: RecipeContext, c) -> list[str]:
    """The paper's label of every main prompt's greedy continuation."""
    main = _prompts(ctx, c.max_countries, c.prompt_seed, c.pairs_per_country)
    return classify_continuations(_bridge(ctx), main, max_new_tokens=c.max_new_tokens, batch_size=64)


@reads("tune_seed", "max_countries")
def dla(ctx: RecipeContext, c) -> list:
    """Per-head DLA ``[layer][head]`` on the tuning prompts."""
    prompts = _prompts(ctx, c.max_countries, c.tune_seed, 1)
    return head_logit_attribution(ctx.shared_lm(), prompts, bridge=_bridge(ctx)).tolist()


@reads("tune_seed", "max_countries", "memory_alphas", "sweep_tokens")
def memory_sweep(ctx: RecipeContext, c, head: list) -> list[dict]:
    """Label rates on the tuning prompts with memory head ``head`` scaled by each α."""
    return _sweep(ctx, _prompts(ctx, c.max_countries, c.tune_seed, 1), head, c.memory_alphas, c.sweep_tokens)


@reads("tune_seed", "max_countries", "in_context_alphas", "sweep_tokens")
def in_context_sweep(ctx: RecipeContext, c, head: list) -> list[dict]:
    """Label rates on the tuning prompts with in-context head ``head`` scaled by each α."""
    return _sweep(ctx, _prompts(ctx, c.max_countries, c.tune_seed, 1), head, c.in_context_alphas, c.sweep_tokens)


@reads("eval_seed", "max_countries", "sweep_tokens")
def scaling_eval(ctx: RecipeContext, c, head: list, alpha: float) -> list[dict]:
    """Label rates on the evaluation prompts: unscaled (α = 1) and with ``head`` scaled by ``alpha``."""
    return _sweep(ctx, _prompts(ctx, c.max_countries, c.eval_seed, 1), head, [1.0, alpha], c.sweep_tokens)


# -- run --------------------------------------------------------------------------------------
def run(ctx: RecipeContext, cfg: Config) -> dict:
    labels = ctx.step("classify", classify, cfg)
    attribution = ctx.step("dla", dla, cfg)
    heads = select_heads(torch.tensor(attribution), k=cfg.k_heads)
    # As the paper chose its heads by hand from top-3 lists (§5.3.4), every top-k memory head is
    # swept on the tuning set and the (head, negative α) with the highest in-context rate wins.
    mem_sweeps = {(l, h): ctx.step(f"sweep-memory-L{l}H{h}", memory_sweep, cfg, [l, h])
                  for l, h, _ in heads["memory"]}
    candidates = [(r["in_context"], head, r["alpha"]) for head, rows in mem_sweeps.items()
                  for r in rows if r["alpha"] < 0]
    _, mem_head, best_alpha = max(candidates, key=lambda c: c[0])
    ic_head = list(heads["in_context"][0][:2])
    ic_sweep = ctx.step("sweep-in-context", in_context_sweep, cfg, ic_head)
    base, scaled = ctx.step("scaling-eval", scaling_eval, cfg, list(mem_head), best_alpha)
    results = {
        **ctx.header(cfg),
        **_rates_block(ctx, cfg, labels),
        "memory_heads": [{"layer": l, "head": h, "attribution": s} for l, h, s in heads["memory"]],
        "in_context_heads": [{"layer": l, "head": h, "attribution": s} for l, h, s in heads["in_context"]],
        "scaling": {"head": list(mem_head), "alpha": best_alpha,
                    "baseline_in_context_rate": base["in_context"], "in_context_rate": scaled["in_context"],
                    "baseline_memorized_rate": base["memorized"], "memorized_rate": scaled["memorized"],
                    "n_eval_prompts": base["n"]},
        "sweeps": {"memory_head": {"head": list(mem_head), "rows": mem_sweeps[mem_head]},
                   "in_context_head": {"head": ic_head, "rows": ic_sweep},
                   "all_memory_heads": [{"head": list(k), "rows": v} for k, v in mem_sweeps.items()]},
        "head_attribution": attribution,
    }
    ctx.write_results(results)
    return results


def _rates_block(ctx: RecipeContext, cfg: Config, labels: list[str]) -> dict:
    """Overall label rates and, with a frequency table, rates by decile of fact frequency."""
    main = _prompts(ctx, cfg.max_countries, cfg.prompt_seed, cfg.pairs_per_country)
    _, freq = ctx.memo("world", lambda: world_and_frequency(ctx.model))
    by_decile = None
    if freq is not None:
        table = rates_by_frequency(labels, per_prompt_frequency(main, freq, by="country"), bins=10)
        by_decile = [{k: b[k] for k in ("bin", "lo", "hi", "n", *LABELS)} for b in table["bins"] if b["n"] > 0]
    n = max(1, len(labels))
    return {"n_prompts": len(main),
            "rates": {k: sum(lab == k for lab in labels) / n for k in LABELS},
            "by_decile": by_decile,
            "frequency_source": "toyworld exact fact counts" if freq is not None else None}


# -- render (from the results JSON only) ------------------------------------------------------
def render(results: dict, ctx: RecipeContext) -> list:
    """Every figure of this recipe, drawn from ``results`` alone (no model, no generation)."""
    paths = [_render_attribution(results, ctx), _render_scaling(results, ctx)]
    if results["by_decile"]:
        paths.append(_render_by_frequency(results, ctx))
    return paths


def _render_attribution(results: dict, ctx: RecipeContext):
    fig = plotting.heatmap(
        np.asarray(results["head_attribution"], dtype=float), xlabel="head", ylabel="layer",
        title="per-head DLA: in-context − memorized logit (blue = promotes the context)",
        cbar_label="mean direct logit attribution",
    )
    return ctx.save_figure(fig, "head_attribution", results)


def _render_by_frequency(results: dict, ctx: RecipeContext):
    bins = results["by_decile"]
    fig = plotting.grouped_bars(
        [str(b["bin"] + 1) for b in bins], {k: [b[k] for b in bins] for k in LABELS},
        ylabel="rate", xlabel="decile of the country's fact frequency (1 = rarest)",
        title="counterfactual answers by training frequency",
    )
    return ctx.save_figure(fig, "rates_by_frequency", results)


def _render_scaling(results: dict, ctx: RecipeContext):
    panels, xs, ylabels = {}, {}, {}
    for name in ("memory_head", "in_context_head"):
        sweep = results["sweeps"][name]
        l, h = sweep["head"]
        rows = sorted(sweep["rows"], key=lambda r: r["alpha"])
        key = f"{name.replace('_', ' ')} L{l}H{h}"
        panels[key] = {k: [r[k] for r in rows] for k in LABELS}
        xs[key], ylabels[key] = [r["alpha"] for r in rows], "share of tuning prompts"
    fig = plotting.line_panels(panels, x=xs, xlabel="α (scale of the head's output, hook_z)", ylabels=ylabels,
                               title="scaling one head's output by α (tuning prompts)", legend="outside")
    return ctx.save_figure(fig, "head_scaling", results)


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
