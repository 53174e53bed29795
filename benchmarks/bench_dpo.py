"""preflens' DPO loop vs TRL's ``DPOTrainer`` on identical work, measured in the same run.

Same model (saved to a local directory; no hub), same pairs (synthetic, every word one token,
so both tokenizations give the same ids), same pairs per step, no truncation (max_length above
the longest sequence), same precision (fp32, or bf16 autocast with fp32 master weights), reference
log-probs precomputed in both, gradient checkpointing off, AdamW (fused on CUDA) at the same
constant lr, weight decay 0, gradient clipping at 1.0, dropout off, DPO sigmoid β = 0.1. Each
implementation runs in its own subprocess (clean peak-memory numbers).

Reported per implementation: steady-state s/step (after ``--warmup`` steps), pairs/s, tokens/s
(prompt + response tokens of both responses, EOS counted), peak memory (CPU: max RSS of the
process; GPU: ``torch.cuda.max_memory_allocated`` from model load on), MFU on GPU =
6·N·tokens/s / peak FLOP/s (N = all parameters, tied embeddings once; ``--peak-tflops``, default
989 = H100 SXM bf16 dense), end-to-end seconds (trainer construction + training, including the
reference pass) and the step-1 loss (both must be ln 2).

``--head-precision fp32,bf16`` runs preflens once per listed unembedding precision
(``TrainConfig.head_precision``; rows ``preflens`` = fp32 head, ``preflens-bf16-head``), each
against the same TRL run, side by side.

    python benchmarks/bench_dpo.py                                   # CPU, tiny-random
    python benchmarks/bench_dpo.py --device cuda --model llama-1b-random --precision bf16   # random Llama-3.2-1B shapes
    python benchmarks/bench_dpo.py --device cuda --model gpt2-small-random --precision bf16 \\
        --pairs 32 --seq 512 --head-precision fp32,bf16 --json-out bench_gpu.json   # the GPU configuration
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLS = ("preflens", "trl")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def single_token_words(tokenizer, k: int = 64) -> list[str]:
    """Words ``" w"`` that the tokenizer maps to exactly one id (so token counts are exact)."""
    out = []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if len(text) > 2 and text[0] == " " and text[1:].isalpha():
            if tokenizer(text, add_special_tokens=False)["input_ids"] == [tid]:
                out.append(text)
    if len(out) < 8:
        raise SystemExit("the tokenizer has too few single-token words for this benchmark")
    return out[:k]


def make_pairs(tokenizer, n: int, seq: int, vary: bool, seed: int = 0) -> list[dict]:
    """``n`` pairs; fixed: prompt seq/2 tokens, responses seq/2 − 1 words + EOS = seq tokens each."""
    rng, words = random.Random(seed), single_token_words(tokenizer)
    half = seq // 2

    def text(k):
        return "".join(rng.choice(words) for _ in range(k))

    pairs = []
    for _ in range(n):
        p = rng.randint(max(1, half // 4), half) if vary else half
        c, r = ((rng.randint(max(1, half // 4), half - 1) for _ in range(2)) if vary else (half - 1, half - 1))
        pairs.append({"prompt": text(p), "chosen": text(c), "rejected": text(r)})
    return pairs


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import random_llama  # noqa: F401 - registers the llama-*-random configs
    from preflens.data import PreferencePair
    from preflens.models import load_model
    from preflens.scoring import encode

    torch.manual_seed(0)
    lm = load_model(args.model, device="cpu")
    tokenizer = lm.tokenizer
    n_steps = args.steps + args.warmup
    raw = make_pairs(tokenizer, args.pairs * n_steps, args.seq, args.vary_lengths)
    enc = [encode(tokenizer, [d["prompt"]] * 2, [d["chosen"], d["rejected"]]) for d in raw]
    tokens_per_pair = sum(len(e[0]) + len(e[1]) for e in enc) / len(enc)
    max_len = max(max(len(e[0]), len(e[1])) for e in enc)
    n_params = sum(p.numel() for p in lm.model.parameters())  # tied wte/lm_head counted once
    times: list[float] = []
    step1_loss = math.nan
    work = Path(tempfile.mkdtemp(prefix=f"bench_dpo_{args.worker}_"))
    device = args.device
    if args.worker == "preflens":
        from preflens.dynamics.train import train_preference

        class Clock:
            def on_step(self, state):
                _sync(device)
                times.append(time.perf_counter())

        lm.model.to(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = train_preference(
            lm, [PreferencePair(**d) for d in raw], loss="dpo", loss_kwargs={"beta": 0.1}, optimizer="adamw",
            lr=args.lr, steps=n_steps, batch_size=args.pairs, precision=args.precision, compile=args.compile,
            head_precision=args.head_precision,
            seed=0, out_dir=work / "run", resume=False, max_grad_norm=1.0, device=device, callbacks=[Clock()],
        )
        _sync(device)
        end_to_end = time.perf_counter() - t0
        step1_loss = res.history[0]["loss"]
    else:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, TrainerCallback
        from trl import DPOConfig, DPOTrainer

        model_dir = work / "model"
        lm.model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del lm
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        losses: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, targs, state, control, **kw):
                _sync(device)
                times.append(time.perf_counter())

            def on_log(self, targs, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append(logs["loss"])

        cuda = device.startswith("cuda")
        config = DPOConfig(
            output_dir=str(work / "trl"), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=n_steps,
            max_length=max_len + 8, precompute_ref_log_probs=True, precompute_ref_batch_size=args.pairs,
            gradient_checkpointing=False, bf16=args.precision == "bf16", fp16=False, use_cpu=not cuda,
            optim="adamw_torch_fused" if cuda else "adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
            beta=0.1, loss_type=["sigmoid"], report_to="none", save_strategy="no", logging_steps=1,
            disable_dropout=True, dataloader_num_workers=0, seed=0, torch_compile=args.compile,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(raw),
                             processing_class=tok, callbacks=[Clock()])
        ds = trainer.train_dataset  # same work: TRL's token ids must match preflens' counts
        trl_tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in
                         zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])) / len(ds)
        if abs(trl_tokens - tokens_per_pair) > 1e-9:
            raise SystemExit(f"token counts differ: TRL {trl_tokens} vs preflens {tokens_per_pair} per pair")
        trainer.train()
        _sync(device)
        end_to_end = time.perf_counter() - t0
        step1_loss = losses[0] if losses else math.nan
    if device.startswith("cuda"):
        peak, kind = torch.cuda.max_memory_allocated(), "cuda.max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS"
    steady = (times[-1] - times[args.warmup - 1]) / args.steps  # steps after the warm-up ones
    pairs_s = args.pairs / steady
    out = {
        "impl": _impl_name(args.worker, args.head_precision), "steps_timed": args.steps, "s_per_step": steady,
        "pairs_per_s": pairs_s,
        "tokens_per_s": pairs_s * tokens_per_pair, "tokens_per_pair": tokens_per_pair, "peak_mem_bytes": peak,
        "mem_kind": kind, "end_to_end_s": end_to_end, "step1_loss": step1_loss, "n_params": n_params,
    }
    if args.worker == "preflens":
        out["head_precision"] = args.head_precision
    if device.startswith("cuda"):
        out["mfu"] = 6 * n_params * out["tokens_per_s"] / (args.peak_tflops * 1e12)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _impl_name(worker: str, head_precision: str) -> str:
    """``preflens`` (fp32 head), ``preflens-bf16-head``, ``trl``."""
    return worker if worker == "trl" or head_precision == "fp32" else f"{worker}-{head_precision}-head"


def describe_machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (prompt + response + EOS)")
    ap.add_argument("--vary-lengths", action="store_true", help="random lengths up to --seq")
    ap.add_argument("--steps", type=int, default=12, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--compile", action="store_true", help="torch.compile in both")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak FLOP/s for MFU (TFLOP/s)")
    ap.add_argument("--head-precision", default="fp32", metavar="P[,P]",
                    help="preflens' unembedding GEMM precision(s), comma-separated: fp32 (default), bf16 or "
                         "fp32,bf16 (one preflens run each)")
    ap.add_argument("--impl", default="both", choices=("both", *IMPLS))
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    heads = [h.strip() for h in args.head_precision.split(",") if h.strip()]
    if not heads or any(h not in ("fp32", "bf16") for h in heads) or len(set(heads)) < len(heads):
        ap.error(f"--head-precision: expected fp32, bf16 or fp32,bf16, got {args.head_precision!r}")
    if args.worker:
        Path(args.result_file).write_text(json.dumps(worker(args)))
        return

    results, failed = {}, {}
    runs = [(impl, head) for impl in (IMPLS if args.impl == "both" else (args.impl,))
            for head in (heads if impl == "preflens" else heads[:1])]
    for impl, head in runs:
        name = _impl_name(impl, head)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            result_file = fh.name
        cmd = [sys.executable, __file__, *sys.argv[1:], "--head-precision", head, "--worker", impl,
               "--result-file", result_file]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:  # report and go on: the other implementation's numbers still count
            print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
            print(f"!! {name} worker failed (exit {proc.returncode})", file=sys.stderr)
            failed[name] = proc.stderr[-2000:]
        else:
            results[name] = json.loads(Path(result_file).read_text())
        os.unlink(result_file)
    if not results:
        raise SystemExit("every worker failed")

    cols = ("impl", "s/step", "pairs/s", "tokens/s", "peak mem (MB)", "MFU", "end-to-end s", "step-1 loss")
    rows = []
    for r in results.values():
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        rows.append((r["impl"], f"{r['s_per_step']:.4f}", f"{r['pairs_per_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['peak_mem_bytes'] / 2**20:.0f}", mfu, f"{r['end_to_end_s']:.1f}",
                     f"{r['step1_loss']:.4f}"))
    print(f"config: model={args.model} device={args.device} precision={args.precision} "
          f"pairs/step={args.pairs} seq={args.seq}{' (varied)' if args.vary_lengths else ''} "
          f"timed steps={args.steps} (+{args.warmup} warm-up)")
    print(f"machine: {describe_machine(args.device)}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    summary = {"config": vars(args), "machine": describe_machine(args.device), "results": results,
               "failed": failed}
    t = results.get("trl")
    for name, p in results.items():
        if name == "trl" or t is None:
            continue
        suffix = "" if name == "preflens" else "_" + name.removeprefix("preflens-").replace("-", "_")
        summary["throughput_ratio" + suffix] = p["pairs_per_s"] / t["pairs_per_s"]
        summary["memory_ratio" + suffix] = p["peak_mem_bytes"] / t["peak_mem_bytes"]
        print(f"{name} / TRL: throughput {summary['throughput_ratio' + suffix]:.2f}x, peak memory "
              f"{summary['memory_ratio' + suffix]:.2f}x ({p['mem_kind']})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
