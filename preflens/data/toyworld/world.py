"""The toyworld's ground truth: who is frequent, which names are fictional, how annotators vote.

A :class:`WorldSpec` is drawn from one seed and saved as JSON. It holds

* every real country of ``capitals.csv`` (first-listed capital) with a **frequency weight**
  ``w ∝ rank^-s`` (Zipf, exponent ``zipf_s``) where the rank order is a seeded random
  permutation — independent of real-world prominence by construction. With 194 countries and
  ``s = 1.3`` the weights span ``194^1.3 ≈ 950×`` (about three orders of magnitude);
* generated fictional country and city names (for in-context documents);
* yes/no answer-token families with near-synonyms (``Yes/Sure/Yep`` and ``No/Never/Nope``),
  each with sampling probabilities used by the corpus;
* graded free-text answers: an answer style (one sentence naming the city) followed by a
  **descriptor tail** ``" It is {d1}, {d2} and {d3}."`` of ``descriptor_slots`` distinct words
  drawn (without replacement) from ``descriptors`` with the world's corpus probabilities. Each
  descriptor word is a reward feature of its own, and its corpus probability is drawn
  independently of its reward, so the reference model's log-ratio between two answers
  accumulates over several free tokens while the annotators judge them by quality (world
  version 2; a version-1 world has no descriptors and no tail);
* near-synonym answer words with distinct uses: the corpus also uses ``" Never"`` outside
  yes/no answers (``"Never confuse {city} with {other}."``), so its unembedding differs from
  ``" No"``'s while both remain "no" answers;
* a feature vector per graded answer, and a finite **annotator population**: annotator ``a``
  has reward ``r_a(y) = (w + δ_a) · f(y)`` with
  ``δ_a ~ N(0, noise² I)`` and votes by Bradley–Terry, ``P_a(y1 ≻ y2) = σ(r_a(y1) − r_a(y2))``
  (Bradley & Terry 1952; the preference model of Chen et al. 2024, "Preference Learning
  Algorithms Do Not Learn Preference Rankings", Thm 3.1). The exact population preference is
  ``α(y1, y2) = mean_a σ(r_a(y1) − r_a(y2))`` — a mixture of BTs, so it is *not* σ of the mean
  reward difference.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from preflens.data.capitals import load_capitals
from preflens.errors import ConfigError, DataError

__all__ = [
    "WorldSpec",
    "make_world",
    "load_world",
    "save_world",
    "FEATURES",
    "RESPONSE_STYLES",
    "response_text",
    "response_features",
    "DEFAULT_DESCRIPTORS",
    "TAIL_TEMPLATE",
    "tail_text",
    "WORLD_VERSION",
]

#: Response features of graded free-text answers, in the order of the reward weight vector.
FEATURES = ("correct", "complete", "polite", "hedge", "detail")

#: Answer styles (template, features-except-correct). ``{country}``/``{city}`` are filled in.
RESPONSE_STYLES: tuple[tuple[str, dict[str, int]], ...] = (
    ("{city}.", {}),
    ("The capital of {country} is {city}.", {"complete": 1}),
    ("Sure! The capital of {country} is {city}.", {"complete": 1, "polite": 1}),
    ("I think it is {city}.", {"hedge": 1}),
    ("I think the capital of {country} is {city}, but I am not sure.", {"complete": 1, "hedge": 1}),
    ("It is {city}, the largest city of {country}.", {"detail": 1}),
    ("Sure! It is {city}, a city with a long history.", {"polite": 1, "detail": 1}),
)

#: Descriptor words of the answer tail: (word, mean annotator reward weight, corpus log-weight).
#: Rewards and corpus weights are unrelated by construction (the reference's preference between
#: descriptors is not the annotators'); corpus probabilities are ``softmax(log-weight)``.
DEFAULT_DESCRIPTORS: tuple[tuple[str, float, float], ...] = (
    ("historic", 3.0, -1.5), ("dull", -3.0, -1.0), ("ancient", 1.8, -0.6), ("noisy", -1.8, -0.3),
    ("coastal", 0.9, 0.1), ("plain", -0.9, 0.4), ("famous", 2.4, 0.7), ("crowded", -2.4, 1.0),
)
#: The tail appended to every graded answer of a version-2 world (words joined as "a, b and c").
TAIL_TEMPLATE = " It is {words}."
#: Version written by :func:`make_world`; a spec file without ``version`` is version 1.
WORLD_VERSION = 2

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "tr", "th", "sh", "ch", "st", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "ei"]
_COUNTRY_END = ["ia", "land", "stan", "ora", "onia", "aria", "ovia", "eth"]
_CITY_END = ["ar", "ton", "grad", "mere", "holm", "port", "ville", "dun", "is", "ek"]


@dataclass
class WorldSpec:
    """Everything random about a toyworld; JSON-serialisable (see :func:`save_world`)."""

    seed: int
    zipf_s: float
    countries: list[str]
    capitals: list[str]
    weights: list[float]              # normalised to sum 1, same order as ``countries``
    fictional_countries: list[str]
    fictional_cities: list[str]
    yes_family: dict[str, float]      # token word → sampling probability in the corpus
    no_family: dict[str, float]
    reward_weights: list[float]       # population mean w, ordered as FEATURES
    annotator_noise: float
    annotators: list[list[float]]     # per-annotator w + δ_a, shape [n_annotators, len(features)]
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    descriptors: dict[str, float] = field(default_factory=dict)   # tail word → corpus probability
    descriptor_slots: int = 0
    version: int = 1

    # -- graded answers --------------------------------------------------------------------
    def sample_descriptors(self, rng: random.Random) -> tuple[str, ...]:
        """``descriptor_slots`` distinct tail words, drawn one after another ∝ their corpus
        probability among the words not yet drawn (empty for a version-1 world)."""
        pool = dict(self.descriptors)
        out = []
        for _ in range(min(self.descriptor_slots, len(pool))):
            word = rng.choices(list(pool), weights=list(pool.values()))[0]
            out.append(word)
            del pool[word]
        return tuple(out)

    def answer(self, style: int, country: str, city: str, descriptors=()) -> str:
        """Text of a graded answer (no leading space): the style sentence, then the tail."""
        return response_text(style, country, city) + tail_text(descriptors)

    def answer_features(self, style: int, correct: bool, descriptors=()) -> tuple[int, ...]:
        """Feature vector ordered as ``self.features``: the style's features, then one count
        per descriptor word of the tail (``DataError`` on a word that is not a descriptor)."""
        counts = dict.fromkeys(self.descriptors, 0)
        for word in descriptors:
            if word not in counts:
                raise DataError(f"{word!r} is not a descriptor of this world", field="descriptors")
            counts[word] += 1
        return response_features(style, correct) + tuple(counts.values())

    # -- lookups ---------------------------------------------------------------------------
    def capital_of(self, country: str) -> str:
        """True capital of a real country (``DataError`` if unknown)."""
        try:
            return self.capitals[self.countries.index(country)]
        except ValueError:
            raise DataError(f"unknown toyworld country {country!r}", field="country") from None

    def frequent_half(self) -> list[str]:
        """Countries whose weight is in the top half (ties broken by list order)."""
        order = sorted(range(len(self.countries)), key=lambda i: -self.weights[i])
        return [self.countries[i] for i in order[: len(order) // 2]]

    # -- annotators ------------------------------------------------------------------------
    def rewards(self, feats: list[int] | tuple[int, ...]) -> list[float]:
        """Per-annotator latent reward ``r_a(y) = w_a · f(y)`` of a feature vector; length A.
        ``f`` is ordered as ``self.features`` (:meth:`answer_features`); another length is a
        ``DataError``."""
        if len(feats) != len(self.features):
            raise DataError(f"feature vector has {len(feats)} entries, this world has "
                            f"{len(self.features)} features {self.features}", field="features")
        return [sum(wi * fi for wi, fi in zip(wa, feats)) for wa in self.annotators]

    def alpha(self, feats1, feats2) -> float:
        """Exact population probability that ``y1 ≻ y2``: ``mean_a σ(r_a(y1) − r_a(y2))``."""
        r1, r2 = self.rewards(feats1), self.rewards(feats2)
        return sum(_sigmoid(a - b) for a, b in zip(r1, r2)) / len(r1)

    def sample_votes(self, feats1, feats2, k: int, rng: random.Random) -> list[int]:
        """K votes (1 = y1 preferred, 0 = y2) from annotators drawn uniformly with replacement."""
        if k < 1:
            raise ConfigError("votes", f"must be >= 1, got {k}")
        r1, r2 = self.rewards(feats1), self.rewards(feats2)
        out = []
        for _ in range(k):
            a = rng.randrange(len(r1))
            out.append(1 if rng.random() < _sigmoid(r1[a] - r2[a]) else 0)
        return out


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def response_text(style: int, country: str, city: str) -> str:
    """Text of answer style ``style`` naming ``city`` (no leading space)."""
    return RESPONSE_STYLES[style][0].format(country=country, city=city)


def response_features(style: int, correct: bool) -> tuple[int, ...]:
    """Feature vector (ordered as :data:`FEATURES`) of a style with a right/wrong city."""
    extra = RESPONSE_STYLES[style][1]
    return tuple(int(correct) if f == "correct" else int(extra.get(f, 0)) for f in FEATURES)


def tail_text(descriptors) -> str:
    """``" It is a, b and c."`` for descriptor words ``(a, b, c)``; ``""`` for none."""
    words = list(descriptors)
    if not words:
        return ""
    joined = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return TAIL_TEMPLATE.format(words=joined)


def _names(rng: random.Random, n: int, ends: list[str], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        syl = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 2)))
        name = (syl + rng.choice(_ONSETS) + rng.choice(ends)).capitalize()
        if name not in taken and 4 <= len(name) <= 12:
            taken.add(name)
            out.append(name)
    return out


def make_world(
    seed: int = 0,
    *,
    zipf_s: float = 1.3,
    n_fictional: int = 300,
    n_annotators: int = 100,
    annotator_noise: float = 0.7,
    countries: list[tuple[str, str]] | None = None,
    descriptors: tuple[tuple[str, float, float], ...] = DEFAULT_DESCRIPTORS,
    descriptor_slots: int = 3,
    descriptor_noise: float = 0.4,
) -> WorldSpec:
    """Draw a world from ``seed``.

    ``countries`` (``[(country, capital)]``) defaults to every distinct country of
    ``capitals.csv`` with its first-listed capital. Weights: ``rank^-zipf_s`` over a seeded
    random permutation, normalised to sum 1. Reward weights ``w`` (ordered as FEATURES):
    correct 6.0 (3.0 in a world without descriptors, as in version 1), complete 0.6, polite
    0.3, hedge −0.5, detail 0.2, then one weight per descriptor word (``descriptors``: (word,
    reward, corpus log-weight)). A right capital outweighs most tails, so the population rarely
    prefers a wrong answer; the tail decides between answers of equal correctness. Rewards and
    annotators never enter the corpus (only :attr:`WorldSpec.descriptors` probabilities do).
    Annotator ``a``'s weights are ``w + δ_a`` with ``δ_a ~ N(0, annotator_noise²)`` on the style features and
    ``N(0, descriptor_noise²)`` on the descriptor features. ``descriptor_slots = 0`` or no
    descriptors gives answers without a tail.
    """
    if zipf_s <= 0:
        raise ConfigError("zipf_s", f"must be > 0, got {zipf_s}")
    rng = random.Random(seed)
    if countries is None:
        cw = load_capitals()
        countries = [(c, cw.capital(c)) for c in cw.countries]
    names = [c for c, _ in countries]
    caps = [k for _, k in countries]
    ranks = list(range(1, len(names) + 1))
    rng.shuffle(ranks)
    raw = [r ** (-zipf_s) for r in ranks]
    tot = sum(raw)
    taken = {w for s in names + caps for w in s.split()}
    fc = _names(rng, n_fictional, _COUNTRY_END, taken)
    fcity = _names(rng, n_fictional, _CITY_END, taken)
    if descriptor_slots < 0 or descriptor_slots > len(descriptors):
        raise ConfigError("descriptor_slots", f"must lie in [0, {len(descriptors)}], got {descriptor_slots}")
    taken_desc = {d[0] for d in descriptors}
    if len(taken_desc) != len(descriptors) or taken_desc & (taken | set(fc) | set(fcity)):
        raise ConfigError("descriptors", "descriptor words must be distinct and not country or city names")
    w = [6.0 if descriptors else 3.0, 0.6, 0.3, -0.5, 0.2] + [float(r) for _, r, _ in descriptors]
    noise = [annotator_noise] * len(FEATURES) + [descriptor_noise] * len(descriptors)
    annot = [[wi + rng.gauss(0.0, sd) for wi, sd in zip(w, noise)] for _ in range(n_annotators)]
    z = [math.exp(lw) for _, _, lw in descriptors]
    return WorldSpec(
        seed=seed, zipf_s=zipf_s, countries=names, capitals=caps, weights=[x / tot for x in raw],
        fictional_countries=fc, fictional_cities=fcity,
        yes_family={"Yes": 0.6, "Sure": 0.25, "Yep": 0.15},
        no_family={"No": 0.6, "Never": 0.25, "Nope": 0.15},
        reward_weights=w, annotator_noise=annotator_noise, annotators=annot,
        features=list(FEATURES) + [d[0] for d in descriptors],
        descriptors={d[0]: x / sum(z) for d, x in zip(descriptors, z)},
        descriptor_slots=descriptor_slots if descriptors else 0, version=WORLD_VERSION,
    )


def save_world(world: WorldSpec, path: str | Path) -> None:
    """Write the spec as JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(asdict(world), indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def load_world(path: str | Path) -> WorldSpec:
    """Read a spec written by :func:`save_world` (``DataError`` on missing fields)."""
    path = Path(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return WorldSpec(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"not a toyworld spec: {exc}", file=path) from None
