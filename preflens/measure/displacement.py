"""``measure displacement``: per-pair change of log π(chosen), log π(rejected) from a reference.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization", ICLR 2025 (arXiv 2410.08847), Sec. 3: after preference training the chosen
response's likelihood often *falls* (likelihood displacement) and the mass goes to other tokens.
For each pair: Δ log π(y|x) = log π_model(y|x) − log π_reference(y|x) for chosen and rejected
(summed response log-probs, EOS counted, :func:`preflens.scoring.response_logprobs`), and the
tokens whose next-token log-probability at the first response position (right after the prompt)
rose most (:func:`preflens.probes.displacement.top_gaining_tokens`, ``by_logprob``; Tables 2-3).

Per-item row: ``logp_chosen``, ``logp_rejected``, ``ref_logp_chosen``, ``ref_logp_rejected``,
``delta_chosen``, ``delta_rejected``, ``displaced`` (Δ chosen < 0), ``top_gaining``: a list of
``{"token_id", "token", "delta_logprob"}``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from preflens.errors import ConfigError
from preflens.probes.displacement import top_gaining_tokens
from preflens.scoring import collate, encode, final_hidden, head_logits, response_logprobs

NAME = "displacement"
KIND = "forward"
REFERENCE = "required"


@dataclass(frozen=True)
class Options:
    """``top_k``: gaining tokens kept per pair (default 5)."""

    top_k: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError("top_k", f"must be a positive integer, got {self.top_k!r}")


@torch.no_grad()
def _next_token_logprobs(lm, prompts, batch_size: int) -> torch.Tensor:
    """``[n, d_vocab]`` fp32 log π(· | prompt) at the last prompt position (first response token)."""
    enc = encode(lm.tokenizer, prompts, [""] * len(prompts), add_eos=True, max_length=lm.n_ctx,
                 truncate="left")
    was = lm.model.training
    lm.model.eval()
    rows = []
    try:
        for s in range(0, len(enc), batch_size):
            batch = collate(enc[s:s + batch_size], pad_id=lm.pad_id, device=lm.device)
            h = final_hidden(lm.model, batch)
            last = h[torch.arange(h.shape[0], device=h.device), batch.prompt_lens.to(h.device) - 1]
            rows.append(torch.log_softmax(head_logits(lm.model, last, dtype=torch.float32), dim=-1).cpu())
    finally:
        lm.model.train(was)
    return torch.cat(rows)


def score_chunk(lm, reference, pairs, opts: Options, batch_size: int) -> list[dict]:
    prompts = [p.prompt for p in pairs]
    m_w = response_logprobs(lm, prompts, [p.chosen for p in pairs], batch_size=batch_size,
                            sources=[p.source for p in pairs], response_field="chosen")
    m_l = response_logprobs(lm, prompts, [p.rejected for p in pairs], batch_size=batch_size,
                            sources=[p.source for p in pairs], response_field="rejected")
    r_w = response_logprobs(reference, prompts, [p.chosen for p in pairs], batch_size=batch_size,
                            sources=[p.source for p in pairs], response_field="chosen")
    r_l = response_logprobs(reference, prompts, [p.rejected for p in pairs], batch_size=batch_size,
                            sources=[p.source for p in pairs], response_field="rejected")
    now = _next_token_logprobs(lm, prompts, batch_size)
    start = _next_token_logprobs(reference, prompts, batch_size)
    rows = []
    for i in range(len(pairs)):
        ids, deltas = top_gaining_tokens(start[i], now[i], opts.top_k, log_space=True)["by_logprob"]
        dw, dl = float(m_w.logp[i] - r_w.logp[i]), float(m_l.logp[i] - r_l.logp[i])
        rows.append({
            "logp_chosen": float(m_w.logp[i]), "logp_rejected": float(m_l.logp[i]),
            "ref_logp_chosen": float(r_w.logp[i]), "ref_logp_rejected": float(r_l.logp[i]),
            "delta_chosen": dw, "delta_rejected": dl, "displaced": dw < 0,
            "top_gaining": [{"token_id": int(t), "token": lm.tokenizer.decode([int(t)]),
                             "delta_logprob": float(d)} for t, d in zip(ids, deltas)],
        })
    return rows


def summarize(rows, opts: Options, has_reference: bool) -> dict:
    """Shares of pairs whose chosen / rejected / both likelihoods fell, Δ statistics, and the
    tokens most often among the pairs' top gainers."""
    dw = torch.tensor([r["delta_chosen"] for r in rows], dtype=torch.float64)
    dl = torch.tensor([r["delta_rejected"] for r in rows], dtype=torch.float64)
    n = len(rows)
    freq: Counter = Counter()
    gain: dict[int, list[float]] = {}
    names: dict[int, str] = {}
    for r in rows:
        for t in r["top_gaining"]:
            freq[t["token_id"]] += 1
            gain.setdefault(t["token_id"], []).append(t["delta_logprob"])
            names[t["token_id"]] = t["token"]
    top = [{"token_id": t, "token": names[t], "pairs": c, "mean_delta_logprob": sum(gain[t]) / len(gain[t])}
           for t, c in freq.most_common(10)]
    return {
        "n_pairs": n,
        "fraction_chosen_down": float((dw < 0).double().mean()),
        "fraction_rejected_down": float((dl < 0).double().mean()),
        "fraction_both_down": float(((dw < 0) & (dl < 0)).double().mean()),
        "delta_chosen": {"mean": float(dw.mean()), "median": float(dw.median())},
        "delta_rejected": {"mean": float(dl.mean()), "median": float(dl.median())},
        "margin_change": {"mean": float((dw - dl).mean()), "median": float((dw - dl).median())},
        "top_gaining_tokens": top,
        "top_k": opts.top_k,
    }


def figure(rows, summary: dict):
    from preflens import plotting

    dw = [r["delta_chosen"] for r in rows]
    dl = [r["delta_rejected"] for r in rows]
    lo, hi = min(dw + dl + [0.0]), max(dw + dl + [0.0])
    return plotting.scatter_with_curve(
        dw, dl, curve=([lo, hi], [lo, hi]), colors=["chosen down" if r["displaced"] else "chosen up"
                                                     for r in rows],
        xlabel="Δ log π(chosen)", ylabel="Δ log π(rejected)", curve_label="equal change",
        title=f"likelihood displacement: {summary['fraction_chosen_down']:.1%} of pairs lose chosen mass")
