"""Preference-data records and their validation.

Two record types:

* :class:`PreferencePair` -- TRL's ``prompt``/``chosen``/``rejected`` keys, read and written as
  they are, plus optional ``id``, ``votes`` (annotator labels, each ``"chosen"`` or
  ``"rejected"``) and ``alpha`` (the population share preferring ``chosen``, in the open
  interval (0, 1); Chen et al. 2024 §3).
* :class:`RankedResponses` -- one prompt with n ≥ 2 responses and either ``scores`` (higher is
  better) or ``ranks`` (1 is best; competition ranks, ties allowed).

Validation raises :class:`~preflens.errors.DataError` naming the field and reason; the loaders
add the file and line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from preflens.errors import DataError

__all__ = ["PreferencePair", "RankedResponses", "VOTE_LABELS", "render_messages"]

VOTE_LABELS = ("chosen", "rejected")


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=name)
    if not value.strip():
        raise DataError("is empty", field=name)
    return value


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` is preferred to ``rejected`` given ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    id: str | None = None
    votes: tuple[str, ...] | None = None
    alpha: float | None = None
    #: ``(file, line)`` the pair was read from (set by ``read_pairs``), so that errors found
    #: later -- e.g. a word the tokenizer does not know -- name the line. Not part of equality.
    source: tuple[str, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "chosen", "rejected"):
            _check_text(getattr(self, name), name)
        if self.chosen == self.rejected:
            raise DataError("chosen is identical to rejected", field="chosen")
        if self.id is not None and not isinstance(self.id, str):
            object.__setattr__(self, "id", str(self.id))
        if self.votes is not None:
            if isinstance(self.votes, str) or not isinstance(self.votes, (list, tuple)):
                raise DataError(
                    f"expected a list of labels {list(VOTE_LABELS)}, got "
                    f"{type(self.votes).__name__}",
                    field="votes",
                )
            bad = [v for v in self.votes if v not in VOTE_LABELS]
            if bad:
                raise DataError(
                    f"vote label {bad[0]!r} is not one of {list(VOTE_LABELS)} "
                    "(a vote for a response outside the pair)",
                    field="votes",
                )
            object.__setattr__(self, "votes", tuple(self.votes))
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
                raise DataError(
                    f"expected a number, got {type(self.alpha).__name__}", field="alpha"
                )
            a = float(self.alpha)
            if not math.isfinite(a):
                raise DataError(f"must be finite, got {a}", field="alpha")
            if not 0.0 < a < 1.0:
                raise DataError(f"must lie in the open interval (0, 1), got {a}", field="alpha")
            object.__setattr__(self, "alpha", a)

    def to_dict(self) -> dict[str, Any]:
        """TRL-style dict; optional fields only when set."""
        out: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.id is not None:
            out["id"] = self.id
        if self.votes is not None:
            out["votes"] = list(self.votes)
        if self.alpha is not None:
            out["alpha"] = self.alpha
        return out


@dataclass(frozen=True)
class RankedResponses:
    """A prompt with n ≥ 2 responses and human ``scores`` (higher better) or ``ranks`` (1 best)."""

    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...] | None = None
    ranks: tuple[int, ...] | None = None
    id: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_text(self.prompt, "prompt")
        if not isinstance(self.responses, (list, tuple)) or len(self.responses) < 2:
            raise DataError("expected a list of at least 2 responses", field="responses")
        for i, r in enumerate(self.responses):
            _check_text(r, f"responses[{i}]")
        object.__setattr__(self, "responses", tuple(self.responses))
        if (self.scores is None) == (self.ranks is None):
            raise DataError("give exactly one of 'scores' and 'ranks'", field="scores")
        key = "scores" if self.scores is not None else "ranks"
        values = getattr(self, key)
        if not isinstance(values, (list, tuple)) or len(values) != len(self.responses):
            raise DataError(f"expected {len(self.responses)} values, one per response", field=key)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DataError(f"expected finite numbers, got {v!r}", field=key)
        if key == "ranks" and any(int(v) != v or v < 1 for v in values):
            raise DataError("ranks must be integers ≥ 1", field="ranks")
        object.__setattr__(self, key, tuple(values))
        if self.id is not None and not isinstance(self.id, str):
            object.__setattr__(self, "id", str(self.id))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "responses": list(self.responses)}
        if self.scores is not None:
            out["scores"] = list(self.scores)
        if self.ranks is not None:
            out["ranks"] = list(self.ranks)
        if self.id is not None:
            out["id"] = self.id
        return out


def render_messages(tokenizer, messages: Any, *, field_name: str, prefix: Any = None) -> str:
    """Render a conversational (message-list) field to text through the tokenizer's chat template.

    ``prompt`` lists render with the generation prompt appended; a ``chosen``/``rejected`` list
    renders as the text the template adds after the rendered prompt (``prefix``), so that
    prompt + response equals the full rendered conversation.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "conversational (message-list) field needs a tokenizer with a chat template; "
            "this model's tokenizer has none — pass plain strings instead",
            field=field_name,
        )
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise DataError("expected a list of {'role', 'content'} messages", field=field_name)
    if prefix is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_text = tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prefix + messages, tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError("chat template does not extend the rendered prompt", field=field_name)
    return full[len(prompt_text) :]
