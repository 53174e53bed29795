"""Reference log-probs, computed once before training and cached on disk.

DPO-style losses need log π_ref(y_w|x) and log π_ref(y_l|x) for every pair (Rafailov et al.
2023, Eq. 7). The reference is frozen, so they are computed once, in eval mode under
``no_grad`` (as Razin et al. 2024 do, App. H), with exactly the loop's conventions AND batch
geometry: chosen and rejected in one right-padded forward
(:func:`preflens.scoring.concatenated_logps`), in the very batches the loop's first epoch uses,
so that at step 0 policy and reference log-probs agree bit for bit (and ``rewards/accuracies``
is exactly 0, as in TRL).

The cache file ``<cache_dir>/<key>.safetensors`` is keyed by :func:`cache_key`: a sha256 over
the reference weights (names, dtypes, shapes, bytes), the token ids of every (prompt, response)
-- which pins the data *and* the tokenization settings (EOS, truncation, tokenizer) -- and the
scoring settings (autocast precision, batch geometry). Any change gives a new key, so a stale
cache is never read. TRL 1.16 by default runs the reference model in every training step;
with ``precompute_ref_log_probs=True`` it computes them once and caches them as a 🤗 Datasets
cache file keyed by the dataset's fingerprint and a hash of the reference weights
(``DPOTrainer._precompute_ref_logps``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load, save

from preflens.data.io import atomic_write_bytes
from preflens.scoring import (EncodedPairs, check_head_precision, concatenated_logps, eval_mode, length_buckets,
                              precision_context)

__all__ = ["weights_digest", "data_digest", "cache_key", "pair_logprobs", "reference_logprobs"]

log = logging.getLogger(__name__)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 hex digest of every parameter and buffer (name, dtype, shape, raw bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_digest(pairs: EncodedPairs) -> str:
    """sha256 hex digest of the token ids of every chosen and rejected (prompt, response)."""
    h = hashlib.sha256()
    for e in list(pairs.chosen) + [None] + list(pairs.rejected):
        h.update(b"|" if e is None else json.dumps([e.prompt_ids, e.response_ids]).encode())
    return h.hexdigest()


def cache_key(model: torch.nn.Module, pairs: EncodedPairs, settings: dict) -> str:
    """sha256 over :func:`weights_digest`, :func:`data_digest` and the JSON ``settings``."""
    h = hashlib.sha256()
    h.update(weights_digest(model).encode())
    h.update(data_digest(pairs).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def pair_logprobs(
    model: torch.nn.Module,
    pairs: EncodedPairs,
    *,
    batches: Sequence[Sequence[int]] | None = None,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
    head_precision: str = "fp32",
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u_w [n], u_l [n])`` float64 summed log-probs (EOS counted), no grad, eval mode.

    ``batches`` (index lists covering every pair once) fixes the batch geometry; give the
    training loop's (:func:`preflens.dynamics.train.reference_batches`) and each pair's
    log-probs are computed in exactly the forward shape the loop will use, so at step 0
    policy and reference agree bit for bit. Default: length buckets of ``batch_size``. Each
    batch is one forward of its chosen rows, then its rejected rows
    (:func:`preflens.scoring.concatenated_logps`). The model's train/eval mode is restored.
    ``precision``: the forward (:func:`preflens.scoring.precision_context`); ``head_precision``:
    the unembedding GEMMs, "fp32" or "bf16" (:func:`preflens.scoring.target_logprobs`).
    """
    check_head_precision(head_precision)
    n = len(pairs)
    u_w = torch.zeros(n, dtype=torch.float64)
    u_l = torch.zeros(n, dtype=torch.float64)
    if batches is None:
        batches = length_buckets(pairs.lengths, batch_size)
    with torch.no_grad(), eval_mode(model), precision_context(device, precision):
        for idx in batches:
            got = concatenated_logps(model, pairs.batch(idx, pad_id=pad_id, device=device),
                                     head_precision=head_precision)
            u_w[list(idx)], u_l[list(idx)] = got.chosen.cpu(), got.rejected.cpu()
    return u_w, u_l


def reference_logprobs(
    model: torch.nn.Module,
    pairs: EncodedPairs,
    *,
    batches: Sequence[Sequence[int]] | None = None,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
    head_precision: str = "fp32",
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    compute: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached :func:`pair_logprobs` of the reference ``model``: ``(u_ref_w, u_ref_l)`` float64 [n].

    With ``cache_dir`` the result is read from / written to ``<cache_dir>/<cache_key>.safetensors``
    (written atomically); the key covers the batch geometry too. ``compute=False`` only reads
    the cache (returns ``None`` on a miss): non-zero ranks of a distributed run use it after
    rank 0 has written the file.
    """
    path = None
    if batches is None:
        batches = length_buckets(pairs.lengths, batch_size)
    if cache_dir is not None:
        settings = {"precision": precision, "pad_id": pad_id, "version": 2,
                    "batches": [list(map(int, b)) for b in batches]}
        if head_precision != "fp32":  # fp32: the key of caches written before the option existed
            settings["head_precision"] = head_precision
        path = Path(cache_dir) / f"{cache_key(model, pairs, settings)}.safetensors"
        if path.is_file():
            try:
                tensors = load(path.read_bytes())
                if tensors["u_ref_w"].shape[0] == len(pairs):
                    log.info("reference log-probs read from %s", path)
                    return tensors["u_ref_w"], tensors["u_ref_l"]
            except Exception as exc:  # noqa: BLE001 - a bad cache file is recomputed
                log.warning("ignoring unreadable reference cache %s: %s", path, exc)
    if not compute:
        return None
    u_w, u_l = pair_logprobs(model, pairs, batches=batches, pad_id=pad_id, device=device, precision=precision,
                             head_precision=head_precision)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"u_ref_w": u_w, "u_ref_l": u_l}))
    return u_w, u_l
