"""Benchmark: per-head attribution of (in-context - memorized) logit for every head.

Two ways to score all L x H heads on the same counterfactual prompts, same run, same bridge:

* **DLA** (:func:`preflens.attribution.heads.head_logit_attribution`): one ``run_with_cache``
  per equal-length batch (hook_z + ln_final scale only), then ``stack_head_results`` and
  ``logit_attrs`` -- direct effect, each prompt with its own direction;
* **zero-ablation**: one clean forward per batch plus one forward per head with that head's
  ``hook_z`` zeroed; effect = clean logit difference - ablated logit difference (total effect,
  so the two numbers are related but not equal; their correlation is printed for context).

Prompts: the paper template (factual_recall.md §2.3), a seeded sample of in-context cities per
country, degenerate prompts excluded, first ``--n-prompts`` taken. Default model:
``gpt2-small-random`` (GPT2Config(), 12 x 12 heads). Timings: wall clock, after one warm-up
batch per method; CUDA is synchronised before each clock read.

    python benchmarks/bench_attribution.py --device cpu --n-prompts 64 --json-out out.json
    python benchmarks/bench_attribution.py --device cuda --n-prompts 512
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

from preflens.attribution.heads import head_logit_attribution
from preflens.attribution.recall import first_token_ids
from preflens.data.recall_prompts import counterfactual_prompts
from preflens.data.capitals import load_capitals
from preflens.models import load_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _batches(bridge, prompts, batch_size):
    tok = bridge.tokenizer
    by_len = defaultdict(list)
    enc = [tok(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    for i, e in enumerate(enc):
        by_len[len(e)].append(i)
    ic = first_token_ids(tok, [p.in_context for p in prompts])
    mem = first_token_ids(tok, [p.memorized[0] for p in prompts])
    dev = bridge.cfg.device
    for length in sorted(by_len):
        idx = by_len[length]
        for s in range(0, len(idx), batch_size):
            j = idx[s: s + batch_size]
            yield (j, torch.tensor([enc[i] for i in j], device=dev),
                   torch.tensor([ic[i] for i in j], device=dev), torch.tensor([mem[i] for i in j], device=dev))


@torch.no_grad()
def zero_ablation(bridge, prompts, batch_size):
    """``[L, H]`` mean over prompts of clean - ablated logit difference; also the forward count."""
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    total = torch.zeros(L, H, dtype=torch.float64)
    forwards = 0
    for idx, ids, ic, mem in _batches(bridge, prompts, batch_size):
        ar = torch.arange(len(idx), device=ids.device)

        def diff(logits):
            return (logits[ar, -1, ic] - logits[ar, -1, mem]).double().cpu()

        clean = diff(bridge(ids))
        forwards += 1
        for l in range(L):
            for h in range(H):
                def zero(z, hook, h=h):
                    z = z.clone()
                    z[:, :, h] = 0.0
                    return z

                with bridge.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_z", zero)]):
                    total[l, h] += (clean - diff(bridge(ids))).sum()
                forwards += 1
    return (total / len(prompts)).float(), forwards


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-prompts", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device)
    bridge = lm.bridge(compat=True)
    t_setup = time.perf_counter() - t0
    world = load_capitals()
    per_country = -(-args.n_prompts // len(world.countries))
    prompts = counterfactual_prompts(world.countries, pairs=per_country, seed=args.seed)
    prompts = [p for p in prompts if not p.degenerate][: args.n_prompts]
    n_batches = sum(1 for _ in _batches(bridge, prompts, args.batch_size))

    warm = prompts[: min(4, len(prompts))]
    head_logit_attribution(bridge, warm, batch_size=args.batch_size, skip_degenerate=False)
    zero_ablation(bridge, warm[:1], args.batch_size)

    _sync(args.device)
    t = time.perf_counter()
    dla = head_logit_attribution(bridge, prompts, batch_size=args.batch_size, skip_degenerate=False)
    _sync(args.device)
    t_dla = time.perf_counter() - t
    t = time.perf_counter()
    abl, forwards = zero_ablation(bridge, prompts, args.batch_size)
    _sync(args.device)
    t_abl = time.perf_counter() - t
    corr = float(torch.corrcoef(torch.stack([dla.flatten(), abl.flatten()]))[0, 1])

    out = {
        "model": args.model, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "n_prompts": len(prompts), "batch_size": args.batch_size,
        "n_batches": n_batches, "n_layers": bridge.cfg.n_layers, "n_heads": bridge.cfg.n_heads,
        "setup_seconds": round(t_setup, 2),
        "dla_seconds": round(t_dla, 3), "dla_forwards": n_batches,
        "ablation_seconds": round(t_abl, 3), "ablation_forwards": forwards,
        "speedup_dla_vs_ablation": round(t_abl / t_dla, 1),
        "pearson_dla_vs_ablation": round(corr, 3),
    }
    print(f"{args.model} on {args.device}: {len(prompts)} prompts, {n_batches} equal-length batches, "
          f"{out['n_layers']}x{out['n_heads']} heads")
    print(f"  DLA (one cached forward per batch): {t_dla:8.2f} s  ({n_batches} forwards)")
    print(f"  per-head zero-ablation:             {t_abl:8.2f} s  ({forwards} forwards)")
    print(f"  ratio ablation / DLA: {t_abl / t_dla:.1f}x   Pearson(DLA, ablation effect) = {corr:.3f}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json_out.with_suffix(args.json_out.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=1), encoding="utf-8")
        tmp.replace(args.json_out)
    return out


if __name__ == "__main__":
    main()
