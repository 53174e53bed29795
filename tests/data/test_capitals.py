"""Capitals data, templates and the factual-recall scoring rule (factual_recall.md §2–3)."""

import pytest

from preflens.data.capitals import (
    CLOSED_BOOK_TEMPLATE,
    PAPER_TEMPLATE,
    classify_continuation,
    load_capitals,
)
from preflens.errors import DataError


@pytest.fixture(scope="module")
def world():
    return load_capitals()


def test_size_and_order(world):
    assert len(world.countries) >= 190
    assert world.rows[0].country == "Afghanistan"           # file order kept
    assert len({r.country for r in world.rows}) == len(world.countries)
    # every canonical country has a capital and no empty strings
    assert all(r.country and r.capital for r in world.rows)


def test_mem_set_is_exact_match_not_substring(world):
    # the official substring lookup answered these wrongly (§2.4)
    assert world.mem_set("China") == {"Beijing"}
    assert world.mem_set("Niger") == {"Niamey"}
    assert world.mem_set("Ireland") == {"Dublin"}
    assert world.mem_set("Guinea") == {"Conakry"}
    assert world.mem_set("Dominica") == {"Roseau"}
    assert world.mem_set("Georgia") == {"Tbilisi"}
    assert world.mem_set("United States") == {"Washington, D.C."}
    assert world.mem_set("Bolivia") == {"Sucre", "La Paz"}
    assert world.capital("Bolivia") == "Sucre"


def test_aliases(world):
    assert world.mem_set("Czechia") == {"Prague"}
    assert world.mem_set("USA") == world.mem_set("United States")
    assert world.canonical("Timor-Leste") == "East Timor"
    with pytest.raises(DataError):
        world.mem_set("Atlantis")


def test_templates_exact_whitespace():
    p = PAPER_TEMPLATE.format(country="Poland", ic="London")
    assert p == "The capital of Poland is London.\nQ: What is the capital of Poland?\nA:"
    assert CLOSED_BOOK_TEMPLATE.format(country="Poland") == "Q: What is the capital of Poland?\nA:"
    assert not p.endswith(" ")


@pytest.mark.parametrize("text,expected", [
    (" Warsaw.\n", "memorized"),
    (" London.", "in_context"),
    (" London, not Warsaw.", "memorized"),            # memorized wins ties
    (" Madrid.", "neither"),
    (" London.\nQ: What is the capital of Poland?\nA: Warsaw", "in_context"),  # cut at first Q:
    ("Warsaw.", "neither"),                           # targets carry the leading space
    (" warsaw", "neither"),                           # case-sensitive
    (" Warsawa", "memorized"),                        # plain substring, as the paper
])
def test_classify_continuation(text, expected):
    assert classify_continuation(text, [" Warsaw"], " London") == expected


def test_classify_several_memorized_targets_and_no_regex():
    assert classify_continuation(" La Paz", [" Sucre", " La Paz"], " Lima") == "memorized"
    # a regex-special target must be matched literally
    assert classify_continuation(" Washington, D.C.", [" Washington, D.C."], " X") == "memorized"
    assert classify_continuation(" WashingtonX DXCX", [" Washington, D.C."], " X.C") == "neither"


def test_bad_csv_names_file_and_line(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("# c\ncountry,capital,aliases\nFrance,Paris,\nSpain,,\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_capitals(f)
    assert e.value.line == 4 and e.value.field == "capital"
    f.write_text("country,capital,aliases\nFrance,Paris,Gaul\nSpain,Madrid,Gaul\n", encoding="utf-8")
    with pytest.raises(DataError, match="two countries"):
        load_capitals(f)
