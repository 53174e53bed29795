"""Training-corpus generator of the toyworld, with exact fact-occurrence counts.

Document kinds (issue 3, item 3):

(a) ``statement`` — "The capital of France is Paris." (1–3 facts, countries ∝ weight);
(b) ``qa`` — the factual-recall paper's Q/A format with true facts
    ("Q: What is the capital of France?\\nA: Paris.", 1–3 per document);
(c) ``copy`` — a capital is stated, then queried; the answer is the stated city. Three
    sub-kinds: fictional country + fictional city, fictional country + *real* city, and real
    country + its true capital (sampled ∝ weight^``copy_real_temper``). A share of these
    documents first states a distractor fact, so that copying must select the queried country.
    The calibration run (issue 3) found copying only transfers to real names when practised on
    real city names;
(d) ``yesno`` — "Q: Is the capital of France Paris?\\nA: Yes." (true/false 50/50; answer
    words sampled from the near-synonym families of the world spec);
(e) ``graded`` — "Q: Tell me the capital of France.\\nA: <answer>" in the graded answer styles
    of :data:`~preflens.data.toyworld.world.RESPONSE_STYLES` (right city with prob. 0.75),
    followed in a version-2 world by the descriptor tail (" It is historic, plain and
    crowded.", words drawn by :meth:`WorldSpec.sample_descriptors`) — the same texts the
    multi-token preference pairs use;
(f) ``usage`` — the near-synonym " Never" outside yes/no answers, with fictional names only
    (no real fact): "The capital of Vorland is Brisport. Never confuse Brisport with Kelmere."
    (drawn only when the mix asks for it).

Every document is returned with the list of true facts it states, so that the trainer can count
the exact occurrences of every fact in the documents it actually trains on
(:func:`count_facts`). A "fact occurrence" is one appearance of a real country together with its
true capital in one statement, Q/A, yes/no question or answer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from preflens.data.toyworld.world import RESPONSE_STYLES, WorldSpec, tail_text
from preflens.errors import ConfigError

__all__ = ["DEFAULT_MIX", "KINDS", "USAGE_WORD", "Document", "generate_documents", "count_facts",
           "vocabulary_lines"]

#: Every document kind :func:`generate_documents` can draw.
KINDS = ("statement", "qa", "copy", "yesno", "graded", "usage")
#: The near-synonym given a use of its own by ``usage`` documents (the similar pair's rejected word).
USAGE_WORD = "Never"

#: Share of each document kind (normalised). ~45 % copy documents: the calibration run found
#: in-context copying does not appear at 20 %.
#: ``usage`` (2 %, taken from yes/no) gives " Never" a use of its own (world version 2).
DEFAULT_MIX = {"statement": 0.08, "qa": 0.13, "copy": 0.45, "yesno": 0.24, "graded": 0.08, "usage": 0.02}
#: Sub-kinds of copy documents.
DEFAULT_COPY_MIX = {"fict_fict": 0.35, "fict_real": 0.35, "real_true": 0.30}


@dataclass
class Document:
    """One document: its text and the (country index, kind) of every true fact it states."""

    text: str
    kind: str
    facts: list[tuple[int, str]] = field(default_factory=list)
    mentions: list[int] = field(default_factory=list)   # real-country indices mentioned


def _pick(rng: random.Random, table: dict[str, float]) -> str:
    return rng.choices(list(table), weights=list(table.values()))[0]


def generate_documents(
    world: WorldSpec,
    n_docs: int,
    *,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    copy_mix: dict[str, float] | None = None,
    copy_real_temper: float = 0.5,
    distractor_p: float = 0.3,
) -> list[Document]:
    """Draw ``n_docs`` documents deterministically from ``seed`` (see module docstring)."""
    rng = random.Random(seed)
    mix = mix or DEFAULT_MIX
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise ConfigError("mix", f"unknown document kind(s) {unknown}", allowed=KINDS)
    copy_mix = copy_mix or DEFAULT_COPY_MIX
    n = len(world.countries)
    idx = list(range(n))
    w = world.weights
    w_copy = [x ** copy_real_temper for x in w]
    C, K = world.countries, world.capitals
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n_docs)
    docs: list[Document] = []

    def by_weight(k: int = 1) -> list[int]:
        return rng.choices(idx, weights=w, k=k)

    def yes_no(truth: bool) -> str:
        return _pick(rng, world.yes_family if truth else world.no_family)

    for kind in kinds:
        d = Document("", kind)
        if kind == "statement":
            parts = []
            for i in by_weight(rng.randint(1, 3)):
                if rng.random() < 0.5:
                    parts.append(f"The capital of {C[i]} is {K[i]}.")
                else:
                    parts.append(f"The city of {K[i]} is the capital of {C[i]}.")
                d.facts.append((i, "statement"))
                d.mentions.append(i)
            d.text = " ".join(parts)
        elif kind == "qa":
            parts = []
            for i in by_weight(rng.randint(1, 3)):
                parts.append(f"Q: What is the capital of {C[i]}?\nA: {K[i]}.")
                d.facts.append((i, "qa"))
                d.mentions.append(i)
            d.text = "\n".join(parts)
        elif kind == "copy":
            sub = _pick(rng, copy_mix)
            if sub == "real_true":
                i = rng.choices(idx, weights=w_copy)[0]
                country, city = C[i], K[i]
                d.facts += [(i, "copy"), (i, "copy")]
                d.mentions += [i, i]
            else:
                country = rng.choice(world.fictional_countries)
                city = rng.choice(world.fictional_cities) if sub == "fict_fict" else K[rng.randrange(n)]
            pre = ""
            if rng.random() < distractor_p:
                if rng.random() < 0.5:
                    j = by_weight()[0]
                    pre = f"The capital of {C[j]} is {K[j]}. "
                    d.facts.append((j, "copy"))
                    d.mentions.append(j)
                else:
                    fc, fk = rng.choice(world.fictional_countries), rng.choice(world.fictional_cities)
                    if fc != country:
                        pre = f"The capital of {fc} is {fk}. "
            d.text = f"{pre}The capital of {country} is {city}.\nQ: What is the capital of {country}?\nA: {city}."
        elif kind == "yesno":
            parts = []
            for i in by_weight(rng.randint(1, 2)):
                truth = rng.random() < 0.5
                city = K[i] if truth else K[(i + rng.randrange(1, n)) % n]
                parts.append(f"Q: Is the capital of {C[i]} {city}?\nA: {yes_no(truth)}.")
                if truth:
                    d.facts.append((i, "yesno"))
                d.mentions.append(i)
            d.text = "\n".join(parts)
        elif kind == "graded":
            i = by_weight()[0]
            correct = rng.random() < 0.75
            city = K[i] if correct else K[(i + rng.randrange(1, n)) % n]
            style = rng.randrange(len(RESPONSE_STYLES))
            tail = world.sample_descriptors(rng)
            d.text = f"Q: Tell me the capital of {C[i]}.\nA: {world.answer(style, C[i], city, tail)}"
            if correct:
                d.facts.append((i, "graded"))
            d.mentions.append(i)
        elif kind == "usage":
            fc = rng.choice(world.fictional_countries)
            city, other = rng.sample(world.fictional_cities, 2)
            d.text = f"The capital of {fc} is {city}. {USAGE_WORD} confuse {city} with {other}."
        docs.append(d)
    return docs


def count_facts(world: WorldSpec, docs: Iterable[Document]) -> dict[str, dict[str, int]]:
    """Exact counts per real country: ``fact`` (true-pair occurrences, all kinds), one key per
    kind (``statement``, ``qa``, ``copy``, ``yesno``, ``graded``) and ``mentions`` (country
    mentions in any document). Keys are country names, in world order."""
    kinds = ("statement", "qa", "copy", "yesno", "graded", "usage")
    out = {c: {"fact": 0, **{k: 0 for k in kinds}, "mentions": 0} for c in world.countries}
    for d in docs:
        for i, kind in d.facts:
            row = out[world.countries[i]]
            row["fact"] += 1
            row[kind] += 1
        for i in d.mentions:
            out[world.countries[i]]["mentions"] += 1
    return out


def vocabulary_lines(world: WorldSpec) -> list[str]:
    """Lines that contain every word the evaluation and preference data may use, so that a
    word-level tokenizer trained on corpus + these lines never maps them to ``unk``."""
    names = world.countries + world.capitals + world.fictional_countries + world.fictional_cities
    fam = list(world.yes_family) + list(world.no_family)
    lines = ["The capital of " + x + " is " + x + ".\nQ: What is the capital of " + x + "?\nA: " + x + "." for x in names]
    lines.append("Q: Is the capital of " + " ".join(names[:3]) + "?\nA: " + " ".join(w + "." for w in fam))
    lines += ["Q: Tell me the capital of X.\nA: " + s.format(country="X", city="Y") for s, _ in RESPONSE_STYLES]
    if world.descriptors:
        lines.append("A: Y." + tail_text(list(world.descriptors)))
    lines.append(f"The capital of X is Y. {USAGE_WORD} confuse Y with Z.")
    return lines
