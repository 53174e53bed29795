"""Prompts of the factual-recall conflict experiments: counterfactual prompts (a country with
another country's capital in context) and closed-book controls, over the capitals data.

Source: Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language Models",
EMNLP 2023 (arXiv 2310.15910), Sec. 3 and the official scripts.

Conventions: prompts are built from the paper's template
(:data:`~preflens.data.capitals.PAPER_TEMPLATE`, real newline, no trailing space); targets carry a
leading space (``" " + city``); ``memorized`` is the exact-match
:meth:`~preflens.data.capitals.CapitalsWorld.mem_set` (never the official substring lookup).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from preflens.data.capitals import CLOSED_BOOK_TEMPLATE, PAPER_TEMPLATE, CapitalsWorld, load_capitals
from preflens.errors import ConfigError, DataError

__all__ = ["CounterfactualPrompt", "counterfactual_prompts", "closed_book_prompts"]


@dataclass(frozen=True)
class CounterfactualPrompt:
    """One counterfactual prompt (Yu et al. 2023, Sec. 3).

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
            answer; kept, flagged (a preflens flag, not in the paper).
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
    """Counterfactual prompts, all pairs by row index (Yu et al. 2023, Sec. 3 and the official code).

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
    """Closed-book control prompts (a preflens control, not in the paper): no in-context city
    (``in_context == ""``), so a continuation is ``memorized`` or ``neither``."""
    world = world if world is not None else load_capitals()
    out = []
    for c in countries if countries is not None else world.countries:
        mem = _mem(world, c)
        out.append(CounterfactualPrompt(_fill(template, c, ""), c, "", mem, False, "",
                                        _overlap(c, "", mem)))
    return out
