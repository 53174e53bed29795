"""Recipe: likelihood displacement and the CHES score.

Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in DPO" (spec:
``shared/research/likelihood_displacement.md``). Steps:

1. **Single-token runs** (paper §3): for a *similar* pair (y⁺ = " No", y⁻ = " Never") and a
   *dissimilar* pair (y⁺ = " Yes", y⁻ = " No"), several seeds, each on one random yes/no prompt
   of the toy world: DPO (β = 0.1, RMSprop, batch 1, full-batch updates, fp32). The responses
   are single tokens scored at the last prompt position without EOS, as in the paper. Recorded
   every step: π(y⁺), π(y⁻), the loss, the full next-token distribution. Per run: the
   peak-to-trough drop of π(y⁺), whether the loss fell monotonically (the paper's run filter),
   the tokens that gained most (log-prob), and overlap@10 between those gainers and the top-10
   tokens by ⟨W_z, W⁺ − W⁻⟩ (Theorem 5) at initialization.
2. **CHES quantiles** (paper §5): CHES of every multi-token pair under the model to be trained;
   DPO from the same initial model on each quantile window (q = 0 … 1); Δ⁺ = change of the
   subset's mean log π(y⁺) (summed, EOS included) in nats. The same for the two baselines
   (negated token edit distance, last-hidden inner product).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from preflens import plotting
from preflens.errors import ConfigError
from preflens.models import load_model
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
)
from preflens.reproduce.common import RecipeContext, format_table, toyworld_world
from preflens.scoring import response_logprobs

PAPER = "likelihood_displacement"
PAIR_TYPES = {"similar (No vs Never)": (" No", " Never"), "dissimilar (Yes vs No)": (" Yes", " No")}


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


def _single_token_prompts(world, chosen: str, rejected: str, seeds) -> list:
    """One yes/no prompt per seed whose correct answer is ``chosen`` (paper: one random prompt
    per run), as a ``PreferencePair`` ``(prompt, chosen, rejected)``."""
    from preflens.data import PreferencePair
    from preflens.data.toyworld.prefs import YESNO_PROMPT

    out = []
    for seed in seeds:
        rng = random.Random(seed)
        i = rng.randrange(len(world.countries))
        if chosen.strip() == "Yes":
            city = world.capitals[i]
        else:
            city = world.capitals[(i + rng.randrange(1, len(world.countries))) % len(world.countries)]
        out.append(PreferencePair(YESNO_PROMPT.format(country=world.countries[i], city=city),
                                  chosen, rejected, id=f"seed-{seed}"))
    return out


def _single_run(ctx, cfg, pair, seed: int, name: str) -> dict:
    from preflens.dynamics.train import train_preference

    lm = load_model(ctx.model, device=ctx.device)
    tok = lm.tokenizer
    pos = tok(pair.chosen, add_special_tokens=False)["input_ids"]
    neg = tok(pair.rejected, add_special_tokens=False)["input_ids"]
    if len(pos) != 1 or len(neg) != 1:
        raise ConfigError("model", f"{pair.chosen!r} and {pair.rejected!r} must each be one token "
                          f"for the single-token experiment; the tokenizer of {ctx.model} splits them")
    alignment = unembedding_alignment_from_lm(lm, pos[0], neg[0])
    tracker = DisplacementTracker(lm, [pair], every=1)
    tracker.record(lm.model, 0)
    run = train_preference(
        lm, [pair], loss="dpo", loss_kwargs={"beta": cfg.beta}, optimizer="rmsprop",
        lr=cfg.single_lr, steps=cfg.single_steps, batch_size=1, seed=seed, add_eos=False,
        callbacks=[tracker], out_dir=ctx.cache_dir / "runs" / f"{name}-{seed}", resume=False,
    )
    losses = [m["loss"] for m in run.history]
    p_pos = tracker.prob_trajectory(0, "chosen")
    p_neg = tracker.prob_trajectory(0, "rejected")
    start = tracker.history[0]["next_token_logprobs"][0]
    end = tracker.history[-1]["next_token_logprobs"][0]
    gain = top_gaining_tokens(start, end, k=10, log_space=True)
    ids, deltas = gain["by_logprob"]
    change = (end - start).double()
    return {
        "pair": name, "seed": seed, "prompt": pair.prompt,
        "max_drop": peak_to_trough_drop(p_pos),
        "loss_monotone": bool(all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))),
        "p_chosen_start": p_pos[0], "p_chosen_end": p_pos[-1],
        "p_rejected_start": p_neg[0], "p_rejected_end": p_neg[-1],
        "top_gaining": [{"token": tok.decode([int(i)]), "delta_logp": float(d)}
                        for i, d in zip(ids[:5], deltas[:5])],
        "overlap_at_10": int(overlap_at_k(alignment, change, k=10, exclude=(pos[0], neg[0]))),
        "trajectory": {"p_chosen": p_pos, "p_rejected": p_neg, "loss": losses},
    }


def _subset_delta(ctx, cfg, pairs, idx, name: str) -> float:
    """Δ⁺ (nats) after DPO on ``pairs[idx]``: mean log π_θ(y⁺) − mean log π_ref(y⁺) on the subset
    (summed log-probs, EOS included), averaged over ``cfg.train_seeds`` (batch order)."""
    from preflens.dynamics.train import train_preference

    subset = [pairs[i] for i in idx]
    prompts, chosen = [p.prompt for p in subset], [p.chosen for p in subset]
    deltas = []
    for seed in cfg.train_seeds:
        lm = load_model(ctx.model, device=ctx.device)
        before = response_logprobs(lm, prompts, chosen).logp
        train_preference(
            lm, subset, loss="dpo", loss_kwargs={"beta": cfg.beta}, optimizer="rmsprop",
            lr=cfg.multi_lr, epochs=cfg.multi_epochs, batch_size=cfg.multi_batch, seed=seed,
            out_dir=ctx.cache_dir / "runs" / f"{name}-{seed}", resume=False,
        )
        deltas.append(float(response_logprobs(lm, prompts, chosen).logp.mean() - before.mean()))
    return sum(deltas) / len(deltas)


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if np.std(rx) == 0 or np.std(ry) == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def run(ctx: RecipeContext, cfg: Config) -> dict:
    from preflens.data.toyworld.prefs import multi_token_pairs

    world = toyworld_world()
    # -- 1. single-token runs -------------------------------------------------------------
    single = []
    jobs = [(name, pair, seed) for name, (yp, yn) in PAIR_TYPES.items()
            for pair, seed in zip(_single_token_prompts(world, yp, yn, cfg.seeds), cfg.seeds)]
    for name, pair, seed in tqdm(jobs, desc="single-token DPO runs"):
        key = f"single-{name.split()[0]}-{seed}"
        single.append(ctx.step(key, asdict(cfg), lambda: _single_run(ctx, cfg, pair, seed, name)))

    # -- 2. CHES quantiles vs baselines -----------------------------------------------------
    pairs = multi_token_pairs(world, cfg.n_multi, seed=cfg.data_seed)
    lm = load_model(ctx.model, device=ctx.device)
    measures = {
        "ches": ches_for_pairs(lm, pairs),
        "edit_similarity": edit_similarity_for_pairs(lm.tokenizer, pairs).double(),
        "last_hidden_inner_product": last_hidden_for_pairs(lm, pairs).double(),
    }
    quantile_rows: dict[str, list] = {k: [] for k in measures}
    for measure, scores in measures.items():
        for q in tqdm(cfg.quantiles, desc=f"DPO on {measure} quantiles"):
            idx = quantile_subset(scores, q, cfg.subset).tolist()
            delta = ctx.step(f"quantile-{measure}-{q}", asdict(cfg),
                             lambda: _subset_delta(ctx, cfg, pairs, idx, f"{measure}-{q}"))
            quantile_rows[measure].append({"q": q, "mean_score": float(scores[idx].mean()),
                                           "mean_delta_logp_chosen": delta})
    ches_quantiles = [{"q": r["q"], "mean_ches": r["mean_score"],
                       "mean_delta_logp_chosen": r["mean_delta_logp_chosen"]} for r in quantile_rows["ches"]]
    rho = {m: _spearman([r["mean_score"] for r in rows], [r["mean_delta_logp_chosen"] for r in rows])
           for m, rows in quantile_rows.items()}
    by_pair = {}
    for name in PAIR_TYPES:
        runs = [r for r in single if r["pair"] == name]
        kept = [r for r in runs if r["loss_monotone"]]  # the paper's run filter
        by_pair[name] = {
            "runs": len(runs), "runs_loss_monotone": len(kept),
            "mean_max_drop_monotone": float(np.mean([r["max_drop"] for r in kept])) if kept else 0.0,
            "runs_with_drop_over_0.1_monotone": sum(r["max_drop"] > 0.1 for r in kept),
            "mean_p_chosen_start": float(np.mean([r["p_chosen_start"] for r in runs])),
            "mean_p_chosen_end": float(np.mean([r["p_chosen_end"] for r in runs])),
            "mean_overlap_at_10": float(np.mean([r["overlap_at_10"] for r in runs])),
        }
    results = {
        "model": ctx.model,
        "config": asdict(cfg),
        "single_token": [{k: v for k, v in r.items() if k != "trajectory"} for r in single],
        "single_token_summary": by_pair,
        "ches_quantiles": ches_quantiles,
        "spearman_ches_vs_delta": rho["ches"],
        "baseline_quantiles": {m: quantile_rows[m] for m in measures if m != "ches"},
        "spearman_baselines_vs_delta": {m: rho[m] for m in measures if m != "ches"},
    }
    _figures(ctx, single, quantile_rows)
    ctx.write_results(results)
    return results


def _figures(ctx, single, quantile_rows) -> None:
    for name in PAIR_TYPES:
        runs = [r for r in single if r["pair"] == name]
        panels = {
            "π(y⁺)": {f"seed {r['seed']}": r["trajectory"]["p_chosen"] for r in runs},
            "π(y⁻)": {f"seed {r['seed']}": r["trajectory"]["p_rejected"] for r in runs},
            "DPO loss": {f"seed {r['seed']}": r["trajectory"]["loss"] for r in runs},
        }
        tag = name.split()[0]
        fig = plotting.line_panels(panels, title=f"single-token DPO, {name}")
        plotting.save_figure(fig, ctx.figure(f"single_token_{tag}"))
    qs = [str(r["q"]) for r in quantile_rows["ches"]]
    fig = plotting.grouped_bars(
        qs, {m: [r["mean_delta_logp_chosen"] for r in rows] for m, rows in quantile_rows.items()},
        ylabel="Δ mean log π(y⁺) (nats)", xlabel="quantile of the similarity measure",
        title="DPO on quantile subsets: CHES vs baselines",
    )
    plotting.save_figure(fig, ctx.figure("ches_quantiles"))


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
    rows = [[r["q"], r["mean_ches"], r["mean_delta_logp_chosen"]] for r in results["ches_quantiles"]]
    t2 = format_table(rows, ["CHES quantile", "mean CHES", "Δ mean log π(y⁺)"])
    return f"{t1}\n\n{t2}\nSpearman(quantile, Δ⁺): CHES {results['spearman_ches_vs_delta']:.2f}; " + ", ".join(
        f"{m} {v:.2f}" for m, v in results["spearman_baselines_vs_delta"].items())

