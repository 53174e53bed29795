"""Overhead of tracking every lens during training: the same DPO run on toyworld with and without
``--track ranking,displacement,ches,entanglement,dla --track-every 10``.

Setup (the ``preflens train`` defaults for tracking): the shipped toyworld model, ``--pairs``
multi-token toyworld preference pairs, DPO (β = 0.1), AdamW lr 1e-4, ``--batch-size`` pairs per
step, ``--steps`` steps, fp32; tracking: a seeded probe sample of ``--track-n`` training pairs
(one shared scoring pass for ranking / displacement / CHES), ghost gradients of the first
``--ghost-n`` of them, DLA through a compatibility-mode bridge over a copy of the model at each
record. Each configuration runs ``--repeat`` times, alternating, and the minimum wall time of each
(reference log-probs included, the same in both) is compared, and so is the process CPU time. On
a machine shared with other jobs both swing by several × between runs; the robust number is then
the within-run ratio: 1 + (seconds spent recording) / (the rest of the same tracked run), both
measured under the same, interleaved, load (median over the repeats). Per-lens recording seconds
of the fastest tracked run are printed.

    python benchmarks/bench_tracking.py                 # CPU, the README configuration
    python benchmarks/bench_tracking.py --device cuda

Target (issue 16): tracked time ≤ 1.25 × untracked.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time

import torch


def _run(lm0, pairs, args, lenses):
    from preflens.dynamics.train import train_preference
    from preflens.report import build_trackers

    lm = copy.deepcopy(lm0)
    trackers = build_trackers(lm, pairs, lenses, every=args.track_every, n=args.track_n, seed=0, loss="dpo",
                              loss_kwargs={"beta": 0.1}, ghost_n=args.ghost_n) if lenses else []
    with tempfile.TemporaryDirectory() as out:
        t0, c0 = time.perf_counter(), time.process_time()
        train_preference(lm, pairs, loss="dpo", loss_kwargs={"beta": 0.1}, optimizer="adamw", lr=1e-4,
                         steps=args.steps, batch_size=args.batch_size, seed=0, callbacks=trackers, out_dir=out,
                         device=args.device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, {t.name: t.seconds for t in trackers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--track-every", type=int, default=10)
    ap.add_argument("--track-n", type=int, default=32)
    ap.add_argument("--ghost-n", type=int, default=8)
    ap.add_argument("--lenses", default="ranking,displacement,ches,entanglement,dla")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    from preflens.data.toyworld.prefs import multi_token_pairs
    from preflens.models import load_model
    from preflens.report import parse_lenses
    from preflens.reproduce.common import toyworld_world

    lenses = parse_lenses(args.lenses)
    lm = load_model("toyworld", device=args.device)
    pairs = multi_token_pairs(toyworld_world(), args.pairs, seed=0)
    plain, tracked, plain_cpu, tracked_cpu, per_lens, within = [], [], [], [], {}, []
    for _ in range(args.repeat):
        sec, cpu, _ = _run(lm, pairs, args, [])
        plain.append(sec)
        plain_cpu.append(cpu)
        sec, cpu, lens_sec = _run(lm, pairs, args, lenses)
        if not tracked or sec < min(tracked):
            per_lens = lens_sec
        tracked.append(sec)
        tracked_cpu.append(cpu)
        spent = sum(lens_sec.values())
        within.append(1 + spent / (sec - spent))  # recording time over the rest of the same run
    base, with_tracking = min(plain), min(tracked)
    ratio = with_tracking / base
    cpu_ratio = min(tracked_cpu) / min(plain_cpu)
    within_ratio = sorted(within)[len(within) // 2]
    out = {
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, device {args.device}",
        "config": vars(args), "untracked_s": plain, "tracked_s": tracked, "untracked_cpu_s": plain_cpu,
        "tracked_cpu_s": tracked_cpu, "ratio": ratio, "cpu_time_ratio": cpu_ratio,
        "within_run_ratios": within, "within_run_ratio": within_ratio, "extra_percent": 100 * (ratio - 1), "per_lens_s": per_lens,
        "records": args.steps // args.track_every + 1,
    }
    print(f"untracked {base:.2f} s, tracked {with_tracking:.2f} s over {args.steps} steps: "
          f"ratio {ratio:.3f} ({100 * (ratio - 1):+.1f} %; target <= +25 %)")
    print(f"CPU time (process): untracked {min(plain_cpu):.2f} s, tracked {min(tracked_cpu):.2f} s: ratio "
          f"{cpu_ratio:.3f} (less sensitive to other load on the machine)")
    print(f"within the tracked runs (recording time / the rest of the same run, median of {len(within)}): "
          f"ratio {within_ratio:.3f} ({100 * (within_ratio - 1):+.1f} %) -- the robust number on a shared machine")
    print("recording seconds per lens: " + ", ".join(f"{k} {v:.2f}" for k, v in per_lens.items()))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
