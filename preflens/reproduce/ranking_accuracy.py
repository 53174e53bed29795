"""Recipe: ranking accuracy vs idealized ranking accuracy, and how rarely DPO flips a ranking.

Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings" (spec:
``shared/research/ranking_accuracy.md``). Steps:

1. preference pairs from the toy world: multi-token graded answers, each with the *exact*
   population preference α and K sampled annotator votes (the model is only the scorer, so the
   same pairs serve ``--model gpt2``);
2. the reference model's ranking accuracy R (summed log-probs, ≥) and R̃ (per-token means), and
   the idealized ranking accuracy R* of Corollary 3.3 over the β grid, from the exact α and from
   α estimated from the sampled votes (ties excluded);
3. DPO from the reference on the same pairs, tracking R every few steps and the per-pair flips
   (incorrect→correct, correct→incorrect);
4. the final per-pair DPO loss against c = log π_ref(y_l) − log π_ref(y_w) with Theorem 4.1's
   threshold curve softplus(−βc): a pair is ranked correctly iff its loss is under the curve.

"after_dpo.idealized" repeats the reference's values: R* depends only on π_ref, α and β (it is
what a perfect optimizer would reach from this reference), so it is the yardstick for both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from preflens import plotting
from preflens.models import load_model
from preflens.probes.ranking import (
    alphas_from_votes,
    dpo_loss_value,
    flip_buckets,
    flip_loss_threshold,
    idealized_ranking_accuracy,
    ranking_correct,
)
from preflens.probes.trackers import RankingTracker
from preflens.reproduce.common import ProgressCallback, RecipeContext, format_table, toyworld_world
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


def _scores(lm, pairs):
    prompts = [p.prompt for p in pairs]
    s_w = response_logprobs(lm, prompts, [p.chosen for p in pairs], batch_size=64)
    s_l = response_logprobs(lm, prompts, [p.rejected for p in pairs], batch_size=64)
    return s_w, s_l


def _ranking_block(s_w, s_l, idealized: dict) -> dict:
    return {
        "ranking_accuracy": float(ranking_correct(s_w.logp, s_l.logp).double().mean()),
        "ranking_accuracy_mean": float(ranking_correct(s_w.mean_logp, s_l.mean_logp).double().mean()),
        "idealized": idealized,
    }


def run(ctx: RecipeContext, cfg: Config) -> dict:
    from preflens.data.toyworld.prefs import multi_token_pairs
    from preflens.dynamics.train import train_preference

    world = toyworld_world()
    pairs = multi_token_pairs(world, cfg.n_pairs, votes=cfg.votes, seed=cfg.data_seed)
    lm = load_model(ctx.model, device=ctx.device)

    # -- 2. the reference model --------------------------------------------------------------
    s_w, s_l = _scores(lm, pairs)
    delta_ref = (s_w.logp - s_l.logp).double()          # Δ_ref = log π_ref(y_w) − log π_ref(y_l)
    delta_ref_mean = (s_w.mean_logp - s_l.mean_logp).double()
    alpha_exact = torch.tensor([p.alpha for p in pairs], dtype=torch.float64)
    alpha_votes = alphas_from_votes([p.votes for p in pairs]).double()
    ideal_exact = idealized_ranking_accuracy(delta_ref, alpha_exact, cfg.betas)
    ideal_votes = idealized_ranking_accuracy(delta_ref, alpha_votes, cfg.betas)
    ideal_exact_mean = idealized_ranking_accuracy(delta_ref_mean, alpha_exact, cfg.betas)
    idealized = {**_public(ideal_exact), "from_votes": _public(ideal_votes),
                 "length_normalized": _public(ideal_exact_mean)}
    reference = _ranking_block(s_w, s_l, idealized)
    correct_ref = ranking_correct(s_w.logp, s_l.logp)

    # -- 3. DPO, tracking ranking accuracy and flips -----------------------------------------
    tracker = RankingTracker(lm, pairs, every=cfg.track_every)
    tracker.record(lm.model, 0)
    result = train_preference(
        lm, pairs, loss="dpo", loss_kwargs={"beta": cfg.dpo_beta}, optimizer=cfg.optimizer,
        lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
        callbacks=[tracker, ProgressCallback("DPO (tracking ranking accuracy)")],
        out_dir=ctx.cache_dir / "dpo_run", resume=False,
    )
    a_w, a_l = _scores(lm, pairs)
    correct_now = ranking_correct(a_w.logp, a_l.logp)
    after = _ranking_block(a_w, a_l, idealized)
    flips = flip_buckets(correct_ref, correct_now)

    # -- 4. final DPO loss vs c with the Theorem 4.1 threshold -------------------------------
    c = -delta_ref                                          # c > 0 ⇔ the reference mis-ranks
    m = (a_w.logp - a_l.logp).double()
    loss_final = dpo_loss_value(m, c, cfg.dpo_beta)
    threshold = flip_loss_threshold(c, cfg.dpo_beta)
    theorem_agrees = float(((loss_final <= threshold) == correct_now).double().mean())

    results = {
        "model": ctx.model,
        "config": asdict(cfg),
        "n_pairs": len(pairs),
        "reference": reference,
        "after_dpo": after,
        "fraction_flipped_to_correct": flips["fraction_flipped_to_correct"],
        "fraction_flipped_to_incorrect": flips["fraction_flipped_to_incorrect"],
        "fraction_incorrect_at_start": flips["fraction_incorrect_at_start"],
        "fraction_flipped_to_correct_of_incorrect": _finite(flips["fraction_flipped_to_correct_of_incorrect"]),
        "flip_buckets": flips["fractions"],
        "trajectory": [{"step": h["step"], "ranking_accuracy": h["accuracy"],
                        "ranking_accuracy_mean": h["accuracy_mean"]} for h in tracker.history],
        "final_loss": result.final_metrics.get("loss"),
        "theorem_4_1_agreement": theorem_agrees,
        "mean_alpha": float(alpha_exact.mean()),
    }
    _figures(ctx, cfg, results, c, loss_final, correct_now, correct_ref)
    ctx.write_results(results)
    return results


def _public(d: dict) -> dict:
    return {"min": d["min"], "median": d["median"], "max": d["max"],
            "per_beta": {str(k): v for k, v in d["per_beta"].items()}}


def _finite(x):
    x = float(x)
    return x if np.isfinite(x) else None


def _figures(ctx, cfg, results, c, loss_final, correct_now, correct_ref) -> None:
    traj = results["trajectory"]
    fig = plotting.line_panels(
        {"ranking accuracy during DPO": {
            "R (summed)": [t["ranking_accuracy"] for t in traj],
            "R̃ (mean)": [t["ranking_accuracy_mean"] for t in traj],
            "idealized R* (median β)": [results["reference"]["idealized"]["median"]] * len(traj),
        }},
        x={"ranking accuracy during DPO": [t["step"] for t in traj]}, xlabel="DPO step",
    )
    plotting.save_figure(fig, ctx.figure("ranking_accuracy_during_dpo"))
    groups = ["reference", "after DPO"]
    ideal = results["reference"]["idealized"]
    fig = plotting.grouped_bars(
        groups,
        {"R": [results["reference"]["ranking_accuracy"], results["after_dpo"]["ranking_accuracy"]],
         "R̃": [results["reference"]["ranking_accuracy_mean"], results["after_dpo"]["ranking_accuracy_mean"]],
         "R* min": [ideal["min"]] * 2, "R* median": [ideal["median"]] * 2, "R* max": [ideal["max"]] * 2},
        ylabel="accuracy", title="observed vs idealized ranking accuracy (exact α)",
    )
    plotting.save_figure(fig, ctx.figure("observed_vs_idealized"))
    cs = np.linspace(float(c.min()), float(c.max()), 200)
    curve = flip_loss_threshold(torch.tensor(cs), cfg.dpo_beta).numpy()
    cats = np.where(correct_ref.numpy(), np.where(correct_now.numpy(), "c→c", "c→i"),
                    np.where(correct_now.numpy(), "i→c", "i→i"))
    fig = plotting.scatter_with_curve(
        c.numpy(), loss_final.numpy(), curve=(cs, curve), colors=cats,
        xlabel="c = log π_ref(y_l) − log π_ref(y_w)", ylabel="final DPO loss",
        title="Theorem 4.1: ranked correctly ⇔ loss ≤ softplus(−βc)", curve_label="softplus(−βc)",
    )
    plotting.save_figure(fig, ctx.figure("dpo_loss_vs_c"))


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

