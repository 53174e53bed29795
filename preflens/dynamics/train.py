"""A minimal preference-optimization loop (DPO and the losses of :mod:`preflens.dynamics.losses`).

Read top to bottom, nanoGPT style: :func:`train_preference` sets up (config, devices, data,
run directory, reference log-probs, optimizer, resume) and :func:`_loop` runs it. One update:

1. take the next length-bucketed global batch of ``batch_size`` pairs (an epoch's order is a pure
   function of ``(seed, epoch)``, so the data cursor is just ``(epoch, position)``);
2. split it over ``grad_accum`` micro-steps × ``world_size`` ranks (interleaved, so shards have
   similar lengths); a micro-batch is ONE right-padded forward of its chosen rows, then its
   rejected rows (:func:`preflens.scoring.concatenated_logps`);
3. u = Σ fp32 token log-probs (EOS counted; the function the probes use), summed in float64;
4. per-pair loss from the registry against cached reference log-probs; backward of
   Σ loss / batch_size (× world size: DDP averages gradients);
5. gradient norm (clipped if asked), every metric reduced in ONE tensor (one host sync per step);
   a non-finite loss or gradient raises :class:`TrainingError` before any update, so the last
   checkpoint stays good; then ``optimizer.step()``; then callbacks, metrics line, checkpoint.

Conventions: dropout is off (the policy runs in eval mode, as TRL's ``disable_dropout=True``);
``bf16`` = autocast for the forward, fp32 master weights, fp32 log-probs; ``head_precision="bf16"``
rounds the unembedding GEMMs' operands to bf16 (fp32 accumulation, fp32 logits and log-softmax;
:func:`preflens.scoring.target_logprobs`) in training, reference and eval alike; the reference defaults
to the initial policy, scored once before training in the batches of the first epoch
(:mod:`.refcache`), so at step 0 policy and reference agree bit for bit. The learning rate
follows transformers' schedules (:func:`preflens.dynamics.config.lr_at`: the first warm-up
update has lr 0, as in TRL). Step t = after t updates.

Metrics (TRL names where the meaning is TRL's): ``rewards/chosen``/``rejected`` = β·(u − u_ref)
on summed log-probs, β = the loss's ``beta`` (1 if it has none); reference-free losses log β·u
as TRL's CPOTrainer does, on the log-probs TRL's trainer for that loss uses: mean log-probs for
``simpo`` (TRL ``CPOTrainer(loss_type="simpo")``) and ``orpo`` (TRL ``ORPOTrainer``, whose β is
our λ), summed for the others; ``logps/*`` are the batch means of those same log-probs (so mean
log-probs for simpo and orpo), ``logps_mean/*`` always of u/len; ``rewards/accuracies`` = mean
1[r_w > r_l] (strict, as TRL: exactly 0 at step 1 when policy = reference);
``ranking_accuracy`` = mean 1[u_w ≥ u_l] on summed log-probs (Chen et al. 2024, Def. 2.3);
``tokens_per_s`` counts prompt + response tokens of both responses; ``grad_norm`` before clipping.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preflens.data import PreferencePair
from preflens.dynamics import fsdp, lora, losses
from preflens.dynamics.callbacks import Callback, CallbackList, TrainState
from preflens.dynamics.checkpoint import (list_checkpoints, load_extra_tensors, load_latest, save_checkpoint,
                                          truncate_metrics)
from preflens.dynamics.config import OPTIMIZERS, TrainConfig, lr_at
from preflens.dynamics.distributed import (DistEnv, all_reduce_sum, barrier, distributed, is_sharded, no_sync,
                                          wrap_model)
from preflens.dynamics.entanglement import pair_gradient_norms
from preflens.dynamics.refcache import data_digest, pair_logprobs, reference_logprobs
from preflens.dynamics.rundir import RunDir
from preflens.errors import ConfigError, TrainingError
from preflens.scoring import (ChosenRejectedLogps, EncodedPairs, SequenceLogps, autocast_for, concatenated_logps,
                              encode_pairs, length_buckets, tf32_for)

__all__ = ["train_preference", "RunResult", "TrainState", "TrainConfig", "Callback", "epoch_batches",
           "reference_batches"]

log = logging.getLogger(__name__)
WINDOW = 32  # bucketing window, in batches: pairs are sorted by length inside a shuffled window
EVAL_BATCH = 16
TRL_MEAN_LOGPS = ("simpo", "orpo")  # losses whose TRL trainer logs mean log-probs


@dataclass
class RunResult:
    """Last step's metrics, the metrics JSONL (None without ``out_dir``), the last checkpoint,
    steps done, full history (earlier runs' steps included after a resume)."""

    final_metrics: dict
    metrics_path: Path | None
    checkpoint_path: Path | None
    steps: int
    history: list[dict]
    peft_model: object = None  # LoRA runs: the PeftModel (save_pretrained, disable_adapter, merge_and_unload)


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


def shard(batch: list[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """The micro-batches of ``rank``: micro-step m takes ``batch[m·world + rank :: grad_accum·world]``."""
    return [batch[m * world_size + rank :: grad_accum * world_size] for m in range(grad_accum)]


def reference_batches(lengths, config: TrainConfig, world_size: int = 1) -> list[list[int]]:
    """Every micro-batch of epoch 0 (all ranks), then any pair epoch 0 leaves out in batches of the
    micro-batch size: the forward shapes in which the loop first scores each pair."""
    parts = config.grad_accum * world_size
    out = [mb for b in epoch_batches(lengths, config.batch_size, config.seed, 0, parts)
           for r in range(world_size) for mb in shard(b, r, world_size, config.grad_accum)]
    seen = {i for mb in out for i in mb}
    rest, size = [i for i in range(len(lengths)) if i not in seen], config.batch_size // parts
    return out + [rest[s : s + size] for s in range(0, len(rest), size)]


def eval_batches(lengths, rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s evaluation batches: its strided share of the pairs, length-bucketed."""
    mine = list(range(rank, len(lengths), world_size))
    return [[mine[j] for j in b] for b in length_buckets([lengths[i] for i in mine], EVAL_BATCH)]


# ----------------------------------------------------------------------------- setup
@dataclass
class TrainData:
    """The encoded data, its epoch order, and the run length."""

    pairs: list
    train: EncodedPairs
    eval: EncodedPairs | None
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    alphas: dict = field(default_factory=dict)  # cdpo soft labels read from the data
    _order: tuple = (-1, None)

    def batch_at(self, step: int, config: TrainConfig, parts: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_batches(self.train.lengths, config.batch_size, config.seed, epoch, parts))
        return self._order[1][pos]

    def loss_kwargs(self, config: TrainConfig, split: str, idx) -> dict:
        kw = config.resolved_loss_kwargs
        return dict(kw, alpha=self.alphas[split][idx]) if self.alphas else kw


def _check_inputs(lm, pairs: list, eval_pairs: list, cfg: TrainConfig) -> None:
    """ConfigError naming the first bad argument of :func:`train_preference` beyond the config."""
    if not pairs:
        raise ConfigError("pairs", "empty dataset")
    if any(not isinstance(p, PreferencePair) for p in pairs + eval_pairs):
        raise ConfigError("pairs", "expected PreferencePair records (see preflens.data.read_pairs)")
    if cfg.eval_every is not None and not eval_pairs:
        raise ConfigError("eval_every", "given without eval_pairs")
    if cfg.precision == "bf16" and next(lm.model.parameters()).dtype != torch.float32:
        raise ConfigError("precision", "bf16 autocast needs fp32 master weights; load the model in float32")


def prepare_data(lm, pairs: list, eval_pairs: list, cfg: TrainConfig, env: DistEnv) -> TrainData:
    """Encode train and eval pairs once (DataError naming a bad pair) and size the run."""
    parts = env.world_size * cfg.grad_accum
    if cfg.batch_size % parts or len(pairs) < cfg.batch_size:
        raise ConfigError("batch_size", f"{cfg.batch_size} must divide by grad_accum × world size ({parts}) "
                          f"and not exceed the dataset ({len(pairs)} pairs)")
    train = encode_pairs(lm, pairs, add_eos=cfg.add_eos, split="train")
    ev = encode_pairs(lm, eval_pairs, add_eos=cfg.add_eos, split="eval") if eval_pairs else None
    steps_per_epoch = len(epoch_batches(train.lengths, cfg.batch_size, cfg.seed, 0, parts))
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    alphas = {}
    if cfg.loss == "cdpo" and "alpha" not in cfg.loss_kwargs and all(p.alpha is not None for p in pairs + eval_pairs):
        alphas = {split: torch.tensor([p.alpha for p in ps], dtype=torch.float64)
                  for split, ps in (("train", pairs), ("eval", eval_pairs))}
    return TrainData(pairs, train, ev, lm.pad_id, steps_per_epoch, total, alphas)


def run_record(cfg: TrainConfig, data: TrainData) -> dict:
    """The resume-compatibility record: :meth:`TrainConfig.to_dict`, the data digest and, for a
    decaying schedule, the run length."""
    return {**cfg.to_dict(), "data": data_digest(data.train),
            "total_steps": data.total_steps if cfg.schedule in ("linear", "cosine") else None}


def reference_logps(ref_model, data: TrainData, cfg: TrainConfig, env: DistEnv, cache_dir) -> dict:
    """``{"train": (u_ref_w, u_ref_l), "eval": ...}`` float64 (empty for reference-free losses),
    scored in the loop's batch geometry; rank 0 fills the cache, the others read it."""
    if not losses.get_loss(cfg.loss).uses_reference:
        return {}
    device, out = next(ref_model.parameters()).device, {}
    world = env.world_size
    geometry = {"train": (data.train, reference_batches(data.train.lengths, cfg, world))}
    if data.eval is not None:
        geometry["eval"] = (data.eval, [b for r in range(world) for b in eval_batches(data.eval.lengths, r, world)])
    for split, (pairs, batches) in geometry.items():
        kw = dict(batches=batches, pad_id=data.pad_id, device=device, precision=cfg.precision,
                  head_precision=cfg.head_precision, cache_dir=cache_dir)
        got = reference_logprobs(ref_model, pairs, **kw, compute=env.is_main)
        barrier(env)
        out[split] = got or reference_logprobs(ref_model, pairs, **kw)
    return out


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` (AdamW: weight decay 0 unless given; fused on CUDA)."""
    okw = dict(cfg.optimizer_kwargs)
    if cfg.optimizer == "adamw":
        okw = {"weight_decay": 0.0, **({"fused": True} if device.type == "cuda" else {}), **okw}
    try:
        return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, **okw)
    except (TypeError, ValueError) as exc:
        raise ConfigError("optimizer_kwargs", str(exc)) from exc


def resume(run: RunDir, cfg: TrainConfig, policy, model, opt, callbacks: CallbackList,
           env: DistEnv) -> tuple[int, Path | None]:
    """Load the newest good checkpoint (weights, optimizer, RNG, callback state): ``(step, path)``.

    A sharded checkpoint (written with ``shard="fsdp"``, any number of processes) loads into any
    strategy and world size; a plain one into a plain or DDP run (LoRA runs: the adapters only)."""
    if not cfg.resume or run.out_dir is None:
        return 0, None
    found_all = list_checkpoints(run.checkpoints)
    if found_all and fsdp.is_sharded_checkpoint(found_all[-1]):
        found = fsdp.load_sharded_latest(run.checkpoints, model=model, optimizer=opt, world=env.world_size)
    elif found_all and is_sharded(model):
        raise TrainingError(f"checkpoint {found_all[-1]} was not written with shard='fsdp'; resume it with "
                            "shard='ddp', or pass resume=False to start over")
    else:
        found = load_latest(run.checkpoints, model=policy, optimizer=opt, trainable_only=cfg.lora_r is not None)
    if found is None:
        return 0, None
    path, state = found
    callbacks.load(state["meta"].get("callbacks", {}), load_extra_tensors(path))
    log.info("resuming from %s at step %d", path, state["step"])
    return state["step"], path


@contextmanager
def no_kv_cache(model):
    """No KV cache is built in training forwards (``config.use_cache`` restored on exit)."""
    old = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        yield
    finally:
        model.config.use_cache = old


# ----------------------------------------------------------------------------- metrics
class PairSums:
    """Named float64 sums over the pairs of one update (or one evaluation pass).

    Reduced over ranks in one ``all_reduce`` and read back in one host sync; :meth:`metrics`
    turns the totals into the logged means (module docstring).
    """

    FIELDS = ("loss", "reward_chosen", "reward_rejected", "reward_correct", "logp_chosen", "logp_rejected",
              "logp_mean_chosen", "logp_mean_rejected", "ranking_correct", "pairs", "tokens")

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        kw = cfg.resolved_loss_kwargs
        self.mean_logps = cfg.loss in TRL_MEAN_LOGPS
        self.scale = float(kw["lam"] if cfg.loss == "orpo" else kw.get("beta", 1.0))
        self.sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in self.FIELDS}

    def add(self, loss: torch.Tensor, lp: ChosenRejectedLogps, ref: tuple | None, tokens) -> None:
        u_w, u_l = (lp.chosen_mean, lp.rejected_mean) if self.mean_logps else (lp.chosen, lp.rejected)
        r_w = self.scale * (u_w - ref[0]) if ref is not None else self.scale * u_w
        r_l = self.scale * (u_l - ref[1]) if ref is not None else self.scale * u_l
        rows = {"loss": loss.sum(), "reward_chosen": r_w.sum(), "reward_rejected": r_l.sum(),
                "reward_correct": (r_w > r_l).sum(), "logp_chosen": u_w.sum(), "logp_rejected": u_l.sum(),
                "logp_mean_chosen": lp.chosen_mean.sum(), "logp_mean_rejected": lp.rejected_mean.sum(),
                "ranking_correct": (lp.chosen >= lp.rejected).sum(), "pairs": len(lp.chosen), "tokens": tokens}
        for k, v in rows.items():
            self.sums[k] = self.sums[k] + torch.as_tensor(v, device=self.sums[k].device).double()

    def reduce(self, env: DistEnv, **local: torch.Tensor) -> dict[str, float]:
        """Totals over ranks, plus this rank's ``local`` scalars (e.g. grad_norm), in one host sync."""
        total = all_reduce_sum(torch.stack([self.sums[k] for k in self.FIELDS]), env)
        values = torch.cat([total, *(v.double().reshape(1).to(total.device) for v in local.values())]).tolist()
        return dict(zip((*self.FIELDS, *local), values))

    @staticmethod
    def metrics(t: dict[str, float], prefix: str = "") -> dict[str, float]:
        n = max(t["pairs"], 1.0)
        m = {"loss": t["loss"] / n, "rewards/chosen": t["reward_chosen"] / n,
             "rewards/rejected": t["reward_rejected"] / n,
             "rewards/margins": (t["reward_chosen"] - t["reward_rejected"]) / n,
             "rewards/accuracies": t["reward_correct"] / n, "logps/chosen": t["logp_chosen"] / n,
             "logps/rejected": t["logp_rejected"] / n, "logps_mean/chosen": t["logp_mean_chosen"] / n,
             "logps_mean/rejected": t["logp_mean_rejected"] / n, "ranking_accuracy": t["ranking_correct"] / n}
        return {prefix + k: v for k, v in m.items()}


def _refs(refs: dict, split: str, idx, device) -> tuple | None:
    return None if split not in refs else tuple(x[idx].to(device) for x in refs[split])


# ----------------------------------------------------------------------------- one update, evaluation
def train_step(model, policy, params, data: TrainData, refs: dict, idx: list[int], cfg: TrainConfig,
               env: DistEnv) -> tuple[PairSums, torch.Tensor]:
    """Forward + backward of every micro-batch of global batch ``idx`` on this rank (gradients
    accumulated, all-reduced on the last micro-step); returns the step's sums and gradient norm."""
    shards, sums = shard(idx, env.rank, env.world_size, cfg.grad_accum), PairSums(cfg, env.device)
    pad_id = data.pad_id
    for m, mine in enumerate(shards):
        batch = data.train.batch(mine, pad_id=pad_id, device=env.device)
        ref, kw = _refs(refs, "train", mine, env.device), data.loss_kwargs(cfg, "train", mine)
        with no_sync(model, sync=m == len(shards) - 1):
            with autocast_for(env.device, cfg.precision):
                lp = concatenated_logps(model, batch, head_precision=cfg.head_precision)
            args = (lp.chosen, lp.rejected, *(ref or (None, None)), lp.chosen_tokens, lp.rejected_tokens)
            loss = losses.compute_loss(cfg.loss, *args, **kw)
            objective = loss
            if cfg.pairwise_normalized:  # −a_w·(u_w/n_w − u_l/n_l), norms detached
                n_w, n_l = pair_gradient_norms(policy, [data.train.chosen[i] for i in mine],
                                               [data.train.rejected[i] for i in mine], pad_id=pad_id)
                n_w, n_l = (x.detach().to(env.device, torch.float64).clamp_min(1e-12) for x in (n_w, n_l))
                a_w, _ = losses.weights(cfg.loss, *args, **kw)
                objective = -a_w * (lp.chosen / n_w - lp.rejected / n_l)
            (objective.sum() * (env.world_size / len(idx))).backward()
        detached = ChosenRejectedLogps(*(x.detach() for x in (lp.chosen, lp.rejected)), lp.chosen_tokens,
                                       lp.rejected_tokens)
        sums.add(loss.detach(), detached, ref, batch.attention_mask.sum())
    if cfg.max_grad_norm is not None:
        return sums, fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    return sums, fsdp.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def evaluate(policy, data: TrainData, refs: dict, cfg: TrainConfig, env: DistEnv, model=None) -> dict:
    """``eval/*`` metrics of the policy on the eval pairs (each rank scores its strided share;
    FSDP: every rank scores every pair -- the same forwards on every rank, the root unit gathered)."""
    sharded = model is not None and is_sharded(model)
    if sharded:
        env = DistEnv(env.device)  # this rank computes the totals itself: no reduce
        model.unshard()
    batches = eval_batches(data.eval.lengths, env.rank, env.world_size)
    mine = sorted(i for b in batches for i in b)
    u_w, u_l = pair_logprobs(policy, data.eval, batches=batches, pad_id=data.pad_id, device=env.device,
                             precision=cfg.precision, head_precision=cfg.head_precision)
    if sharded:
        model.reshard()
    lens = [torch.tensor([len(x[i].response_ids) for i in mine], dtype=torch.float64)
            for x in (data.eval.chosen, data.eval.rejected)]
    lp = ChosenRejectedLogps(u_w[mine], u_l[mine], *lens)
    ref = _refs(refs, "eval", mine, "cpu")
    loss = losses.compute_loss(cfg.loss, lp.chosen, lp.rejected, *(ref or (None, None)), *lens,
                               **data.loss_kwargs(cfg, "eval", mine))
    sums = PairSums(cfg, torch.device("cpu"))
    sums.add(loss, lp, ref, 0)
    sums.sums = {k: v.to(env.device) for k, v in sums.sums.items()}
    return PairSums.metrics(sums.reduce(env), "eval/")


# ----------------------------------------------------------------------------- the loop
class _TrackingReplica:
    """Under FSDP, a plain replica of the policy for the measuring callbacks (``measures = True``,
    e.g. the lens trackers), which run forwards/backwards on rank 0 alone: a rank-0-only pass over
    sharded parameters would wait forever for the other ranks' all-gathers. On a step where a
    measuring callback may record (its ``records_at(step, total)``; every step when it has none;
    always at the start), every rank joins one full-state gather to CPU and rank 0 loads it into
    the replica (built once); ``state.model`` is the replica on rank 0 for that step's callbacks,
    the sharded policy otherwise."""

    def __init__(self, callbacks: CallbackList, policy, model, env: DistEnv, state: TrainState) -> None:
        self.measuring = [cb for cb in callbacks.callbacks if getattr(cb, "measures", False)]
        self.policy, self.model, self.env, self.state = policy, model, env, state
        self.plain = None

    def sync(self, step: int | None, total: int) -> None:
        """``step`` None = the start of training."""
        self.state.model = self.policy
        if not self.measuring or (step is not None and not any(
                cb.records_at(step, total) if callable(getattr(cb, "records_at", None)) else True
                for cb in self.measuring)):
            return
        full = fsdp.full_policy_state(self.policy, self.model, cpu_offload=True)  # collective: every rank
        if self.env.is_main:
            self.plain = fsdp.plain_from_state(self.policy, full, self.plain, device=self.env.device)
            self.state.model = self.plain


def _loop(lm, data: TrainData, refs: dict, cfg: TrainConfig, env: DistEnv, run: RunDir, callbacks: CallbackList,
          model, opt, params, start: int, last_ckpt: Path | None, peft_model=None) -> RunResult:
    policy, total = lm.model, data.total_steps
    parts = env.world_size * cfg.grad_accum
    sharded = is_sharded(model)
    state = TrainState(step=start, total_steps=total, epoch=max(start - 1, 0) // data.steps_per_epoch, metrics={},
                       model=policy, lm=lm, rank=env.rank, world_size=env.world_size, out_dir=run.out_dir,
                       config=cfg, optimizer=opt, ref_logps=refs.get("train"))  # updated in place each step
    with ExitStack() as stack:
        stack.enter_context(tf32_for(env.device, cfg.precision))  # bf16 on CUDA: fp32 head matmuls in TF32
        stack.enter_context(no_kv_cache(policy))
        stack.enter_context(run.metrics_writer())
        replica = _TrackingReplica(callbacks, policy, model, env, state) if sharded else None
        if replica is not None:
            replica.sync(None, total)
        callbacks.on_train_begin(state)
        t_prev = time.perf_counter()
        for step in range(start, total):
            idx = data.batch_at(step, cfg, parts)
            lr = lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=total, schedule=cfg.schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            sums, grad_norm = train_step(model, policy, params, data, refs, idx, cfg, env)
            t = sums.reduce(env, grad_norm=grad_norm)  # the step's one host sync
            if not (math.isfinite(t["loss"]) and math.isfinite(t["grad_norm"])):
                what = "loss" if not math.isfinite(t["loss"]) else "gradient"
                raise TrainingError(f"step {step + 1}: non-finite {what} (loss {t['loss'] / t['pairs']}, grad_norm "
                                    f"{t['grad_norm']}); no update applied; last good checkpoint: {last_ckpt or 'none'}")
            opt.step()
            now = time.perf_counter()
            metrics = {"step": step + 1, **PairSums.metrics(t), "grad_norm": t["grad_norm"], "lr": lr,
                       "tokens_per_s": t["tokens"] / max(now - t_prev, 1e-9)}
            t_prev = now
            if data.eval is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == total):
                metrics.update(evaluate(policy, data, refs, cfg, env, model))
            state.step, state.epoch, state.metrics = step + 1, step // data.steps_per_epoch, metrics
            state.batch, state.batch_indices = [data.pairs[i] for i in idx], idx
            if replica is not None:
                replica.sync(step + 1, total)
            callbacks.on_step(state)
            run.log(metrics, last_ckpt)
            if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or step + 1 == total:
                last_ckpt = run.save(step + 1, data.steps_per_epoch, policy, opt, callbacks, cfg.keep_checkpoints,
                                     trainable_only=peft_model is not None,
                                     sharded=(model, env) if cfg.shard == "fsdp" else None) or last_ckpt
                barrier(env)
        callbacks.on_end(state)
        if sharded:  # hand back a plain module holding the full trained weights (every rank)
            lm.model = fsdp.gather_plain_model(policy, model)
        barrier(env)
    history = run.history()
    return RunResult(history[-1] if history else {}, run.metrics_path, last_ckpt, total, history, peft_model)


def train_preference(lm, pairs, config: TrainConfig | None = None, *, eval_pairs=None, callbacks=(),
                     out_dir=None, checkpoint: bool = True, ref=None, **options) -> RunResult:
    """Train ``lm.model`` in place on ``pairs`` (``PreferencePair`` s) as ``config`` says.

    ``config``: a :class:`TrainConfig`; or its fields as keywords (``train_preference(lm, pairs,
    lr=1e-3, steps=10, batch_size=4, seed=0, out_dir=...)``), not both. ``eval_pairs``: held-out
    pairs (``eval/*`` metrics every ``eval_every`` steps and at the end). ``callbacks``: objects
    of the :mod:`preflens.dynamics.callbacks` protocol. ``out_dir``: the run directory
    (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``ref_cache/``); None writes nothing.
    ``checkpoint=False``: no checkpoints (throwaway runs). ``ref``: the reference, an LM or HF
    module (default: the initial policy). Under ``torchrun`` (env ``WORLD_SIZE`` > 1) it runs
    DDP, or FSDP2 with ``shard="fsdp"`` (gloo on CPU, NCCL on GPU); only rank 0 writes files
    (sharded checkpoints: every rank its shard). After an FSDP run ``lm.model`` is a new plain
    module with the full trained weights. LoRA (``lora_r``): adapters are attached to
    ``lm.model`` in place after the reference is scored; ``RunResult.peft_model`` holds them. Resuming (``config.resume``, the
    default) continues from the newest good checkpoint, bit-identical to an uninterrupted run
    on CPU fp32 (``tokens_per_s`` aside), callback state included.

    Raises:
        ConfigError: naming the bad field or argument (``out_dir`` when it cannot be written, is
            an unrelated non-empty directory or is in use by another run; ``resume`` when it holds
            a run with a different configuration -- nothing is written then).
        DataError: a pair that cannot be scored (``field`` = its side, ``pair_index``/``split``
            attributes; ``file``/``line`` when the pair was read from a file).
        TrainingError: non-finite loss/gradient (step named), a failed metrics/checkpoint write,
            an unreadable saved config on resume.
    """
    if config is not None and options:
        raise ConfigError("config", f"give a TrainConfig or its fields as keywords, not both ({', '.join(options)})")
    cfg = config if config is not None else TrainConfig(**options)
    pairs, eval_pairs = list(pairs), list(eval_pairs or [])
    _check_inputs(lm, pairs, eval_pairs, cfg)
    hooks = CallbackList(callbacks)
    with distributed(cfg.device, lm.device) as env:
        data = prepare_data(lm, pairs, eval_pairs, cfg, env)
        run = RunDir(out_dir, env.is_main, checkpoint)
        record = run_record(cfg, data)
        run.check_resume(record, cfg.resume)  # before anything is written: a refused resume writes nothing
        with run.open():
            policy = lm.model.to(env.device).eval().requires_grad_(True)  # eval = dropout off; grads flow
            ref_model = getattr(ref, "model", ref) if ref is not None else policy
            refs = reference_logps(ref_model, data, cfg, env, cfg.ref_cache_dir or run.ref_cache)
            torch.manual_seed(cfg.seed)
            peft_model = None
            if cfg.lora_r is not None:  # after the reference: the cached log-probs are the base model's
                peft_model = lora.attach_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
            if cfg.activation_checkpointing:
                fsdp.enable_activation_checkpointing(policy)
            if cfg.compile:
                policy.base_model.compile()
            model = wrap_model(SequenceLogps(policy), env, cfg.shard,
                               bf16=cfg.precision == "bf16" and env.device.type == "cuda")
            params = [p for p in policy.parameters() if p.requires_grad]  # after sharding: DTensors
            opt = make_optimizer(params, cfg, env.device)
            if not cfg.resume:
                run.drop_checkpoints()
            start, last_ckpt = resume(run, cfg, policy, model, opt, hooks, env)
            run.start(start, record, info={"model": lm.name, "data_path": _data_path(pairs),
                                           "steps": cfg.steps, "epochs": cfg.epochs})
            return _loop(lm, data, refs, cfg, env, run, hooks, model, opt, params, start, last_ckpt, peft_model)


def _data_path(pairs) -> str | None:
    source = getattr(pairs[0], "source", None)
    return str(source[0]) if source else None
