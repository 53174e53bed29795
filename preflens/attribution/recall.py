"""Counterfactual-capitals conflicts: prompts, greedy generation, the paper's labels, rates.

Source: Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language Models",
EMNLP 2023 (arXiv 2310.15910), Sec. 3-4 and the official scripts; spec:
``shared/research/factual_recall.md`` §2-4.

Conventions (every function):
* Prompts are built from the paper's template (:data:`~preflens.data.capitals.PAPER_TEMPLATE`,
  real newline, no trailing space). Targets carry a leading space (``" " + city``).
* Tokenization: ``add_special_tokens=False``, **no BOS** (as :mod:`preflens.scoring`).
* Generation is greedy, ``max_new_tokens = 16`` new tokens, stops at EOS, runs through a
  ``TransformerBridge`` (so hooks such as :func:`preflens.attribution.scaling.scale_heads`
  apply on every step) and re-runs the full sequence each step (no KV cache: the spec's
  reference implementation). Batches are **left-padded** with an attention mask and position
  ids ``cumsum(mask) - 1``, so GPT-2's absolute positions equal the unpadded ones.
* Labels (paper rule, :func:`~preflens.data.capitals.classify_continuation`): continuation cut at
  the first ``"Q:"``; ``memorized`` if any memorized target is a substring, else ``in_context``
  if the in-context target is, else ``neither``. Memorized wins ties.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from preflens.data.capitals import (
    CLOSED_BOOK_TEMPLATE,
    PAPER_TEMPLATE,
    CapitalsWorld,
    classify_continuation,
    load_capitals,
)
from preflens.errors import ConfigError, DataError, ScoringError

__all__ = [
    "CounterfactualPrompt",
    "Continuation",
    "LABELS",
    "counterfactual_prompts",
    "closed_book_prompts",
    "generate_continuations",
    "classify_continuations",
    "answer_logit_diff",
    "first_token_ids",
    "per_prompt_frequency",
    "rates_by_frequency",
    "spearman",
]

LABELS = ("memorized", "in_context", "neither")


@dataclass(frozen=True)
class CounterfactualPrompt:
    """One counterfactual prompt (factual_recall.md §2.2-2.3).

    Attributes:
        text: the filled template (no trailing space).
        country: the query country as written in the prompt (an alias stays an alias).
        in_context: the in-context city, without leading space ("" for closed-book prompts).
        memorized: every true capital of ``country`` (exact lookup, row order), e.g. Bolivia ->
            ("Sucre", "La Paz").
        degenerate: the in-context city is itself a memorized capital (Bolivia x La Paz, an alias
            x its own capital): excluded from rates by default.
        ic_country: the country whose capital the in-context city is (first row listing it).
        overlap: a target is a substring of another target or of the country name (Singapore/
            Singapore, Tunisia/Tunis), so a restatement of the question can be scored as an
            answer (factual_recall.md §3.1 [D]); kept, flagged.
    """

    text: str
    country: str
    in_context: str
    memorized: tuple[str, ...]
    degenerate: bool = False
    ic_country: str = ""
    overlap: bool = False

    @property
    def ic_target(self) -> str:
        return " " + self.in_context if self.in_context else ""

    @property
    def mem_targets(self) -> tuple[str, ...]:
        return tuple(" " + m for m in self.memorized)


@dataclass(frozen=True)
class Continuation:
    """A greedy continuation: new token ids (EOS excluded), decoded text (not cut), paper label."""

    token_ids: tuple[int, ...]
    text: str
    label: str


def _fill(template: str, country: str, ic: str) -> str:
    try:
        return template.format(country=country, ic=ic)
    except (KeyError, IndexError) as exc:
        raise ConfigError("template", f"only {{country}} and {{ic}} may be used ({exc})") from None


def _overlap(country: str, ic: str, mem: Sequence[str]) -> bool:
    targets = [t for t in (ic, *mem) if t]
    pairs = any(a != b and a in b for a in targets for b in targets)
    return pairs or any(" " + t in " " + country for t in targets)


def _mem(world: CapitalsWorld, country: str) -> tuple[str, ...]:
    """Exact-match capitals of ``country`` in row order (DataError if unknown)."""
    world.mem_set(country)
    canon = world.canonical(country)
    return tuple(dict.fromkeys(r.capital for r in world.rows if r.country == canon))


def counterfactual_prompts(
    countries: Sequence[str] | None = None,
    *,
    template: str = PAPER_TEMPLATE,
    pairs: str | int = "all",
    seed: int = 0,
    world: CapitalsWorld | None = None,
    aliases: bool = True,
) -> list[CounterfactualPrompt]:
    """Counterfactual prompts, all pairs by row index (factual_recall.md §2.2, official code).

    For each base country (``countries``, default: every distinct country in file order, then
    every alias when ``aliases``), the in-context cities are the capitals of every row j that is
    not the base country's own row i (compared **by index**, so Bolivia's Sucre row still gets
    La Paz, flagged degenerate); an alias gets every row's capital, its own included
    (degenerate). Identical (country, city) strings are emitted once (first occurrence), so the
    pairs are unique (checked). ``memorized`` is the exact-match ``world.mem_set``.

    Args:
        countries: base countries (canonical names or aliases); unknown names raise DataError.
        template: a format string with ``{country}`` and ``{ic}``.
        pairs: ``"all"``, or an int n: a seeded sample of n non-degenerate cities per country
            (``random.Random(f"{seed}:{country}")``, so a country's sample does not depend on
            which other countries are asked for).
        world: a :class:`CapitalsWorld`; default :func:`load_capitals`.

    Returns:
        Prompts grouped by base country, in-context cities in row order.
    """
    world = world if world is not None else load_capitals()
    rows = world.rows
    if countries is None:
        bases = list(world.countries) + (list(world.aliases) if aliases else [])
    else:
        bases = list(dict.fromkeys(countries))
    if pairs != "all" and not (isinstance(pairs, int) and not isinstance(pairs, bool) and pairs >= 1):
        raise ConfigError("pairs", f"must be 'all' or an int >= 1, got {pairs!r}")
    owner: dict[str, str] = {}
    for r in rows:
        owner.setdefault(r.capital, r.country)
    out: list[CounterfactualPrompt] = []
    seen: set[tuple[str, str]] = set()
    for country in bases:
        canon = world.canonical(country)
        mem = _mem(world, country)
        own_rows = [i for i, r in enumerate(rows) if r.country == canon]
        if country == canon:  # a row i of this country excludes itself only, by index
            cand = [rows[j].capital for i in own_rows for j in range(len(rows)) if j != i]
        else:  # alias: every row's capital, none excluded
            cand = [r.capital for r in rows]
        cand = list(dict.fromkeys(cand))
        if pairs != "all":
            pool = [c for c in cand if c not in mem]
            if pairs > len(pool):
                raise ConfigError("pairs", f"{country!r} has only {len(pool)} candidate cities, asked {pairs}")
            chosen = set(random.Random(f"{seed}:{country}").sample(pool, pairs))
            cand = [c for c in cand if c in chosen]
        for city in cand:
            key = (country, city)
            if key in seen:
                raise DataError(f"duplicate counterfactual pair {key}", field="country")
            seen.add(key)
            out.append(CounterfactualPrompt(
                text=_fill(template, country, city), country=country, in_context=city,
                memorized=mem, degenerate=city in mem, ic_country=owner[city],
                overlap=_overlap(country, city, mem),
            ))
    return out


def closed_book_prompts(
    countries: Sequence[str] | None = None,
    *,
    template: str = CLOSED_BOOK_TEMPLATE,
    world: CapitalsWorld | None = None,
) -> list[CounterfactualPrompt]:
    """Closed-book control prompts (factual_recall.md §2.3 [D]): no in-context city
    (``in_context == ""``), so a continuation is ``memorized`` or ``neither``."""
    world = world if world is not None else load_capitals()
    out = []
    for c in countries if countries is not None else world.countries:
        mem = _mem(world, c)
        out.append(CounterfactualPrompt(_fill(template, c, ""), c, "", mem, False, "",
                                        _overlap(c, "", mem)))
    return out


# --------------------------------------------------------------------------- generation
def _bridge_of(lm_or_bridge):
    """An LM gets a compatibility-mode bridge (the pipeline scale_heads uses); a bridge is kept."""
    from preflens.models import LM

    return lm_or_bridge.bridge(compat=True) if isinstance(lm_or_bridge, LM) else lm_or_bridge


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError("prompt tokenizes to no tokens", field="text")
    return list(ids)


def first_token_ids(tokenizer, cities: Sequence[str]) -> list[int]:
    """First sub-token id of ``" " + city`` for each city (factual_recall.md §5.2)."""
    return [_encode(tokenizer, " " + c)[0] for c in cities]


@torch.no_grad()
def _greedy(bridge, batch: list[list[int]], max_new_tokens: int, eos: int | None, pad: int):
    """Left-padded greedy loop over one batch; returns new ids per row (EOS cut)."""
    dev = torch.device(bridge.cfg.device) if getattr(bridge.cfg, "device", None) else None
    S = max(map(len, batch))
    ids = torch.full((len(batch), S), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), S), dtype=torch.long)
    for b, row in enumerate(batch):
        ids[b, S - len(row):] = torch.tensor(row)
        mask[b, S - len(row):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    done = torch.zeros(len(batch), dtype=torch.bool, device=dev)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = bridge(ids, attention_mask=mask, position_ids=pos, return_type="logits")
        nxt = logits[:, -1].argmax(-1)
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        new.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if eos is not None:
            done |= nxt == eos
            if bool(done.all()):
                break
    rows = torch.stack(new, 1).tolist() if new else [[] for _ in batch]
    return [r[: r.index(eos)] if eos is not None and eos in r else r for r in rows]


def generate_continuations(
    lm_or_bridge,
    prompts: Sequence[CounterfactualPrompt],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[Continuation]:
    """Greedy continuations and their paper labels (factual_recall.md §3.1), input order.

    Args:
        lm_or_bridge: an :class:`~preflens.models.LM` (a compatibility-mode bridge is built once)
            or a ``TransformerBridge`` (used as is, so active hooks apply at every step).
        prompts: :class:`CounterfactualPrompt` list.
        max_new_tokens: new-token budget (paper: 16); "neither" depends on it.
        batch_size: prompts per left-padded batch (sorted by length); ``1`` = unbatched.

    The decoded text is ``tokenizer.decode(new_ids, clean_up_tokenization_spaces=False)``.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("max_new_tokens/batch_size", "must be >= 1")
    bridge = _bridge_of(lm_or_bridge)
    tok = bridge.tokenizer
    enc = [_encode(tok, p.text) for p in prompts]
    n_ctx = int(bridge.cfg.n_ctx)
    for i, e in enumerate(enc):
        if len(e) + max_new_tokens > n_ctx:
            raise ScoringError(
                f"prompt {i}: {len(e)} tokens + {max_new_tokens} new exceed the context ({n_ctx})")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
    order = sorted(range(len(enc)), key=lambda i: (len(enc[i]), i))
    new_ids: dict[int, list[int]] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        for i, row in zip(idx, _greedy(bridge, [enc[i] for i in idx], max_new_tokens, eos, pad)):
            new_ids[i] = row
    out = []
    for i, p in enumerate(prompts):
        text = tok.decode(new_ids[i], clean_up_tokenization_spaces=False)
        out.append(Continuation(tuple(new_ids[i]), text,
                                classify_continuation(text, p.mem_targets, p.ic_target)))
    return out


def classify_continuations(
    lm_or_bridge,
    prompts: Sequence[CounterfactualPrompt],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Paper labels (``memorized`` / ``in_context`` / ``neither``) of greedy continuations;
    see :func:`generate_continuations` for the conventions (no BOS, 16 tokens, cut at "Q:")."""
    return [c.label for c in generate_continuations(
        lm_or_bridge, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]


@torch.no_grad()
def answer_logit_diff(
    lm,
    prompts: Sequence[CounterfactualPrompt],
    *,
    answer_prefix: str | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """``[n]`` float32 next-token logit difference (factual_recall.md §3.2; a preflens variant,
    not the paper's measure): ``logit[t_ic] - max_m logit[t_mem_m]`` with ``t_x`` the first
    sub-token of ``" " + x``.

    **Answer position.** By default the last prompt token (the ":" of "A:"), i.e. the model's
    very next token. GPT-2-family models often first restate (" The capital of ..."), so this is
    a relative preference and does not reproduce generation rates. With ``answer_prefix`` (e.g.
    ``" The capital of {country} is"``, formatted with the prompt's country and tokenized
    separately, then appended to the prompt ids) the difference is read at the prefix's last
    token: the city slot of the restatement. Identical first tokens give exactly 0.

    Runs ``lm.model`` (HF) with right padding; the difference is invariant under compatibility
    mode (centring shifts all logits at a position equally).
    """
    tok, model = lm.tokenizer, lm.model
    seqs = []
    for p in prompts:
        ids = _encode(tok, p.text)
        if answer_prefix:
            ids += _encode(tok, answer_prefix.format(country=p.country))
        seqs.append(ids)
    ic = torch.tensor(first_token_ids(tok, [p.in_context for p in prompts]))
    mems = [first_token_ids(tok, p.memorized) for p in prompts]
    out = torch.empty(len(seqs))
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s: s + batch_size]
        S = max(map(len, chunk))
        ids = torch.full((len(chunk), S), lm.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, row in enumerate(chunk):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        logits = model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float()
        for b, row in enumerate(chunk):
            last = logits[b, len(row) - 1]
            i = s + b
            out[i] = last[ic[i]] - last[torch.tensor(mems[i])].max()
    return out


# --------------------------------------------------------------------------- frequency bins
def per_prompt_frequency(
    prompts: Sequence[CounterfactualPrompt], table: dict, *, by: str = "country"
) -> list[float]:
    """Per-prompt scalar from a caller's table (factual_recall.md §4.1): ``by="country"`` reads
    ``table[prompt.country]`` (criterion ``abs_icl_country``, or ``bi_gt_capital`` when the table
    holds country-capital counts, e.g. toyworld's exact fact counts); ``by="in_context"`` reads
    ``table[prompt.in_context]`` (``abs_capital``); ``by="ic_country"`` reads
    ``table[prompt.ic_country]``. Missing keys raise DataError."""
    if by not in ("country", "in_context", "ic_country"):
        raise ConfigError("by", f"unknown value {by!r}", allowed=("country", "in_context", "ic_country"))
    out = []
    for p in prompts:
        key = getattr(p, by)
        if key not in table:
            raise DataError(f"no frequency for {key!r}", field=by)
        out.append(float(table[key]))
    return out


def _ranks(x: Sequence[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rho (Pearson correlation of tie-averaged ranks); NaN if < 2 points or constant."""
    if len(x) != len(y) or len(x) < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _percentile(sorted_x: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    pos = (len(sorted_x) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_x) - 1)
    return sorted_x[lo] + (sorted_x[hi] - sorted_x[lo]) * (pos - lo)


def rates_by_frequency(
    labels: Sequence[str],
    frequency: Sequence[float],
    *,
    bins: int = 10,
    degenerate: Sequence[bool] | None = None,
    keep_degenerate: bool = False,
) -> dict:
    """Label rates per frequency percentile bin (factual_recall.md §4.1).

    Edges are the percentiles 0, 100/bins, ..., 100 of the per-prompt ``frequency`` values
    (linear interpolation). Bin k is the half-open ``[e_k, e_{k+1})``, the last bin closed
    ``[e_{bins-1}, e_bins]``, so each prompt lands in exactly one bin (the official code's
    inclusive edges double-counted boundary prompts). With tied edges a bin can be empty
    (n = 0, rates NaN); a value equal to repeated edges goes to the last bin starting at it.
    Prompts flagged in ``degenerate`` are dropped unless ``keep_degenerate``.

    Returns:
        ``{"edges": [bins+1], "n": int, "n_excluded": int, "bins": [{"bin", "lo", "hi", "n",
        "memorized", "in_context", "neither"}], "spearman": {label: rho}}`` where rho is the
        Spearman correlation of bin index with the label's rate over the non-empty bins.
    """
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ConfigError("bins", f"must be an int >= 1, got {bins!r}")
    if len(labels) != len(frequency):
        raise DataError(f"{len(labels)} labels but {len(frequency)} frequencies", field="frequency")
    if degenerate is not None and len(degenerate) != len(labels):
        raise DataError(f"{len(labels)} labels but {len(degenerate)} degenerate flags", field="degenerate")
    keep = [keep_degenerate or degenerate is None or not degenerate[i] for i in range(len(labels))]
    lab = [l for l, k in zip(labels, keep) if k]
    freq = [float(f) for f, k in zip(frequency, keep) if k]
    for l in lab:
        if l not in LABELS:
            raise DataError(f"unknown label {l!r}; valid: {', '.join(LABELS)}", field="labels")
    if any(math.isnan(f) for f in freq):
        raise DataError("frequency contains NaN", field="frequency")
    if not lab:
        raise DataError("no prompts left to bin", field="labels")
    sx = sorted(freq)
    edges = [_percentile(sx, 100.0 * k / bins) for k in range(bins + 1)]
    edges[0], edges[-1] = sx[0], sx[-1]
    members: list[list[str]] = [[] for _ in range(bins)]
    for l, f in zip(lab, freq):
        # last bin whose left edge is <= f; the maximum goes to the (closed) last bin
        members[min(bisect.bisect_right(edges, f) - 1, bins - 1)].append(l)
    rows = []
    for k, m in enumerate(members):
        row = {"bin": k, "lo": edges[k], "hi": edges[k + 1], "n": len(m)}
        for name in LABELS:
            row[name] = (sum(x == name for x in m) / len(m)) if m else math.nan
        rows.append(row)
    full = [r for r in rows if r["n"]]
    rho = {name: spearman([r["bin"] for r in full], [r[name] for r in full]) for name in LABELS}
    return {"edges": edges, "n": len(lab), "n_excluded": len(labels) - len(lab), "bins": rows,
            "spearman": rho}
