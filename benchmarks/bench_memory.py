"""Memory table: the largest random Llama that ``train_preference`` trains on one device, per strategy.

Strategies (one process each, so peak memory and an out-of-memory failure stay isolated):

* ``full``       full fine-tuning (fp32 master weights, AdamW state, bf16 autocast on GPU). On one
                 device this is also what ``shard="ddp"`` runs (DDP replicates everything).
* ``full+ckpt``  ``shard="fsdp"`` with ``activation_checkpointing=True``. With ONE process FSDP2 has
                 nothing to shard across, so the saving measured here is the checkpointing alone;
                 parameter/gradient/optimizer memory divides by the number of GPUs under torchrun.
* ``lora``       LoRA r=16 on q/k/v/o (frozen base, adapters + their AdamW state trainable).

For each strategy the models are tried largest first; the first that completes ``--steps`` timed
steps is "the largest that fits" (``--all`` tries every model). Reported: peak memory
(``torch.cuda.max_memory_allocated``, CPU: max RSS), steady-state pairs/s, or the failure.

    python benchmarks/bench_memory.py --device cuda --precision bf16                 # GPU table
    python benchmarks/bench_memory.py --dry-run                                      # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("llama-8b-random", "llama-3b-random", "llama-1b-random", "llama-0.5b-random")
STRATEGIES = {"full": {}, "full+ckpt": {"shard": "fsdp", "activation_checkpointing": True},
              "lora": {"lora_r": 16}}


def worker(args) -> dict:
    import torch

    import random_llama  # noqa: F401 - registers the configs
    from preflens.data import PreferencePair
    from preflens.dynamics.train import train_preference
    from preflens.models import load_model

    cuda = args.device.startswith("cuda")
    if cuda:
        os.environ["PREFLENS_BENCH_BUILD_DEVICE"] = args.device
    lm = load_model(args.model, device=args.device)
    n_params = sum(p.numel() for p in lm.model.parameters())
    half = args.seq // 2
    words = " a" * (half - 1)
    pairs = [PreferencePair(f"Question {i}:" + " x" * (half - 3), words, words.replace("a", "b"))
             for i in range(args.pairs * (args.steps + 1))]
    times = []

    class Clock:
        def on_step(self, state):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        # no run directory, no checkpoints: an 8B checkpoint would take longer than the row
        train_preference(lm, pairs, loss="dpo", loss_kwargs={"beta": 0.1}, optimizer="adamw", lr=1e-5,
                         steps=args.steps + 1, batch_size=args.pairs, precision=args.precision, seed=0,
                         out_dir=None, checkpoint=False, max_grad_norm=1.0, device=args.device,
                         callbacks=[Clock()], **STRATEGIES[args.strategy])
    except torch.OutOfMemoryError as exc:
        return {"fits": False, "error": "out of memory: " + str(exc).splitlines()[0][:200], "n_params": n_params}
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steady = (times[-1] - times[0]) / args.steps
    return {"fits": True, "peak_mem_bytes": peak, "pairs_per_s": args.pairs / steady, "s_per_step": steady,
            "n_params": n_params}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--models", default=",".join(MODELS), help="largest first")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model x strategy")
    ap.add_argument("--all", action="store_true", help="try every model, not only down to the first fit")
    ap.add_argument("--dry-run", action="store_true", help="CPU, llama-tiny-random, 2 pairs x 32 tokens")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        Path(args.result_file).write_text(json.dumps(worker(args)))
        return {}
    if args.dry_run:
        args.device, args.precision, args.models, args.pairs, args.seq = "cpu", "fp32", "llama-tiny-random", 2, 32
    rows = []
    for strategy in args.strategies.split(","):
        for model in args.models.split(","):
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
                result_file = fh.name
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--strategy", strategy,
                   "--device", args.device, "--precision", args.precision, "--pairs", str(args.pairs),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--result-file", result_file]
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                if proc.returncode == 0:
                    row = json.loads(Path(result_file).read_text())
                else:
                    row = {"fits": False, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
            except subprocess.TimeoutExpired:
                row = {"fits": False, "error": f"timed out after {args.timeout:.0f} s"}
            os.unlink(result_file)
            row.update(model=model, strategy=strategy, wall_s=time.perf_counter() - t0)
            rows.append(row)
            mem = f"{row['peak_mem_bytes'] / 2**30:.1f} GiB" if row.get("fits") else "-"
            rate = f"{row['pairs_per_s']:.2f}" if row.get("fits") else row.get("error", "")[:80]
            print(f"| {strategy} | {model} | {'yes' if row.get('fits') else 'no'} | {mem} | {rate} |", flush=True)
            if row.get("fits") and not args.all:
                break
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file")}, "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
