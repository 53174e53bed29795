"""Batched vs per-example response scoring, measured side by side in one run.

Per-example = one unpadded forward per (prompt, response), the style of the official
repositories; batched = ``preflens.scoring.response_logprobs`` (length-bucketed, right-padded,
fused chunked log-softmax over response positions only). Both compute the same numbers (checked).

    python benchmarks/bench_scoring.py [--model gpt2-small-random] [--pairs 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from preflens.models import load_model
from preflens.scoring import response_logprobs

WORDS = (
    "the model answer question capital country city river preference chosen rejected human "
    "assistant because therefore however yes no never sure maybe response prompt token"
).split()


def make_texts(n: int, lo: int, hi: int, rng: random.Random) -> list[str]:
    # A long-tailed length spread, as in real preference data: most short, some long.
    out = []
    for _ in range(n):
        length = min(hi, lo + int(rng.expovariate(1.0 / ((hi - lo) / 4))))
        out.append(" ".join(rng.choice(WORDS) for _ in range(length)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small-random")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    lm = load_model(args.model, device=args.device)
    rng = random.Random(0)
    prompts = make_texts(args.pairs, 8, 200, rng)
    chosen = make_texts(args.pairs, 4, 250, rng)
    rejected = make_texts(args.pairs, 4, 250, rng)
    all_prompts, all_responses = prompts + prompts, chosen + rejected

    response_logprobs(lm, all_prompts[:4], all_responses[:4])  # warm-up
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

    sync()
    t0 = time.perf_counter()
    batched = response_logprobs(lm, all_prompts, all_responses, batch_size=args.batch_size)
    sync()
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    single = [
        response_logprobs(lm, [p], [r], batch_size=1).logp[0]
        for p, r in zip(all_prompts, all_responses)
    ]
    sync()
    t_single = time.perf_counter() - t0

    max_err = (batched.logp - torch.stack(single)).abs().max().item()
    tokens = int(batched.n_tokens.sum())
    result = {
        "model": args.model,
        "device": str(lm.device),
        "pairs": args.pairs,
        "sequences": len(all_prompts),
        "response_tokens": tokens,
        "per_example_s": round(t_single, 3),
        "batched_s": round(t_batched, 3),
        "speedup": round(t_single / t_batched, 2),
        "max_abs_logp_diff": max_err,
    }
    print(f"{'method':<14}{'seconds':>10}{'seq/s':>10}")
    print(f"{'per-example':<14}{t_single:>10.2f}{len(single) / t_single:>10.1f}")
    print(f"{'batched':<14}{t_batched:>10.2f}{len(single) / t_batched:>10.1f}")
    print(f"speedup {t_single / t_batched:.2f}x, max |Δ logp| = {max_err:.2e}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
