"""Preference pairs drawn from the toyworld (issue 3, item 7), as ``PreferencePair`` records.

(i) :func:`single_token_pairs` — the yes/no verification prompt
    ``"Q: Is the capital of {country} {city}?\\nA:"`` with one-word responses (leading space,
    one token each under the toyworld tokenizer), for likelihood-displacement experiments
    (Razin et al. 2025, "Unintentional Unalignment", Sec. 3: similar pairs such as No vs Never,
    dissimilar such as Yes vs No). ``id`` = ``single-{similar|dissimilar}-{k}``:
      * dissimilar: chosen = the correct family head (" Yes" if the stated city is the true
        capital, else " No"), rejected = the other head;
      * similar: chosen = the correct head, rejected = its near-synonym (" Sure" for Yes,
        " Never" for No — both responses mean the same).
(ii) :func:`multi_token_pairs` — ``"Q: Tell me the capital of {country}.\\nA:"`` with two graded
    answers of different feature vectors (style, right or wrong city and, in a version-2 world,
    each answer's own descriptor tail drawn as in the corpus). ``alpha`` is the exact population preference of the
    world's annotators (:meth:`WorldSpec.alpha`, a mixture of Bradley–Terry models) and
    ``chosen`` is the population-preferred response (α > 0.5); ``votes`` are K labels sampled
    from annotators drawn with replacement (so the majority can disagree with α when K is small).

Countries are drawn ∝ the world's frequency weights; everything is seeded.
"""

from __future__ import annotations

import random

from preflens.data import PreferencePair
from preflens.data.toyworld.world import RESPONSE_STYLES, WorldSpec
from preflens.errors import ConfigError

__all__ = ["YESNO_PROMPT", "GRADED_PROMPT", "single_token_pairs", "multi_token_pairs"]

YESNO_PROMPT = "Q: Is the capital of {country} {city}?\nA:"
GRADED_PROMPT = "Q: Tell me the capital of {country}.\nA:"


def _country(world: WorldSpec, rng: random.Random) -> int:
    return rng.choices(range(len(world.countries)), weights=world.weights)[0]


def single_token_pairs(world: WorldSpec, n: int, *, seed: int = 0, similar_share: float = 0.5) -> list[PreferencePair]:
    """``n`` single-token pairs (see module docstring); a share ``similar_share`` are similar
    pairs, the rest dissimilar; half of the prompts state the true capital."""
    if n < 1:
        raise ConfigError("n", f"must be >= 1, got {n}")
    if not 0.0 <= similar_share <= 1.0:
        raise ConfigError("similar_share", f"must lie in [0, 1], got {similar_share}")
    rng = random.Random(seed)
    yes, no = list(world.yes_family), list(world.no_family)
    syn = {yes[0]: yes[1], no[0]: no[1]}          # Yes → Sure, No → Never
    out = []
    for k in range(n):
        i = _country(world, rng)
        truth = rng.random() < 0.5
        n_c = len(world.countries)
        city = world.capitals[i] if truth else world.capitals[(i + rng.randrange(1, n_c)) % n_c]
        head = yes[0] if truth else no[0]
        similar = rng.random() < similar_share
        other = syn[head] if similar else (no[0] if truth else yes[0])
        out.append(PreferencePair(
            prompt=YESNO_PROMPT.format(country=world.countries[i], city=city),
            chosen=" " + head, rejected=" " + other,
            id=f"single-{'similar' if similar else 'dissimilar'}-{k:05d}"))
    return out


def multi_token_pairs(world: WorldSpec, n: int, *, votes: int = 4, seed: int = 0) -> list[PreferencePair]:
    """``n`` multi-token pairs with ``votes`` sampled annotator votes and the exact α.

    Each pair: one country (∝ weight), two (style, correct, descriptor tail) draws with
    different feature vectors (:meth:`WorldSpec.answer_features`); a wrong answer names another
    country's capital. α = mean_a σ(r_a(y_w) − r_a(y_l))
    ≥ 0.5 for the stored chosen response."""
    if n < 1:
        raise ConfigError("n", f"must be >= 1, got {n}")
    rng = random.Random(seed)
    n_c, n_s = len(world.countries), len(RESPONSE_STYLES)
    out = []
    while len(out) < n:
        i = _country(world, rng)
        country = world.countries[i]
        wrong = world.capitals[(i + rng.randrange(1, n_c)) % n_c]
        (s1, c1, t1), (s2, c2, t2) = [(rng.randrange(n_s), rng.random() < 0.6, world.sample_descriptors(rng))
                                      for _ in range(2)]
        f1, f2 = world.answer_features(s1, c1, t1), world.answer_features(s2, c2, t2)
        if f1 == f2:
            continue
        y1 = " " + world.answer(s1, country, world.capitals[i] if c1 else wrong, t1)
        y2 = " " + world.answer(s2, country, world.capitals[i] if c2 else wrong, t2)
        a = world.alpha(f1, f2)
        if a < 0.5:
            y1, y2, f1, f2, a = y2, y1, f2, f1, 1.0 - a
        v = world.sample_votes(f1, f2, votes, rng)
        out.append(PreferencePair(prompt=GRADED_PROMPT.format(country=country), chosen=y1, rejected=y2,
                                  id=f"multi-{len(out):05d}", alpha=a,
                                  votes=["chosen" if x else "rejected" for x in v]))
    return out
