"""The chunked, resumable runner: appends, crash recovery, refusing a different configuration."""

from __future__ import annotations

import json

import pytest

from preflens.errors import ConfigError, DataError
from preflens.measure.runner import SCORES, ScoresFile, item_ids, run_chunks


def _items(n):
    return [{"id": f"x{i}", "v": i} for i in range(n)]


def _score(calls):
    def fn(chunk):
        calls.append([it["id"] for it in chunk])
        return [{"square": it["v"] ** 2, "nan": float("nan")} for it in chunk]
    return fn


def test_rows_in_order_with_ids(tmp_path):
    calls = []
    rows = run_chunks(_items(7), _score(calls), out_dir=tmp_path, lens="t", config={}, chunk_size=3,
                      progress=False)
    assert [r["id"] for r in rows] == [f"x{i}" for i in range(7)] and rows[6]["square"] == 36
    assert rows[0]["nan"] is None                       # non-finite -> null, file stays valid JSON
    lines = (tmp_path / SCORES).read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert [len(c) for c in calls] == [3, 3, 1]


def test_killed_run_resumes_after_last_complete_line(tmp_path):
    calls = []
    score = _score(calls)

    def dies_on_third_chunk(chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score(chunk)

    with pytest.raises(KeyboardInterrupt):
        run_chunks(_items(8), dies_on_third_chunk, out_dir=tmp_path, lens="t", config={"a": 1},
                   chunk_size=2, progress=False)
    path = tmp_path / SCORES
    with open(path, "ab") as fh:                        # a chunk write cut off mid-line
        fh.write(b'{"id": "x4", "squ')
    before = path.read_bytes()
    calls.clear()
    rows = run_chunks(_items(8), score, out_dir=tmp_path, lens="t", config={"a": 1}, chunk_size=2,
                      progress=False)
    assert calls == [["x4", "x5"], ["x6", "x7"]]        # continues at item 4
    assert path.read_bytes().startswith(before[: before.rindex(b"\n") + 1])   # earlier lines intact
    assert [r["id"] for r in rows] == [f"x{i}" for i in range(8)]
    assert len(path.read_text().splitlines()) == 8


def test_lines_of_other_items_are_dropped(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "x0"}\n{"id": "zz"}\n{"id": "x2"}\n')
    assert ScoresFile(path).resume(["x0", "x1", "x2"]) == [{"id": "x0"}]
    assert path.read_text() == '{"id": "x0"}\n'


def test_other_configuration_is_refused_unless_resume_off(tmp_path):
    run_chunks(_items(2), _score([]), out_dir=tmp_path, lens="t", config={"a": 1}, progress=False)
    with pytest.raises(ConfigError, match="out_dir: .*different configuration"):
        run_chunks(_items(2), _score([]), out_dir=tmp_path, lens="t", config={"a": 2}, progress=False)
    calls = []
    run_chunks(_items(2), _score(calls), out_dir=tmp_path, lens="t", config={"a": 2}, resume=False,
               progress=False)
    assert calls == [["x0", "x1"]]
    calls.clear()
    run_chunks(_items(2), _score(calls), out_dir=tmp_path, lens="t", config={"a": 2}, progress=False)
    assert calls == []                                  # finished run: nothing to redo


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="duplicate item id 'a'"):
        item_ids([{"id": "a"}, {"id": "a"}])
    assert item_ids([{"id": None}, {"x": 1}]) == ["0", "1"]
    with pytest.raises(ConfigError, match="chunk_size"):
        run_chunks(_items(2), _score([]), out_dir=tmp_path, lens="t", config={}, chunk_size=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        run_chunks(_items(2), _score([]), out_dir=tmp_path / "file", lens="t", config={})
