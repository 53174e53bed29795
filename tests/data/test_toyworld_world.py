"""toyworld world spec, corpus counts, tokenizer and preference generators."""

import dataclasses
import json
import math
import random
import re

import numpy as np
import pytest

from preflens.data import read_pairs, write_pairs
from preflens.data.toyworld.corpus import count_facts, generate_documents, vocabulary_lines
from preflens.data.toyworld.prefs import multi_token_pairs, single_token_pairs
from preflens.data.toyworld.tokenizer import EOS, load_tokenizer, save_tokenizer, train_tokenizer
from preflens.data.toyworld.world import load_world, make_world, response_features, save_world
from preflens.errors import DataError

SMALL = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
         ("Chile", "Santiago"), ("Nepal", "Kathmandu"), ("Ghana", "Accra"), ("Laos", "Vientiane")]


def test_world_is_seeded_and_roundtrips(tmp_path):
    a, b, c = make_world(3), make_world(3), make_world(4)
    assert a == b and a.weights != c.weights
    save_world(a, tmp_path / "w.json")
    assert load_world(tmp_path / "w.json") == a


def test_weights_span_two_orders_and_ignore_prominence():
    w = make_world(0)
    assert len(w.countries) >= 190 and math.isclose(sum(w.weights), 1.0)
    assert max(w.weights) / min(w.weights) >= 100
    # the Zipf rank is a random permutation: file order (alphabetical) is not the rank order
    ranks = np.argsort(np.argsort(-np.array(w.weights)))
    assert abs(np.corrcoef(ranks, np.arange(len(ranks)))[0, 1]) < 0.3
    assert not set(w.fictional_countries) & set(w.countries)


def test_alpha_is_mixture_of_bradley_terry():
    w = make_world(1, n_annotators=7)
    f1 = w.answer_features(1, True, ("historic", "dull", "plain"))
    f2 = w.answer_features(3, False, ("famous", "dull", "noisy"))
    W = np.array(w.annotators)
    d = W @ (np.array(f1) - np.array(f2))
    assert w.alpha(f1, f2) == pytest.approx(float(np.mean(1 / (1 + np.exp(-d)))), abs=1e-12)
    assert w.alpha(f1, f2) + w.alpha(f2, f1) == pytest.approx(1.0)
    votes = w.sample_votes(f1, f2, 20000, random.Random(0))
    assert np.mean(votes) == pytest.approx(w.alpha(f1, f2), abs=0.015)


def _independent_counts(world, docs):
    """Count true-pair occurrences by string search over the texts (not the recorded facts)."""
    out = {}
    for c, k in zip(world.countries, world.capitals):
        pats = [f"capital of {c} is {k}.", f"city of {k} is the capital of {c}.",
                f"capital of {c}?\nA: {k}.", f"Is the capital of {c} {k}?"]
        n = 0
        for d in docs:
            if d.text.startswith("Q: Tell me the capital of "):   # one graded answer: 0 or 1
                if d.text.startswith(f"Q: Tell me the capital of {c}.\nA: "):
                    ans = d.text.split("\nA: ", 1)[1]
                    n += bool(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", ans))
            else:
                n += sum(d.text.count(p) for p in pats)
        out[c] = n
    return out


def test_corpus_counts_are_exact():
    w = make_world(0, countries=SMALL, n_fictional=20)
    docs = generate_documents(w, 3000, seed=5)
    counts = count_facts(w, docs)
    assert {c: v["fact"] for c, v in counts.items()} == _independent_counts(w, docs)
    kinds = {d.kind for d in docs}
    assert kinds == {"statement", "qa", "copy", "yesno", "graded", "usage"}
    assert [d.text for d in generate_documents(w, 3000, seed=5)] == [d.text for d in docs]  # seeded
    # frequent countries are counted more often
    order = np.argsort(w.weights)
    assert counts[w.countries[order[-1]]]["fact"] > counts[w.countries[order[0]]]["fact"]


def test_tokenizer_roundtrip_and_leading_space(tmp_path):
    w = make_world(0, countries=SMALL, n_fictional=20)
    docs = generate_documents(w, 500, seed=1)
    tok = train_tokenizer([d.text for d in docs] + vocabulary_lines(w))
    save_tokenizer(tok, tmp_path)
    hf = load_tokenizer(tmp_path)
    assert hf.eos_token == hf.bos_token == hf.pad_token == hf.unk_token == EOS
    for city in w.capitals + w.fictional_cities + list(w.yes_family) + list(w.no_family):
        ids = hf(" " + city, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != hf.eos_token_id
        assert ids != hf(city, add_special_tokens=False)["input_ids"]
    text = "The capital of France is Tokyo.\nQ: What is the capital of France?\nA: Tokyo."
    assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text


def test_preference_generators(tmp_path):
    w = make_world(0)
    single = single_token_pairs(w, 200, seed=0)
    assert {p.id.split("-")[1] for p in single} == {"similar", "dissimilar"}
    for p in single:
        truth = re.match(r"Q: Is the capital of (.+) (\S.*)\?\nA:$", p.prompt)
        assert truth and p.chosen in (" Yes", " No") and p.rejected.startswith(" ")
        if "-similar-" in p.id:
            assert (p.chosen, p.rejected) in ((" Yes", " Sure"), (" No", " Never"))
        else:
            assert {p.chosen, p.rejected} == {" Yes", " No"}
    multi = multi_token_pairs(w, 100, votes=5, seed=0)
    assert all(0.5 < p.alpha < 1 and len(p.votes) == 5 for p in multi)
    assert multi_token_pairs(w, 100, votes=5, seed=0) == multi
    write_pairs(tmp_path / "m.jsonl", multi)
    assert read_pairs(tmp_path / "m.jsonl") == multi


# -- world version 2: descriptor tails and the near-synonym's own use --------------------------
def test_descriptor_tail_draws_distinct_words_by_corpus_probability():
    w = make_world(0, countries=SMALL, n_fictional=20)
    assert w.version == 2 and w.descriptor_slots == 3
    assert w.features[5:] == list(w.descriptors) and math.isclose(sum(w.descriptors.values()), 1.0)
    rng = random.Random(0)
    draws = [w.sample_descriptors(rng) for _ in range(20000)]
    assert all(len(set(d)) == 3 and set(d) <= set(w.descriptors) for d in draws)
    # first slot: exactly the corpus probabilities; later slots: renormalised over the rest
    first = {x: sum(d[0] == x for d in draws) / len(draws) for x in w.descriptors}
    for x, p in w.descriptors.items():
        assert first[x] == pytest.approx(p, abs=0.01)
    rare, common = min(w.descriptors, key=w.descriptors.get), max(w.descriptors, key=w.descriptors.get)
    p_rare, p_common = w.descriptors[rare], w.descriptors[common]
    second = sum(d[0] == common and d[1] == rare for d in draws) / len(draws)
    assert second == pytest.approx(p_common * p_rare / (1 - p_common), abs=0.004)


def test_answer_features_count_the_tail_and_reward_follows_descriptors():
    w = make_world(0, countries=SMALL, n_fictional=20)
    f = w.answer_features(2, True, ("historic", "famous", "dull"))
    assert f[:5] == (1, 1, 1, 0, 0)   # style 2 = "Sure! The capital of ...": complete, polite
    assert dict(zip(w.features[5:], f[5:])) == {x: int(x in ("historic", "famous", "dull")) for x in w.descriptors}
    assert w.answer(2, "France", "Paris", ("historic", "famous", "dull")) == (
        "Sure! The capital of France is Paris. It is historic, famous and dull.")
    # the population prefers the same answer with a better tail (mean weights: historic > crowded)
    good = w.answer_features(0, True, ("historic", "coastal", "plain"))
    bad = w.answer_features(0, True, ("crowded", "coastal", "plain"))
    assert w.alpha(good, bad) > 0.8
    with pytest.raises(DataError, match="not a descriptor"):
        w.answer_features(0, True, ("Paris",))
    with pytest.raises(DataError, match="feature vector has 5 entries"):
        w.alpha(response_features(0, True), response_features(1, True))


def test_graded_documents_and_pairs_carry_tails_and_usage_gives_never_its_own_use(tmp_path):
    w = make_world(0, countries=SMALL, n_fictional=20)
    docs = generate_documents(w, 4000, seed=2)
    graded = [d.text for d in docs if d.kind == "graded"]
    assert graded and all(re.search(r"\. It is \w+, \w+ and \w+\.$", t) for t in graded)
    usage = [d for d in docs if d.kind == "usage"]
    assert usage and all(not d.facts and not d.mentions and " Never confuse " in d.text for d in usage)
    assert not any(c in d.text for d in usage for c in w.countries)   # fictional names only
    multi = multi_token_pairs(w, 50, seed=0)
    assert all(re.search(r"\. It is \w+, \w+ and \w+\.$", y) for p in multi for y in (p.chosen, p.rejected))
    tok = train_tokenizer([d.text for d in docs] + vocabulary_lines(w))
    save_tokenizer(tok, tmp_path)
    hf = load_tokenizer(tmp_path)
    for word in list(w.descriptors) + ["Never"]:
        assert len(hf(" " + word, add_special_tokens=False)["input_ids"]) == 1


def test_version_1_world_has_no_tail_and_unknown_mix_is_refused(tmp_path):
    from preflens.errors import ConfigError

    w = make_world(0, countries=SMALL, n_fictional=20)
    data = {k: v for k, v in dataclasses.asdict(w).items()
            if k not in ("descriptors", "descriptor_slots", "version")}
    data["features"] = data["features"][:5]
    data["reward_weights"] = data["reward_weights"][:5]
    data["annotators"] = [a[:5] for a in data["annotators"]]
    (tmp_path / "v1.json").write_text(json.dumps(data))
    old = load_world(tmp_path / "v1.json")
    assert old.version == 1 and old.sample_descriptors(random.Random(0)) == ()
    assert old.answer(1, "France", "Paris") == "The capital of France is Paris."
    tail = re.compile(r" It is \w+, \w+ and \w+\.$")
    assert not any(tail.search(y) for p in multi_token_pairs(old, 20) for y in (p.chosen, p.rejected))
    with pytest.raises(ConfigError, match="unknown document kind"):
        generate_documents(w, 10, mix={"statement": 1.0, "poems": 1.0})
