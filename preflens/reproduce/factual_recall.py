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
4. ``sweep-baseline`` and ``sweep-LxHy``: label rates on the tuning set (``sweep_tokens`` new
   tokens) with one head's output scaled by α, for EVERY head (``bridge.cfg``: all layers ×
   heads; ``sweep_heads = n`` keeps the n heads of largest |DLA|) and both signs of α
   (``head_alphas``; the unscaled α = 1 row is computed once and shared). The scaling acts on
   ``hook_z`` (the head's output before W_O; with one value head per query head, as in GPT-2,
   the same as scaling ``hook_v``, the paper's site). Each head's best α is its α with the
   highest tuning in-context rate;
5. ``pairs-LxHy-LzHw``: the ``pair_heads`` heads whose best single α gives the highest tuning
   in-context rates, paired two by two; each pair is swept over a grid where each head takes the
   ``head_alphas`` on the same side of 1 as its own best α (α < 1: ablate or reverse; α > 1:
   amplify), so the two heads can carry different αs;
6. ``scaling-eval``: the best single (head, α) and the best pair setting -- both chosen on the
   tuning set only -- and the unscaled baseline, applied to a second seeded prompt sample (the
   evaluation set: same countries, other in-context cities). The paper chose heads and α by hand
   on a tuning set (§5.3.4, §6.2); this searches every head and both signs because a head's DLA
   and its causal effect can disagree (a head with a strongly negative DLA may only break
   generation when scaled; the ``dla_vs_causal`` figure shows both per head).

The results JSON keeps every value the figures draw (``head_attribution``: the full
``[layer][head]`` matrix; ``sweeps``: the baseline row, every head's α rows and every pair row;
``selection``: the chosen settings with their tuning and held-out rates).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preflens import plotting
from preflens.attribution.heads import head_logit_attribution, select_heads
from preflens.attribution.recall import classify_continuations, per_prompt_frequency, rates_by_frequency
from preflens.attribution.scaling import scaling_grid
from preflens.data.capitals import CapitalRow, CapitalsWorld, load_capitals
from preflens.data.recall_prompts import counterfactual_prompts
from preflens.data.toyworld.world import load_world
from preflens.errors import ConfigError
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
    head_alphas: tuple = (-3.0, -2.0, -1.0, 0.0, 2.0, 3.0, 4.0)  # per head; α = 1 runs once
    sweep_tokens: int = 8
    k_heads: int = 3                # top-k memory / in-context heads by DLA (reported)
    sweep_heads: int | None = None  # None: every head; n: the n heads of largest |DLA|
    pair_heads: int = 4             # best single heads (tuning set) paired two by two
    max_countries: int | None = None

    def __post_init__(self) -> None:
        if not any(float(a) != 1.0 for a in self.head_alphas):
            raise ConfigError("head_alphas", f"need at least one α other than 1, got {self.head_alphas}")
        if not isinstance(self.pair_heads, int) or self.pair_heads < 2:
            raise ConfigError("pair_heads", f"must be an int >= 2, got {self.pair_heads!r}")
        if self.sweep_heads is not None and (not isinstance(self.sweep_heads, int) or self.sweep_heads < 2):
            raise ConfigError("sweep_heads", f"must be None or an int >= 2, got {self.sweep_heads!r}")

    @classmethod
    def quick(cls) -> Config:
        return cls(pairs_per_country=1, max_new_tokens=8, head_alphas=(-2.0, 2.0), sweep_tokens=6,
                   sweep_heads=2, pair_heads=2, max_countries=48)


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


def _grid(ctx: RecipeContext, prompts, settings: list, tokens: int) -> list[dict]:
    """:func:`scaling_grid` rows without their counts (rates and ``n`` are kept)."""
    rows = scaling_grid(ctx.shared_lm(), prompts, settings, bridge=_bridge(ctx), max_new_tokens=tokens,
                        batch_size=64)
    return [{k: v for k, v in r.items() if k != "counts"} for r in rows]


def _tuning(ctx: RecipeContext, c) -> list:
    return _prompts(ctx, c.max_countries, c.tune_seed, 1)


def _alphas(c) -> list[float]:
    """The per-head α grid: ``head_alphas`` without α = 1 (the shared baseline row)."""
    return [float(a) for a in c.head_alphas if float(a) != 1.0]


# -- steps ------------------------------------------------------------------------------------
@reads("pairs_per_country", "max_new_tokens", "prompt_seed", "max_countries")
def classify(ctx: RecipeContext, c) -> list[str]:
    """The paper's label of every main prompt's greedy continuation."""
    main = _prompts(ctx, c.max_countries, c.prompt_seed, c.pairs_per_country)
    return classify_continuations(_bridge(ctx), main, max_new_tokens=c.max_new_tokens, batch_size=64)


@reads("tune_seed", "max_countries")
def dla(ctx: RecipeContext, c) -> list:
    """Per-head DLA ``[layer][head]`` on the tuning prompts."""
    return head_logit_attribution(ctx.shared_lm(), _tuning(ctx, c), bridge=_bridge(ctx)).tolist()


@reads("tune_seed", "max_countries", "sweep_tokens")
def baseline_sweep(ctx: RecipeContext, c) -> dict:
    """Label rates on the tuning prompts with no head scaled (α = 1 for every head)."""
    row = _grid(ctx, _tuning(ctx, c), [{}], c.sweep_tokens)[0]
    return {"alpha": 1.0, **{k: v for k, v in row.items() if k != "scales"}}


@reads("tune_seed", "max_countries", "head_alphas", "sweep_tokens")
def head_sweep(ctx: RecipeContext, c, head: list) -> list[dict]:
    """Label rates on the tuning prompts with head ``head`` scaled by each α of the grid."""
    l, h = head
    alphas = _alphas(c)
    rows = _grid(ctx, _tuning(ctx, c), [{(l, h): a} for a in alphas], c.sweep_tokens)
    return [{"alpha": a, **{k: v for k, v in r.items() if k != "scales"}} for a, r in zip(alphas, rows)]


@reads("tune_seed", "max_countries", "sweep_tokens")
def pair_sweep(ctx: RecipeContext, c, settings: list) -> list[dict]:
    """Label rates on the tuning prompts under each two-head setting ``[[l, h, α], [l, h, α]]``."""
    return _grid(ctx, _tuning(ctx, c), settings, c.sweep_tokens)


@reads("eval_seed", "max_countries", "sweep_tokens")
def scaling_eval(ctx: RecipeContext, c, settings: list) -> list[dict]:
    """Label rates on the evaluation (held-out) prompts under each setting (``[]`` = baseline)."""
    return _grid(ctx, _prompts(ctx, c.max_countries, c.eval_seed, 1), settings, c.sweep_tokens)


# -- selection (pure functions of the tuning rows) -----------------------------------------------
def swept_heads(attribution: list, sweep_heads: int | None) -> list[tuple[int, int]]:
    """Every ``(layer, head)`` of the ``[layer][head]`` DLA matrix, or the ``sweep_heads`` of
    largest |DLA| (ties in (layer, head) order), returned in (layer, head) order."""
    heads = [(l, h) for l, row in enumerate(attribution) for h in range(len(row))]
    if sweep_heads is not None:
        heads = sorted(heads, key=lambda lh: -abs(attribution[lh[0]][lh[1]]))[:sweep_heads]
    return sorted(heads)


def best_singles(per_head: dict, k: int) -> list[tuple[int, int, float, float]]:
    """Each head's best α (highest tuning in-context rate; the first of equal rates in grid
    order), the ``k`` best heads as ``(layer, head, α, in_context)``, best first (ties: (layer,
    head) order)."""
    best = []
    for (l, h), rows in sorted(per_head.items()):
        top = max(rows, key=lambda r: r["in_context"])
        best.append((l, h, top["alpha"], top["in_context"]))
    return sorted(best, key=lambda b: -b[3])[:k]


def pair_settings(a: tuple, b: tuple, alphas: list[float]) -> list:
    """The two-head grid of heads ``a``, ``b`` (``(layer, head, best α, …)``): each head takes the
    αs of ``alphas`` on the same side of 1 as its own best α; as ``[[l, h, α], [l, h, α]]``."""
    def side(best):
        return [x for x in alphas if (x < 1.0) == (best < 1.0)]

    return [[[a[0], a[1], x], [b[0], b[1], y]] for x in side(a[2]) for y in side(b[2])]


# -- run --------------------------------------------------------------------------------------
def run(ctx: RecipeContext, cfg: Config) -> dict:
    labels = ctx.step("classify", classify, cfg)
    attribution = ctx.step("dla", dla, cfg)
    heads = select_heads(torch.tensor(attribution), k=cfg.k_heads)
    baseline = ctx.step("sweep-baseline", baseline_sweep, cfg)
    per_head = {(l, h): ctx.step(f"sweep-L{l}H{h}", head_sweep, cfg, [l, h])
                for l, h in swept_heads(attribution, cfg.sweep_heads)}
    singles = best_singles(per_head, cfg.pair_heads)
    pairs = []
    for a, b in itertools.combinations(sorted(singles), 2):
        rows = ctx.step(f"pairs-L{a[0]}H{a[1]}-L{b[0]}H{b[1]}", pair_sweep, cfg,
                        pair_settings(a, b, _alphas(cfg)))
        pairs.append({"heads": [[a[0], a[1]], [b[0], b[1]]], "rows": rows})
    # Chosen on the tuning set only: the best single (head, α) and the best two-head setting.
    l, h, alpha, _ = singles[0]
    single, single_row = [[l, h, alpha]], next(r for r in per_head[(l, h)] if r["alpha"] == alpha)
    pair_row = max((r for p in pairs for r in p["rows"]), key=lambda r: r["in_context"])
    pair = pair_row["scales"]
    tuning_rows = [baseline, single_row, pair_row]
    held = ctx.step("scaling-eval", scaling_eval, cfg, [[], single, pair])
    selection = [{"name": name, "scales": scales, "tuning": _rates(t), "held_out": _rates(e)}
                 for name, scales, t, e in zip(("baseline", "single", "pair"), ([], single, pair),
                                               tuning_rows, held)]
    base, best = held[0], held[1]
    results = {
        **ctx.header(cfg),
        **_rates_block(ctx, cfg, labels),
        "memory_heads": [{"layer": l, "head": h, "attribution": s} for l, h, s in heads["memory"]],
        "in_context_heads": [{"layer": l, "head": h, "attribution": s} for l, h, s in heads["in_context"]],
        "scaling": {"head": [l, h], "alpha": alpha,
                    "baseline_in_context_rate": base["in_context"], "in_context_rate": best["in_context"],
                    "baseline_memorized_rate": base["memorized"], "memorized_rate": best["memorized"],
                    "n_eval_prompts": base["n"]},
        "selection": {"n_tuning_prompts": baseline["n"], "n_eval_prompts": base["n"],
                      "pair_candidates": [{"head": [l, h], "alpha": a, "in_context": r} for l, h, a, r in singles],
                      "settings": selection},
        "sweeps": {"alphas": _alphas(cfg), "baseline": baseline,
                   "heads": [{"head": [l, h], "attribution": attribution[l][h], "rows": rows}
                             for (l, h), rows in per_head.items()],
                   "pairs": pairs},
        "head_attribution": attribution,
    }
    ctx.write_results(results)
    return results


def _rates(row: dict) -> dict:
    return {k: row[k] for k in ("n", *LABELS)}


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
    paths = [_render_attribution(results, ctx)]
    if "selection" in results:  # results written before the every-head search have neither
        paths += [_render_scaling(results, ctx), _render_dla_vs_causal(results, ctx)]
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


def best_gains(sweeps: dict) -> list[dict]:
    """Per swept head: its DLA and its best tuning in-context gain over the baseline for α < 1
    (ablate / reverse) and for α > 1 (amplify), with the α and the "neither" rate there
    (``None`` where the grid has no α on that side)."""
    base = sweeps["baseline"]["in_context"]
    out = []
    for entry in sweeps["heads"]:
        row = {"head": entry["head"], "attribution": entry["attribution"]}
        for side, rows in (("down", [r for r in entry["rows"] if r["alpha"] < 1]),
                           ("up", [r for r in entry["rows"] if r["alpha"] > 1])):
            top = max(rows, key=lambda r: r["in_context"]) if rows else None
            row[side] = None if top is None else {"alpha": top["alpha"], "gain": top["in_context"] - base,
                                                  "neither": top["neither"]}
        out.append(row)
    return out


def _render_dla_vs_causal(results: dict, ctx: RecipeContext):
    xs, ys, kinds, names = [], [], [], []
    for g in best_gains(results["sweeps"]):
        for side in ("down", "up"):
            if g[side] is not None:
                xs.append(g["attribution"])
                ys.append(g[side]["gain"])
                kinds.append(side)
                names.append("L{}H{}".format(*g["head"]))
    fig = plotting.scatter_with_curve(
        xs, ys, colors=kinds, color_labels={"down": "best α < 1 (ablate / reverse)", "up": "best α > 1 (amplify)"},
        xlabel="DLA score (in-context − memorized logit; < 0: memory head; symlog)",
        ylabel="best in-context gain over α = 1 (tuning)",
        title="DLA vs causal effect per head (one point per head and side of α)", legend="outside",
    )
    ax = fig.axes[0]
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.axvline(0.0, color="grey", lw=0.8)
    # most heads' DLA is near 0: a symmetric log axis, linear within 1 % of the largest |DLA|
    top = max(map(abs, xs), default=1.0) or 1.0
    lin = 10.0 ** np.floor(np.log10(0.01 * top))
    ax.set_xscale("symlog", linthresh=lin)
    ticks = [s * 10.0 ** k for k in range(int(np.log10(lin)), int(np.ceil(np.log10(top))) + 1) for s in (-1, 1)]
    ax.set_xticks(sorted([0.0, *ticks]), [f"{t:g}" for t in sorted([0.0, *ticks])], fontsize=7)
    for x, y, name in zip(xs, ys, names):
        ax.annotate(name, (x, y), xytext=(3, 2), textcoords="offset points", fontsize=6)
    return ctx.save_figure(fig, "dla_vs_causal", results)


def _render_scaling(results: dict, ctx: RecipeContext):
    """α sweeps of the chosen heads (best single, best pair) and of the top DLA memory and
    in-context heads, each with the shared α = 1 baseline."""
    sweeps = results["sweeps"]
    by_head = {tuple(e["head"]): e for e in sweeps["heads"]}
    roles: dict[tuple, list[str]] = {}
    for setting in results["selection"]["settings"]:
        for l, h, _ in setting["scales"]:
            roles.setdefault((l, h), []).append(f"{setting['name']}")
    for key, role in (("memory_heads", "top DLA memory"), ("in_context_heads", "top DLA in-context")):
        top = results[key][0]
        roles.setdefault((top["layer"], top["head"]), []).append(role)
    panels, xs, ylabels = {}, {}, {}
    for (l, h), role in roles.items():
        if (l, h) not in by_head:
            continue
        entry = by_head[(l, h)]
        rows = sorted([*entry["rows"], sweeps["baseline"]], key=lambda r: r["alpha"])
        key = f"L{l}H{h} (DLA {entry['attribution']:+.2f}; {', '.join(dict.fromkeys(role))})"
        panels[key] = {k: [r[k] for r in rows] for k in LABELS}
        xs[key], ylabels[key] = [r["alpha"] for r in rows], "share of tuning prompts"
    fig = plotting.line_panels(panels, x=xs, xlabel="α (scale of the head's output, hook_z)", ylabels=ylabels,
                               title="scaling one head's output by α (tuning prompts)", legend="outside")
    return ctx.save_figure(fig, "head_scaling", results)


def _scales_text(scales: list) -> str:
    return " + ".join(f"L{l}H{h} α={a:g}" for l, h, a in scales) or "none (α = 1)"


def summary(results: dict) -> str:
    r = results["rates"]
    lines = [format_table([[results["n_prompts"], r["in_context"], r["memorized"], r["neither"]]],
                          ["prompts", "in-context", "memorized", "neither"])]
    if results["by_decile"]:
        rows = [[b["bin"] + 1, b["n"], b["in_context"], b["memorized"], b["neither"]] for b in results["by_decile"]]
        lines.append(format_table(rows, ["decile", "n", "in-context", "memorized", "neither"]))
    heads = ", ".join(f"L{h['layer']}H{h['head']} ({h['attribution']:.2f})" for h in results["memory_heads"])
    lines.append(f"memory heads by DLA: {heads}")

    def side(g):
        return ["-", "-", "-"] if g is None else [g["alpha"], g["gain"], g["neither"]]

    gains = sorted(best_gains(results["sweeps"]), key=lambda g: g["attribution"])
    lines.append("per head on the tuning set (gain = in-context rate − the α = 1 rate):")
    lines.append(format_table([["L{}H{}".format(*g["head"]), g["attribution"], *side(g["down"]), *side(g["up"])]
                               for g in gains],
                              ["head", "DLA", "α<1", "gain", "neither", "α>1", "gain", "neither"]))
    sel = results["selection"]
    base = sel["settings"][0]
    rows = [[s["name"], _scales_text(s["scales"]), s["tuning"]["in_context"], s["held_out"]["in_context"],
             s["held_out"]["in_context"] - base["held_out"]["in_context"], s["held_out"]["memorized"],
             s["held_out"]["neither"]] for s in sel["settings"]]
    lines.append(f"chosen on {sel['n_tuning_prompts']} tuning prompts, evaluated on {sel['n_eval_prompts']} "
                 "held-out prompts:")
    lines.append(format_table(rows, ["setting", "heads", "tuning in-ctx", "held-out in-ctx", "gain",
                                     "memorized", "neither"]))
    return "\n".join(lines)
