"""Evaluate a toyworld model against the world's ground truth (issue 3, item 6).

Metrics (all greedy, no BOS, 16 new tokens, continuation cut at EOS, scored with
:func:`preflens.data.capitals.classify_continuation` — the rule of Yu, Merullo & Pavlick 2023,
Sec. 3):

* ``closed_book`` — ``CLOSED_BOOK_TEMPLATE`` per real country; correct iff the true capital
  (``" " + capital``) appears before the first ``"Q:"``. Overall, on the most frequent half
  and by frequency decile.
* ``in_context`` — ``PAPER_TEMPLATE`` with a fictional country and a fictional city (fixed,
  seeded pairs); correct iff the stated city appears.
* ``counterfactual`` — ``PAPER_TEMPLATE`` with a real country and another country's capital
  (all N·(N−1) pairs, or a fixed subset); rates of in_context / memorized / neither overall and
  by decile of the query country's training fact count (``abs_icl_country``, Yu et al. 2023 Sec. 4: edges at the
  0,10,…,100th percentiles of the per-prompt values, half-open bins, last closed).
* ``yesno`` — "Q: Is the capital of {country} {city}?\\nA:" with the true capital and with one
  seeded wrong capital per country; the model says yes iff logsumexp of the next-token logits
  over the yes family exceeds that over the no family. Accuracy overall and on the most
  frequent half (by training fact count).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from preflens.data.capitals import CLOSED_BOOK_TEMPLATE, PAPER_TEMPLATE, classify_continuation
from preflens.data.toyworld.world import load_world
from preflens.errors import ModelError
from preflens.generation import greedy_decode, hf_forward, last_logits
from preflens.scoring import eval_mode
from preflens.stats import label_rates, percentile_bins

__all__ = ["evaluate_toyworld", "greedy_continuations"]

YESNO_TEMPLATE = "Q: Is the capital of {country} {city}?\nA:"


def _load(model_dir_or_lm):
    """``(model, tokenizer, directory)`` from an LM, a toyworld directory or None (the shipped
    checkpoint), loaded through :func:`preflens.models.load_model`."""
    from preflens.models import load_model

    if model_dir_or_lm is None:
        from preflens.toyworld import ASSETS_DIR
        model_dir_or_lm = ASSETS_DIR
    if hasattr(model_dir_or_lm, "model") and hasattr(model_dir_or_lm, "tokenizer"):
        lm = model_dir_or_lm
        return lm.model, lm.tokenizer, Path(lm.tokenizer_dir)
    d = Path(model_dir_or_lm)
    if not (d / "world.json").is_file() or not (d / "config.json").is_file():
        raise ModelError(f"{d} is not a toyworld model directory (needs config.json and world.json)")
    lm = load_model(str(d))
    return lm.model, lm.tokenizer, d


def greedy_continuations(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 16,
                         batch_size: int = 256) -> list[str]:
    """Greedy-decode ``max_new_tokens`` after each prompt (no BOS, no padding: prompts are
    grouped by token length; KV cache) with :func:`preflens.generation.greedy_decode` and return
    the decoded new text, cut at the first EOS."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: list[str] = [""] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):
        groups.setdefault(len(ids), []).append(i)
    dev = next(model.parameters()).device
    for _, idx in sorted(groups.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            gen = greedy_decode(None, [enc[i] for i in chunk], max_new_tokens=max_new_tokens, eos=eos,
                                pad=pad, device=dev, cache_model=model)
            for i, g in zip(chunk, gen):
                out[i] = tokenizer.decode(g)
    return out


def _deciles(values) -> tuple[np.ndarray, list[float]]:
    index, edges = percentile_bins(values, 10)
    return np.asarray(index), edges


def _rates(labels: list[str]) -> dict:
    return label_rates(labels, ("in_context", "memorized", "neither"))


@torch.no_grad()
def _yes_no(model, tok, world, prompts: list[str], batch_size: int = 256) -> list[bool]:
    ids_yes = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in world.yes_family]
    ids_no = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in world.no_family]
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    says_yes = [False] * len(prompts)
    dev = next(model.parameters()).device
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):       # equal-length groups: no padding, position -1 is real
        groups.setdefault(len(ids), []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            logits = last_logits(hf_forward(model), [enc[i] for i in chunk], pad=0, device=dev)
            yes = torch.logsumexp(logits[:, ids_yes], -1) > torch.logsumexp(logits[:, ids_no], -1)
            for i, v in zip(chunk, yes.tolist()):
                says_yes[i] = bool(v)
    return says_yes


def evaluate_toyworld(model_dir_or_lm=None, *, subset: int | None = None, n_fictional: int = 200,
                      seed: int = 1234) -> dict:
    """Run all four evaluations; ``subset`` = number of counterfactual in-context cities per
    country (fixed, seeded) for the fast mode, ``None`` = all N·(N−1) prompts. Returns a JSON-
    ready dict (rates in [0, 1]); the acceptance checks of issue 3 are under ``acceptance``."""
    model, tok, d = _load(model_dir_or_lm)
    with eval_mode(model):  # an LM passed in keeps its train/eval flag
        return _evaluate(model, tok, d, subset, n_fictional, seed)


def _evaluate(model, tok, d: Path, subset: int | None, n_fictional: int, seed: int) -> dict:
    world = load_world(d / "world.json")
    freqs = json.loads((d / "frequencies.json").read_text(encoding="utf-8"))["counts"]
    C, K = world.countries, world.capitals
    n = len(C)
    fact = np.array([freqs[c]["fact"] for c in C], dtype=float)
    order = np.argsort(-fact, kind="stable")
    frequent = set(order[: n // 2].tolist())

    # closed book
    cont = greedy_continuations(model, tok, [CLOSED_BOOK_TEMPLATE.format(country=c) for c in C])
    cb = np.array([classify_continuation(t, [" " + K[i]], "") == "memorized" for i, t in enumerate(cont)])
    bins, edges = _deciles(fact)
    closed = {"accuracy": float(cb.mean()), "frequent_half": float(cb[sorted(frequent)].mean()),
              "rare_half": float(np.delete(cb, sorted(frequent)).mean()), "decile_edges": edges,
              "by_decile": [{"n": int((bins == b).sum()), "accuracy": float(cb[bins == b].mean()) if (bins == b).any() else None}
                            for b in range(10)]}

    # in-context copying on fictional entities
    rng = random.Random(seed)
    pairs = [(rng.choice(world.fictional_countries), rng.choice(world.fictional_cities)) for _ in range(n_fictional)]
    cont = greedy_continuations(model, tok, [PAPER_TEMPLATE.format(country=c, ic=k) for c, k in pairs])
    ic_ok = [classify_continuation(t, (), " " + k) == "in_context" for t, (_, k) in zip(cont, pairs)]
    in_ctx = {"accuracy": sum(ic_ok) / len(ic_ok), "n": len(ic_ok)}

    # counterfactual conflict
    cf = []
    for i in range(n):
        others = [j for j in range(n) if j != i and K[j] != K[i]]
        if subset is not None:
            others = random.Random(seed * 1000 + i).sample(others, min(subset, len(others)))
        cf += [(i, j) for j in others]
    cont = greedy_continuations(model, tok, [PAPER_TEMPLATE.format(country=C[i], ic=K[j]) for i, j in cf])
    lab = [classify_continuation(t, [" " + K[i]], " " + K[j]) for t, (i, j) in zip(cont, cf)]
    bins_cf, edges_cf = _deciles([fact[i] for i, _ in cf])
    counter = {**_rates(lab), "criterion": "abs_icl_country (training fact count of the query country)",
               "decile_edges": edges_cf,
               "by_decile": [_rates([x for x, b in zip(lab, bins_cf) if b == k]) for k in range(10)]}

    # yes/no verification
    qs = []
    rng = random.Random(seed + 1)
    for i in range(n):
        wrong = K[(i + rng.randrange(1, n)) % n]
        qs += [(i, K[i], True), (i, wrong, False)]
    says = _yes_no(model, tok, world, [YESNO_TEMPLATE.format(country=C[i], city=k) for i, k, _ in qs])
    ok = np.array([s == t for s, (_, _, t) in zip(says, qs)])
    fmask = np.array([i in frequent for i, _, _ in qs])
    yesno = {"accuracy": float(ok.mean()), "frequent_half": float(ok[fmask].mean()),
             "rare_half": float(ok[~fmask].mean()), "n": int(len(ok))}

    dec = [r["memorized"] for r in counter["by_decile"] if r["n"]]
    top, bottom = (dec[-1], dec[0]) if dec else (0.0, 0.0)
    ratio = top / bottom if bottom else None       # None when the bottom decile never memorizes
    acc = {
        "closed_book_frequent_half>=0.90": closed["frequent_half"] >= 0.90,
        "in_context_fictional>=0.95": in_ctx["accuracy"] >= 0.95,
        "counterfactual_in_context_in_[0.2,0.8]": 0.2 <= counter["in_context"] <= 0.8,
        "memorized_top_decile>=2x_bottom": top > 0 and top >= 2.0 * bottom,
        "yesno_frequent_half>=0.90": yesno["frequent_half"] >= 0.90,
    }
    return {"model_dir": str(d), "mode": "full" if subset is None else f"subset({subset} per country)",
            "max_new_tokens": 16, "closed_book": closed, "in_context": in_ctx,
            "counterfactual": counter, "memorized_ratio_top_vs_bottom_decile": ratio,
            "memorized_top_decile": top, "memorized_bottom_decile": bottom,
            "yesno": yesno, "acceptance": acc}
