"""Recipe: likelihood displacement and the CHES score.

Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in DPO". Steps:

1. **Single-token runs** (paper §3): for a *similar* pair (y⁺ = " No", y⁻ = " Never") and a
   *dissimilar* pair (y⁺ = " Yes", y⁻ = " No"), several seeds, each on one random yes/no prompt
   of the toy world: DPO (β = 0.1, RMSprop, batch 1, full-batch updates, fp32). The responses
   are single tokens scored at the last prompt position without EOS, as in the paper. Recorded
   every step: π(y⁺), π(y⁻), the loss, the full next-token distribution. Per run: the
   peak-to-trough drop of π(y⁺), whether the loss fell monotonically (the paper's run filter),
   the tokens that gained most (log-prob), and overlap@10 between those gainers and the top-10
   tokens by ⟨W_z, W⁺ − W⁻⟩ (Theorem 5) at initialization. With them, the unembedding geometry
   of each pair (Table 13: the projection of W⁺ − W⁻ on W⁺ and the norm of its orthogonal part),
   which says whether DPO's push can move mass to other tokens.
2. **CHES quantiles** (paper §5): CHES of every multi-token pair under the model to be trained;
   DPO from the same initial model on each quantile window (q = 0 … 1); Δ⁺ = change of the
   subset's mean log π(y⁺) (summed, EOS included) in nats, per DPO seed and averaged. The same
   for the two baselines (negated token edit distance, last-hidden inner product).

The results JSON keeps every value the figures draw: each single-token run's trajectory and
each quantile's Δ⁺ per seed.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from preflens import plotting
from preflens.data import PreferencePair
from preflens.data.toyworld.prefs import YESNO_PROMPT, multi_token_pairs
from preflens.dynamics.train import train_preference
from preflens.errors import ConfigError
from preflens.probes.ches import (
    ches_for_pairs,
    edit_similarity_for_pairs,
    last_hidden_for_pairs,
    quantile_subset,
)
from preflens.probes.displacement import (
    DisplacementTracker,
    overlap_at_k,
    peak_to_trough_drop,
    top_gaining_tokens,
    unembedding_alignment_from_lm,
    unembedding_geometry,
)
from preflens.reproduce.common import RecipeContext, format_table, reads, toyworld_world
from preflens.scoring import response_logprobs
from preflens.stats import spearman

PAPER = "likelihood_displacement"
PAIR_TYPES = {"similar (No vs Never)": (" No", " Never"), "dissimilar (Yes vs No)": (" Yes", " No")}
MEASURES = ("ches", "edit_similarity", "last_hidden_inner_product")


@dataclass(frozen=True)
class Config:
    seeds: tuple = (9773, 5290, 8767, 9818, 7596, 344, 2701, 3298, 7834, 6327)  # the paper's ten
    single_steps: int = 100
    single_lr: float = 3e-5     # the paper's 1e-7 is for 1B+ models; toyworld needs larger steps
    beta: float = 0.1
    n_multi: int = 2000
    subset: int = 200
    quantiles: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    multi_lr: float = 3e-5
    multi_epochs: int = 2
    multi_batch: int = 16
    train_seeds: tuple = (0, 1, 2)  # DPO runs per subset, averaged
    data_seed: int = 548        # the paper's UltraFeedback sampling seed

    @classmethod
    def quick(cls) -> Config:
        return cls(seeds=(9773, 5290, 8767), single_steps=40, n_multi=240, subset=48,
                   multi_epochs=1, quantiles=(0.0, 0.5, 1.0), train_seeds=(0,))


# -- step 1: single-token runs ----------------------------------------------------------------
def single_token_pair(world, chosen: str, rejected: str, seed: int) -> PreferencePair:
    """The yes/no prompt of one run (paper: one random prompt per run) whose correct answer is
    ``chosen``, as a ``PreferencePair`` ``(prompt, chosen, rejected)``."""
    rng = random.Random(seed)
    i = rng.randrange(len(world.countries))
    if chosen.strip() == "Yes":
        city = world.capitals[i]
    else:
        city = world.capitals[(i + rng.randrange(1, len(world.countries))) % len(world.countries)]
    return PreferencePair(YESNO_PROMPT.format(country=world.countries[i], city=city),
                          chosen, rejected, id=f"seed-{seed}")


def _single_token_ids(lm, pair, model: str) -> tuple[int, int]:
    tok = lm.tokenizer
    pos = tok(pair.chosen, add_special_tokens=False)["input_ids"]
    neg = tok(pair.rejected, add_special_tokens=False)["input_ids"]
    if len(pos) != 1 or len(neg) != 1:
        raise ConfigError("model", f"{pair.chosen!r} and {pair.rejected!r} must each be one token "
                          f"for the single-token experiment; the tokenizer of {model} splits them")
    return pos[0], neg[0]


@reads("single_steps", "single_lr", "beta")
def single_token_run(ctx: RecipeContext, c, name: str, seed: int) -> dict:
    """DPO on one single-token pair; π(y±) and the loss every step; where the mass went."""
    pair = single_token_pair(toyworld_world(), *PAIR_TYPES[name], seed)
    lm = ctx.fresh_lm()
    pos, neg = _single_token_ids(lm, pair, ctx.model)
    alignment = unembedding_alignment_from_lm(lm, pos, neg)
    tracker = DisplacementTracker(lm, [pair], every=1)
    tracker.record(lm.model, 0)
    run = train_preference(
        lm, [pair], loss="dpo", loss_kwargs={"beta": c.beta}, optimizer="rmsprop",
        lr=c.single_lr, steps=c.single_steps, batch_size=1, seed=seed, add_eos=False,
        callbacks=[tracker], out_dir=None,  # a throwaway run: writes nothing
    )
    losses = [m["loss"] for m in run.history]
    p_pos, p_neg = tracker.prob_trajectory(0, "chosen"), tracker.prob_trajectory(0, "rejected")
    start = tracker.history[0]["next_token_logprobs"][0]
    end = tracker.history[-1]["next_token_logprobs"][0]
    ids, deltas = top_gaining_tokens(start, end, k=10, log_space=True)["by_logprob"]
    return {
        "pair": name, "seed": seed, "prompt": pair.prompt,
        "max_drop": peak_to_trough_drop(p_pos),
        "loss_monotone": bool(all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))),
        "p_chosen_start": p_pos[0], "p_chosen_end": p_pos[-1],
        "p_rejected_start": p_neg[0], "p_rejected_end": p_neg[-1],
        "top_gaining": [{"token": lm.tokenizer.decode([int(i)]), "delta_logp": float(d)}
                        for i, d in zip(ids[:5], deltas[:5])],
        "overlap_at_10": int(overlap_at_k(alignment, (end - start).double(), k=10, exclude=(pos, neg))),
        "trajectory": {"p_chosen": p_pos, "p_rejected": p_neg, "loss": losses},
    }


@reads()
def pair_geometry(ctx: RecipeContext, c) -> dict:
    """Table-13 unembedding geometry of each single-token pair under the model before DPO."""
    lm = ctx.shared_lm()
    W_U = lm.model.get_output_embeddings().weight.T
    out = {}
    for name, (chosen, rejected) in PAIR_TYPES.items():
        pos, neg = _single_token_ids(lm, PreferencePair("Q:", chosen, rejected), ctx.model)
        out[name] = unembedding_geometry(W_U, pos, neg)
    return out


# -- step 2: CHES and baselines on quantile windows -------------------------------------------
def _multi_pairs(ctx: RecipeContext, c) -> list:
    make = functools.partial(multi_token_pairs, toyworld_world(), c.n_multi, seed=c.data_seed)
    return ctx.memo(f"multi-{c.n_multi}-{c.data_seed}", make)


@reads("n_multi", "data_seed")
def similarity_scores(ctx: RecipeContext, c) -> dict:
    """CHES and the two baselines of every multi-token pair under the initial model (fp64)."""
    pairs, lm = _multi_pairs(ctx, c), ctx.shared_lm()
    return {"ches": ches_for_pairs(lm, pairs).tolist(),
            "edit_similarity": edit_similarity_for_pairs(lm.tokenizer, pairs).double().tolist(),
            "last_hidden_inner_product": last_hidden_for_pairs(lm, pairs).double().tolist()}


@reads("n_multi", "data_seed", "beta", "multi_lr", "multi_epochs", "multi_batch", "train_seeds")
def quantile_dpo(ctx: RecipeContext, c, idx: list) -> dict:
    """Δ⁺ (nats) per DPO seed on ``pairs[idx]``: mean log π_θ(y⁺) − mean log π_ref(y⁺) over the
    subset (summed log-probs, EOS included); seeds differ in batch order."""
    subset = [_multi_pairs(ctx, c)[i] for i in idx]
    prompts, chosen = [p.prompt for p in subset], [p.chosen for p in subset]
    deltas = []
    for seed in c.train_seeds:
        lm = ctx.fresh_lm()
        before = response_logprobs(lm, prompts, chosen).logp
        train_preference(
            lm, subset, loss="dpo", loss_kwargs={"beta": c.beta}, optimizer="rmsprop",
            lr=c.multi_lr, epochs=c.multi_epochs, batch_size=c.multi_batch, seed=seed,
            out_dir=None,
        )
        deltas.append(float(response_logprobs(lm, prompts, chosen).logp.mean() - before.mean()))
    return {"delta_per_seed": deltas}


def _quantile_rows(ctx: RecipeContext, cfg: Config, measure: str, scores: list) -> list[dict]:
    scores = torch.tensor(scores, dtype=torch.float64)
    rows = []
    for q in tqdm(cfg.quantiles, desc=f"DPO on {measure} quantiles"):
        idx = quantile_subset(scores, q, cfg.subset).tolist()
        deltas = ctx.step(f"quantile-{measure}-{q}", quantile_dpo, cfg, idx)["delta_per_seed"]
        rows.append({"q": q, "mean_score": float(scores[idx].mean()),
                     "mean_delta_logp_chosen": sum(deltas) / len(deltas), "delta_per_seed": deltas})
    return rows


# -- run --------------------------------------------------------------------------------------
def run(ctx: RecipeContext, cfg: Config) -> dict:
    single = [ctx.step(f"single-{name.split()[0]}-{seed}", single_token_run, cfg, name, seed)
              for name in PAIR_TYPES for seed in tqdm(cfg.seeds, desc=f"single-token DPO, {name}")]
    geometry = ctx.step("unembedding-geometry", pair_geometry, cfg)
    scores = ctx.step("similarity-scores", similarity_scores, cfg)
    quantile_rows = {m: _quantile_rows(ctx, cfg, m, scores[m]) for m in MEASURES}
    results = _results(ctx, cfg, single, quantile_rows)
    results["unembedding_geometry"] = geometry
    ctx.write_results(results)
    return results


def _spearman(x, y) -> float:
    """preflens.stats.spearman, 0.0 (not NaN: results JSON must be finite) for a constant side."""
    rho = spearman(x, y)
    return 0.0 if math.isnan(rho) else rho


def _single_summary(runs: list[dict]) -> dict:
    kept = [r for r in runs if r["loss_monotone"]]  # the paper's run filter
    return {
        "runs": len(runs), "runs_loss_monotone": len(kept),
        "mean_max_drop_monotone": float(np.mean([r["max_drop"] for r in kept])) if kept else 0.0,
        "runs_with_drop_over_0.1_monotone": sum(r["max_drop"] > 0.1 for r in kept),
        "mean_p_chosen_start": float(np.mean([r["p_chosen_start"] for r in runs])),
        "mean_p_chosen_end": float(np.mean([r["p_chosen_end"] for r in runs])),
        "mean_overlap_at_10": float(np.mean([r["overlap_at_10"] for r in runs])),
    }


def _results(ctx: RecipeContext, cfg: Config, single: list, quantile_rows: dict) -> dict:
    rho = {m: _spearman([r["mean_score"] for r in rows], [r["mean_delta_logp_chosen"] for r in rows])
           for m, rows in quantile_rows.items()}
    ches_quantiles = [{"q": r["q"], "mean_ches": r["mean_score"],
                       "mean_delta_logp_chosen": r["mean_delta_logp_chosen"],
                       "delta_per_seed": r["delta_per_seed"]} for r in quantile_rows["ches"]]
    return {
        **ctx.header(cfg),
        "single_token": single,
        "single_token_summary": {n: _single_summary([r for r in single if r["pair"] == n]) for n in PAIR_TYPES},
        "ches_quantiles": ches_quantiles,
        "spearman_ches_vs_delta": rho["ches"],
        "baseline_quantiles": {m: quantile_rows[m] for m in MEASURES if m != "ches"},
        "spearman_baselines_vs_delta": {m: rho[m] for m in MEASURES if m != "ches"},
    }


# -- render (from the results JSON only) ------------------------------------------------------
def render(results: dict, ctx: RecipeContext) -> list:
    """Every figure of this recipe, drawn from ``results`` alone (no model, no training)."""
    paths = [_render_single_token(results, ctx, name) for name in PAIR_TYPES]
    return [*paths, _render_ches_quantiles(results, ctx)]


def _render_single_token(results: dict, ctx: RecipeContext, name: str):
    runs = [r for r in results["single_token"] if r["pair"] == name]
    panels = {
        "π(y⁺)": {f"seed {r['seed']}": r["trajectory"]["p_chosen"] for r in runs},
        "π(y⁻)": {f"seed {r['seed']}": r["trajectory"]["p_rejected"] for r in runs},
        "DPO loss": {f"seed {r['seed']}": r["trajectory"]["loss"] for r in runs},
    }
    ylabels = {"π(y⁺)": "probability of y⁺", "π(y⁻)": "probability of y⁻", "DPO loss": "loss"}
    fig = plotting.line_panels(panels, title=f"single-token DPO, {name}", xlabel="DPO step",
                               ylabels=ylabels, legend="outside")
    return ctx.save_figure(fig, f"single_token_{name.split()[0]}", results)


def _render_ches_quantiles(results: dict, ctx: RecipeContext):
    rows = {"ches": results["ches_quantiles"], **results["baseline_quantiles"]}
    means = {m: [r["mean_delta_logp_chosen"] for r in rs] for m, rs in rows.items()}
    spread = {m: ([min(r["delta_per_seed"]) for r in rs], [max(r["delta_per_seed"]) for r in rs])
              for m, rs in rows.items()}
    n_seeds = len(results["ches_quantiles"][0]["delta_per_seed"])
    seeds = (f"bars: mean over {n_seeds} DPO seeds (batch orders); error bars: min to max"
             if n_seeds > 1 else "one DPO seed: no error bars")
    fig = plotting.grouped_bars(
        [str(r["q"]) for r in results["ches_quantiles"]], means, errors=spread if n_seeds > 1 else None,
        ylabel="Δ mean log π(y⁺) (nats)", xlabel="quantile of the similarity measure",
        title=f"DPO on quantile subsets: CHES vs baselines\n({seeds})", legend="outside",
    )
    return ctx.save_figure(fig, "ches_quantiles", results)


def summary(results: dict) -> str:
    rows = [[r["pair"], r["seed"], r["max_drop"], r["loss_monotone"], r["overlap_at_10"],
             ", ".join(t["token"].strip() or repr(t["token"]) for t in r["top_gaining"][:3])]
            for r in results["single_token"]]
    t1 = format_table(rows, ["pair", "seed", "max drop π(y⁺)", "loss monotone", "overlap@10", "top gainers"])
    rows = [[n, s["runs_loss_monotone"], s["mean_max_drop_monotone"], s["runs_with_drop_over_0.1_monotone"],
             s["mean_p_chosen_start"], s["mean_p_chosen_end"], s["mean_overlap_at_10"]]
            for n, s in results["single_token_summary"].items()]
    t1 += "\n\n" + format_table(rows, ["pair", "monotone runs", "mean drop", "drops > 0.1",
                                       "π(y⁺) start", "π(y⁺) end", "overlap@10"])
    if "unembedding_geometry" in results:
        rows = [[n, g["signed_projection"], g["orthogonal_norm"], g["norm_pos"], g["norm_neg"]]
                for n, g in results["unembedding_geometry"].items()]
        t1 += "\n\n" + format_table(rows, ["pair", "W⁺−W⁻ on W⁺", "⊥ part", "‖W⁺‖", "‖W⁻‖"])
    rows = [[r["q"], r["mean_ches"], r["mean_delta_logp_chosen"]] for r in results["ches_quantiles"]]
    t2 = format_table(rows, ["CHES quantile", "mean CHES", "Δ mean log π(y⁺)"])
    return f"{t1}\n\n{t2}\nSpearman(quantile, Δ⁺): CHES {results['spearman_ches_vs_delta']:.2f}; " + ", ".join(
        f"{m} {v:.2f}" for m, v in results["spearman_baselines_vs_delta"].items())
