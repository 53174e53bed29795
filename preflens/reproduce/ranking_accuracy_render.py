"""Figures and printed summary of the ranking-accuracy recipe, drawn from its results JSON alone.

``render(results, ctx)`` and ``summary(results)`` of :mod:`preflens.reproduce.ranking_accuracy`
(kept apart so the recipe file holds the computation): no model, no training, only the keys that
recipe writes. "base" is the shipped reference (the results' top-level keys), "miscalibrated"
the skewed-SFT reference (``results["miscalibrated"]``), ``results["frontier"]`` the DPO grid.
"""

from __future__ import annotations

import math

import numpy as np

from preflens import plotting
from preflens.plotting import plt
from preflens.reproduce.common import RecipeContext, format_table

ARMS = {"base": "base π_ref", "miscalibrated": "miscalibrated π_ref"}

FLIP_CLASSES = {  # (correct under π_ref, correct after DPO) -> legend text
    (True, True): "correct → correct", (True, False): "correct → incorrect",
    (False, True): "incorrect → correct", (False, False): "incorrect → incorrect",
}


def arm(results: dict, name: str) -> dict:
    """The keys of one reference arm: the top level for "base", ``results[name]`` otherwise."""
    return results if name == "base" else results[name]


def arms(results: dict) -> dict:
    """The arms ``results`` holds, name -> label (results written before the miscalibrated arm
    existed hold only "base")."""
    return {name: label for name, label in ARMS.items() if name == "base" or name in results}


def render(results: dict, ctx: RecipeContext) -> list:
    """Every figure of the recipe, drawn from ``results`` alone (no model, no training); the
    figures of a block that an older results file lacks (miscalibrated arm, frontier) are skipped."""
    paths = [_render_trajectory(results, ctx), _render_observed_vs_idealized(results, ctx)]
    paths += [_render_loss_vs_c(results, ctx, name) for name in arms(results)]
    if "frontier" in results:
        paths.append(_render_frontier(results, ctx))
    return paths


def _render_trajectory(results: dict, ctx: RecipeContext):
    panels, xs = {}, {}
    for name, label in arms(results).items():
        a = arm(results, name)
        traj, title = a["trajectory"], f"DPO from the {label}"
        panels[title] = {"R (summed)": [t["ranking_accuracy"] for t in traj],
                         "R̃ (mean)": [t["ranking_accuracy_mean"] for t in traj],
                         "idealized R* (median β)": [a["reference"]["idealized"]["median"]] * len(traj)}
        xs[title] = [t["step"] for t in traj]
    fig = plotting.line_panels(panels, x=xs, xlabel="DPO step", ylabels={t: "accuracy" for t in panels},
                               legend="outside")
    return ctx.save_figure(fig, "ranking_accuracy_during_dpo", results)


def _render_observed_vs_idealized(results: dict, ctx: RecipeContext):
    groups, series = [], {"R": [], "R̃": [], "R* min": [], "R* median": [], "R* max": [], "R* median, votes α": []}
    for name, label in arms(results).items():
        a = arm(results, name)
        ideal = a["reference"]["idealized"]
        for when, block in ((label, a["reference"]), (f"{name}: after DPO", a["after_dpo"])):
            groups.append(when)
            series["R"].append(block["ranking_accuracy"])
            series["R̃"].append(block["ranking_accuracy_mean"])
            for stat in ("min", "median", "max"):
                series[f"R* {stat}"].append(ideal[stat])
            series["R* median, votes α"].append(ideal["from_votes"]["median"])
    fig = plotting.grouped_bars(groups, series, ylabel="accuracy", legend="outside",
                                title="observed vs idealized ranking accuracy (R*: exact α unless noted)")
    return ctx.save_figure(fig, "observed_vs_idealized", results)


def _render_loss_vs_c(results: dict, ctx: RecipeContext, name: str):
    a, beta = arm(results, name), results["config"]["dpo_beta"]
    pp = a["per_pair"]
    c, loss = np.asarray(pp["c"], float), np.asarray(pp["final_dpo_loss"], float)
    classes = [FLIP_CLASSES[(x, y)] for x, y in zip(pp["correct_reference"], pp["correct_after_dpo"])]
    counts = {k: classes.count(k) for k in FLIP_CLASSES.values()}
    cs = np.linspace(c.min(), c.max(), 200)
    fig = plotting.scatter_with_curve(
        c, loss, curve=(cs, np.logaddexp(0.0, -beta * cs)), colors=classes,
        color_labels={k: f"{k} ({n})" for k, n in counts.items()},
        xlabel="c = log π_ref(y_l) − log π_ref(y_w)   (c > 0: the reference mis-ranks)",
        ylabel="final DPO loss", curve_label=f"softplus(−βc), β = {beta:g}", legend="outside",
        title=f"{ARMS[name]}. Theorem 4.1: correct after DPO ⇔ loss ≤ softplus(−βc)",
    )
    fig.text(1.0, 0.08, "colour: ranking under π_ref → after DPO\n(pairs below the curve end correct)",
             fontsize=7, ha="left", va="bottom", transform=fig.transFigure)
    return ctx.save_figure(fig, "dpo_loss_vs_c" if name == "base" else f"dpo_loss_vs_c_{name}", results)


def _render_frontier(results: dict, ctx: RecipeContext):
    fr = results["frontier"]
    crit, rows = fr["criterion"], [r for r in fr["rows"] if r["flipped_to_correct_of_incorrect"] is not None]
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    betas = sorted({r["dpo_beta"] for r in rows})
    lrs = sorted({r["lr"] for r in rows})
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(betas), 1)))
    markers = "osD^vP"
    for row in rows:
        k, j = betas.index(row["dpo_beta"]), lrs.index(row["lr"])
        ax.scatter(row["loss_drop"], row["flipped_to_correct_of_incorrect"], color=colors[k],
                   marker=markers[j % len(markers)], s=36, zorder=3)
        ax.annotate(f"{row['epochs']}", (row["loss_drop"], row["flipped_to_correct_of_incorrect"]),
                    textcoords="offset points", xytext=(4, 3), fontsize=6)
    for k, b in enumerate(betas):
        ax.scatter([], [], color=colors[k], marker="o", label=f"β = {b:g}")
    for j, lr in enumerate(lrs):
        ax.scatter([], [], color="grey", marker=markers[j % len(markers)], label=f"{rows[0]['optimizer']} lr {lr:g}")
    xs = [r["loss_drop"] for r in rows] + [crit["min_loss_drop"]]
    for name, marker in (("base", "*"), ("miscalibrated", "X")):
        a = arm(results, name)
        if a["fraction_flipped_to_correct_of_incorrect"] is not None:
            xs.append(math.log(2) - a["mean_final_dpo_loss"])
            ax.scatter(xs[-1], a["fraction_flipped_to_correct_of_incorrect"], color="crimson", marker=marker, s=90,
                       zorder=4, label=f"recipe DPO, {ARMS[name]} (β = {results['config']['dpo_beta']:g})")
    hi = max(xs) * 1.08 + 0.01
    if fr["idealized_median"] >= crit["min_idealized_median"]:
        ax.fill_between([crit["min_loss_drop"], max(hi, math.log(2))], 0, crit["max_flip_share"], color="tab:green",
                        alpha=0.15, zorder=1, label="acceptance region")
    else:
        ax.text(0.5, 0.5, f"base R* median {fr['idealized_median']:.3f} < {crit['min_idealized_median']:g}:\n"
                "no setting qualifies", transform=ax.transAxes, ha="center", fontsize=8)
    ax.set_xlim(min(0.0, *xs) - 0.01, hi)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("mean DPO loss drop below ln 2 (all pairs, after training)")
    ax.set_ylabel("share of mis-ranked pairs flipped to correct")
    ax.set_title("flip frontier: DPO from the base π_ref (numbers: epochs)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plotting.legend_outside(fig, ax)
    return ctx.save_figure(fig, "flip_frontier", results)


# -- summary ----------------------------------------------------------------------------------
def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary(results: dict) -> str:
    rows = []
    for name, label in ARMS.items():
        a = arm(results, name)
        ideal = a["reference"]["idealized"]
        rows.append([label, a["reference"]["ranking_accuracy"], a["reference"]["ranking_accuracy_mean"],
                     ideal["min"], ideal["median"], ideal["max"], ideal["from_votes"]["median"],
                     ideal["length_normalized"]["median"]])
        rows.append([f"{name}: after DPO", a["after_dpo"]["ranking_accuracy"], a["after_dpo"]["ranking_accuracy_mean"],
                     "", "", "", "", ""])
    lines = [format_table(rows, ["model", "R", "R̃", "R* min", "R* median", "R* max", "R* med (votes)",
                                 "R̃* median"])]
    for name, label in ARMS.items():
        a = arm(results, name)
        gap = a.get("alignment_gap", {})
        lines.append(
            f"{label}: R* median − R {_fmt(gap.get('exact'))} (votes {_fmt(gap.get('from_votes'))}); "
            f"incorrect at start {a['fraction_incorrect_at_start']:.3f} (median c {_fmt(a.get('median_c_incorrect'))}); "
            f"DPO flips to correct {a['fraction_flipped_to_correct']:.3f} "
            f"({_fmt(a['fraction_flipped_to_correct_of_incorrect'])} of incorrect), to incorrect "
            f"{a['fraction_flipped_to_incorrect']:.3f}; mean final loss {a['mean_final_dpo_loss']:.4f}; "
            f"Theorem 4.1 agreement {a['theorem_4_1_agreement']:.3f}")
    fit = results["miscalibrated"]["sft"]
    cfg = results["config"]
    lines.append(f"miscalibrated reference: SFT, {cfg['sft_steps']} steps {cfg['sft_optimizer']} lr {cfg['sft_lr']:g}, "
                 f"batch {cfg['sft_batch_size']}, on {fit['n_examples']} examples ({fit['rejected_share']:.2f} "
                 f"dispreferred; q = {cfg['skew_q']:g}); loss {fit['losses'][0]:.3f} → {fit['losses'][-1]:.3f}")
    spread = results["miscalibrated"]["seed_spread"]
    lines.append("miscalibrated R* median − R over SFT seeds " + ", ".join(
        f"{r['skew_seed']}: {r['gap']:.3f}" for r in spread["rows"])
        + f" (min {spread['gap_min']:.3f}, median {spread['gap_median']:.3f}, max {spread['gap_max']:.3f})")
    fr = results["frontier"]
    table = format_table(
        [[r["dpo_beta"], r["lr"], r["epochs"], r["mean_loss"], r["loss_drop"], _fmt(r["flipped_to_correct_of_incorrect"]),
          _fmt(r["flipped_to_incorrect_of_correct"]), r["ranking_accuracy"], "yes" if r["meets_criterion"] else ""]
         for r in fr["rows"]],
        ["β", "lr", "epochs", "mean loss", "ln2 − loss", "i→c of incorrect", "c→i of correct", "R after", "meets"])
    crit = fr["criterion"]
    meeting = [r for r in fr["rows"] if r["meets_criterion"]]
    lines += [f"flip frontier (DPO from the base π_ref, {cfg['optimizer']}):", table,
              f"criterion: i→c ≤ {crit['max_flip_share']:g} of incorrect at ln 2 − loss ≥ {crit['min_loss_drop']:g}, "
              f"base R* median {fr['idealized_median']:.3f} ≥ {crit['min_idealized_median']:g}: "
              + (", ".join(f"β {r['dpo_beta']:g} lr {r['lr']:g} {r['epochs']} ep" for r in meeting) or "no setting")]
    return "\n".join(lines)
