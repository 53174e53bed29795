"""Benchmark ``preflens measure``: pairs/s of the ``ches`` and ``entanglement`` lenses end to end.

What is timed: :func:`preflens.measure.measure` on an already loaded model and in-memory pairs,
i.e. scoring, chunked ``scores.jsonl`` appends, the summary and the figure (model loading and
data reading excluded). Model: ``gpt2-small-random`` (GPT2Config() defaults, 124 M parameters,
fp32, eval mode) with the shipped BPE-512 tokenizer. Pairs: toyworld multi-token preference pairs
(``preflens.data.toyworld.prefs.multi_token_pairs``), whose token counts are reported. Batch
sizes: the lens defaults for the device (:func:`preflens.measure.runner.auto_batch_size`) unless
``--batch-size`` is given. ``entanglement`` uses ghost inner products over all parameters.

Time = minimum over ``--repeat`` timed runs after one untimed warm-up run on 2 pairs.

Usage::

    python benchmarks/bench_measure.py                        # CPU: 64 pairs ches, 16 entanglement
    python benchmarks/bench_measure.py --device cuda --ches-pairs 2048 --entanglement-pairs 512
    python benchmarks/bench_measure.py --json-out out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preflens.data.toyworld.prefs import multi_token_pairs  # noqa: E402
from preflens.measure import measure  # noqa: E402
from preflens.models import load_model  # noqa: E402
from preflens.reproduce.common import toyworld_world  # noqa: E402
from preflens.scoring import encode  # noqa: E402


def _time(lens: str, lm, pairs, batch_size, repeat: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run: on a shared machine wall time includes waiting)."""
    best, cpu = float("inf"), float("nan")
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as d:
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            measure(lens, model=lm, data=pairs, out_dir=d, batch_size=batch_size, progress=False)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            if wall < best:
                best, cpu = wall, time.process_time() - c0
    return best, cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-small-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ches-pairs", type=int, default=64)
    ap.add_argument("--entanglement-pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the lens default for the device")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)

    lm = load_model(args.model, device=args.device)
    n = max(args.ches_pairs, args.entanglement_pairs)
    pairs = multi_token_pairs(toyworld_world(), n, votes=4, seed=0)
    enc = encode(lm.tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs])
    tokens = sorted(len(e) for e in enc)
    for lens in ("ches", "entanglement"):            # warm-up (allocator, kernels, imports)
        with tempfile.TemporaryDirectory() as d:
            measure(lens, model=lm, data=pairs[:2], out_dir=d, progress=False, figure=False)
    import os

    out = {"model": args.model, "device": str(lm.device), "load_average": os.getloadavg()[0],
           "device_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda"
           else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "tokens_per_sequence": {"min": tokens[0], "median": tokens[len(tokens) // 2],
                                                              "max": tokens[-1]},
           "results": {}}
    for lens, k in (("ches", args.ches_pairs), ("entanglement", args.entanglement_pairs)):
        secs, cpu = _time(lens, lm, pairs[:k], args.batch_size, args.repeat)
        out["results"][lens] = {"pairs": k, "seconds": round(secs, 3), "pairs_per_s": round(k / secs, 3),
                                "cpu_seconds": round(cpu, 3)}
        print(f"{lens:<13} {k:>5} pairs  {secs:8.2f} s  {k / secs:8.3f} pairs/s  (cpu {cpu:.1f} s)", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
