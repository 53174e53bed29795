"""Reference log-probs, computed once before training and cached on disk.

DPO-style losses need log π_ref(y_w|x) and log π_ref(y_l|x) for every pair (Rafailov et al.
2023, Eq. 7). The reference is frozen, so they are computed once, in eval mode under
``no_grad`` (as Razin et al. 2024 do, App. H), with exactly the loop's conventions: chosen and
rejected in one right-padded forward (:func:`preflens.scoring.collate`), summed fp32 token
log-probs from :func:`preflens.scoring.token_logprobs` (EOS included), summed in float64.

The cache file ``<cache_dir>/<key>.safetensors`` is keyed by :func:`cache_key`: a sha256 over
the reference weights (names, dtypes, shapes, bytes), the token ids of every (prompt, response)
-- which pins the data *and* the tokenization settings (EOS, truncation, tokenizer) -- and the
scoring settings (autocast precision). Any change gives a new key, so a stale cache is never
read. TRL recomputes these at every run (TRL issue #3985).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load, save

from preflens.data.io import atomic_write_bytes
from preflens.scoring import Encoded, collate, length_buckets, token_logprobs

__all__ = [
    "weights_digest", "data_digest", "cache_key", "autocast_for", "tf32_for", "pair_logprobs",
    "reference_logprobs",
]

log = logging.getLogger(__name__)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 hex digest of every parameter and buffer (name, dtype, shape, raw bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_digest(encoded_w: Sequence[Encoded], encoded_l: Sequence[Encoded]) -> str:
    """sha256 hex digest of the token ids of every chosen and rejected (prompt, response)."""
    h = hashlib.sha256()
    for e in list(encoded_w) + [None] + list(encoded_l):
        h.update(b"|" if e is None else json.dumps([e.prompt_ids, e.response_ids]).encode())
    return h.hexdigest()


def cache_key(
    model: torch.nn.Module, encoded_w: Sequence[Encoded], encoded_l: Sequence[Encoded], settings: dict
) -> str:
    """sha256 over :func:`weights_digest`, :func:`data_digest` and the JSON ``settings``."""
    h = hashlib.sha256()
    h.update(weights_digest(model).encode())
    h.update(data_digest(encoded_w, encoded_l).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def autocast_for(device: torch.device, precision: str):
    """The forward-pass autocast context of the loop: bf16 autocast or nothing (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def tf32_for(device: torch.device, precision: str):
    """With ``precision="bf16"`` on CUDA, let the matmuls that stay fp32 use TF32 (restored after).

    Under autocast the transformer runs in bf16, but :func:`preflens.scoring.target_logprobs`
    forms the unembedding logits in fp32 on purpose; TF32 (10-bit mantissa inputs, fp32
    accumulation and output) is ~7× faster there on Hopper and still finer than the bf16 head
    TRL uses under autocast. ``precision="fp32"`` keeps exact fp32 (no-op).
    """
    if precision != "bf16" or device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        old, new_api = matmul.fp32_precision, True
        matmul.fp32_precision = "tf32"
    except (AttributeError, RuntimeError):
        old, new_api = matmul.allow_tf32, False
        matmul.allow_tf32 = True
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision = old
        else:
            matmul.allow_tf32 = old


def pair_logprobs(
    model: torch.nn.Module,
    encoded_w: Sequence[Encoded],
    encoded_l: Sequence[Encoded],
    *,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u_w [n], u_l [n])`` float64 summed log-probs (EOS counted), no grad, eval mode.

    Pairs are length-bucketed; each batch stacks its chosen rows, then its rejected rows, into
    one forward, like the training loop. The model's train/eval mode is restored afterwards.
    """
    n = len(encoded_w)
    u_w = torch.zeros(n, dtype=torch.float64)
    u_l = torch.zeros(n, dtype=torch.float64)
    lengths = [max(len(a), len(b)) for a, b in zip(encoded_w, encoded_l)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tf32_for(device, precision):
            for idx in length_buckets(lengths, batch_size):
                batch = collate(
                    [encoded_w[i] for i in idx] + [encoded_l[i] for i in idx],
                    pad_id=pad_id, device=device,
                )
                with autocast_for(device, precision):
                    u = token_logprobs(model, batch).double().sum(1).cpu()
                u_w[idx], u_l[idx] = u[: len(idx)], u[len(idx) :]
    finally:
        model.train(was_training)
    return u_w, u_l


def reference_logprobs(
    model: torch.nn.Module,
    encoded_w: Sequence[Encoded],
    encoded_l: Sequence[Encoded],
    *,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    compute: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached :func:`pair_logprobs` of the reference ``model``: ``(u_ref_w, u_ref_l)`` float64 [n].

    With ``cache_dir`` the result is read from / written to ``<cache_dir>/<cache_key>.safetensors``
    (written atomically). ``compute=False`` only reads the cache (returns ``None`` on a miss):
    non-zero ranks of a distributed run use it after rank 0 has written the file.
    """
    path = None
    if cache_dir is not None:
        settings = {"precision": precision, "pad_id": pad_id, "version": 1}
        path = Path(cache_dir) / f"{cache_key(model, encoded_w, encoded_l, settings)}.safetensors"
        if path.is_file():
            try:
                tensors = load(path.read_bytes())
                if tensors["u_ref_w"].shape[0] == len(encoded_w):
                    log.info("reference log-probs read from %s", path)
                    return tensors["u_ref_w"], tensors["u_ref_l"]
            except Exception as exc:  # noqa: BLE001 - a bad cache file is recomputed
                log.warning("ignoring unreadable reference cache %s: %s", path, exc)
    if not compute:
        return None
    u_w, u_l = pair_logprobs(
        model, encoded_w, encoded_l, pad_id=pad_id, device=device, precision=precision,
        batch_size=batch_size,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"u_ref_w": u_w, "u_ref_l": u_l}))
    return u_w, u_l
