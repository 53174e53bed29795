"""Small numeric helpers shared by the Chen et al. 2024 probes (ranking, flip): float64
coercion with clear errors, scalar-in/scalar-out, and an exact softplus."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from preflens.errors import ConfigError, DataError


def _f64(x, field: str) -> Tensor:
    """Any number / sequence / tensor -> float64 tensor (detached); NaN is a DataError."""
    try:
        t = x.detach().to(torch.float64) if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot read as numbers: {e}", field=field) from None
    if torch.isnan(t).any():
        raise DataError("contains NaN", field=field)
    return t


def _is_scalar(*xs) -> bool:
    return all(isinstance(x, numbers.Real) and not isinstance(x, Tensor) for x in xs)


def _out(t: Tensor, scalar: bool):
    return float(t) if scalar else t


def _softplus(z: Tensor) -> Tensor:
    """log(1 + e^z), stable for any finite z (no threshold approximation)."""
    return torch.clamp(z, min=0) + torch.log1p(torch.exp(-z.abs()))


def _positive(value, option: str) -> None:
    v = _f64(value, option)
    if not (torch.isfinite(v).all() and (v > 0).all()):
        raise ConfigError(option, f"must be finite and > 0, got {value!r}")


def _same_shape(a: Tensor, b: Tensor, fa: str, fb: str) -> None:
    if a.shape != b.shape:
        raise DataError(f"shape {tuple(a.shape)} of '{fa}' != shape {tuple(b.shape)} of '{fb}'", field=fb)
