"""Command line on a non-GPT-2 family: chat-format data through the model's chat template,
--dtype, and --gradient-method for the gradient-entanglement recipe."""

from __future__ import annotations

import json

import pytest

from preflens.cli import main
from tests.families.builders import build_family

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def llama_chat_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    d = build_family("llama", tmp_path_factory.mktemp("chat") / "llama", seed=2)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(d))
    return d


def test_train_accepts_chat_format_data(llama_chat_dir, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "What is the capital of France?"}],
             "chosen": [{"role": "assistant", "content": "Paris."}],
             "rejected": [{"role": "assistant", "content": "Rome."}]}] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", "--model", str(llama_chat_dir), "--data", str(data), "--lr", "1e-3",
                 "--steps", "1", "--batch-size", "2", "--device", "cpu", "--dtype", "fp32",
                 "--out", str(tmp_path / "run"), "--no-progress", "--no-save-model"])
    assert code == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["steps"] == 1


def test_reproduce_parser_has_gradient_method_and_dtype():
    from preflens.cli import build_parser

    args = build_parser().parse_args(["reproduce", "gradient-entanglement", "--gradient-method",
                                      "exact", "--dtype", "bf16", "--quick"])
    assert args.gradient_method == "exact" and args.dtype == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "all", "--gradient-method", "vmap"])


def test_reproduce_all_reports_a_failing_recipe_in_one_line_and_runs_the_others(monkeypatch, capsys):
    import preflens.cli.reproduce as rep
    from preflens.errors import ConfigError
    from preflens.reproduce import PAPERS

    ran = []

    def fake_run_paper(paper, **kw):
        ran.append(paper)
        if paper == "likelihood-displacement":
            raise ConfigError("model", "' No' and ' Never' must each be one token")

    monkeypatch.setattr(rep, "run_paper", fake_run_paper)
    assert main(["reproduce", "all", "--quick", "--model", "m"]) == 2
    assert ran == list(PAPERS)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("preflens reproduce: likelihood-displacement: error: --model: ' No' and "
                      "' Never' must each be one token")
    assert f"1 of {len(PAPERS)} recipes failed (likelihood-displacement" in err[-1]
