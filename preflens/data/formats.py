"""Per-format conversions of the public preference datasets (rows -> records).

The conversions of Chen et al. 2024, "Preference Learning Algorithms Do Not Learn Preference
Rankings" (NeurIPS 2024), documented format by format in :mod:`preflens.data.adapters`, which
reads the sources and calls these. Each function raises :class:`~preflens.errors.DataError`
naming the field; the caller adds the file and line (or row).
"""

from __future__ import annotations

import dataclasses

from preflens.data.io import _pair_from_obj
from preflens.data.schemas import PreferencePair, RankedResponses
from preflens.errors import ConfigError, DataError

__all__ = ["FORMATS", "HH_ASSISTANT", "competition_ranks"]

HH_ASSISTANT = "\n\nAssistant:"
#: the dataset formats :func:`preflens.data.adapters.load_pairs` reads
FORMATS = ("trl", "hh-rlhf", "shp", "ultrafeedback", "alpaca-farm", "synthetic-gptj", "stack-exchange")


# --------------------------------------------------------------------------- helpers
def competition_ranks(keys) -> list[int]:
    """Competition ranks, higher key better (1 = best; equal keys share the better rank).

    Chen et al. 2024, Def. A.8 ("1224" ranking): rank_i = 1 + #{j : key_j > key_i}. Keys may be
    numbers or tuples (compared lexicographically, as SHP's (score, created_at)).
    """
    return [1 + sum(k2 > k for k2 in keys) for k in keys]


def _need(obj: dict, key: str):
    if key not in obj or obj[key] is None:
        raise DataError("missing key", field=key)
    return obj[key]


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise DataError(f"expected a number, got {value!r}", field=name)
    return float(value)


def _hh_split(text, name: str) -> tuple[str, str]:
    if not isinstance(text, str):
        raise DataError(f"expected a string, got {type(text).__name__}", field=name)
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(f"no {HH_ASSISTANT!r} turn to split at", field=name)
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _scored(obj: dict, list_key: str, text_key: str, score_key: str) -> tuple[list[str], list[float]]:
    items = _need(obj, list_key)
    if not isinstance(items, list) or len(items) < 2:
        raise DataError("expected a list of at least 2 responses", field=list_key)
    texts, scores = [], []
    for k, it in enumerate(items):
        where = f"{list_key}[{k}]"
        if not isinstance(it, dict):
            raise DataError(f"expected an object, got {type(it).__name__}", field=where)
        t = it.get(text_key)
        if not isinstance(t, str):
            raise DataError(f"expected a string, got {type(t).__name__}", field=f"{where}.{text_key}")
        texts.append(t)
        scores.append(_number(it.get(score_key), f"{where}.{score_key}"))
    return texts, scores


_NWAY = {"ultrafeedback": ("instruction", "completions", "response", "overall_score"),
         "stack-exchange": ("question", "answers", "text", "pm_score")}


# --------------------------------------------------------------------------- per-row conversions
def _row_pairs(fmt: str, obj: dict, i: int, tokenizer) -> list[PreferencePair]:
    if fmt in ("trl", "synthetic-gptj"):
        if "prompt" not in obj and isinstance(obj.get("chosen"), list):
            obj = _implicit_prompt(obj)
        pair = _pair_from_obj(obj, None, None, tokenizer)
        return [pair if pair.id is not None else _with_id(pair, str(i))]
    if fmt == "hh-rlhf":
        pw, yw = _hh_split(_need(obj, "chosen"), "chosen")
        pl, yl = _hh_split(_need(obj, "rejected"), "rejected")
        if pw != pl:
            raise DataError("chosen and rejected do not share the dialogue up to the last "
                            "assistant turn", field="rejected")
        return [PreferencePair(pw, yw, yl, id=str(i))]
    if fmt == "shp":
        label = _need(obj, "labels")
        if label not in (0, 1) or isinstance(label, bool):
            raise DataError(f"expected 1 (A preferred) or 0 (B preferred), got {label!r}", field="labels")
        a, b = _need(obj, "human_ref_A"), _need(obj, "human_ref_B")
        w, l = (a, b) if label == 1 else (b, a)
        return [PreferencePair(_need(obj, "history"), w, l, id=str(i))]
    if fmt in _NWAY:
        p_key, list_key, t_key, s_key = _NWAY[fmt]
        prompt = _need(obj, p_key)
        texts, scores = _scored(obj, list_key, t_key, s_key)
        out = []
        for a in range(len(texts)):
            for b in range(a + 1, len(texts)):
                if scores[a] != scores[b]:
                    w, l = (a, b) if scores[a] > scores[b] else (b, a)
                    out.append(PreferencePair(prompt, texts[w], texts[l], id=f"{i}:{w}-{l}"))
        return out
    raise ConfigError("format", f"unknown value {fmt!r}", allowed=FORMATS)  # pragma: no cover


def _with_id(pair: PreferencePair, pid: str) -> PreferencePair:
    return dataclasses.replace(pair, id=pid)


def _implicit_prompt(obj: dict) -> dict:
    """TRL's implicit-prompt conversational rows: the shared leading messages are the prompt."""
    c, r = obj.get("chosen"), obj.get("rejected")
    if not isinstance(r, list) or len(c) < 2 or c[:-1] != r[:-1]:
        raise DataError("implicit-prompt rows need chosen and rejected message lists that share all "
                        "but their last message", field="rejected")
    return {**obj, "prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]}


def _row_ranking(fmt: str, obj: dict, i: int, tokenizer) -> RankedResponses:
    if fmt in _NWAY:
        p_key, list_key, t_key, s_key = _NWAY[fmt]
        texts, scores = _scored(obj, list_key, t_key, s_key)
        return RankedResponses(_need(obj, p_key), texts, ranks=competition_ranks(scores), id=str(i),
                               extra={"scores": scores})
    pair = _row_pairs(fmt, obj, i, tokenizer)[0]   # trl, hh-rlhf, shp rows: [chosen, rejected]
    return RankedResponses(pair.prompt, (pair.chosen, pair.rejected), ranks=(1, 2), id=pair.id)


# --------------------------------------------------------------------------- grouped formats
def _alpaca_group(rows, idx: list[int], *, rankings: bool):
    votes = []
    for i in idx:
        obj = rows.get(i)
        try:
            v = _number(_need(obj, "preference"), "preference")
            if v not in (1.0, 2.0):
                raise DataError(f"expected 1 or 2, got {obj['preference']!r}", field="preference")
        except DataError as exc:
            raise rows.error(i, exc) from None
        votes.append(int(v))
    first = rows.get(idx[0])
    prompt, o1, o2 = first["instruction"], first["output_1"], first["output_2"]
    n1, n2 = votes.count(1), votes.count(2)
    try:
        if rankings:
            return RankedResponses(prompt, (o1, o2), ranks=competition_ranks([n1, n2]), id=str(idx[0]),
                                   extra={"scores": [n1, n2]})
        if n1 == n2:
            return None   # a 1:1 tie has no majority (alpha = 0.5): left out
        (w, l), n_w = ((o1, o2), n1) if n1 > n2 else ((o2, o1), n2)
        labels = ["chosen" if (v == 1) == (n1 > n2) else "rejected" for v in votes]
        alpha = n_w / len(votes) if n_w < len(votes) else None
        return PreferencePair(prompt, w, l, id=str(idx[0]), votes=labels, alpha=alpha)
    except DataError as exc:
        raise rows.error(idx[0], exc) from None


def _shp_post(rows, idx: list[int]) -> RankedResponses:
    replies: dict[str, tuple] = {}
    for i in idx:
        obj = rows.get(i)
        try:
            for side in ("A", "B"):
                text = _need(obj, f"human_ref_{side}")
                key = (_number(_need(obj, f"score_{side}"), f"score_{side}"),
                       _number(obj.get(f"created_at_utc_{side}", 0), f"created_at_utc_{side}"))
                replies.setdefault(text, key)
        except DataError as exc:
            raise rows.error(i, exc) from None
    texts, keys = list(replies), list(replies.values())
    first = rows.get(idx[0])
    try:
        return RankedResponses(first["history"], texts, ranks=competition_ranks(keys),
                               id=str(first["post_id"]), extra={"scores": [k[0] for k in keys]})
    except DataError as exc:
        raise rows.error(idx[0], exc) from None


def _triple(obj: dict, i: int) -> dict:
    out = {"id": str(obj["id"]) if obj.get("id") is not None else str(i)}
    for key in ("prompt", "target"):
        v = _need(obj, key)
        if not isinstance(v, str) or not v.strip():
            raise DataError("expected a non-empty string", field=key)
        out[key] = v
    foil = _need(obj, "foil")
    foils = [foil] if isinstance(foil, str) else foil
    if not isinstance(foils, list) or not foils or not all(isinstance(f, str) and f.strip() for f in foils):
        raise DataError("expected a non-empty string or a list of them", field="foil")
    if out["target"] in foils:
        raise DataError("the target is also a foil", field="foil")
    out["foil"] = foil if isinstance(foil, str) else tuple(foils)
    return out


