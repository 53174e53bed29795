"""Recipe: gradient entanglement in margin-based preference losses, and a mitigation.

Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement". Steps:

1. **Trajectories**: the same graded-answer pairs trained with DPO, IPO, SimPO, SLiC (hinge),
   DPO-Positive, CPO and DPO with the pairwise-normalized gradient (the step along
   a·(g_w/‖g_w‖ − g_l/‖g_l‖), one of the paper's proposed mitigations), plain SGD for all (the
   setting of the paper's first-order analysis), tracking the mean summed log π(y_w) and
   log π(y_l) on the training pairs, and at a few checkpoints the per-pair gradient statistics
   (⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖², cos; ghost method) with the predicted case counts (Table 1).
2. **First-order sign agreement against step size**: for each loss (and the pairwise-normalized
   step), one plain-SGD step of size η on each pair alone, for every η of a grid; the measured
   Δu_w, Δu_l against those predicted to first order from the gradient statistics and the loss
   weights (Eqs. 3–5 generalised): sign agreement, and the absolute and relative error, whose
   log-log slopes against η are ≈ 2 and ≈ 1 while the step is small (O(η²) remainder).
   ``first_order_sign_agreement`` is the row at ``sign_lr``.
3. **Controlled token overlap** (paper §4.3): pairs whose responses differ in one token
   (" Yes" vs " No") against the same pairs with a long shared suffix, scored without EOS so
   that the one-token pairs really differ in exactly one token; cos and DPO's effect on the
   chosen log-prob for each; a token-level gradient-similarity heatmap for one suffix pair.

Each loss's trajectory is a step of its own: editing one loss's settings in ``RUNS`` reruns
that loss's trajectory and the sign-vs-lr step (which covers every loss), nothing else. The
results JSON keeps every value the figures draw (``losses[*].history``, ``sign_vs_lr.rows``,
``token_similarity``).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from preflens import plotting
from preflens.data import PreferencePair
from preflens.data.toyworld.prefs import YESNO_PROMPT, multi_token_pairs
from preflens.dynamics.entanglement import (
    pair_gradient_stats,
    predict_first_order,
    sgd_step_changes,
    token_gradient_similarity,
)
from preflens.dynamics.train import train_preference
from preflens.dynamics.trackers import EntanglementTracker
from preflens.errors import ConfigError
from preflens.reproduce.common import RecipeContext, format_table, reads, toyworld_world
from preflens.scoring import encode, response_logprobs

PAPER = "gradient_entanglement"
# name -> (registered loss, loss kwargs, pairwise_normalized)
RUNS = {
    "dpo": ("dpo", {"beta": 0.1}, False),
    "ipo": ("ipo", {"tau": 0.1}, False),
    "simpo": ("simpo", {"beta": 2.0, "gamma": 0.5}, False),
    "slic": ("hinge", {"beta": 0.1}, False),
    "dpop": ("dpop", {"beta": 0.1, "lam": 50.0}, False),
    "cpo": ("cpo", {"beta": 0.1, "lam": 1.0}, False),
    "dpo_pairwise_normalized": ("dpo", {"beta": 0.1}, True),
}


@dataclass(frozen=True)
class Config:
    n_pairs: int = 256
    data_seed: int = 7
    lr: float = 0.05            # plain SGD
    epochs: int = 3
    batch_size: int = 16
    stats_pairs: int = 32       # pairs whose gradient statistics are tracked
    stats_every: int = 8
    sign_pairs: int = 48
    sign_lr: float = 1e-3       # the step of first_order_sign_agreement
    sign_lrs: tuple = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # SGD steps of the sweep
    slope_points: int = 3       # error-vs-lr slopes are fitted on this many smallest steps
    overlap_pairs: int = 48
    overlap_lr: float = 0.05
    overlap_steps: int = 30
    seed: int = 0
    gradient_method: str = "ghost"  # or "exact" (pair_gradient_stats; equal up to rounding)

    @classmethod
    def quick(cls) -> Config:
        return cls(n_pairs=64, epochs=1, stats_pairs=8, stats_every=1000, sign_pairs=4,
                   sign_lrs=(1e-4, 1e-2), overlap_pairs=12, overlap_steps=6)


def _pairs(ctx: RecipeContext, c) -> list:
    make = functools.partial(multi_token_pairs, toyworld_world(), c.n_pairs, seed=c.data_seed)
    return ctx.memo(f"pairs-{c.n_pairs}-{c.data_seed}", make)


# -- step 1: trajectories under each loss -----------------------------------------------------
def _history(tracker: EntanglementTracker) -> list[dict]:
    """The tracker's records in this recipe's JSON shape (case counts as a dict of ints)."""
    keys = ("step", "logp_chosen", "logp_rejected", "mean_inner", "mean_cos", "mean_norm_w_sq", "mean_norm_l_sq")
    return [{**{k: h[k] for k in keys}, "case_counts": tracker.case_counts_at(i)}
            for i, h in enumerate(tracker.history)]


@reads("n_pairs", "data_seed", "lr", "epochs", "batch_size", "stats_pairs", "stats_every", "seed",
       "gradient_method")
def trajectory(ctx: RecipeContext, c, name: str, spec: list) -> dict:
    """Plain-SGD run ``name`` with ``spec`` = (loss, loss kwargs, pairwise_normalized)."""
    loss, kwargs, normalized = spec
    pairs, lm = _pairs(ctx, c), ctx.fresh_lm()
    # every stats_every steps (and at 0 and the end): mean log-probs on all pairs, gradient
    # statistics and predicted case counts on the first stats_pairs
    tracker = EntanglementTracker(lm, pairs, loss=loss, loss_kwargs=kwargs, every=c.stats_every,
                                  ghost_n=c.stats_pairs, ghost_batch_size=16, method=c.gradient_method)
    train_preference(
        lm, pairs, loss=loss, loss_kwargs=kwargs, optimizer="sgd", lr=c.lr, epochs=c.epochs,
        batch_size=c.batch_size, seed=c.seed, pairwise_normalized=normalized,
        max_grad_norm=10.0, callbacks=[tracker], out_dir=None,  # a throwaway run: writes nothing
    )
    h = _history(tracker)
    return {
        "chosen_delta": h[-1]["logp_chosen"] - h[0]["logp_chosen"],
        "rejected_delta": h[-1]["logp_rejected"] - h[0]["logp_rejected"],
        "case_counts": h[0]["case_counts"],
        "case_counts_final": h[-1]["case_counts"],
        "mean_cos_start": h[0]["mean_cos"], "mean_cos_end": h[-1]["mean_cos"],
        "history": h,
    }


# -- step 2: first-order sign agreement against step size ------------------------------------
def first_order_agreement(measured_w, measured_l, predicted_w, predicted_l) -> dict:
    """Measured vs first-order predicted (Δu_w, Δu_l) of one SGD step, each ``[n]`` (Yuan et al.
    2024 Eqs. 3–5): sign agreement per response and for both (``np.sign`` equality, so 0 matches
    only 0), ``abs_error`` = mean |measured − predicted| and ``rel_error`` = median
    |measured − predicted| / |predicted|, both over the 2n changes (chosen and rejected pooled;
    a prediction of exactly 0, e.g. an inactive hinge, is left out of ``rel_error``, which is
    None when every prediction is 0)."""
    m_w, m_l, p_w, p_l = (np.asarray(x, dtype=np.float64) for x in (measured_w, measured_l, predicted_w, predicted_l))
    same_w, same_l = np.sign(m_w) == np.sign(p_w), np.sign(m_l) == np.sign(p_l)
    err, pred = np.abs(np.concatenate([m_w - p_w, m_l - p_l])), np.abs(np.concatenate([p_w, p_l]))
    rel = err[pred > 0] / pred[pred > 0]
    return {"agree_chosen": float(same_w.mean()), "agree_rejected": float(same_l.mean()),
            "agree_both": float((same_w & same_l).mean()), "abs_error": float(err.mean()),
            "rel_error": float(np.median(rel)) if rel.size else None}


def loglog_slope(lrs, errors) -> float:
    """Least-squares slope of log(error) against log(lr); a first-order prediction leaves an
    O(η²) remainder, so ≈ 2 for the absolute and ≈ 1 for the relative error at small η."""
    return float(np.polyfit(np.log(np.asarray(lrs, dtype=float)), np.log(np.asarray(errors, dtype=float)), 1)[0])


def _sign_lrs(c) -> list[float]:
    lrs = sorted({float(x) for x in c.sign_lrs} | {float(c.sign_lr)})
    if any(not 0 < x < float("inf") for x in lrs):
        raise ConfigError("sign_lrs", f"step sizes must be finite and > 0, got {lrs}")
    return lrs


@reads("n_pairs", "data_seed", "sign_pairs", "sign_lr", "sign_lrs", "gradient_method")
def sign_vs_lr(ctx: RecipeContext, c, runs: dict) -> dict:
    """Per run in ``runs`` (name -> spec) and step size η in ``sign_lrs`` ∪ {``sign_lr``}: one
    plain-SGD step on each of the first ``sign_pairs`` pairs alone (fp64 model), measured
    Δu_w, Δu_l against the first-order prediction from the gradient statistics
    (:func:`first_order_agreement`). The statistics are computed once (they do not depend on η)
    and each (run, pair) takes one gradient; each η is one forward at θ0 − η·g."""
    lrs = _sign_lrs(c)
    lm = ctx.fresh_lm(dtype=torch.float64)
    sub = _pairs(ctx, c)[: c.sign_pairs]
    stats = pair_gradient_stats(lm, sub, method=c.gradient_method)
    specs = {name: (loss, kwargs, normalized) for name, (loss, kwargs, normalized) in runs.items()}
    measured = sgd_step_changes(lm, sub, specs, lrs, norms=(stats.norm_w, stats.norm_l))
    rows = []
    for name, (loss, kwargs, normalized) in specs.items():
        for k, lr in enumerate(lrs):
            pred_w, pred_l = predict_first_order(stats, loss, lr=lr, loss_kwargs=kwargs, pairwise_normalized=normalized,
                                                 ref_chosen_logps=stats.u_w, ref_rejected_logps=stats.u_l)
            m_w, m_l = measured[name]
            rows.append({"loss": name, "lr": lr, **first_order_agreement(m_w[k], m_l[k], pred_w, pred_l)})
    return {"lrs": lrs, "rows": rows}


def _slopes(rows: list[dict], points: int) -> dict:
    """Per run: log-log slopes of ``abs_error`` and ``rel_error`` against lr over its ``points``
    smallest step sizes (the first-order regime; rows without a relative error are skipped)."""
    out = {}
    for name in dict.fromkeys(r["loss"] for r in rows):
        fit = sorted((r for r in rows if r["loss"] == name and r["rel_error"] and r["abs_error"] > 0), key=lambda r: r["lr"])[:points]
        if len(fit) < 2:
            continue
        lrs = [r["lr"] for r in fit]
        out[name] = {"abs_error": loglog_slope(lrs, [r["abs_error"] for r in fit]),
                     "rel_error": loglog_slope(lrs, [r["rel_error"] for r in fit]), "fit_lrs": lrs}
    return out


# -- step 3: controlled token overlap ---------------------------------------------------------
def overlap_pairs(world, n: int, seed: int, suffix: bool) -> list[PreferencePair]:
    """Yes/no pairs; with ``suffix`` both answers continue with the same long explanation."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        i = rng.randrange(len(world.countries))
        country, capital = world.countries[i], world.capitals[i]
        tail = f", the capital of {country} is {capital}. The capital of {country} is {capital}." if suffix else ""
        out.append(PreferencePair(YESNO_PROMPT.format(country=country, city=capital),
                                  " Yes" + tail, " No" + tail, id=f"overlap-{k}"))
    return out


def _summed_logps(lm, pairs, side: str):
    prompts = [p.prompt for p in pairs]
    return response_logprobs(lm, prompts, [getattr(p, side) for p in pairs], add_eos=False).logp


def _overlap_arm(ctx: RecipeContext, c, kind: str, suffix: bool) -> dict:
    pairs = overlap_pairs(toyworld_world(), c.overlap_pairs, c.seed + 11, suffix)
    lm = ctx.fresh_lm()
    st = pair_gradient_stats(lm, pairs, method=c.gradient_method, batch_size=16, add_eos=False)
    before, before_l = _summed_logps(lm, pairs, "chosen"), _summed_logps(lm, pairs, "rejected")
    train_preference(lm, pairs, loss="dpo", loss_kwargs={"beta": 0.1}, optimizer="sgd",
                     lr=c.overlap_lr, steps=c.overlap_steps, batch_size=min(16, len(pairs)), seed=c.seed,
                     add_eos=False, out_dir=None)
    after, after_l = _summed_logps(lm, pairs, "chosen"), _summed_logps(lm, pairs, "rejected")
    return {"mean_cos": float(st.cos.mean()), "frac_cos_positive": float((st.cos > 0).double().mean()),
            "chosen_delta": float((after - before).mean()),
            "rejected_delta": float((after_l - before_l).mean())}


@reads("overlap_pairs", "overlap_lr", "overlap_steps", "seed", "gradient_method")
def overlap(ctx: RecipeContext, c) -> dict:
    """One-token pairs vs the same pairs with a shared suffix: cos and DPO's Δ log-probs."""
    return {kind: _overlap_arm(ctx, c, kind, suffix) for kind, suffix in (("one_token", False),
                                                                           ("shared_suffix", True))}


@reads("seed")
def token_heatmap(ctx: RecipeContext, c) -> dict:
    """Token-level gradient cosine between the responses of one shared-suffix pair."""
    lm = ctx.shared_lm()
    pair = overlap_pairs(toyworld_world(), 1, c.seed + 11, True)[0]
    sim = token_gradient_similarity(lm, pair)
    tok = lm.tokenizer
    enc = encode(tok, [pair.prompt, pair.prompt], [pair.chosen, pair.rejected])  # EOS included, as sim
    return {"cos": sim.cos.tolist(),
            "chosen_tokens": [tok.decode([i]) for i in enc[0].response_ids],
            "rejected_tokens": [tok.decode([i]) for i in enc[1].response_ids]}


# -- run --------------------------------------------------------------------------------------
def run(ctx: RecipeContext, cfg: Config) -> dict:
    runs = {name: ctx.step(f"trajectory-{name}", trajectory, cfg, name, list(spec))
            for name, spec in tqdm(RUNS.items(), desc="loss trajectories")}
    sweep = ctx.step("sign-vs-lr", sign_vs_lr, cfg, {n: list(s) for n, s in RUNS.items()})
    ov = ctx.step("overlap", overlap, cfg)
    heat = ctx.step("token-heatmap", token_heatmap, cfg)
    plain, mitigated = runs["dpo"], runs["dpo_pairwise_normalized"]
    keys = ("chosen_delta", "rejected_delta", "case_counts", "case_counts_final", "mean_cos_start",
            "mean_cos_end", "history")
    results = {
        **ctx.header(cfg),
        "losses": {n: {k: r[k] for k in keys} for n, r in runs.items()},
        "first_order_sign_agreement": {r["loss"]: r["agree_both"] for r in sweep["rows"]
                                       if r["lr"] == float(cfg.sign_lr)},
        "sign_vs_lr": {"lrs": sweep["lrs"], "sign_lr": float(cfg.sign_lr), "trajectory_lr": cfg.lr,
                       "trajectory_batch_size": cfg.batch_size, "rows": sweep["rows"],
                       "slopes": _slopes(sweep["rows"], cfg.slope_points)},
        "overlap_experiment": ov,
        "normalized_mitigation": {
            "dpo_chosen_delta": plain["chosen_delta"], "dpo_rejected_delta": plain["rejected_delta"],
            "normalized_chosen_delta": mitigated["chosen_delta"],
            "normalized_rejected_delta": mitigated["rejected_delta"],
        },
        "token_similarity": heat,
    }
    ctx.write_results(results)
    return results


# -- render (from the results JSON only) ------------------------------------------------------
def render(results: dict, ctx: RecipeContext) -> list:
    """Every figure of this recipe, drawn from ``results`` alone (no model, no training)."""
    figures = [_render_trajectories(results, ctx), _render_token_similarity(results, ctx)]
    if "sign_vs_lr" in results:  # results written before the step-size sweep have only one step
        figures.append(_render_sign_vs_lr(results, ctx))
    return figures


def _render_trajectories(results: dict, ctx: RecipeContext):
    runs = results["losses"]
    panels = {
        "mean log π(y_w)": {n: [h["logp_chosen"] for h in r["history"]] for n, r in runs.items()},
        "mean log π(y_l)": {n: [h["logp_rejected"] for h in r["history"]] for n, r in runs.items()},
        "mean cos(g_w, g_l)": {n: [h["mean_cos"] for h in r["history"]] for n, r in runs.items()},
    }
    steps = [h["step"] for h in next(iter(runs.values()))["history"]]
    ylabels = {"mean log π(y_w)": "nats (summed)", "mean log π(y_l)": "nats (summed)",
               "mean cos(g_w, g_l)": "cosine"}
    fig = plotting.line_panels(panels, x={k: steps for k in panels}, xlabel="SGD step", ylabels=ylabels,
                               title="chosen/rejected log-probs under margin losses (SGD)", legend="outside")
    return ctx.save_figure(fig, "trajectories", results)


def _render_token_similarity(results: dict, ctx: RecipeContext):
    heat = results["token_similarity"]
    fig = plotting.heatmap(
        np.asarray(heat["cos"], dtype=float), xlabel="rejected token", ylabel="chosen token",
        title="token-level gradient cosine (shared suffix pair)",
        xticklabels=[t.strip() or repr(t) for t in heat["rejected_tokens"]],
        yticklabels=[t.strip() or repr(t) for t in heat["chosen_tokens"]],
    )
    return ctx.save_figure(fig, "token_similarity", results)


def _sweep_series(sweep: dict, key: str) -> dict[str, list]:
    """Per run, ``key`` of its rows in lr order (None where undefined)."""
    out: dict[str, list] = {}
    for r in sorted(sweep["rows"], key=lambda r: r["lr"]):
        out.setdefault(r["loss"], []).append(r[key])
    return out


_STYLES = ("-", "--", ":", "-.", (0, (6, 2)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)))


def _render_sign_vs_lr(results: dict, ctx: RecipeContext):
    sweep = results["sign_vs_lr"]
    agree, rel = "sign agreement (Δu_w and Δu_l)", "relative first-order error (median)"
    panels = {agree: _sweep_series(sweep, "agree_both"),
              rel: {n: [np.nan if v is None else v for v in ys] for n, ys in _sweep_series(sweep, "rel_error").items()}}
    lrs = sorted(sweep["lrs"])
    fig = plotting.line_panels(panels, x={k: lrs for k in panels}, xlabel="SGD step size η (one pair alone)",
                               ylabels={agree: "fraction of pairs", rel: "|Δu − Δu_predicted| / |Δu_predicted|"},
                               title="first-order predictions (Yuan et al. Eqs. 3–5) against step size",
                               legend="none")
    lr, batch = sweep["trajectory_lr"], sweep["trajectory_batch_size"]
    marks = [(lr, "--", f"trajectory lr {lr:g} (batch mean of {batch})"),
             (lr / batch, ":", "trajectory lr / batch size"),
             (sweep["sign_lr"], "-", f"sign_lr {sweep['sign_lr']:g} (first_order_sign_agreement)")]
    for i, ax in enumerate(fig.axes[:2]):
        ax.set_xscale("log")
        if i == 1:
            ax.set_yscale("log")
        for k, line in enumerate(ax.get_lines()):  # runs with identical rows (DPO and DPOP at M = 0) stay visible
            line.set_linestyle(_STYLES[k % len(_STYLES)])
        for x, style, label in marks:
            ax.axvline(x, color="grey", lw=1, ls=style, alpha=0.7, label=label)
    plotting.legend_outside(fig, fig.axes[0])
    return ctx.save_figure(fig, "sign_vs_lr", results)


def _sweep_table(results: dict) -> str:
    sweep = results["sign_vs_lr"]
    agree, rel = _sweep_series(sweep, "agree_both"), _sweep_series(sweep, "rel_error")
    lrs = [f"{x:.0e}" for x in sorted(sweep["lrs"])]
    slopes = sweep["slopes"]
    rows = [[n, *agree[n]] for n in agree]
    t1 = format_table(rows, ["sign agreement (both)", *lrs])
    rows = [[n, *("–" if v is None else v for v in rel[n]),
             *((slopes[n]["abs_error"], slopes[n]["rel_error"]) if n in slopes else ("–", "–"))] for n in rel]
    t2 = format_table(rows, ["median relative error", *lrs, "slope |err|", "slope rel"])
    return f"{t1}\n{t2}"


def summary(results: dict) -> str:
    rows = [[n, r["chosen_delta"], r["rejected_delta"], r["mean_cos_start"],
             " ".join(f"{k}:{v}" for k, v in r["case_counts"].items() if v)]
            for n, r in results["losses"].items()]
    t = format_table(rows, ["run", "Δ log π(y_w)", "Δ log π(y_l)", "mean cos", "predicted cases at init"])
    ov = results["overlap_experiment"]
    sweep = f"\n{_sweep_table(results)}" if "sign_vs_lr" in results else ""
    return (f"{t}\nsign agreement (one SGD step, η = {results['config']['sign_lr']:g}): " + ", ".join(f"{k} {v:.2f}" for k, v in results["first_order_sign_agreement"].items())
            + sweep + f"\noverlap: one token cos {ov['one_token']['mean_cos']:.2f} Δchosen {ov['one_token']['chosen_delta']:.2f}; "
            f"shared suffix cos {ov['shared_suffix']['mean_cos']:.2f} Δchosen {ov['shared_suffix']['chosen_delta']:.2f}")
