"""Shared machinery of the lens trackers: training-loop callbacks that measure while a run trains.

A tracker follows the training loop's callback protocol (:mod:`preflens.dynamics.train`):
``name``; ``on_train_begin(state)``; ``on_step(state) -> dict | None`` whose scalars are merged
into that step's ``metrics.jsonl`` row; ``on_end(state)``; ``state_dict()`` /
``load_state_dict(d)`` (saved with every checkpoint, restored on resume). This module sits
beside :mod:`preflens.scoring` so that every lens package (probes, dynamics, attribution) can
build on it without importing a sibling.

Conventions every tracker shares (:class:`Tracker`):

* **When.** A record is taken at ``on_train_begin`` (the baseline, step 0 on a fresh run) and in
  ``on_step`` at every step that is a multiple of ``every`` and at the last step. Step ``t`` =
  the model after ``t`` updates. Quantities "since step 0" are relative to the baseline.
* **Where.** Rank 0 only (``state.is_main``); other ranks return ``None`` and go on to their next
  collective, where they wait for rank 0. Nothing a tracker does is a collective operation.
* **Names.** Scalars are returned as ``tracked/<lens>/<quantity>`` (non-finite values are left
  out of the row); per-pair detail is appended to ``OUT/tracked/<lens>.jsonl``, one line per
  record ``{"step", "metrics", ...detail}``. On resume from step ``s`` the lines past ``s`` are cut
  (:func:`truncate_jsonl`), as the loop does for ``metrics.jsonl``.
* **No perturbation.** A record runs inside :func:`measuring`: the torch RNG streams are forked
  and restored, the model is put in eval mode and its mode restored, and every parameter's
  ``.grad`` is put back as it was. Gradients a lens needs are taken with ``torch.autograd.grad``
  on the plain (unwrapped) module, never through DDP.
* **State.** ``state_dict()`` is plain JSON (floats round-trip exactly), so a resumed run's
  tracked metrics equal an uninterrupted run's bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preflens.data.io import atomic_write_text, truncate_jsonl  # noqa: F401  (truncate_jsonl re-exported)
from preflens.errors import ConfigError, DataError
from preflens.scoring import (CPU_MAX_TOKENS, collate, encode, final_hidden, head_logits, length_buckets, logit_head,
                              target_logprobs)
from preflens.stats import spearman  # re-exported: trackers and their tests use it from here

__all__ = [
    "TRACKED_DIR",
    "Tracker",
    "ProbeSet",
    "ProbeScores",
    "measuring",
    "sample_probe_pairs",
    "spearman",
    "truncate_jsonl",
    "read_jsonl",
]

log = logging.getLogger(__name__)
TRACKED_DIR = "tracked"


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def sample_probe_pairs(pairs: Sequence, n: int, seed: int = 0) -> list:
    """A fixed seeded sample of ``n`` pairs (all of them, in order, when ``n >= len(pairs)``).

    ``random.Random(seed).sample`` of the indices, kept in their original order, so the probe
    set is a pure function of ``(len(pairs), n, seed)``; the global RNG is not touched.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError("n", f"must be an integer >= 1, got {n!r}")
    pairs = list(pairs)
    if not pairs:
        raise DataError("no pairs to sample probes from", field="pairs")
    if n >= len(pairs):
        return pairs
    idx = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in idx]


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file that may still be being written: a torn last line is ignored, an
    unreadable line elsewhere is a :class:`DataError` naming ``file:line``."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            if n == len(lines):  # the writer is mid-line (a run that is still going)
                break
            raise DataError(f"not valid JSON ({exc})", file=path, line=n) from None
        if not isinstance(rec, dict):
            raise DataError("expected a JSON object", file=path, line=n)
        out.append(rec)
    return out


@contextmanager
def measuring(model: torch.nn.Module):
    """Run a measurement on ``model`` without perturbing training.

    Inside: eval mode; the torch CPU (and the model's CUDA device's) RNG state is forked and
    restored on exit; each parameter's ``.grad`` is restored to the tensor it was (``None``
    included), so nothing a lens computes can leak into the next optimizer step.
    """
    params = list(model.parameters())
    grads = [p.grad for p in params]
    was_training = model.training
    device = params[0].device if params else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)
            for p, g in zip(params, grads):
                if p.grad is not g:
                    p.grad = g


def _state_attr(state, name: str, default=None):
    return getattr(state, name, default)


def _is_main(state) -> bool:
    main = _state_attr(state, "is_main")
    return bool(main) if main is not None else int(_state_attr(state, "rank", 0) or 0) == 0


def _state_model(state):
    model = _state_attr(state, "model")
    return model if model is not None else _state_attr(state, "policy")


# --------------------------------------------------------------------------------------------
# one scoring pass over a probe set, shared by the probe lenses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeScores:
    """One pass of the model over a probe set (``n`` pairs), CPU tensors.

    ``u_w``/``u_l`` [n] float64 summed response log-probs (EOS counted; bit-identical to
    :func:`preflens.scoring.response_logprobs` at the same ``batch_size``), ``len_w``/``len_l``
    [n] response lengths; ``h_w``/``h_l`` [n, d] float64 sums over the response-predicting
    positions of the post-final-norm hidden states and ``hm_w``/``hm_l`` their means (CHES, Razin
    et al. 2024 Def. 2); ``first_w`` [s] float64 ln π(y+_1|x) at the last prompt position of each
    single-token pair (no EOS) and ``next_logp`` [k, V] float32 the whole log-distribution there
    for the first ``k`` of them (see :class:`ProbeSet`).
    """

    u_w: torch.Tensor
    u_l: torch.Tensor
    len_w: torch.Tensor
    len_l: torch.Tensor
    h_w: torch.Tensor | None = None
    h_l: torch.Tensor | None = None
    hm_w: torch.Tensor | None = None
    hm_l: torch.Tensor | None = None
    first_w: torch.Tensor | None = None
    next_logp: torch.Tensor | None = None


class ProbeSet:
    """A fixed set of probe pairs, encoded once (:mod:`preflens.scoring` conventions), scored by
    :meth:`score`. Trackers given the same ``ProbeSet`` share one pass per record step.

    ``single_token`` lists the pairs whose chosen and rejected responses are each exactly one token
    before EOS (Razin et al. 2024 Sec. 3); the next-token distribution is kept for the first
    ``max_distributions`` of them.
    """

    def __init__(self, lm, pairs: Sequence, *, batch_size: int = 64, add_eos: bool = True,
                 max_distributions: int = 16) -> None:
        pairs = list(pairs)
        if not pairs:
            raise DataError("no probe pairs", field="pairs")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", f"must be an integer >= 1, got {batch_size!r}")
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, lm.pad_id
        prompts, sources = [p.prompt for p in pairs], [getattr(p, "source", None) for p in pairs]
        self.enc_w, self.enc_l = (encode(lm.tokenizer, prompts, [getattr(p, side) for p in pairs], add_eos=add_eos,
                                         max_length=lm.n_ctx, sources=sources, response_field=side)
                                  for side in ("chosen", "rejected"))
        extra = 1 if add_eos else 0
        self.single_token = [i for i, (a, b) in enumerate(zip(self.enc_w, self.enc_l))
                             if len(a.response_ids) == 1 + extra and len(b.response_ids) == 1 + extra]
        self.distribution_pairs = self.single_token[:max_distributions]
        self.want_hidden = self.want_distributions = False  # set by the trackers that need them
        self._memo: tuple | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def _side(self, model, encoded, device, with_hidden: bool):
        n = len(encoded)
        t_max = max(len(e.response_ids) for e in encoded)
        tok_lp = torch.zeros((n, t_max), dtype=torch.float32)
        h_sum = h_mean = None
        budget = CPU_MAX_TOKENS if device.type == "cpu" else None
        head, transform = model.get_output_embeddings(), logit_head(model)
        for idx in length_buckets([len(e) for e in encoded], self.batch_size, max_tokens=budget):
            batch = collate([encoded[i] for i in idx], pad_id=self.pad_id, device=device)
            hidden = final_hidden(model, batch)
            mask = batch.response_mask
            lp = target_logprobs(hidden[mask], head.weight, getattr(head, "bias", None), batch.targets[mask],
                                 head=transform)
            lp = torch.zeros(mask.shape, dtype=lp.dtype, device=hidden.device).masked_scatter(mask, lp).cpu()
            hid = hidden.float().cpu() if with_hidden else None
            if with_hidden and h_sum is None:
                h_sum = torch.zeros((n, hid.shape[-1]), dtype=torch.float64)
                h_mean = torch.zeros_like(h_sum)
            for row, i in enumerate(idx):
                p, r = len(encoded[i].prompt_ids), len(encoded[i].response_ids)
                tok_lp[i, :r] = lp[row, p - 1 : p + r - 1]
                if with_hidden:
                    h = hid[row, p - 1 : p + r - 1].to(torch.float64)
                    h_sum[i], h_mean[i] = h.sum(0), h.mean(0)
        return tok_lp.double().sum(1), h_sum, h_mean

    def _next_logp(self, model, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ln π(y+_1|x) [s] float64, log-distributions [k, V] float32) for the single-token pairs."""
        first, dists = [], []
        for s in range(0, len(self.single_token), self.batch_size):
            rows = self.single_token[s : s + self.batch_size]
            batch = collate([self.enc_w[i] for i in rows], pad_id=self.pad_id, device=device)
            hidden = final_hidden(model, batch)
            last = batch.prompt_lens.to(hidden.device) - 1
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            lp = torch.log_softmax(head_logits(model, h, dtype=torch.float32), -1).cpu()
            ids = torch.tensor([self.enc_w[i].response_ids[0] for i in rows])
            first.append(lp[torch.arange(len(rows)), ids].double())
            dists += [lp[j] for j, i in enumerate(rows) if i in self.distribution_pairs]
        return torch.cat(first), (torch.stack(dists) if dists else None)

    @torch.no_grad()
    def score(self, model, step: int | None = None, *, hidden: bool = False,
              distributions: bool = False) -> ProbeScores:
        """Score the probe pairs with ``model`` (eval mode, mode restored).

        Hidden-state sums and single-token distributions are computed when asked here or by
        ``want_hidden`` / ``want_distributions`` (set by the trackers sharing this set). With a
        ``step``, the result is kept and returned again for the same model, step and parameter
        versions, so several trackers share one pass.
        """
        hidden, distributions = hidden or self.want_hidden, distributions or self.want_distributions
        params = list(model.parameters())
        key = (id(model), step, tuple(p._version for p in params), hidden, distributions)
        if step is not None and self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        device = params[0].device
        was = model.training
        model.eval()
        try:
            u_w, h_w, hm_w = self._side(model, self.enc_w, device, hidden)
            u_l, h_l, hm_l = self._side(model, self.enc_l, device, hidden)
            first, nxt = self._next_logp(model, device) if distributions and self.single_token else (None, None)
        finally:
            model.train(was)
        out = ProbeScores(u_w, u_l, torch.tensor([len(e.response_ids) for e in self.enc_w]),
                          torch.tensor([len(e.response_ids) for e in self.enc_l]), h_w, h_l, hm_w, hm_l,
                          first, nxt)
        if step is not None:
            self._memo = (key, out)
        return out


# --------------------------------------------------------------------------------------------
# the tracker base class
# --------------------------------------------------------------------------------------------


class Tracker:
    """Base of the lens trackers (module docstring). Subclasses set ``name`` and implement
    :meth:`measure` (and :meth:`extra_state` / :meth:`load_extra_state` for their own state).

    ``history`` holds ``{"step", **scalars}`` per record (scalars without the
    ``tracked/<lens>/`` prefix); ``lm`` is the :class:`~preflens.models.LM` whose tokenizer and
    conventions the lens uses (its model is replaced by the state's model at each record).
    """

    name = "tracker"
    #: a callback that runs forwards/backwards on ``state.model`` (on rank 0) at record steps; under
    #: FSDP the training loop gathers a plain replica for it on the steps :meth:`records_at` names
    measures = True

    def __init__(self, lm, *, every: int = 10) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError("every", f"must be an integer >= 1, got {every!r}")
        self.lm, self.every = lm, every
        self.history: list[dict[str, Any]] = []
        self.path: Path | None = None
        self.seconds = 0.0  # wall time spent recording (not saved: timing is not reproducible)

    # -- what subclasses provide ----------------------------------------------------------
    def measure(self, lm, step: int) -> tuple[dict[str, float], dict[str, Any]]:
        """``(scalars, detail)`` for the model ``lm.model`` after ``step`` updates."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, d: dict[str, Any]) -> None:
        pass

    # -- recording ------------------------------------------------------------------------
    @property
    def last_step(self) -> int | None:
        return self.history[-1]["step"] if self.history else None

    def _lm_for(self, model):
        if model is None or model is self.lm.model:
            return self.lm
        return dataclasses.replace(self.lm, model=model)

    def record(self, model, step: int) -> dict[str, float]:
        """Measure ``model`` now, label it ``step``, append to ``history`` (and to the JSONL file
        once the run directory is known); returns the scalars without prefix."""
        lm = self._lm_for(model)
        t0 = time.perf_counter()
        with measuring(lm.model):
            scalars, detail = self.measure(lm, int(step))
        scalars = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        self.history.append({"step": int(step), **scalars})
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": int(step), "metrics": scalars, **detail}) + "\n")
        self.seconds += time.perf_counter() - t0
        return scalars

    def _prefixed(self, scalars: dict[str, float]) -> dict[str, float]:
        return {f"tracked/{self.name}/{k}": v for k, v in scalars.items()}

    # -- the callback protocol ------------------------------------------------------------
    def on_train_begin(self, state) -> None:
        if not _is_main(state):
            return
        step = int(state.step)
        out_dir = _state_attr(state, "out_dir")
        if out_dir is not None:
            self.path = Path(out_dir) / TRACKED_DIR / f"{self.name}.jsonl"
            truncate_jsonl(self.path, step)
        if self.last_step is not None and self.last_step > step:  # state from a later step
            self.history = [h for h in self.history if h["step"] <= step]
        if self.last_step is None:
            self.record(_state_model(state), step)

    def records_at(self, step: int, total: int | None) -> bool:
        """Whether :meth:`on_step` may record after ``step`` updates of ``total`` (every
        ``every``-th step and the last). The same answer on every rank (it ignores ``history``,
        which only rank 0 fills), so all ranks can agree on collective work for the record."""
        return not step % self.every or step == total

    def on_step(self, state) -> dict[str, float] | None:
        if not _is_main(state):
            return None
        step, total = int(state.step), _state_attr(state, "total_steps")
        if not self.records_at(step, total):
            return None
        if self.last_step == step:
            return None
        return self._prefixed(self.record(_state_model(state), step))

    def on_end(self, state) -> None:
        pass

    def fingerprint(self) -> str:
        """sha256 (16 hex) of what the saved state depends on: the probe pairs (``self.probes`` or
        ``self.pairs``) and :meth:`settings`."""
        import hashlib

        probes = getattr(self, "probes", None)
        pairs = probes.pairs if probes is not None else getattr(self, "pairs", [])
        text = json.dumps([[p.prompt, p.chosen, p.rejected] for p in pairs] + [self.settings()],
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def settings(self) -> dict[str, Any]:
        """Options that change the recorded quantities (part of :meth:`fingerprint`)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "every": self.every, "fingerprint": self.fingerprint(),
                "history": [dict(h) for h in self.history], **self.extra_state()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a saved state; ConfigError ``track`` when it was recorded by another lens or on
        other probe pairs / settings (continuing it would mix two experiments)."""
        if d.get("name", self.name) != self.name:
            raise ConfigError("track", f"saved state of tracker {d.get('name')!r} given to {self.name!r}")
        if d.get("fingerprint", self.fingerprint()) != self.fingerprint():
            raise ConfigError("track", f"the run's saved {self.name!r} tracker state was recorded on other probe "
                              "pairs or settings; resume with the same ones, or start over without resuming")
        self.history = [dict(h) for h in d.get("history", [])]
        self.load_extra_state(d)


def tensor_list(t: torch.Tensor | None) -> list | None:
    """``t.tolist()`` (float64 values round-trip exactly through JSON)."""
    return None if t is None else t.tolist()
