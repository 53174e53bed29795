"""A minimal preference-optimization loop (DPO and the losses of :mod:`preflens.dynamics.losses`).

Read top to bottom, nanoGPT style. One optimizer step:

1. take the next length-bucketed global batch of ``batch_size`` pairs (an epoch's order is a pure
   function of ``(seed, epoch)``, so the data cursor is just ``(epoch, position)``);
2. split it over ``grad_accum`` micro-steps × ``world_size`` ranks (interleaved, so shards have
   similar lengths); a micro-batch stacks its chosen rows, then its rejected rows, into ONE
   right-padded forward (:func:`preflens.scoring.collate`);
3. u = Σ fp32 token log-probs of :func:`preflens.scoring.token_logprobs` (EOS counted; the
   function the probes use, so loop and probes agree), summed in float64;
4. per-pair loss from the registry against cached reference log-probs; backward of
   Σ loss / batch_size (× world size: DDP averages gradients);
5. gradient norm (clipped if asked), every metric reduced in ONE tensor (one host sync per step);
   a non-finite loss or gradient raises :class:`TrainingError` before any update, so the last
   checkpoint stays good; then ``optimizer.step()``.

Conventions: dropout is off (the policy runs in eval mode, as TRL's ``disable_dropout=True``);
``bf16`` = autocast for the forward, fp32 master weights, fp32 log-probs; the reference defaults
to the initial policy, scored once before training (:mod:`.refcache`). Metrics (TRL names,
ecosystem spec §2.1): ``rewards/*`` = β·(u − u_ref) on summed log-probs, β = the loss's ``beta``
if it has one, else 1.0 (reference-free losses: β·u); ``rewards/accuracies`` = mean 1[r_w > r_l]
(strict, as TRL); ``ranking_accuracy`` = mean 1[u_w ≥ u_l] on raw summed log-probs (Chen et al.
2024, Def. 2.3); ``logps/*`` batch means of summed log-probs, ``logps_mean/*`` of u/len;
``tokens_per_s`` counts prompt + response tokens of both responses. Step t = after t updates.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from preflens.data import PreferencePair
from preflens.data.io import atomic_write_text
from preflens.dynamics import losses
from preflens.dynamics.checkpoint import list_checkpoints, load_latest, save_checkpoint, truncate_metrics
from preflens.dynamics.refcache import (autocast_for, data_digest, pair_logprobs, reference_logprobs,
                                        tf32_for)
from preflens.errors import ConfigError, DataError, ScoringError, TrainingError
from preflens.scoring import Batch, collate, encode, length_buckets, token_logprobs

__all__ = ["train_preference", "RunResult", "TrainState", "epoch_batches"]

log = logging.getLogger(__name__)
OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
PRECISIONS, SCHEDULES = ("fp32", "bf16"), ("constant", "linear", "cosine")
WINDOW = 32  # bucketing window, in batches: pairs are sorted by length inside a shuffled window


@dataclass
class RunResult:
    """Last step's metrics, the metrics JSONL, the last checkpoint, steps done, full history."""

    final_metrics: dict
    metrics_path: Path
    checkpoint_path: Path | None
    steps: int
    history: list[dict]


@dataclass
class TrainState:
    """What callbacks see: ``on_step(state)`` after each update, ``on_end(state)`` at the end.

    ``policy`` = ``lm.model`` (the HF module being trained); ``ref_logps`` = ``(u_ref_w, u_ref_l)``
    float64 [n] over the training set (``None`` for reference-free losses); ``batch`` the step's
    global batch of pairs (``batch_indices`` their indices); keys added to ``metrics`` are logged.
    """

    step: int
    lm: Any
    policy: torch.nn.Module
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None
    batch: list
    batch_indices: list
    metrics: dict
    out_dir: Path
    total_steps: int
    optimizer: torch.optim.Optimizer
    rank: int = 0
    world_size: int = 1


class _SummedLogprobs(torch.nn.Module):
    """u [B] float64 = Σ_j token_logprobs; a module so that DDP sees the forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return token_logprobs(self.model, Batch(*tensors)).double().sum(1)


def epoch_batches(lengths, batch_size: int, seed: int, epoch: int, min_size: int = 1) -> list[list[int]]:
    """Length-bucketed batches (index lists) of one epoch; a pure function of ``seed``, ``epoch``.

    Shuffle, cut into windows of ``WINDOW·batch_size`` pairs, bucket each window by length
    (:func:`preflens.scoring.length_buckets`), shuffle the batches; drop batches smaller than
    ``min_size`` (only an epoch's last, partial batch can be).
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    perm, span, out = torch.randperm(len(lengths), generator=g).tolist(), WINDOW * batch_size, []
    for s in range(0, len(perm), span):
        win = perm[s : s + span]
        out += [[win[j] for j in b] for b in length_buckets([lengths[i] for i in win], batch_size)]
    out = [b for b in out if len(b) >= min_size]
    return [out[k] for k in torch.randperm(len(out), generator=g).tolist()]


def _stats(per_pair, u_w, u_l, ref_w, ref_l, len_w, len_l, beta, n_tokens) -> torch.Tensor:
    """[11] float64 sums over pairs; :func:`_metrics` turns the reduced sums into means."""
    r_w = beta * (u_w - ref_w) if ref_w is not None else beta * u_w
    r_l = beta * (u_l - ref_l) if ref_l is not None else beta * u_l
    rows = [per_pair.sum(), r_w.sum(), r_l.sum(), (r_w > r_l).sum(), u_w.sum(), u_l.sum(),
            (u_w / len_w).sum(), (u_l / len_l).sum(), (u_w >= u_l).sum(), u_w.new_tensor(len(u_w)), n_tokens]
    return torch.stack([r.double() for r in rows])


def _metrics(s: list[float], prefix: str = "") -> dict[str, float]:
    n = max(s[9], 1.0)
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "logps_mean/chosen", "logps_mean/rejected", "ranking_accuracy")
    m = {k: v / n for k, v in zip(names, s)}
    m = {**dict(list(m.items())[:3]), "rewards/margins": (s[1] - s[2]) / n, **dict(list(m.items())[3:])}
    return {prefix + k: v for k, v in m.items()}


def _encode_side(lm, ps, side: str, split: str, add_eos: bool) -> list:
    """Encode one side of ``ps``; a record that cannot be scored raises DataError naming it.

    The error carries ``pair_index`` and ``split`` ("train"/"eval") so that a caller who knows
    the file (the CLI) can name its line.
    """
    try:
        return encode(lm.tokenizer, [p.prompt for p in ps], [getattr(p, side) for p in ps],
                      max_length=lm.n_ctx, add_eos=add_eos)
    except ScoringError as batch_exc:
        for i, p in enumerate(ps):  # find the offending record (only on the error path)
            try:
                (e,) = encode(lm.tokenizer, [p.prompt], [getattr(p, side)], add_eos=add_eos)
                reason = None if len(e) <= lm.n_ctx else (
                    f"prompt ({len(e.prompt_ids)}) + {side} ({len(e.response_ids)}) tokens exceed the "
                    f"context of model '{lm.name}' ({lm.n_ctx})")
            except ScoringError as exc:
                reason = str(exc).removeprefix("example 0: ")
            if reason is not None:
                name = f"{split} pair {i}" + (f" (id {p.id!r})" if p.id is not None else "")
                err = DataError(f"{reason} [{name}]", field=side)
                err.pair_index, err.split = i, split
                raise err from None
        raise batch_exc


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable (ConfigError naming it otherwise), before any work;
    drop temporary files that a killed run's atomic writes left (``.*.tmp``, never read)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
        for stale in out_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError("out_dir", f"cannot write to {out_dir}: {exc.strerror or exc}") from None


def _validate(o: dict) -> None:
    """ConfigError naming the first bad option of ``train_preference``'s arguments ``o``."""
    def bad(name, reason, allowed=None):
        raise ConfigError(name, reason, allowed=allowed)

    for name in ("lr", "max_grad_norm"):
        v = o[name]
        if (v is not None or name == "lr") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                or not math.isfinite(v) or v <= 0):
            bad(name, f"must be a finite number > 0, got {v!r}")
    if (o["steps"] is None) == (o["epochs"] is None):
        bad("steps", "give exactly one of steps and epochs")
    for name, low in (("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0), ("keep_checkpoints", 1),
                      ("steps", 1), ("epochs", 1), ("eval_every", 1), ("checkpoint_every", 1),
                      ("seed", -2**63)):
        v = o[name]
        if (v is not None or name in ("batch_size", "seed")) and (
                not isinstance(v, int) or isinstance(v, bool) or v < low):
            bad(name, f"must be an integer >= {low}, got {v!r}")
    for name, allowed in (("optimizer", OPTIMIZERS), ("precision", PRECISIONS),
                          ("schedule", (None, *SCHEDULES))):
        if o[name] not in allowed:
            bad(name, f"unknown value {o[name]!r}", [a for a in allowed if a is not None])
    if not o["pairs"]:
        bad("pairs", "empty dataset")
    if any(not isinstance(p, PreferencePair) for p in o["pairs"] + o["eval_pairs"]):
        bad("pairs", "expected PreferencePair records (see preflens.data.read_pairs)")
    if o["eval_every"] is not None and not o["eval_pairs"]:
        bad("eval_every", "given without eval_pairs")
    if any(not (hasattr(cb, "on_step") or hasattr(cb, "on_end")) for cb in o["callbacks"]):
        bad("callbacks", "each callback needs on_step(state) and/or on_end(state)")
    if o["precision"] == "bf16" and next(o["lm"].model.parameters()).dtype != torch.float32:
        bad("precision", "bf16 autocast needs fp32 master weights; load the model in float32")


def train_preference(
    lm, pairs, *, loss="dpo", loss_kwargs=None, ref=None, optimizer="adamw", lr, schedule=None,
    warmup_steps=0, steps=None, epochs=None, batch_size, grad_accum=1, precision="fp32", compile=False,
    seed, eval_pairs=None, eval_every=None, callbacks=(), out_dir, resume=True, checkpoint_every=None,
    pairwise_normalized=False, device=None, max_grad_norm=None, optimizer_kwargs=None, ref_cache_dir=None,
    keep_checkpoints=2, add_eos=True,
) -> RunResult:
    """Train ``lm.model`` in place on ``pairs`` (``PreferencePair`` s) with registered loss ``loss``.

    Options beyond the module docstring: ``batch_size`` = pairs per update, global (over
    ``grad_accum`` micro-steps and the ranks; must divide by their product); exactly one of
    ``steps``/``epochs``; ``schedule`` None/"constant"/"linear"/"cosine" (to 0) after
    ``warmup_steps`` of linear warm-up; ``optimizer`` "adamw" (weight decay 0 unless in
    ``optimizer_kwargs``; fused on CUDA), "sgd", "rmsprop" (torch defaults); ``add_eos=False``
    scores responses without the appended EOS (single-token experiments, Razin et al. §3); ``ref`` an LM or HF
    module (default: the initial policy); ``max_grad_norm`` clips (default: no clipping);
    ``checkpoint_every`` N steps plus the final step, newest ``keep_checkpoints`` kept;
    ``resume=True`` continues from the newest good checkpoint in ``out_dir`` (bit-identical to
    an uninterrupted run on CPU fp32 except ``tokens_per_s``; callbacks' own state is not
    restored), ``resume=False`` deletes its checkpoints and starts over; ``pairwise_normalized``
    optimizes −a_w·(u_w/n_w − u_l/n_l), n = detached per-pair gradient norms (gradient-
    entanglement spec §7), while ``loss`` still logs the loss itself; ``cdpo`` without an
    ``alpha`` kwarg uses the pairs' own ``alpha`` when all have one. Under ``torchrun`` (env
    ``WORLD_SIZE`` > 1) it runs DDP (gloo on CPU, NCCL on GPU); only rank 0 writes files.

    Raises:
        ConfigError: naming the bad option (``out_dir`` when it cannot be created or written).
        DataError: a pair that cannot be scored (longer than the context), ``field`` = its side,
        ``pair_index``/``split`` attributes name it. TrainingError: non-finite loss/gradient
        (step named), a failed metrics/checkpoint write, an unreadable saved config on resume.
    """
    pairs, eval_pairs, callbacks = list(pairs), list(eval_pairs or []), list(callbacks)
    spec, kw = losses.get_loss(loss), losses.resolve_kwargs(loss, loss_kwargs)
    _validate(dict(locals()))
    # ---------------------------------------------------------------- device, ranks, output paths
    world, created_group = int(os.environ.get("WORLD_SIZE", "1")), False
    if device is None and world > 1 and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    device = torch.device(device) if device is not None else lm.device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"'{device}' requested but CUDA is not available")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    parts = world * grad_accum
    if batch_size % parts or len(pairs) < batch_size:
        raise ConfigError("batch_size", f"{batch_size} must divide by grad_accum × world size ({parts}) "
                          f"and not exceed the dataset ({len(pairs)} pairs)")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created_group = True
    rank = dist.get_rank() if world > 1 else 0
    policy = lm.model.to(device).eval().requires_grad_(True)  # eval = dropout off; grads still flow
    out_dir = Path(out_dir)
    ckpt_root, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    # ---------------------------------------------------------------- data and reference log-probs
    def encode_pairs(ps, split):
        return tuple(_encode_side(lm, ps, side, split, add_eos) for side in ("chosen", "rejected"))

    (enc_w, enc_l), (ev_w, ev_l) = encode_pairs(pairs, "train"), encode_pairs(eval_pairs, "eval")
    if rank == 0:  # after the data checks: a rejected run leaves no output behind
        _prepare_out_dir(out_dir)
    lengths, pad_id = [max(len(a), len(b)) for a, b in zip(enc_w, enc_l)], lm.pad_id
    steps_per_epoch = len(epoch_batches(lengths, batch_size, seed, 0, parts))
    total_steps = steps if steps is not None else epochs * steps_per_epoch
    alphas = {}  # cdpo soft labels from the data (Chen et al. 2024)
    own_alpha = all(p.alpha is not None for p in pairs + eval_pairs)
    if loss == "cdpo" and "alpha" not in (loss_kwargs or {}) and own_alpha:
        alphas = {"train": torch.tensor([p.alpha for p in pairs], dtype=torch.float64),
                  "eval": torch.tensor([p.alpha for p in eval_pairs], dtype=torch.float64)}
    beta, ref_model = float(kw.get("beta", 1.0)), getattr(ref, "model", ref) if ref is not None else policy

    def reference(ew, el):
        if not spec.uses_reference or not ew:
            return None
        args = dict(pad_id=pad_id, device=next(ref_model.parameters()).device, precision=precision,
                    cache_dir=ref_cache_dir or out_dir / "ref_cache")
        got = reference_logprobs(ref_model, ew, el, **args, compute=rank == 0)  # rank 0 fills the cache
        if world > 1:
            dist.barrier()
        return got or reference_logprobs(ref_model, ew, el, **args)

    ref_logps, eval_ref = reference(enc_w, enc_l), reference(ev_w, ev_l)
    config = dict(loss=loss, loss_kwargs=kw, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs or {},
                  lr=lr, schedule=schedule, warmup_steps=warmup_steps, batch_size=batch_size,
                  grad_accum=grad_accum, precision=precision, seed=seed,
                  pairwise_normalized=pairwise_normalized,
                  max_grad_norm=max_grad_norm, data=data_digest(enc_w, enc_l),
                  total_steps=total_steps if schedule in ("linear", "cosine") else None)
    config = json.loads(json.dumps(config, default=lambda t: t.tolist()))
    # ---------------------------------------------------------------- optimizer, resume, metrics file
    torch.manual_seed(seed)
    if compile:
        policy.base_model.compile()
    params = [p for p in policy.parameters() if p.requires_grad]
    okw = dict(optimizer_kwargs or {})
    if optimizer == "adamw":
        okw = {"weight_decay": 0.0, **({"fused": True} if device.type == "cuda" else {}), **okw}
    try:
        opt = OPTIMIZERS[optimizer](params, lr=lr, **okw)
    except (TypeError, ValueError) as exc:
        raise ConfigError("optimizer_kwargs", str(exc)) from exc
    start, last_ckpt = 0, None
    if not resume and rank == 0:
        for path in list_checkpoints(ckpt_root):
            shutil.rmtree(path)
    if resume and list_checkpoints(ckpt_root) and (out_dir / "config.json").is_file():
        try:  # checked before any weight is loaded
            saved = json.loads((out_dir / "config.json").read_text())
            if not isinstance(saved, dict):
                raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot resume: {out_dir / 'config.json'} is unreadable ({exc}); pass "
                                "resume=False (--no-resume) to start over") from None
        diff = [k for k in config if saved.get(k) != config[k]]
        if diff:
            raise ConfigError("resume", f"{out_dir} holds a run with different {', '.join(diff)}; pass "
                              "resume=False (--no-resume) to start over")
    if resume and (found := load_latest(ckpt_root, model=policy, optimizer=opt)) is not None:
        last_ckpt, start = found[0], found[1]["step"]
        log.info("resuming from %s at step %d", last_ckpt, start)
    if rank == 0:
        truncate_metrics(metrics_path, start)  # the file ends where the checkpoint does
        atomic_write_text(out_dir / "config.json", json.dumps(config, indent=1))
    model = _SummedLogprobs(policy)
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def lr_at(step):
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        decayed = {"linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}
        return lr * decayed.get(schedule, 1.0)

    def refs(pair_logps, idx):
        return (None, None) if pair_logps is None else tuple(x[idx].to(device) for x in pair_logps)

    def evaluate():
        mine = list(range(rank, len(ev_w), world))
        chosen, rejected = [ev_w[i] for i in mine], [ev_l[i] for i in mine]
        u_w, u_l = pair_logprobs(policy, chosen, rejected, pad_id=pad_id, device=device, precision=precision)
        lw, ll = (torch.tensor([len(e.response_ids) for e in x], dtype=torch.float64) for x in (chosen, rejected))
        rw, rl = (None, None) if eval_ref is None else (eval_ref[0][mine], eval_ref[1][mine])
        ekw = dict(kw, **({"alpha": alphas["eval"][mine]} if alphas else {}))
        lv = losses.compute_loss(loss, u_w, u_l, rw, rl, lw, ll, **ekw)
        sums = _stats(lv, u_w, u_l, rw, rl, lw, ll, beta, torch.tensor(0)).to(device)
        if world > 1:
            dist.all_reduce(sums)
        return _metrics(sums.tolist(), "eval/")

    # ---------------------------------------------------------------- the loop
    metrics_file = open(metrics_path, "a") if rank == 0 else None  # noqa: SIM115
    order, order_epoch, metrics, idx, t_prev = None, -1, {}, [], time.perf_counter()
    tf32 = tf32_for(device, precision)  # bf16 on CUDA: the fp32 unembedding matmuls use TF32
    tf32.__enter__()
    use_cache = getattr(policy.config, "use_cache", None)
    policy.config.use_cache = False  # no KV cache is built in training forwards (restored below)
    try:
        for step in range(start, total_steps):
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_batches(lengths, batch_size, seed, epoch, parts), epoch
            idx = order[pos]
            shards = [idx[m * world + rank :: parts] for m in range(grad_accum)]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            norms = []
            if pairwise_normalized:  # detached per-pair gradient norms (ghost; leaves .grad alone)
                from preflens.dynamics.entanglement import pair_gradient_norms

                for mine in shards:
                    n = pair_gradient_norms(policy, [enc_w[i] for i in mine], [enc_l[i] for i in mine],
                                            pad_id=pad_id)
                    norms.append([x.detach().to(device, torch.float64).clamp_min(1e-12) for x in n])
            opt.zero_grad(set_to_none=True)
            sums = torch.zeros(11, dtype=torch.float64, device=device)
            for m, mine in enumerate(shards):
                batch = collate([enc_w[i] for i in mine] + [enc_l[i] for i in mine], pad_id=pad_id,
                                device=device)
                lens = batch.response_lens.to(torch.float64)
                len_w, len_l, k = lens[: len(mine)], lens[len(mine) :], len(mine)
                ref_w, ref_l = refs(ref_logps, mine)
                mkw = dict(kw, **({"alpha": alphas["train"][mine]} if alphas else {}))
                with model.no_sync() if world > 1 and m < grad_accum - 1 else nullcontext():
                    with autocast_for(device, precision):
                        u = model(*batch.__dict__.values())
                    u_w, u_l = u[:k], u[k:]
                    lv = losses.compute_loss(loss, u_w, u_l, ref_w, ref_l, len_w, len_l, **mkw)
                    objective = lv
                    if pairwise_normalized:
                        a_w, _ = losses.weights(loss, u_w, u_l, ref_w, ref_l, len_w, len_l, **mkw)
                        objective = -a_w * (u_w / norms[m][0] - u_l / norms[m][1])
                    (objective.sum() * (world / len(idx))).backward()
                sums += _stats(lv.detach(), u_w.detach(), u_l.detach(), ref_w, ref_l, len_w, len_l, beta,
                               batch.attention_mask.sum())
            if max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if world > 1:
                dist.all_reduce(sums)
            s = torch.cat([sums, grad_norm.double().reshape(1)]).tolist()  # the step's one host sync
            if not (math.isfinite(s[0]) and math.isfinite(s[-1])):
                raise TrainingError(
                    f"step {step + 1}: non-finite {'loss' if not math.isfinite(s[0]) else 'gradient'} "
                    f"(loss {s[0] / s[9]}, grad_norm {s[-1]}); no update applied; last good checkpoint: "
                    f"{last_ckpt or 'none'}")
            opt.step()
            now = time.perf_counter()
            metrics = {"step": step + 1, **_metrics(s), "grad_norm": s[-1], "lr": lr_at(step),
                       "tokens_per_s": s[10] / max(now - t_prev, 1e-9)}
            t_prev = now
            if eval_pairs and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == total_steps):
                metrics.update(evaluate())
            state = TrainState(step + 1, lm, policy, ref_logps, [pairs[i] for i in idx], idx, metrics,
                               out_dir, total_steps, opt, rank, world)
            for cb in callbacks:
                if hasattr(cb, "on_step"):
                    cb.on_step(state)
            if metrics_file is not None:
                try:
                    metrics_file.write(json.dumps(metrics) + "\n")
                    metrics_file.flush()
                except OSError as exc:  # disk full: stop; a resume cuts the torn line off
                    raise TrainingError(f"step {step + 1}: could not write {metrics_path}: "
                                        f"{exc.strerror or exc}; last good checkpoint: {last_ckpt or 'none'}"
                                        ) from exc
            if (checkpoint_every and (step + 1) % checkpoint_every == 0) or step + 1 == total_steps:
                if rank == 0:
                    epoch_done, position = divmod(step + 1, steps_per_epoch)
                    cursor = {"epoch": epoch_done, "position": position}
                    save_checkpoint(ckpt_root, step + 1, model=policy, optimizer=opt,
                                    meta={"cursor": cursor, "config": config}, keep=keep_checkpoints)
                if world > 1:
                    dist.barrier()
                last_ckpt = ckpt_root / f"step-{step + 1:08d}"
        state = TrainState(total_steps, lm, policy, ref_logps, [pairs[i] for i in idx], idx, metrics,
                           out_dir, total_steps, opt, rank, world)
        for cb in callbacks:
            if hasattr(cb, "on_end"):
                cb.on_end(state)
        if world > 1:
            dist.barrier()
    finally:
        tf32.__exit__(None, None, None)
        policy.config.use_cache = use_cache
        if metrics_file is not None:
            try:
                metrics_file.close()
            except OSError:  # the write error was already raised as TrainingError
                pass
        if created_group:
            # Free DDP's reducer while the group is still registered, and let gloo's worker
            # threads finish releasing completed work (they need the GIL) before the group's
            # destructor joins them: otherwise teardown can deadlock (seen in CI under load).
            model = None
            gc.collect()
            time.sleep(0.2)
            dist.destroy_process_group()
    history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return RunResult(history[-1] if history else {}, metrics_path, last_ckpt, total_steps, history)
