"""Recipe: gradient entanglement in margin-based preference losses, and a mitigation.

Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement". Steps:

1. **Trajectories**: the same graded-answer pairs trained with DPO, IPO, SimPO, SLiC (hinge),
   DPO-Positive, CPO and DPO with the pairwise-normalized gradient (the step along
   a·(g_w/‖g_w‖ − g_l/‖g_l‖), one of the paper's proposed mitigations), plain SGD for all (the
   setting of the paper's first-order analysis), tracking the mean summed log π(y_w) and
   log π(y_l) on the training pairs, and at a few checkpoints the per-pair gradient statistics
   (⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖², cos; ghost method) with the predicted case counts (Table 1).
2. **First-order sign agreement**: for each loss, one plain-SGD step on each pair alone; the
   signs of the measured Δu_w, Δu_l against those predicted from the gradient statistics and the
   loss weights (Eqs. 3–5 generalised).
3. **Controlled token overlap** (paper §4.3): pairs whose responses differ in one token
   (" Yes" vs " No") against the same pairs with a long shared suffix, scored without EOS so
   that the one-token pairs really differ in exactly one token; cos and DPO's effect on the
   chosen log-prob for each; a token-level gradient-similarity heatmap for one suffix pair.

Each loss's trajectory is a step of its own: editing one loss's settings in ``RUNS`` reruns
that loss's trajectory and the sign-agreement step (which covers every loss), nothing else. The results JSON keeps every value the figures draw (``losses[*].history``,
``token_similarity``).
"""

from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from preflens import plotting
from preflens.data import PreferencePair
from preflens.data.toyworld.prefs import YESNO_PROMPT, multi_token_pairs
from preflens.dynamics import losses as loss_registry
from preflens.dynamics.entanglement import pair_gradient_stats, predict_first_order, token_gradient_similarity
from preflens.dynamics.train import train_preference
from preflens.dynamics.trackers import EntanglementTracker
from preflens.reproduce.common import RecipeContext, format_table, reads, toyworld_world
from preflens.scoring import concatenated_logps, encode, encode_pairs, response_logprobs

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
    sign_lr: float = 1e-3
    overlap_pairs: int = 48
    overlap_lr: float = 0.05
    overlap_steps: int = 30
    seed: int = 0
    gradient_method: str = "ghost"  # or "exact" (pair_gradient_stats; equal up to rounding)

    @classmethod
    def quick(cls) -> Config:
        return cls(n_pairs=64, epochs=1, stats_pairs=8, stats_every=1000, sign_pairs=8,
                   overlap_pairs=12, overlap_steps=6)


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


# -- step 2: first-order sign agreement -------------------------------------------------------
def _one_step_agrees(lm, pair, loss, kwargs, lr, pred_w, pred_l) -> bool:
    """One plain-SGD step on ``pair`` alone (policy = reference); do the measured signs of
    Δu_w, Δu_l match the predicted ones?"""
    model = copy.deepcopy(lm.model)
    batch = encode_pairs(lm, [pair]).batch([0], pad_id=lm.pad_id, device=next(model.parameters()).device)
    u = concatenated_logps(model, batch)
    ref_w, ref_l = u.chosen.detach(), u.rejected.detach()
    loss_registry.compute_loss(loss, u.chosen, u.rejected, ref_w, ref_l, u.chosen_tokens, u.rejected_tokens,
                               **kwargs).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
        after = concatenated_logps(model, batch)
    d_w, d_l = float(after.chosen - ref_w), float(after.rejected - ref_l)
    return bool(np.sign(d_w) == np.sign(float(pred_w)) and np.sign(d_l) == np.sign(float(pred_l)))


@reads("n_pairs", "data_seed", "sign_pairs", "sign_lr", "gradient_method")
def sign_agreement(ctx: RecipeContext, c, runs: dict) -> dict:
    """Per loss in ``runs`` (name -> spec), the fraction of pairs whose one-step signs of Δu_w,
    Δu_l match the first-order prediction from the gradient statistics (fp64 model)."""
    lm = ctx.fresh_lm(dtype=torch.float64)
    sub = _pairs(ctx, c)[: c.sign_pairs]
    stats = pair_gradient_stats(lm, sub, method=c.gradient_method)
    out = {}
    for name, (loss, kwargs, normalized) in runs.items():
        if normalized:
            continue
        pred_w, pred_l = predict_first_order(stats, loss, lr=c.sign_lr, loss_kwargs=kwargs,
                                             ref_chosen_logps=stats.u_w, ref_rejected_logps=stats.u_l)
        agree = sum(_one_step_agrees(lm, pair, loss, kwargs, c.sign_lr, pred_w[i], pred_l[i])
                    for i, pair in enumerate(sub))
        out[name] = agree / len(sub)
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
    sign = ctx.step("sign-agreement", sign_agreement, cfg, {n: list(s) for n, s in RUNS.items()})
    ov = ctx.step("overlap", overlap, cfg)
    heat = ctx.step("token-heatmap", token_heatmap, cfg)
    plain, mitigated = runs["dpo"], runs["dpo_pairwise_normalized"]
    keys = ("chosen_delta", "rejected_delta", "case_counts", "case_counts_final", "mean_cos_start",
            "mean_cos_end", "history")
    results = {
        **ctx.header(cfg),
        "losses": {n: {k: r[k] for k in keys} for n, r in runs.items()},
        "first_order_sign_agreement": sign,
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
    return [_render_trajectories(results, ctx), _render_token_similarity(results, ctx)]


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


def summary(results: dict) -> str:
    rows = [[n, r["chosen_delta"], r["rejected_delta"], r["mean_cos_start"],
             " ".join(f"{k}:{v}" for k, v in r["case_counts"].items() if v)]
            for n, r in results["losses"].items()]
    t = format_table(rows, ["run", "Δ log π(y_w)", "Δ log π(y_l)", "mean cos", "predicted cases at init"])
    ov = results["overlap_experiment"]
    return (f"{t}\nsign agreement: " + ", ".join(f"{k} {v:.2f}" for k, v in results["first_order_sign_agreement"].items())
            + f"\noverlap: one token cos {ov['one_token']['mean_cos']:.2f} Δchosen {ov['one_token']['chosen_delta']:.2f}; "
            f"shared suffix cos {ov['shared_suffix']['mean_cos']:.2f} Δchosen {ov['shared_suffix']['chosen_delta']:.2f}")
