"""toyworld world spec, corpus counts, tokenizer and preference generators."""

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
    f1, f2 = response_features(1, True), response_features(3, False)
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
    assert kinds == {"statement", "qa", "copy", "yesno", "graded"}
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
