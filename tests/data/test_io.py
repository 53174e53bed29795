"""JSONL preference data: round trip, chat templates, and every bad-input case of the foundation."""

from __future__ import annotations

import json
import os

import pytest

from preflens.data import PreferencePair, RankedResponses, read_pairs, read_ranked, write_json, write_pairs
from preflens.errors import DataError

GOOD = {"prompt": "Q: Is the sky blue?\nA:", "chosen": " Yes", "rejected": " No"}


def _write(tmp_path, lines, name="pairs.jsonl"):
    path = tmp_path / name
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def test_roundtrip_keeps_trl_keys(tmp_path):
    pairs = [
        PreferencePair(**GOOD, id="a", votes=["chosen", "chosen", "rejected"], alpha=0.7),
        PreferencePair("P", "x", "y"),
    ]
    path = write_pairs(tmp_path / "out.jsonl", pairs)
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first)[:3] == ["prompt", "chosen", "rejected"]
    assert read_pairs(path) == pairs


def test_extra_columns_are_ignored(tmp_path):
    path = _write(tmp_path, [dict(GOOD, score_chosen=8.0)])
    assert read_pairs(path)[0].chosen == " Yes"


BAD_CASES = [
    ("invalid_json", ['{"prompt": "a", "chosen": '], 1, None, "invalid JSON"),
    ("missing_key", [GOOD, {"prompt": "a", "chosen": "b"}], 2, "rejected", "missing key"),
    ("wrong_type", [dict(GOOD, chosen=3)], 1, "chosen", "expected a string"),
    ("empty_prompt", [dict(GOOD, prompt="  ")], 1, "prompt", "is empty"),
    ("empty_response", [GOOD, GOOD, dict(GOOD, rejected="")], 3, "rejected", "is empty"),
    ("identical", [dict(GOOD, rejected=" Yes")], 1, "chosen", "identical"),
    ("alpha_high", [dict(GOOD, alpha=1.0)], 1, "alpha", "open interval"),
    ("alpha_neg", [dict(GOOD, alpha=-0.2)], 1, "alpha", "open interval"),
    ("alpha_nan", ['{"prompt": "a", "chosen": "b", "rejected": "c", "alpha": NaN}'], 1, None, "non-finite"),
    ("alpha_inf", ['{"prompt": "a", "chosen": "b", "rejected": "c", "alpha": Infinity}'], 1, None, "non-finite"),
    ("alpha_str", [dict(GOOD, alpha="0.5")], 1, "alpha", "expected a number"),
    ("votes_not_list", [dict(GOOD, votes="chosen")], 1, "votes", "list of labels"),
    ("votes_third", [dict(GOOD, votes=["chosen", "response_3"])], 1, "votes", "response_3"),
    ("duplicate_id", [dict(GOOD, id="x"), dict(GOOD, id="y"), dict(GOOD, id="x")], 3, "id", "duplicate id"),
    ("not_object", ['["a", "b"]'], 1, None, "JSON object"),
]


@pytest.mark.parametrize("name,lines,line,field,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_file_line_and_field(tmp_path, name, lines, line, field, reason):
    path = _write(tmp_path, lines)
    with pytest.raises(DataError) as err:
        read_pairs(path)
    msg = str(err.value)
    assert f"{path}:{line}" in msg and reason in msg
    assert err.value.line == line and err.value.file == str(path)
    if field:
        assert f"field '{field}'" in msg


def test_non_utf8_bytes(tmp_path):
    path = _write(tmp_path, json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r":2: invalid UTF-8"):
        read_pairs(path)


def test_empty_file(tmp_path):
    path = _write(tmp_path, b"\n\n")
    with pytest.raises(DataError, match="empty"):
        read_pairs(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "nope.jsonl")


def test_conversational_without_template_is_clear_error(tmp_path, tiny):
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
    }
    path = _write(tmp_path, [row])
    with pytest.raises(DataError, match=r":1: field 'prompt': conversational .* chat template"):
        read_pairs(path, tokenizer=tiny.tokenizer)


def test_conversational_with_template(tmp_path, tiny):
    import copy

    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
    }
    pair = read_pairs(_write(tmp_path, [row]), tokenizer=tok)[0]
    assert pair.prompt == "<user>Hi\n<assistant>"
    assert pair.chosen == "Hello\n" and pair.rejected == "Go away\n"


def test_ranked_records(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 3, 3]}])
    assert read_ranked(path)[0].scores == (1, 3, 3)
    bad = _write(tmp_path, [{"prompt": "p", "responses": ["a", "b"], "ranks": [1]}], "r.jsonl")
    with pytest.raises(DataError, match=r"r.jsonl:1: field 'ranks'"):
        read_ranked(bad)
    with pytest.raises(DataError):
        RankedResponses("p", ("a",), scores=(1.0,))


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_json(target, {"old": 1})

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(DataError, match="No space left on device"):
        write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("running as root: a read-only directory is still writable")
        with pytest.raises(DataError, match="could not write"):
            write_json(ro / "x.json", {})
    finally:
        ro.chmod(0o700)


def test_results_must_be_finite(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"a": float("nan")})
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_keep_the_users_umask(tmp_path, umask):
    """tempfile.mkstemp creates 0600; the renamed output must get 0o666 & ~umask like open()."""
    import stat
    from pathlib import Path

    import matplotlib.pyplot as plt

    from preflens.plotting import save_figure

    old = os.umask(umask)
    try:
        for path in (write_json(tmp_path / "r.json", {"a": 1}),
                     write_pairs(tmp_path / "p.jsonl", [PreferencePair("Q", " a", " b")]),
                     save_figure(plt.figure(), tmp_path / "f.png")):
            assert stat.S_IMODE(Path(path).stat().st_mode) == 0o666 & ~umask, path
    finally:
        os.umask(old)
