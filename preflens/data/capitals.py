"""Country → capital data and the factual-recall paper's prompt templates and scoring rule.

Source: Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language
Models", EMNLP 2023 (arXiv 2310.15910), Sec. 3 and the official scripts. The shipped list ``capitals.csv`` is our own
(193 UN member states + Vatican City, CC0; see ``CAPITALS_SOURCE.md``), not the paper's
``world_capitals.csv``.

Conventions:
* rows keep file order; a country may have several rows (Bolivia: Sucre, La Paz);
* ``mem_set(country)`` is an **exact** string match on the country column (aliases resolve
  through ``aliases`` first) — never the official code's substring lookup, which answered
  China→Taipei, Niger→Abuja, Ireland→Belfast;
* answer targets carry a leading space (``" " + city``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from preflens.errors import DataError

__all__ = [
    "CapitalRow",
    "CapitalsWorld",
    "load_capitals",
    "PAPER_TEMPLATE",
    "CLOSED_BOOK_TEMPLATE",
    "classify_continuation",
    "CAPITALS_CSV",
]

CAPITALS_CSV = Path(__file__).with_name("capitals.csv")

#: The paper's counterfactual prompt (exact whitespace: real newline, no trailing space).
PAPER_TEMPLATE = "The capital of {country} is {ic}.\nQ: What is the capital of {country}?\nA:"
#: Closed-book control (a preflens decision, not in the paper).
CLOSED_BOOK_TEMPLATE = "Q: What is the capital of {country}?\nA:"


@dataclass(frozen=True)
class CapitalRow:
    """One (country, capital) row of the CSV."""

    country: str
    capital: str


@dataclass(frozen=True)
class CapitalsWorld:
    """Rows in file order plus an alias → canonical-country map (Yu et al. 2023, Sec. 3)."""

    rows: tuple[CapitalRow, ...]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def countries(self) -> list[str]:
        """Distinct canonical countries in first-appearance order."""
        return list(dict.fromkeys(r.country for r in self.rows))

    def canonical(self, country: str) -> str:
        """Resolve an alias to its canonical country (identity for canonical names)."""
        return self.aliases.get(country, country)

    def mem_set(self, country: str) -> frozenset[str]:
        """Capitals of every row whose country equals ``country`` exactly (after alias map).

        Exact match (the official code's substring lookup is a bug): China → {Beijing}, Niger → {Niamey},
        Bolivia → {Sucre, La Paz}. Raises ``DataError`` for an unknown country.
        """
        name = self.canonical(country)
        caps = frozenset(r.capital for r in self.rows if r.country == name)
        if not caps:
            raise DataError(f"unknown country {country!r}", field="country")
        return caps

    def capital(self, country: str) -> str:
        """The first-listed capital of ``country`` (Bolivia → Sucre)."""
        name = self.canonical(country)
        for r in self.rows:
            if r.country == name:
                return r.capital
        raise DataError(f"unknown country {country!r}", field="country")


def load_capitals(path: str | Path | None = None) -> CapitalsWorld:
    """Read ``capitals.csv`` (columns ``country,capital,aliases``; ``#`` lines are comments).

    ``aliases`` is a ``;``-separated list of alternative names for the row's country. Raises
    ``DataError`` (file, line, field) for empty fields, an alias naming two countries, or an
    alias equal to a canonical country.
    """
    path = Path(path) if path is not None else CAPITALS_CSV
    with open(path, encoding="utf-8", newline="") as fh:
        lines = [(i + 1, ln) for i, ln in enumerate(fh) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise DataError("empty file", file=path)
    reader = csv.reader([ln for _, ln in lines])
    header = next(reader)
    if [h.strip() for h in header[:2]] != ["country", "capital"]:
        raise DataError("header must start with 'country,capital'", file=path, line=lines[0][0])
    rows: list[CapitalRow] = []
    aliases: dict[str, str] = {}
    for (lineno, _), rec in zip(lines[1:], reader):
        if len(rec) < 2:
            raise DataError("expected at least 2 columns", file=path, line=lineno)
        country, capital = rec[0].strip(), rec[1].strip()
        for name, val in (("country", country), ("capital", capital)):
            if not val:
                raise DataError("empty value", file=path, line=lineno, field=name)
        rows.append(CapitalRow(country, capital))
        for alias in (a.strip() for a in (rec[2] if len(rec) > 2 else "").split(";")):
            if not alias:
                continue
            if aliases.get(alias, country) != country:
                raise DataError(f"alias {alias!r} names two countries", file=path, line=lineno, field="aliases")
            aliases[alias] = country
    canon = {r.country for r in rows}
    for alias, target in aliases.items():
        if alias in canon:
            raise DataError(f"alias {alias!r} is also a canonical country", file=path, field="aliases")
    return CapitalsWorld(tuple(rows), aliases)


def classify_continuation(text: str, mem_targets, ic_target: str) -> str:
    """The paper's generation scoring rule (Yu et al. 2023, Sec. 3; official scripts).

    ``text`` is the decoded continuation (new tokens only). It is cut at the first ``"Q:"``;
    then ``"memorized"`` if any memorized target is a substring, else ``"in_context"`` if the
    in-context target is, else ``"neither"``. Plain case-sensitive substring tests (no regex);
    targets are used as given and should carry their leading space (``" Paris"``). Memorized
    wins ties: a continuation naming both cities counts as memorized.
    """
    if isinstance(mem_targets, str):
        mem_targets = (mem_targets,)
    cut = text.split("Q:", 1)[0]
    if any(m and m in cut for m in mem_targets):
        return "memorized"
    if ic_target and ic_target in cut:
        return "in_context"
    return "neither"
