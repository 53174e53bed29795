"""Benchmark per-pair gradient inner products: ghost vs per-pair exact loop vs torch.func vmap(grad).

Quantity (gradient-entanglement spec §5): for every pair, ⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖² with
g = ∇θ of the SUMMED response log-prob (EOS included), over ALL parameters of gpt2-small-random
(GPT2Config() defaults, tied wte/lm_head counted once), fp32 model, eval mode.

Methods (same pairs, same run):
* ``ghost``  -- ``entanglement.encoded_gradient_stats(method="ghost")``: one forward + one backward
  per batch of pairs, no per-example gradient materialized.
* ``exact``  -- ``encoded_gradient_stats(method="exact")``: per pair one forward, two backwards,
  per-parameter float64 dot products. The reference for the errors.
* ``vmap``   -- ``torch.func.vmap(grad(f))`` + ``functional_call`` on a deep copy of the plain HF
  module with eager attention (never a TransformerLens bridge), ``--vmap-chunk`` pairs per call.

Time = the minimum over ``--repeat`` timed runs (after an untimed 1-pair warm-up).
Error = max over pairs of |Δ⟨g_w,g_l⟩| / (‖g_w‖‖g_l‖) and |Δ‖g‖²| / ‖g‖² against ``exact``.
Peak memory: CUDA ``max_memory_allocated`` above the level before the method; CPU peak RSS
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) above the RSS before.

Usage::

    python benchmarks/bench_entanglement.py                      # CPU: 4 pairs x 32 tokens
    python benchmarks/bench_entanglement.py --device cuda        # GPU: 64 pairs x 256 tokens
    python benchmarks/bench_entanglement.py --json-out out.json --methods ghost,exact
    python benchmarks/bench_entanglement.py --sweep 32,64,128,256,512 --pairs 2   # ghost vs exact by length

``--sweep`` runs ghost and exact at each sequence length and prints one row per length: speedup,
ghost's peak memory over exact's, max relative error (issue 17 targets: ≥ 5× and ≤ 2× memory
from 32 to 512 tokens on CPU, ≤ 1e-3 error).

Targets (issue 6): ghost ≥ 10× the exact loop on GPU, ≥ 5× on CPU, at ≤ 1e-3 relative error.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preflens.dynamics.entanglement import encoded_gradient_stats  # noqa: E402
from preflens.models import load_model  # noqa: E402
from preflens.scoring import Encoded, collate  # noqa: E402

TARGET_SPEEDUP = {"cuda": 10.0, "cpu": 5.0}
TARGET_ERR = 1e-3


def make_pairs(vocab: int, eos: int, n: int, tokens: int, seed: int):
    """n random pairs; every sequence ≤ ``tokens`` (chosen exactly ``tokens``), varied lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        out = torch.randint(0, vocab - 1, (k,), generator=g)
        return tuple(int(i) + (int(i) >= eos) for i in out)  # never EOS inside the text

    enc_w, enc_l = [], []
    for _ in range(n):
        p = int(torch.randint(max(1, tokens // 4), max(2, tokens // 2 + 1), (1,), generator=g))
        prompt = ids(p)
        r_w = tokens - p
        r_l = max(1, r_w - int(torch.randint(0, max(1, tokens // 8), (1,), generator=g)))
        enc_w.append(Encoded(prompt, ids(r_w - 1) + (eos,)))
        enc_l.append(Encoded(prompt, ids(r_l - 1) + (eos,)))
    return enc_w, enc_l


def _rss_kb(field: str) -> int | None:
    try:
        m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _trim() -> None:
    """Return freed heap to the OS (glibc), so the next RSS baseline is not inflated by it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, device: torch.device):
    """(result, seconds, peak extra bytes or None)."""
    _trim()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
        except OSError:
            pass
        base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        hwm = _rss_kb("VmHWM")
        peak = (hwm - base) * 1024 if hwm is not None and base is not None else None
    return out, dt, peak


def run_stats(model, enc_w, enc_l, pad_id, method, batch_size):
    s = encoded_gradient_stats(model, enc_w, enc_l, pad_id=pad_id, method=method, batch_size=batch_size)
    return s.inner, s.norm_w_sq, s.norm_l_sq


def vmap_runner(model, pad_id: int):
    """Closure computing (ip, n_w², n_l²) by torch.func vmap(grad) on an eager-attention HF copy."""
    from torch.func import functional_call, grad, vmap

    m = copy.deepcopy(model).eval()
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        m.config._attn_implementation = "eager"
    params = {n: p.detach() for n, p in m.named_parameters()}
    emb = m.get_input_embeddings().weight
    wte = next(n for n, p in m.named_parameters() if p is emb)
    device = emb.device

    def summed_logprob(p, ids, tgt):
        # inputs_embeds: HF's padding check on input_ids is data-dependent (not vmappable); right
        # padding + causal attention needs no mask. The tied head reuses p[wte] (functional_call).
        x = F.embedding(ids[None], p[wte])
        logits = functional_call(m, p, (), {"inputs_embeds": x}).logits[0].float()
        lp = torch.log_softmax(logits, -1).gather(1, tgt.clamp(min=0)[:, None])[:, 0]
        return (lp * (tgt >= 0)).sum()

    per_row = vmap(grad(summed_logprob), in_dims=(None, 0, 0))

    def run(enc_w, enc_l, chunk):
        out = []
        for s in range(0, len(enc_w), chunk):
            w, l = enc_w[s:s + chunk], enc_l[s:s + chunk]
            k = len(w)
            b = collate(w + l, pad_id=pad_id, device=device)
            grads = per_row(params, b.input_ids, b.targets)
            ip = nw = nl = torch.zeros(k, dtype=torch.float64, device=device)
            for g in grads.values():
                gw, gl = g[:k].flatten(1).double(), g[k:].flatten(1).double()
                ip, nw, nl = ip + (gw * gl).sum(1), nw + (gw * gw).sum(1), nl + (gl * gl).sum(1)
                del gw, gl
            del grads
            out.append(torch.stack([ip, nw, nl]).cpu())
        return tuple(torch.cat(out, 1))

    return run


def rel_err(got, ref) -> float:
    ip, nw, nl = (t.double().cpu() for t in got)
    rip, rnw, rnl = (t.double().cpu() for t in ref)
    errs = [((ip - rip).abs() / (rnw * rnl).sqrt()).max(), ((nw - rnw).abs() / rnw).max(),
            ((nl - rnl).abs() / rnl).max()]
    return float(max(errs))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="gpt2-small-random")
    ap.add_argument("--pairs", type=int, default=None, help="default 4 (CPU) / 64 (CUDA)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sequence; 32 (CPU) / 256 (CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="ghost pairs per forward; 8 / 16")
    ap.add_argument("--vmap-chunk", type=int, default=None, help="pairs per vmap call; 1 (CPU) / 4 (CUDA)")
    ap.add_argument("--methods", default="ghost,exact,vmap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per method; the minimum is reported")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-pair warm-up")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--sweep", default=None, metavar="T1,T2,...",
                    help="ghost vs exact at each of these sequence lengths (one table row each)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        return sweep(args)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.pairs or (64 if gpu else 4)
    tokens = args.tokens or (256 if gpu else 32)
    batch_size = args.batch_size or (16 if gpu else 8)
    chunk = args.vmap_chunk or (4 if gpu else 1)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = set(methods) - {"ghost", "exact", "vmap"}
    if bad:
        ap.error(f"unknown methods {sorted(bad)}")
    torch.manual_seed(args.seed)

    lm = load_model(args.model, device=device)
    model = lm.model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    tokens = min(tokens, lm.n_ctx)
    enc_w, enc_l = make_pairs(vocab, lm.eos_id, n, tokens, args.seed)
    runners = {
        "ghost": lambda w, l: run_stats(model, w, l, lm.pad_id, "ghost", batch_size),
        "exact": lambda w, l: run_stats(model, w, l, lm.pad_id, "exact", batch_size),
    }
    if "vmap" in methods:
        vm = vmap_runner(model, lm.pad_id)
        runners["vmap"] = lambda w, l: vm(w, l, chunk)

    rows, results = [], {}
    for name in methods:
        try:
            if not args.no_warmup:
                runners[name](enc_w[:1], enc_l[:1])
            times, peaks = [], []
            for _ in range(max(1, args.repeat)):
                out, dt, p = measure(lambda: runners[name](enc_w, enc_l), device)
                times.append(dt)
                peaks.append(p)
            peak = peaks[0]
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:  # keep the other methods' numbers
            rows.append({"method": name, "error": f"out of memory: {exc}".splitlines()[0]})
            if gpu:
                torch.cuda.empty_cache()
            continue
        results[name] = out
        rows.append({"method": name, "seconds": min(times), "all_seconds": times, "peak_mem_bytes": peak})
    ref = results.get("exact")
    t_exact = next((r["seconds"] for r in rows if r["method"] == "exact" and "seconds" in r), None)
    for r in rows:
        if "seconds" in r:
            r["speedup_vs_exact"] = t_exact / r["seconds"] if t_exact else None
            r["max_rel_err_vs_exact"] = rel_err(results[r["method"]], ref) if ref is not None else None

    ghost = next((r for r in rows if r["method"] == "ghost" and "seconds" in r), None)
    target = TARGET_SPEEDUP["cuda" if gpu else "cpu"]
    met = None
    if ghost and ghost.get("speedup_vs_exact") is not None:
        met = ghost["speedup_vs_exact"] >= target and ghost["max_rel_err_vs_exact"] <= TARGET_ERR
    report = {
        "config": {"model": args.model, "device": str(device), "pairs": n, "tokens": tokens,
                   "ghost_batch_size": batch_size, "repeat": args.repeat, "vmap_chunk_pairs": chunk, "seed": args.seed,
                   "dtype": str(lm.dtype), "params": "all",
                   "n_params": sum(p.numel() for p in model.parameters()),
                   "device_name": torch.cuda.get_device_name(device) if gpu else platform.processor()
                   or platform.machine(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rows": rows,
        "target": {"speedup": target, "max_rel_err": TARGET_ERR, "met": met},
    }
    print(f"{args.model} on {report['config']['device_name']} ({device}): {n} pairs x {tokens} tokens, "
          f"{report['config']['n_params'] / 1e6:.1f}M params, {lm.dtype}")
    print(f"{'method':<7} {'time (s)':>10} {'speedup':>8} {'peak mem (MiB)':>15} {'max rel err':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<7} {r['error']}")
            continue
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] is not None else "n/a"
        sp = f"{r['speedup_vs_exact']:.1f}x" if r.get("speedup_vs_exact") else "n/a"
        err = f"{r['max_rel_err_vs_exact']:.1e}" if r.get("max_rel_err_vs_exact") is not None else "n/a"
        print(f"{r['method']:<7} {r['seconds']:>10.3f} {sp:>8} {mem:>15} {err:>12}")
    print(f"target: ghost >= {target:g}x exact at <= {TARGET_ERR:g} rel err: "
          + ("met" if met else "NOT met" if met is not None else "not measured"))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)
    return report


def sweep(args) -> dict:
    """Ghost vs exact at several lengths: speedup, peak-memory ratio, error (one row per length)."""
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n, batch_size = args.pairs or (64 if gpu else 2), args.batch_size or (16 if gpu else 8)
    lm = load_model(args.model, device=device)
    model = lm.model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    lengths = [min(int(t), lm.n_ctx) for t in args.sweep.split(",")]
    if not args.no_warmup:
        w, l = make_pairs(vocab, lm.eos_id, 1, lengths[0], args.seed)
        for method in ("ghost", "exact"):
            run_stats(model, w, l, lm.pad_id, method, batch_size)
    rows = []
    print(f"{args.model} on {platform.processor() or platform.machine()} ({device}), {n} pairs per length, "
          f"{torch.get_num_threads()} threads, {lm.dtype}")
    print(f"{'tokens':>6} {'exact (s)':>10} {'ghost (s)':>10} {'speedup':>8} {'exact MiB':>10} {'ghost MiB':>10} "
          f"{'mem ratio':>9} {'max rel err':>12}")
    for tokens in lengths:
        enc_w, enc_l = make_pairs(vocab, lm.eos_id, n, tokens, args.seed)
        got = {}
        for method in ("exact", "ghost"):
            got[method] = [measure(lambda m=method: run_stats(model, enc_w, enc_l, lm.pad_id, m, batch_size), device)
                           for _ in range(max(1, args.repeat))]
        (ex, t_ex, m_ex), (gh, t_gh, m_gh) = (min(got[k], key=lambda r: r[1]) for k in ("exact", "ghost"))
        row = {"tokens": tokens, "exact_s": t_ex, "ghost_s": t_gh, "speedup": t_ex / t_gh,
               "exact_peak_bytes": m_ex, "ghost_peak_bytes": m_gh,
               "mem_ratio": m_gh / m_ex if m_ex and m_gh is not None else None,
               "max_rel_err": rel_err(gh, ex)}
        rows.append(row)
        mib = lambda b: f"{b / 2**20:.0f}" if b is not None else "n/a"  # noqa: E731
        ratio = f"{row['mem_ratio']:.2f}" if row["mem_ratio"] is not None else "n/a"
        print(f"{tokens:>6} {t_ex:>10.2f} {t_gh:>10.2f} {row['speedup']:>7.1f}x {mib(m_ex):>10} {mib(m_gh):>10} "
              f"{ratio:>9} {row['max_rel_err']:>12.1e}", flush=True)
    report = {"config": {"model": args.model, "device": str(device), "pairs": n, "ghost_batch_size": batch_size,
                         "threads": torch.get_num_threads(), "torch": torch.__version__, "repeat": args.repeat},
              "rows": rows}
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
