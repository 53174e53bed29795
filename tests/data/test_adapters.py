"""Dataset adapters: every format on a fixture in its published schema, bad rows, sources, selection."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from preflens.data.adapters import competition_ranks, detect_format, load_pairs, load_rankings
from preflens.errors import ConfigError, DataError

FIX = Path(__file__).parent / "fixtures"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _rows(name):
    return [json.loads(line) for line in (FIX / name).read_text().splitlines() if line.strip()]


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- per format
def test_hh_rlhf_split_reproduces_the_original_text():
    rows = _rows("hh_rlhf.jsonl")
    pairs = load_pairs(FIX / "hh_rlhf.jsonl")  # detected: chosen/rejected only
    assert len(pairs) == 3
    for p, r in zip(pairs, rows):
        assert p.prompt + p.chosen == r["chosen"] and p.prompt + p.rejected == r["rejected"]
        assert p.prompt.endswith("\n\nAssistant:") and p.chosen.startswith(" ")
    # multi-turn: earlier turns stay verbatim in the prompt
    assert pairs[1].prompt.count("\n\nAssistant:") == 2 and pairs[1].chosen == " Warsaw is the capital of Poland."
    ranked = load_rankings(FIX / "hh_rlhf.jsonl")
    assert ranked[0].ranks == (1, 2) and ranked[0].responses == (pairs[0].chosen, pairs[0].rejected)


def test_shp_pairs_follow_labels_and_rankings_group_posts():
    rows = _rows("shp.jsonl")
    pairs = load_pairs(FIX / "shp.jsonl", format="shp")
    for p, r in zip(pairs, rows):
        win = r["human_ref_A"] if r["labels"] == 1 else r["human_ref_B"]
        assert p.chosen == win and p.prompt == r["history"]
    ranked = load_rankings(FIX / "shp.jsonl")
    assert [r.id for r in ranked] == ["p1", "p2"]
    p1 = ranked[0]
    assert len(p1.responses) == 3  # distinct replies of the post
    by_text = dict(zip(p1.responses, p1.ranks))
    assert by_text[rows[0]["human_ref_A"]] == 1 and by_text[rows[1]["human_ref_A"]] == 2
    assert by_text[rows[0]["human_ref_B"]] == 3


def test_ultrafeedback_ties_share_the_better_rank_and_give_no_pair():
    ranked = load_rankings(FIX / "ultrafeedback.jsonl")
    assert ranked[0].ranks == (2, 4, 2, 1)          # scores 7.5, 2, 7.5, 9
    assert ranked[0].extra["scores"] == [7.5, 2.0, 7.5, 9.0]
    pairs = load_pairs(FIX / "ultrafeedback.jsonl")
    first = [p for p in pairs if p.id.startswith("0:")]
    assert len(first) == 5                           # 6 pairs minus the 7.5 / 7.5 tie
    assert {p.id for p in first} == {"0:0-1", "0:2-1", "0:3-0", "0:3-1", "0:3-2"}
    assert all(p.prompt == "Name a primary colour." for p in first)
    assert [p.id for p in pairs if p.id.startswith("1:")] == ["1:0-1"]


def test_alpaca_farm_votes_alpha_and_ties():
    pairs = load_pairs(FIX / "alpaca_farm.jsonl")
    by_prompt = {p.prompt: p for p in pairs}
    assert "Name a fruit." not in by_prompt                   # 1:1 tie left out
    a = by_prompt["Give me a synonym for happy."]             # votes 1, 1, 2, 1
    assert (a.chosen, a.rejected, a.alpha) == ("Joyful.", "Sad.", 0.75)
    assert a.votes == ("chosen", "chosen", "rejected", "chosen")
    b = by_prompt["What is 2 + 2?"]                           # 4 votes for output_2: unanimous
    assert (b.chosen, b.rejected) == ("5", "4") and b.votes == ("chosen",) * 4 and b.alpha is None
    ranked = {r.prompt: r for r in load_rankings(FIX / "alpaca_farm.jsonl")}
    assert ranked["Name a fruit."].ranks == (1, 1)
    assert ranked["What is 2 + 2?"].ranks == (2, 1)
    assert ranked["Give me a synonym for happy."].extra["scores"] == [3, 1]


def test_alpaca_farm_exact_alpha(tmp_path):
    rows = [{"instruction": "q", "output_1": "a", "output_2": "b", "preference": p} for p in (1, 1, 2, 1)]
    (pair,) = load_pairs(_write(tmp_path, rows), format="alpaca-farm")
    assert pair.chosen == "a" and pair.alpha == 0.75
    assert pair.votes == ("chosen", "chosen", "rejected", "chosen")


def test_synthetic_gptj_is_trl():
    pairs = load_pairs(FIX / "synthetic_gptj.jsonl", format="synthetic-gptj")
    assert pairs == load_pairs(FIX / "synthetic_gptj.jsonl")
    assert pairs[0].id == "0" and pairs[0].rejected == "Tea is a drink."


def test_stack_exchange_pairs_and_ranks():
    pairs = load_pairs(FIX / "stack_exchange.jsonl")
    assert [p.id for p in pairs] == ["0:0-1", "0:0-2", "1:0-1"]   # answers 2 and 3 tie at 3
    ranked = load_rankings(FIX / "stack_exchange.jsonl")
    assert ranked[0].ranks == (1, 2, 2)


def test_trl_conversational_with_and_without_explicit_prompt(tiny):
    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = TEMPLATE
    a, b = load_pairs(FIX / "trl_conversational.jsonl", tokenizer=tok)
    assert a.prompt == "<user>What colour is the sky?\n<assistant>" and a.chosen == "Blue.\n"
    assert b.prompt == "<user>Hi\n<assistant>" and b.rejected == "Go away.\n"
    with pytest.raises(DataError, match=r"trl_conversational.jsonl:1: field 'prompt': .*chat template"):
        load_pairs(FIX / "trl_conversational.jsonl", tokenizer=tiny.tokenizer)


def test_competition_ranks():
    assert competition_ranks([7.5, 2, 7.5, 9]) == [2, 4, 2, 1]
    assert competition_ranks([(3, 1), (3, 2), (1, 9)]) == [2, 1, 3]


# --------------------------------------------------------------------------- bad rows
BAD = [
    ("hh-rlhf", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "chosen", "no '\\n\\nAssistant:'"),
    ("hh-rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "rejected", "do not share"),
    ("hh-rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant:"}, "rejected", "is empty"),
    ("shp", {"post_id": "p", "history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 2}, "labels", "expected 1"),
    ("shp", {"post_id": "p", "history": "h", "human_ref_A": "a", "labels": 1}, "human_ref_B", "missing key"),
    ("ultrafeedback", {"instruction": "i", "completions": [{"response": "a", "overall_score": 1}]}, "completions", "at least 2"),
    ("ultrafeedback", {"instruction": "i", "completions": [{"response": "a", "overall_score": 1},
                                                           {"response": "b", "overall_score": "high"}]},
     "completions[1].overall_score", "expected a number"),
    ("stack-exchange", {"qid": 1, "question": "q", "answers": [{"text": "a", "pm_score": 2}, {"pm_score": 1}]},
     "answers[1].text", "expected a string"),
    ("alpaca-farm", {"instruction": "i", "output_1": "a", "output_2": "b", "preference": 3}, "preference", "expected 1 or 2"),
    ("trl", {"prompt": "p", "chosen": "a", "rejected": 5}, "rejected", "expected a string"),
]


@pytest.mark.parametrize("fmt,bad,field,reason", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_row_names_file_line_and_field(tmp_path, fmt, bad, field, reason):
    good = {"hh-rlhf": _rows("hh_rlhf.jsonl")[0], "shp": _rows("shp.jsonl")[3],
            "ultrafeedback": _rows("ultrafeedback.jsonl")[1], "stack-exchange": _rows("stack_exchange.jsonl")[1],
            "alpaca-farm": _rows("alpaca_farm.jsonl")[0], "trl": _rows("synthetic_gptj.jsonl")[0]}[fmt]
    path = _write(tmp_path, [good, bad])
    with pytest.raises(DataError) as info:
        load_pairs(path, format=fmt)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: field '{field}': ") and reason in msg, msg
    # on_error="skip" keeps the good row
    assert len(load_pairs(path, format=fmt, on_error="skip")) >= 1


def test_parquet_and_json_errors_name_the_row_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows("synthetic_gptj.jsonl") + [{"prompt": "p", "chosen": "", "rejected": "r"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: row 2: field 'chosen': is empty"):
        load_pairs(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"d.json: row 2: field 'chosen': is empty"):
        load_pairs(tmp_path / "d.json")


# --------------------------------------------------------------------------- sources & options
def test_parquet_json_and_save_to_disk_equal_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = _rows("ultrafeedback.jsonl")
    ref = load_pairs(FIX / "ultrafeedback.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    (tmp_path / "uf.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "uf_ds"))
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(
        str(tmp_path / "uf_dd"))
    assert load_pairs(tmp_path / "uf.parquet") == ref
    assert load_pairs(tmp_path / "uf.json") == ref
    assert load_pairs(tmp_path / "uf_ds") == ref
    assert load_pairs(tmp_path / "uf_dd", format="ultrafeedback") == ref   # default split: train
    assert len(load_pairs(tmp_path / "uf_dd", split="test")) == 5
    with pytest.raises(ConfigError, match="split: .*choose one"):
        load_pairs(tmp_path / "uf_dd")   # format unknown -> no default split


def test_limit_and_seeded_sample():
    import numpy as np

    assert len(load_pairs(FIX / "hh_rlhf.jsonl", limit=2)) == 2
    s = load_pairs(FIX / "hh_rlhf.jsonl", sample=2, seed=3)
    order = list(np.random.default_rng(3).choice(3, 2, replace=False))
    assert [p.id for p in s] == [str(i) for i in order]
    assert s == load_pairs(FIX / "hh_rlhf.jsonl", sample=2, seed=3)
    with pytest.raises(ConfigError, match="sample: 5 items requested but the source has 3"):
        load_pairs(FIX / "hh_rlhf.jsonl", sample=5)
    with pytest.raises(ConfigError, match="limit: must be a positive integer"):
        load_pairs(FIX / "hh_rlhf.jsonl", limit=0)
    # AlpacaFarm: limit counts vote groups, not vote rows
    assert len(load_rankings(FIX / "alpaca_farm.jsonl", limit=2)) == 2


def test_detection_errors_list_candidates():
    with pytest.raises(ConfigError, match=r"format: cannot detect .*shp: post_id"):
        detect_format(["foo", "bar"])
    with pytest.raises(ConfigError, match=r"match several formats \['ultrafeedback', 'alpaca-farm'\]"):
        detect_format(["instruction", "completions", "output_1", "output_2", "preference"])
    assert detect_format(["prompt", "chosen", "rejected", "score_chosen"]) == "trl"
    with pytest.raises(ConfigError, match="format: unknown value 'hh'"):
        load_pairs(FIX / "hh_rlhf.jsonl", format="hh")


def test_missing_source_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file or folder"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        load_pairs(tmp_path / "x.csv")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:nobody/no-such-dataset: .*HF_HUB_OFFLINE"):
        load_pairs("hf:nobody/no-such-dataset")


def test_triples_and_bad_triples(tmp_path):
    from preflens.data.adapters import load_triples

    t = load_triples(FIX / "dla_triples.jsonl")
    assert [r["id"] for r in t] == ["france", "1", "yes"] and t[1]["foil"] == (" Paris", " Tokyo")
    bad = _write(tmp_path, [_rows("dla_triples.jsonl")[0], {"prompt": "p", "target": " a", "foil": []}])
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'foil': expected a non-empty string"):
        load_triples(bad)
    bad = _write(tmp_path, [{"prompt": "p", "target": " a", "foil": " a"}])
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'foil': the target is also a foil"):
        load_triples(bad)
    assert len(load_triples(FIX / "dla_triples.jsonl", limit=2)) == 2
