"""CHES and ranking accuracy for N pairs: batched preflens vs a per-example loop, same run.

The per-example loop is the official repositories' style: one unpadded forward per response,
hidden states / log-probs read off that single sequence. Both arms compute the same numbers
(checked: max relative CHES difference and ranking-accuracy equality are printed).

    python benchmarks/bench_probes.py [--model toyworld] [--pairs 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from preflens.models import DEFAULT_MODEL, load_model
from preflens.probes.ches import ches_for_pairs, ches_scores
from preflens.probes.ranking import ranking_accuracy
from preflens.scoring import response_hidden_states, response_logprobs


def per_example(lm, pairs):
    """One forward per response (batch 1, no padding), as the official scripts do."""
    ches, lw, ll = [], [], []
    for p in pairs:
        hw = response_hidden_states(lm, [p.prompt], [p.chosen], batch_size=1)
        hl = response_hidden_states(lm, [p.prompt], [p.rejected], batch_size=1)
        ches.append(ches_scores(hw, hl)[0])
        lw.append(response_logprobs(lm, [p.prompt], [p.chosen], batch_size=1).logp[0])
        ll.append(response_logprobs(lm, [p.prompt], [p.rejected], batch_size=1).logp[0])
    return torch.stack(ches), ranking_accuracy(torch.stack(lw), torch.stack(ll))


def batched(lm, pairs, batch_size):
    ches = ches_for_pairs(lm, pairs, batch_size=batch_size)
    prompts = [p.prompt for p in pairs]
    s_w = response_logprobs(lm, prompts, [p.chosen for p in pairs], batch_size=batch_size)
    s_l = response_logprobs(lm, prompts, [p.rejected for p in pairs], batch_size=batch_size)
    return ches, ranking_accuracy(s_w.logp, s_l.logp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    from preflens.data.toyworld.prefs import multi_token_pairs
    from preflens.reproduce.common import toyworld_world

    lm = load_model(args.model, device=args.device)
    pairs = multi_token_pairs(toyworld_world(), args.pairs, seed=0)
    batched(lm, pairs[:8], args.batch_size)  # warm-up
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    c_b, r_b = batched(lm, pairs, args.batch_size)
    sync()
    t_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    c_s, r_s = per_example(lm, pairs)
    sync()
    t_s = time.perf_counter() - t0
    rel = ((c_b - c_s).abs() / c_s.abs().clamp_min(1e-12)).max().item()
    out = {"model": args.model, "device": str(lm.device), "pairs": args.pairs,
           "per_example_s": round(t_s, 3), "batched_s": round(t_b, 3),
           "speedup": round(t_s / t_b, 2), "max_rel_ches_diff": rel,
           "ranking_accuracy_equal": r_b == r_s}
    print(f"{'method':<14}{'seconds':>10}")
    print(f"{'per-example':<14}{t_s:>10.2f}")
    print(f"{'batched':<14}{t_b:>10.2f}")
    print(f"speedup {t_s / t_b:.1f}x; max rel CHES diff {rel:.1e}; ranking accuracy equal: {r_b == r_s}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
