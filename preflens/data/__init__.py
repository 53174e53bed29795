"""Preference-data schemas, JSONL I/O, shipped data (capitals) and the toy-world generator."""

from preflens.data.adapters import FORMATS, load_pairs, load_rankings
from preflens.data.io import (
    atomic_write_bytes,
    atomic_write_text,
    read_jsonl,
    read_pairs,
    read_ranked,
    write_json,
    write_pairs,
    write_ranked,
)
from preflens.data.schemas import VOTE_LABELS, PreferencePair, RankedResponses, render_messages

__all__ = [
    "PreferencePair",
    "FORMATS",
    "load_pairs",
    "load_rankings",
    "RankedResponses",
    "VOTE_LABELS",
    "render_messages",
    "read_jsonl",
    "read_pairs",
    "write_pairs",
    "read_ranked",
    "write_ranked",
    "write_json",
    "atomic_write_text",
    "atomic_write_bytes",
]
