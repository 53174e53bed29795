"""Recipe: ranking accuracy vs idealized ranking accuracy, and how rarely DPO flips a ranking.

Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference Rankings". Two
reference arms are measured side by side on the same evaluation pairs:

* **base**: the shipped model as π_ref;
* **miscalibrated**: the shipped model after a short, seeded SFT on skewed data -- from
  toyworld pairs drawn with their own seed (``skew_seed``, not the evaluation pairs) it emits
  the *dispreferred* response with probability ``skew_q`` and the preferred one otherwise
  (:func:`skewed_examples`; response-only loss, :func:`preflens.dynamics.sft.sft`). The paper's
  references are SFT models whose likelihoods need not follow the raters, which is what opens
  its gap between idealized and observed ranking accuracy; this arm builds such a reference.

Steps (each ``@reads``-keyed; the arms share the DPO settings):

1. pairs from the toy world: multi-token graded answers, each with the *exact* population
   preference α and K sampled annotator votes (the model is only the scorer, so the same pairs
   serve ``--model gpt2``);
2. ``reference`` / ``miscalibrated_reference``: the arm's π_ref log-probs (summed and per-token
   mean) of every response; from them R (summed, ≥), R̃ (per-token means) and the idealized R*
   of Corollary 3.3 over the β grid, from the exact α, from the votes' α, and length-normalized;
3. ``dpo`` / ``miscalibrated_dpo``: DPO from that arm's π_ref *with that π_ref as reference*,
   R tracked every few steps, then the per-pair log-probs: the flips, and the final per-pair
   DPO loss against c = log π_ref(y_l) − log π_ref(y_w) with Theorem 4.1's threshold
   softplus(−βc) (a pair is ranked correctly iff its loss is under the curve);
   ``miscalibrated_spread`` rebuilds the miscalibrated reference with other SFT seeds
   (``skew_spread_seeds``) and reports R, R* median and their gap per seed: how much of the
   arm's gap is the seed;
4. ``frontier``: DPO from the base reference over a grid of (β, learning rate), each run recorded
   after ``frontier_epochs`` epochs: per setting the mean DPO loss over all pairs (and its drop
   below ln 2, the loss at π_θ = π_ref), the share of initially mis-ranked pairs flipped to
   correct, of correct ones flipped to incorrect, and R after (:func:`flip_frontier_point`).

What the frontier shows. By Theorem 4.1 a mis-ranked pair (c > 0) ends correct iff its loss
falls to softplus(−βc) from ln 2, a drop of ln 2 − softplus(−βc) ≈ βc/2 for small βc. With a
small β every mis-ranked pair is within a hair of its threshold, so any run that lowers the
mean loss at all flips them; a larger β moves the thresholds down (the needed drop grows with
βc) while the mean loss, dominated by the pairs π_ref already ranks correctly, falls faster
(β scales every margin). So "DPO lowers the loss yet rarely flips rankings" (the paper's
finding) holds exactly where ln 2 − softplus(−βc) of the mis-ranked pairs is large compared
with the mean loss drop: large βc. The figure places every setting by (loss drop, flip share)
against the acceptance region (``min_loss_drop``, ``max_flip_share``; the base R* median must
reach ``min_idealized_median``).

R* depends only on π_ref, α and β (it is what a perfect optimizer would reach from that
reference), so each arm's ``after_dpo.idealized`` repeats its reference's. The results JSON
keeps every per-pair value the figures draw (``per_pair``). The base arm's keys are the
results' top level (as before); the miscalibrated arm has the same keys under
``miscalibrated``; the grid is ``frontier``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from preflens.data.toyworld.prefs import multi_token_pairs
from preflens.dynamics.sft import sft
from preflens.dynamics.train import train_preference
from preflens.errors import ConfigError
from preflens.probes.ranking import (
    alphas_from_votes,
    dpo_loss_value,
    flip_buckets,
    flip_frontier_point,
    flip_loss_threshold,
    idealized_ranking_accuracy,
    ranking_correct,
)
from preflens.probes.trackers import RankingTracker
from preflens.reproduce.common import ProgressCallback, RecipeContext, config_hash, reads, toyworld_world
from preflens.reproduce.ranking_accuracy_render import render, summary  # noqa: F401  (drawn from the JSON alone)
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
    # the miscalibrated reference: SFT of the base model on skewed examples
    skew_q: float = 0.85         # probability of emitting the dispreferred (rejected) response
    skew_pairs: int = 1000       # pairs the SFT examples come from (drawn with skew_seed)
    skew_seed: int = 1           # pairs, emission and SFT order; not the evaluation data_seed
    sft_steps: int = 30
    sft_lr: float = 3e-4
    sft_batch_size: int = 32
    sft_optimizer: str = "adamw"
    skew_spread_seeds: tuple = (2, 3, 4, 5)  # the miscalibrated reference again with these seeds: R, R* spread
    # the flip frontier: DPO from the base reference, one run per (beta, lr), recorded after
    # each of frontier_epochs (a constant-lr run's first k epochs are a k-epoch run)
    frontier_betas: tuple = (0.1, 1.0, 5.0)
    frontier_lrs: tuple = (1e-6, 3e-6, 1e-5, 3e-5)
    frontier_epochs: tuple = (1, 2)
    # the frontier's acceptance region (issue 18): flips of mis-ranked pairs <= max_flip_share
    # where the mean loss is >= min_loss_drop below ln 2 and the base R* median >= min_idealized_median
    max_flip_share: float = 0.30
    min_loss_drop: float = 0.05
    min_idealized_median: float = 0.85

    def __post_init__(self) -> None:
        if not 0.0 <= self.skew_q <= 1.0:
            raise ConfigError("skew_q", f"must lie in [0, 1], got {self.skew_q!r}")
        for name in ("frontier_betas", "frontier_lrs", "frontier_epochs"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                 for v in values):
                raise ConfigError(name, f"must be a non-empty list of positive numbers, got {values!r}")
        if any(not isinstance(e, int) for e in self.frontier_epochs):
            raise ConfigError("frontier_epochs", f"must be whole epochs, got {self.frontier_epochs!r}")

    @classmethod
    def quick(cls) -> Config:
        return cls(n_pairs=128, epochs=2, batch_size=16, track_every=4, skew_pairs=64, sft_steps=4,
                   sft_batch_size=16, skew_spread_seeds=(2,), frontier_betas=(1.0,), frontier_lrs=(3e-6,),
                   frontier_epochs=(1,))


DATA = ("n_pairs", "votes", "data_seed")
DPO = ("dpo_beta", "optimizer", "lr", "epochs", "batch_size", "track_every", "seed")
SFT = ("votes", "skew_q", "skew_pairs", "sft_steps", "sft_lr", "sft_batch_size", "sft_optimizer")
SKEW = (*SFT, "skew_seed")


# -- data -------------------------------------------------------------------------------------
def _pairs(ctx: RecipeContext, c):
    make = functools.partial(multi_token_pairs, toyworld_world(), c.n_pairs, votes=c.votes, seed=c.data_seed)
    return ctx.memo(f"pairs-{c.n_pairs}-{c.votes}-{c.data_seed}", make)


def skewed_examples(pairs, q: float, *, seed: int) -> list[tuple[str, str]]:
    """One SFT example per pair: (prompt, rejected) with probability ``q``, else (prompt, chosen).

    The draws are ``torch.rand(n, generator=Generator().manual_seed(seed)) < q``: reproducible,
    independent of the RNG that drew the pairs; q = 1 emits every dispreferred response, q = 0
    every preferred one, q = 0.5 is an unskewed SFT on a random response of each pair.
    """
    emit_rejected = torch.rand(len(pairs), generator=torch.Generator().manual_seed(seed)) < q
    return [(p.prompt, p.rejected if bad else p.chosen) for p, bad in zip(pairs, emit_rejected.tolist())]


def _score_lists(lm, pairs) -> dict:
    """Summed (fp64, EOS included) and per-token-mean log-probs of both responses, as lists."""
    prompts = [p.prompt for p in pairs]
    s_w = response_logprobs(lm, prompts, [p.chosen for p in pairs], batch_size=64)
    s_l = response_logprobs(lm, prompts, [p.rejected for p in pairs], batch_size=64)
    return {"logp_chosen": s_w.logp.tolist(), "logp_rejected": s_l.logp.tolist(),
            "mean_logp_chosen": s_w.mean_logp.tolist(), "mean_logp_rejected": s_l.mean_logp.tolist()}


def _skewed_sft(ctx: RecipeContext, c, seed: int):
    """A fresh copy of the model after the skewed SFT of ``seed`` (its SFT pairs, emissions and
    order), and the SFT record."""
    lm = ctx.fresh_lm()
    sft_pairs = multi_token_pairs(toyworld_world(), c.skew_pairs, votes=c.votes, seed=seed)
    examples = skewed_examples(sft_pairs, c.skew_q, seed=seed)
    fit = sft(lm, examples, steps=c.sft_steps, lr=c.sft_lr, batch_size=c.sft_batch_size, seed=seed,
              optimizer=c.sft_optimizer)
    rejected = sum(ex[1] == p.rejected for ex, p in zip(examples, sft_pairs))
    return lm, {"losses": fit.losses, "tokens": fit.tokens, "n_examples": len(examples),
                "rejected_share": rejected / len(examples)}


def _miscalibrated_lm(ctx: RecipeContext, c):
    """The miscalibrated reference (:func:`_skewed_sft` of ``skew_seed``), built once per context
    and shared by the steps that need it (never trained further)."""
    key = "miscalibrated-" + config_hash({f: getattr(c, f) for f in SKEW})
    return ctx.memo(key, functools.partial(_skewed_sft, ctx, c, c.skew_seed))


# -- steps ------------------------------------------------------------------------------------
@reads(*DATA)
def reference(ctx: RecipeContext, c) -> dict:
    """The shipped reference's log-probs of every pair's responses."""
    return _score_lists(ctx.shared_lm(), _pairs(ctx, c))


@reads(*DATA, *SKEW)
def miscalibrated_reference(ctx: RecipeContext, c) -> dict:
    """The miscalibrated reference's log-probs of every pair's responses, and its SFT record."""
    lm, fit = _miscalibrated_lm(ctx, c)
    return {**_score_lists(lm, _pairs(ctx, c)), "sft": fit}


@reads(*DATA, *SFT, "skew_spread_seeds")
def miscalibrated_spread(ctx: RecipeContext, c) -> dict:
    """The miscalibrated reference rebuilt with each of ``skew_spread_seeds`` (other SFT pairs,
    emissions and order): its Δ_ref per pair, so the results can show how much R and R* move
    with the seed alone."""
    pairs, out = _pairs(ctx, c), {}
    for seed in c.skew_spread_seeds:
        s = _score_lists(_skewed_sft(ctx, c, seed)[0], pairs)
        out[str(seed)] = (np.asarray(s["logp_chosen"]) - np.asarray(s["logp_rejected"])).tolist()
    return out


def _dpo_from(lm, pairs, c, desc: str) -> dict:
    """DPO of ``lm`` (trained in place; it is also the reference); R every ``track_every``
    steps; the log-probs after training."""
    tracker = RankingTracker(lm, pairs, every=c.track_every)
    tracker.record(lm.model, 0)
    run = train_preference(
        lm, pairs, loss="dpo", loss_kwargs={"beta": c.dpo_beta}, optimizer=c.optimizer,
        lr=c.lr, epochs=c.epochs, batch_size=c.batch_size, seed=c.seed,
        callbacks=[tracker, ProgressCallback(desc)],
        out_dir=None,  # a throwaway run: writes nothing
    )
    trajectory = [{"step": h["step"], "ranking_accuracy": h["accuracy"],
                   "ranking_accuracy_mean": h["accuracy_mean"]} for h in tracker.history]
    return {"trajectory": trajectory, "final_loss": run.final_metrics.get("loss"),
            "after": _score_lists(lm, pairs)}


@reads(*DATA, *DPO)
def dpo(ctx: RecipeContext, c) -> dict:
    """DPO from the shipped reference."""
    return _dpo_from(ctx.fresh_lm(), _pairs(ctx, c), c, "DPO, base reference (tracking R)")


@reads(*DATA, *SKEW, *DPO)
def miscalibrated_dpo(ctx: RecipeContext, c) -> dict:
    """DPO from the miscalibrated reference, which is also its reference model."""
    lm, _ = _miscalibrated_lm(ctx, c)
    policy = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    return _dpo_from(policy, _pairs(ctx, c), c, "DPO, miscalibrated reference (tracking R)")


class _EpochMargins:
    """Training callback: the margins log π(y_w) − log π(y_l) of every pair after the listed epochs."""

    name = "epoch_margins"

    def __init__(self, lm, pairs, epochs) -> None:
        self.lm, self.pairs, self.epochs, self.records = lm, pairs, sorted(set(epochs)), []

    def on_step(self, state) -> None:
        per_epoch = state.total_steps // self.epochs[-1]
        if state.step % per_epoch == 0 and state.step // per_epoch in self.epochs:
            s = _score_lists(dataclasses.replace(self.lm, model=state.model), self.pairs)
            margin = np.asarray(s["logp_chosen"]) - np.asarray(s["logp_rejected"])
            self.records.append({"epochs": state.step // per_epoch, "margin": margin.tolist()})


@reads(*DATA, "optimizer", "batch_size", "seed", "frontier_epochs")
def frontier_run(ctx: RecipeContext, c, beta: float, lr: float) -> dict:
    """One frontier setting: DPO (β, lr) from the shipped reference, margins after each recorded epoch."""
    pairs, lm = _pairs(ctx, c), ctx.fresh_lm()
    recorder = _EpochMargins(lm, pairs, c.frontier_epochs)
    train_preference(lm, pairs, loss="dpo", loss_kwargs={"beta": beta}, optimizer=c.optimizer, lr=lr,
                     epochs=max(c.frontier_epochs), batch_size=c.batch_size, seed=c.seed, out_dir=None,
                     callbacks=[recorder, ProgressCallback(f"DPO frontier β={beta:g} lr={lr:g}")])
    return {"dpo_beta": beta, "lr": lr, "records": recorder.records}


# -- run --------------------------------------------------------------------------------------
def run(ctx: RecipeContext, cfg: Config) -> dict:
    ref = ctx.step("reference", reference, cfg)
    trained = ctx.step("dpo", dpo, cfg)
    mis_ref = ctx.step("miscalibrated_reference", miscalibrated_reference, cfg)
    mis_trained = ctx.step("miscalibrated_dpo", miscalibrated_dpo, cfg)
    spread = ctx.step("miscalibrated_spread", miscalibrated_spread, cfg)
    runs = [ctx.step("frontier", frontier_run, cfg, float(b), float(lr))
            for b in cfg.frontier_betas for lr in cfg.frontier_lrs]
    results = _results(ctx, cfg, ref, trained, mis_ref, mis_trained, spread, runs)
    ctx.write_results(results)
    return results


def _tensors(scores: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items() if k != "sft"}


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


def _arm(pairs, ref_lists: dict, trained: dict, cfg: Config) -> dict:
    """One reference arm: R, R̃, R* of π_ref and after DPO, flips, Theorem 4.1 per pair."""
    ref, after = _tensors(ref_lists), _tensors(trained["after"])
    idealized = _idealized(pairs, ref, cfg.betas)
    reference_block = _ranking_block(ref, idealized)
    correct_ref = ranking_correct(ref["logp_chosen"], ref["logp_rejected"])
    correct_now = ranking_correct(after["logp_chosen"], after["logp_rejected"])
    flips = flip_buckets(correct_ref, correct_now)
    # Theorem 4.1: the final DPO loss against c = log π_ref(y_l) − log π_ref(y_w) (c > 0 ⇔ mis-ranked).
    c = -(ref["logp_chosen"] - ref["logp_rejected"])
    loss_final = dpo_loss_value(after["logp_chosen"] - after["logp_rejected"], c, cfg.dpo_beta)
    threshold = flip_loss_threshold(c, cfg.dpo_beta)
    r, r_mean = reference_block["ranking_accuracy"], reference_block["ranking_accuracy_mean"]
    return {
        "reference": reference_block,
        "after_dpo": _ranking_block(after, idealized),
        "alignment_gap": {"exact": idealized["median"] - r, "from_votes": idealized["from_votes"]["median"] - r,
                          "length_normalized": idealized["length_normalized"]["median"] - r_mean},
        "fraction_flipped_to_correct": flips["fraction_flipped_to_correct"],
        "fraction_flipped_to_incorrect": flips["fraction_flipped_to_incorrect"],
        "fraction_incorrect_at_start": flips["fraction_incorrect_at_start"],
        "fraction_flipped_to_correct_of_incorrect": _finite(flips["fraction_flipped_to_correct_of_incorrect"]),
        "flip_buckets": flips["fractions"],
        "median_c_incorrect": _finite(c[~correct_ref].quantile(0.5)) if bool((~correct_ref).any()) else None,
        "trajectory": trained["trajectory"],
        "final_loss": trained["final_loss"],
        "mean_final_dpo_loss": float(loss_final.mean()),
        "theorem_4_1_agreement": float(((loss_final <= threshold) == correct_now).double().mean()),
        "per_pair": {"c": c.tolist(), "final_dpo_loss": loss_final.tolist(),
                     "correct_reference": correct_ref.tolist(), "correct_after_dpo": correct_now.tolist()},
    }


def _frontier(cfg: Config, ref_lists: dict, runs: list, idealized_median: float) -> dict:
    """Rows of (β, lr, epochs) with :func:`flip_frontier_point`'s numbers and the criterion."""
    ref = _tensors(ref_lists)
    c = -(ref["logp_chosen"] - ref["logp_rejected"])
    rows = []
    for run_ in runs:
        for rec in run_["records"]:
            point = {k: _finite(v) for k, v in flip_frontier_point(rec["margin"], c, run_["dpo_beta"]).items()}
            flips = point["flipped_to_correct_of_incorrect"]
            meets = (flips is not None and flips <= cfg.max_flip_share and point["loss_drop"] >= cfg.min_loss_drop
                     and idealized_median >= cfg.min_idealized_median)
            rows.append({"dpo_beta": run_["dpo_beta"], "optimizer": cfg.optimizer, "lr": run_["lr"],
                         "epochs": rec["epochs"], **point, "meets_criterion": bool(meets)})
    return {"criterion": {"max_flip_share": cfg.max_flip_share, "min_loss_drop": cfg.min_loss_drop,
                          "min_idealized_median": cfg.min_idealized_median},
            "idealized_median": idealized_median, "rows": rows,
            "n_meeting": sum(row["meets_criterion"] for row in rows)}


def _spread(pairs, cfg: Config, arm: dict, deltas: dict) -> dict:
    """R, the exact-α R* median and their gap of the miscalibrated reference per SFT seed (the
    recipe's own ``skew_seed`` first), with the gap's min / median / max over the seeds."""
    alpha = torch.tensor([p.alpha for p in pairs], dtype=torch.float64)
    rows = [{"skew_seed": cfg.skew_seed, "ranking_accuracy": arm["reference"]["ranking_accuracy"],
             "idealized_median": arm["reference"]["idealized"]["median"], "gap": arm["alignment_gap"]["exact"]}]
    for seed, delta in deltas.items():
        d = torch.tensor(delta, dtype=torch.float64)
        r, ideal = float(ranking_correct(d, torch.zeros_like(d)).double().mean()), idealized_ranking_accuracy(
            d, alpha, cfg.betas)["median"]
        rows.append({"skew_seed": int(seed), "ranking_accuracy": r, "idealized_median": ideal, "gap": ideal - r})
    gaps = [row["gap"] for row in rows]
    return {"rows": rows, "gap_min": min(gaps), "gap_median": statistics.median(gaps), "gap_max": max(gaps)}


def _results(ctx: RecipeContext, cfg: Config, ref: dict, trained: dict, mis_ref: dict, mis_trained: dict,
             spread: dict, runs: list) -> dict:
    pairs = _pairs(ctx, cfg)
    base = _arm(pairs, ref, trained, cfg)
    miscalibrated = {"sft": mis_ref["sft"], **_arm(pairs, mis_ref, mis_trained, cfg)}
    miscalibrated["seed_spread"] = _spread(pairs, cfg, miscalibrated, spread)
    return {
        **ctx.header(cfg),
        "n_pairs": len(pairs),
        **base,
        "mean_alpha": float(torch.tensor([p.alpha for p in pairs], dtype=torch.float64).mean()),
        "miscalibrated": miscalibrated,
        "frontier": _frontier(cfg, ref, runs, base["reference"]["idealized"]["median"]),
    }


def _public(d: dict) -> dict:
    return {"min": d["min"], "median": d["median"], "max": d["max"],
            "per_beta": {str(k): v for k, v in d["per_beta"].items()}}


def _finite(x):
    x = float(x)
    return x if math.isfinite(x) else None
