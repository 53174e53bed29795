"""Recipe: ranking accuracy vs idealized ranking accuracy, and how rarely DPO flips a ranking.

Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings". Steps:

1. preference pairs from the toy world: multi-token graded answers, each with the *exact*
   population preference α and K sampled annotator votes (the model is only the scorer, so the
   same pairs serve ``--model gpt2``);
2. ``reference``: the reference model's summed and per-token-mean log-probs of every response;
   from them the ranking accuracy R (summed log-probs, ≥), R̃ (per-token means), and the
   idealized ranking accuracy R* of Corollary 3.3 over the β grid, from the exact α and from α
   estimated from the sampled votes (ties excluded);
3. ``dpo``: DPO from the reference on the same pairs, tracking R every few steps, then the
   per-pair log-probs after training: the flips (incorrect→correct, correct→incorrect);
4. the final per-pair DPO loss against c = log π_ref(y_l) − log π_ref(y_w) with Theorem 4.1's
   threshold curve softplus(−βc): a pair is ranked correctly iff its loss is under the curve.

"after_dpo.idealized" repeats the reference's values: R* depends only on π_ref, α and β (it is
what a perfect optimizer would reach from this reference), so it is the yardstick for both.
The results JSON keeps every per-pair value the figures draw (``per_pair``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from preflens import plotting
from preflens.data.toyworld.prefs import multi_token_pairs
from preflens.dynamics.train import train_preference
from preflens.probes.ranking import (
    alphas_from_votes,
    dpo_loss_value,
    flip_buckets,
    flip_loss_threshold,
    idealized_ranking_accuracy,
    ranking_correct,
)
from preflens.probes.trackers import RankingTracker
from preflens.reproduce.common import ProgressCallback, RecipeContext, format_table, reads, toyworld_world
from preflens.scoring import response_logprobs

PAPER = "ranking_accuracy"


@dataclass(frozen=True)
class Config:
    n_pairs: int = 1000          # the paper's fixed 1K training subsample
    votes: int = 4               # annotators per pair (AlpacaFarm has 4)
    data_seed: int = 0
    betas: tuple = (0.01, 0.1, 1.0, 5.0, 10.0)  # Chen et al. §4 grid
    dpo_beta: float = 0.1
    optimizer: str = "rmsprop"   # as the paper's DPO runs
    lr: float = 3e-5
    epochs: int = 5
    batch_size: int = 32
    track_every: int = 10
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(n_pairs=128, epochs=2, batch_size=16, track_every=4)


# -- steps ------------------------------------------------------------------------------------
def _pairs(ctx: RecipeContext, c):
    make = functools.partial(multi_token_pairs, toyworld_world(), c.n_pairs, votes=c.votes, seed=c.data_seed)
    return ctx.memo(f"pairs-{c.n_pairs}-{c.votes}-{c.data_seed}", make)


def _score_lists(lm, pairs) -> dict:
    """Summed (fp64, EOS included) and per-token-mean log-probs of both responses, as lists."""
    prompts = [p.prompt for p in pairs]
    s_w = response_logprobs(lm, prompts, [p.chosen for p in pairs], batch_size=64)
    s_l = response_logprobs(lm, prompts, [p.rejected for p in pairs], batch_size=64)
    return {"logp_chosen": s_w.logp.tolist(), "logp_rejected": s_l.logp.tolist(),
            "mean_logp_chosen": s_w.mean_logp.tolist(), "mean_logp_rejected": s_l.mean_logp.tolist()}


@reads("n_pairs", "votes", "data_seed")
def reference(ctx: RecipeContext, c) -> dict:
    """The reference model's log-probs of every pair's responses."""
    return _score_lists(ctx.shared_lm(), _pairs(ctx, c))


@reads("n_pairs", "votes", "data_seed", "dpo_beta", "optimizer", "lr", "epochs", "batch_size",
       "track_every", "seed")
def dpo(ctx: RecipeContext, c) -> dict:
    """DPO from the reference; R every ``track_every`` steps; log-probs after training."""
    pairs, lm = _pairs(ctx, c), ctx.fresh_lm()
    tracker = RankingTracker(lm, pairs, every=c.track_every)
    tracker.record(lm.model, 0)
    run = train_preference(
        lm, pairs, loss="dpo", loss_kwargs={"beta": c.dpo_beta}, optimizer=c.optimizer,
        lr=c.lr, epochs=c.epochs, batch_size=c.batch_size, seed=c.seed,
        callbacks=[tracker, ProgressCallback("DPO (tracking ranking accuracy)")],
        out_dir=None,  # a throwaway run: writes nothing
    )
    trajectory = [{"step": h["step"], "ranking_accuracy": h["accuracy"],
                   "ranking_accuracy_mean": h["accuracy_mean"]} for h in tracker.history]
    return {"trajectory": trajectory, "final_loss": run.final_metrics.get("loss"),
            "after": _score_lists(lm, pairs)}


# -- run --------------------------------------------------------------------------------------
def run(ctx: RecipeContext, cfg: Config) -> dict:
    ref = ctx.step("reference", reference, cfg)
    trained = ctx.step("dpo", dpo, cfg)
    results = _results(ctx, cfg, ref, trained)
    ctx.write_results(results)
    return results


def _tensors(scores: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}


def _ranking_block(s: dict, idealized: dict) -> dict:
    return {
        "ranking_accuracy": float(ranking_correct(s["logp_chosen"], s["logp_rejected"]).double().mean()),
        "ranking_accuracy_mean": float(
            ranking_correct(s["mean_logp_chosen"], s["mean_logp_rejected"]).double().mean()),
        "idealized": idealized,
    }


def _idealized(pairs, ref: dict, betas) -> dict:
    """R* (Cor. 3.3) from the exact α, from the votes' α, and on per-token means."""
    delta_ref = ref["logp_chosen"] - ref["logp_rejected"]   # Δ_ref = log π_ref(y_w) − log π_ref(y_l)
    delta_ref_mean = ref["mean_logp_chosen"] - ref["mean_logp_rejected"]
    alpha_exact = torch.tensor([p.alpha for p in pairs], dtype=torch.float64)
    alpha_votes = alphas_from_votes([p.votes for p in pairs]).double()
    return {**_public(idealized_ranking_accuracy(delta_ref, alpha_exact, betas)),
            "from_votes": _public(idealized_ranking_accuracy(delta_ref, alpha_votes, betas)),
            "length_normalized": _public(idealized_ranking_accuracy(delta_ref_mean, alpha_exact, betas))}


def _results(ctx: RecipeContext, cfg: Config, ref_lists: dict, trained: dict) -> dict:
    pairs = _pairs(ctx, cfg)
    ref, after = _tensors(ref_lists), _tensors(trained["after"])
    idealized = _idealized(pairs, ref, cfg.betas)
    correct_ref = ranking_correct(ref["logp_chosen"], ref["logp_rejected"])
    correct_now = ranking_correct(after["logp_chosen"], after["logp_rejected"])
    flips = flip_buckets(correct_ref, correct_now)
    # Theorem 4.1: the final DPO loss against c = log π_ref(y_l) − log π_ref(y_w) (c > 0 ⇔ mis-ranked).
    c = -(ref["logp_chosen"] - ref["logp_rejected"])
    loss_final = dpo_loss_value(after["logp_chosen"] - after["logp_rejected"], c, cfg.dpo_beta)
    threshold = flip_loss_threshold(c, cfg.dpo_beta)
    return {
        **ctx.header(cfg),
        "n_pairs": len(pairs),
        "reference": _ranking_block(ref, idealized),
        "after_dpo": _ranking_block(after, idealized),
        "fraction_flipped_to_correct": flips["fraction_flipped_to_correct"],
        "fraction_flipped_to_incorrect": flips["fraction_flipped_to_incorrect"],
        "fraction_incorrect_at_start": flips["fraction_incorrect_at_start"],
        "fraction_flipped_to_correct_of_incorrect": _finite(flips["fraction_flipped_to_correct_of_incorrect"]),
        "flip_buckets": flips["fractions"],
        "trajectory": trained["trajectory"],
        "final_loss": trained["final_loss"],
        "theorem_4_1_agreement": float(((loss_final <= threshold) == correct_now).double().mean()),
        "mean_alpha": float(torch.tensor([p.alpha for p in pairs], dtype=torch.float64).mean()),
        "per_pair": {"c": c.tolist(), "final_dpo_loss": loss_final.tolist(),
                     "correct_reference": correct_ref.tolist(), "correct_after_dpo": correct_now.tolist()},
    }


def _public(d: dict) -> dict:
    return {"min": d["min"], "median": d["median"], "max": d["max"],
            "per_beta": {str(k): v for k, v in d["per_beta"].items()}}


def _finite(x):
    x = float(x)
    return x if np.isfinite(x) else None


# -- render (from the results JSON only) ------------------------------------------------------
def render(results: dict, ctx: RecipeContext) -> list:
    """Every figure of this recipe, drawn from ``results`` alone (no model, no training)."""
    return [_render_trajectory(results, ctx), _render_observed_vs_idealized(results, ctx),
            _render_loss_vs_c(results, ctx)]


def _render_trajectory(results: dict, ctx: RecipeContext):
    traj = results["trajectory"]
    fig = plotting.line_panels(
        {"ranking accuracy during DPO": {
            "R (summed)": [t["ranking_accuracy"] for t in traj],
            "R̃ (mean)": [t["ranking_accuracy_mean"] for t in traj],
            "idealized R* (median β)": [results["reference"]["idealized"]["median"]] * len(traj),
        }},
        x={"ranking accuracy during DPO": [t["step"] for t in traj]}, xlabel="DPO step",
        ylabels={"ranking accuracy during DPO": "accuracy"},
    )
    return ctx.save_figure(fig, "ranking_accuracy_during_dpo", results)


def _render_observed_vs_idealized(results: dict, ctx: RecipeContext):
    ref, after = results["reference"], results["after_dpo"]
    ideal = ref["idealized"]
    fig = plotting.grouped_bars(
        ["reference", "after DPO"],
        {"R": [ref["ranking_accuracy"], after["ranking_accuracy"]],
         "R̃": [ref["ranking_accuracy_mean"], after["ranking_accuracy_mean"]],
         "R* min": [ideal["min"]] * 2, "R* median": [ideal["median"]] * 2, "R* max": [ideal["max"]] * 2},
        ylabel="accuracy", title="observed vs idealized ranking accuracy (exact α)", legend="outside",
    )
    return ctx.save_figure(fig, "observed_vs_idealized", results)


FLIP_CLASSES = {  # (correct under π_ref, correct after DPO) -> legend text
    (True, True): "correct → correct", (True, False): "correct → incorrect",
    (False, True): "incorrect → correct", (False, False): "incorrect → incorrect",
}


def _render_loss_vs_c(results: dict, ctx: RecipeContext):
    pp, beta = results["per_pair"], results["config"]["dpo_beta"]
    c, loss = np.asarray(pp["c"], float), np.asarray(pp["final_dpo_loss"], float)
    classes = [FLIP_CLASSES[(a, b)] for a, b in zip(pp["correct_reference"], pp["correct_after_dpo"])]
    counts = {k: classes.count(k) for k in FLIP_CLASSES.values()}
    cs = np.linspace(c.min(), c.max(), 200)
    fig = plotting.scatter_with_curve(
        c, loss, curve=(cs, np.logaddexp(0.0, -beta * cs)), colors=classes,
        color_labels={k: f"{k} ({n})" for k, n in counts.items()},
        xlabel="c = log π_ref(y_l) − log π_ref(y_w)   (c > 0: the reference mis-ranks)",
        ylabel="final DPO loss", curve_label=f"softplus(−βc), β = {beta:g}", legend="outside",
        title="Theorem 4.1: ranked correctly after DPO ⇔ loss ≤ softplus(−βc)",
    )
    fig.text(1.0, 0.08, "colour: ranking under π_ref → after DPO\n(pairs below the curve end correct)",
             fontsize=7, ha="left", va="bottom", transform=fig.transFigure)
    return ctx.save_figure(fig, "dpo_loss_vs_c", results)


def summary(results: dict) -> str:
    ref, after = results["reference"], results["after_dpo"]
    rows = [
        ["reference", ref["ranking_accuracy"], ref["ranking_accuracy_mean"], ref["idealized"]["min"],
         ref["idealized"]["median"], ref["idealized"]["max"]],
        ["after DPO", after["ranking_accuracy"], after["ranking_accuracy_mean"], "", "", ""],
    ]
    table = format_table(rows, ["model", "R", "R̃", "R* min", "R* median", "R* max"])
    return (
        f"{table}\nincorrect at start {results['fraction_incorrect_at_start']:.3f}; flipped to correct "
        f"{results['fraction_flipped_to_correct']:.3f}; flipped to incorrect "
        f"{results['fraction_flipped_to_incorrect']:.3f}; Theorem 4.1 agreement "
        f"{results['theorem_4_1_agreement']:.3f}"
    )
