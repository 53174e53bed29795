"""preflens: why preference learning behaves as it does, measured on TransformerLens models.

The names below are the curated public API; each is imported lazily from the module that owns it
(``import preflens`` stays cheap, and ``preflens.train_preference`` is
``preflens.dynamics.train.train_preference``). Everything else lives in its subpackage:
``preflens.probes`` (displacement, CHES, ranking, trackers), ``preflens.dynamics`` (losses, the
training loop, entanglement), ``preflens.attribution`` (factual recall, DLA, head scaling),
``preflens.data`` (schemas, dataset adapters, toyworld) and ``preflens.measure`` /
``preflens.reproduce`` (the command line's measurements and paper recipes).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> owning module
_EXPORTS: dict[str, str] = {
    # models and scoring
    "DEFAULT_MODEL": "preflens.models",
    "LM": "preflens.models",
    "load_model": "preflens.models",
    "response_logprobs": "preflens.scoring",
    "encode_pairs": "preflens.scoring",
    "concatenated_logps": "preflens.scoring",
    # data
    "PreferencePair": "preflens.data",
    "RankedResponses": "preflens.data",
    "read_pairs": "preflens.data",
    "write_pairs": "preflens.data",
    "load_pairs": "preflens.data",
    "load_rankings": "preflens.data",
    # training
    "TrainConfig": "preflens.dynamics.config",
    "train_preference": "preflens.dynamics.train",
    "LOSSES": "preflens.dynamics.losses",
    "compute_loss": "preflens.dynamics.losses",
    # the four lenses
    "ches_for_pairs": "preflens.probes.ches",
    "ranking_accuracy": "preflens.probes.ranking",
    "idealized_ranking_accuracy": "preflens.probes.ranking",
    "pair_gradient_stats": "preflens.dynamics.entanglement",
    "predict_first_order": "preflens.dynamics.entanglement",
    "head_attribution": "preflens.attribution.heads",
    "head_logit_attribution": "preflens.attribution.heads",
    "scale_heads": "preflens.attribution.scaling",
    # errors
    "PreflensError": "preflens.errors",
    "ConfigError": "preflens.errors",
    "DataError": "preflens.errors",
    "ModelError": "preflens.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'preflens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
