"""Safe loading: no pickle is written or read without ``weights_only=True``, remote code is off
unless asked for, and text from data files never becomes a path, an open() or a command.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

import preflens
from preflens.cli import main as cli_main
from preflens.data import PreferencePair, write_pairs
from preflens.errors import ModelError
from preflens.models import load_model

PACKAGE = Path(preflens.__file__).resolve().parent
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny-random", "--data", str(data), "--lr", "1e-3", "--steps", "2",
            "--batch-size", "2", "--checkpoint-every", "1", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def _pairs(n=4, ids=None):
    return [PreferencePair(f"Q{i}: the capital is", f" Paris{' yes' * i}", " Rome",
                           id=None if ids is None else ids[i]) for i in range(n)]


# ------------------------------------------------------------------ checkpoints are safetensors


def test_training_writes_no_pickle(tmp_path, monkeypatch):
    """A full CLI run (checkpoints, reference cache, final model) never calls torch.save/pickle."""
    import transformers  # noqa: F401 - jinja2 pickles a constant at import time; import it first
    from transformers import GPT2LMHeadModel  # noqa: F401

    def refuse(*a, **k):
        raise AssertionError("a pickle was written")

    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(pickle, "dump", refuse)
    monkeypatch.setattr(pickle, "dumps", refuse)
    data = write_pairs(tmp_path / "pairs.jsonl", _pairs())
    out = tmp_path / "run"
    assert cli_main(_train(data, out)) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.relative_to(out).parts[0] for p in files} == {"checkpoints", "ref_cache", "final-model",
                                                           "metrics.jsonl", "config.json", ".preflens.lock"}
    for p in files:
        assert not p.name.endswith(PICKLE_SUFFIXES), p
        head = p.read_bytes()[:4]
        assert not head.startswith(b"PK\x03\x04"), p  # torch.save's zip container
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), p
    for ckpt in (out / "checkpoints").iterdir():
        assert sorted(f.name for f in ckpt.iterdir()) == ["manifest.json", "model.safetensors",
                                                          "optimizer.safetensors", "rng.safetensors",
                                                          "state.json"]
    assert all(p.suffix == ".safetensors" for p in (out / "ref_cache").iterdir())
    assert (out / "final-model" / "model.safetensors").is_file()


def test_pickle_weights_with_code_are_refused(tiny, tmp_path):
    """A model directory whose pytorch_model.bin smuggles a callable: refused, payload not run."""
    model_dir, marker = tmp_path / "evil", tmp_path / "payload-ran"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    state = dict(tiny.model.state_dict())
    state["payload"] = Payload()
    with open(model_dir / "pytorch_model.bin", "wb") as fh:
        torch.save(state, fh)  # the attacker's file (torch.save is fine in a test)
    with pytest.raises(ModelError, match="was refused .*weights_only=True"):
        load_model(str(model_dir), device="cpu")
    assert not marker.exists()


# ------------------------------------------------------------------ source checks


class _UnsafeCalls(ast.NodeVisitor):
    """torch.load without weights_only=True, pickle/dill/joblib/numpy-pickle loads, eval/exec,
    shell commands, and a literal trust_remote_code=True."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = ast.unparse(f)
        kw = {k.arg: k.value for k in node.keywords}
        const = lambda v: isinstance(v, ast.Constant) and v.value  # noqa: E731
        if name == "torch.load" or name.endswith(".torch.load"):
            if not const(kw.get("weights_only")):
                self.found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load",
                    "cloudpickle.load", "cloudpickle.loads", "marshal.loads", "shelve.open"):
            self.found.append(f"line {node.lineno}: {name}")
        if name in ("np.load", "numpy.load") and const(kw.get("allow_pickle")):
            self.found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
        if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
            self.found.append(f"line {node.lineno}: builtin {f.id}()")
        if name in ("os.system", "os.popen") or name.startswith(("subprocess.", "os.exec", "os.spawn")):
            self.found.append(f"line {node.lineno}: {name}")
        if "trust_remote_code" in kw and isinstance(kw["trust_remote_code"], ast.Constant) \
                and kw["trust_remote_code"].value is True:
            self.found.append(f"line {node.lineno}: trust_remote_code=True")
        self.generic_visit(node)


def _unsafe(source: str) -> list[str]:
    v = _UnsafeCalls()
    v.visit(ast.parse(source))
    return v.found


def test_checker_catches_unsafe_calls():
    bad = ("import torch, pickle, os\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
           "eval(s)\nos.system(c)\nm = f(x, trust_remote_code=True)\n")
    assert len(_unsafe(bad)) == 6
    assert _unsafe("import torch\ntorch.load(p, weights_only=True, map_location='cpu')\nmodel.eval()\n") == []


def test_package_source_has_no_unsafe_loading():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += [f"{path.relative_to(PACKAGE.parent)}: {p}" for p in _unsafe(path.read_text())]
    assert problems == []


# ------------------------------------------------------------------ trust_remote_code


class _Recorder:
    """Stands in for ``from_pretrained``: records its keyword arguments, then fails (no hub)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def patch(self, monkeypatch) -> None:
        import transformers

        for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
            def fake(name, *a, _cls=cls.__name__, **kw):
                self.calls.append((_cls, kw))
                raise OSError("offline test: not loading anything")

            monkeypatch.setattr(cls, "from_pretrained", fake)

    def flags(self) -> list:
        return [kw.get("trust_remote_code", "<not passed>") for _, kw in self.calls]


def test_load_model_passes_trust_remote_code_false_by_default(monkeypatch, tmp_path):
    rec = _Recorder()
    rec.patch(monkeypatch)
    with pytest.raises(ModelError):
        load_model("some-org/some-model", device="cpu")
    assert rec.flags() and all(f is False for f in rec.flags())
    rec.calls.clear()
    with pytest.raises(ModelError):
        load_model("some-org/some-model", device="cpu", trust_remote_code=True)
    assert rec.flags() and all(f is True for f in rec.flags())
    rec.calls.clear()
    model_dir = tmp_path / "m"  # a local directory takes the same flag
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError):
        load_model(str(model_dir), device="cpu")
    assert rec.flags() == [False]


@pytest.mark.parametrize("extra,want", [((), False), (("--trust-remote-code",), True)])
def test_cli_trust_remote_code_is_opt_in(monkeypatch, tmp_path, capsys, extra, want):
    rec = _Recorder()
    rec.patch(monkeypatch)
    data = write_pairs(tmp_path / "pairs.jsonl", _pairs())
    argv = _train(data, tmp_path / "run", *extra)
    argv[argv.index("tiny-random")] = "some-org/some-model"
    assert cli_main(argv) == 2
    assert "unknown or unreachable model 'some-org/some-model'" in capsys.readouterr().err
    assert rec.flags() and all(f is want for f in rec.flags())


def test_reproduce_never_trusts_remote_code(monkeypatch, tmp_path, capsys):
    rec = _Recorder()
    rec.patch(monkeypatch)
    rc = cli_main(["reproduce", "ranking-accuracy", "--model", "some-org/some-model", "--out", str(tmp_path)])
    assert rc == 2 and rec.flags() and all(f is False for f in rec.flags())


# ------------------------------------------------------------------ paths from data


_EVENTS: list[tuple[str, tuple]] = []
_RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if _RECORDING[0] and event in ("open", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn",
                                   "os.spawn", "os.startfile", "os.rename", "os.remove", "os.mkdir",
                                   "shutil.rmtree", "os.symlink"):
        _EVENTS.append((event, args))


sys.addaudithook(_audit)  # cannot be removed; it records only while _RECORDING[0] is set


def test_ids_and_texts_from_data_never_become_paths_or_commands(tmp_path, capsys):
    marker = "ESCAPE-MARKER"
    ids = [f"../../{marker}", f"/tmp/{marker}-abs", f"..\\{marker}", f"$(touch {marker})"]
    pairs = [PreferencePair(f"; touch /tmp/{marker}; Q{i}: the capital is", f" Paris{' yes' * i}",
                            f" `rm -rf {marker}`", id=ids[i]) for i in range(4)]
    (tmp_path / "data").mkdir()
    data = write_pairs(tmp_path / "data" / "pairs.jsonl", pairs)
    out = tmp_path / "deep" / "run"
    before = {p for p in tmp_path.rglob("*")}
    _EVENTS.clear()
    _RECORDING[0] = True
    try:
        rc = cli_main(_train(data, out))
    finally:
        _RECORDING[0] = False
    assert rc == 0, capsys.readouterr().err
    assert not [e for e in _EVENTS if e[0] not in ("open", "os.rename", "os.remove", "os.mkdir",
                                                   "shutil.rmtree")], "a command was started"
    assert not [e for e in _EVENTS if marker in repr(e[1])]
    out_real = out.resolve()
    checked = 0
    for event, args in _EVENTS:
        paths = args[:2] if event == "os.rename" else args[:1]
        writes = event != "open" or (isinstance(args[1], str) and any(c in args[1] for c in "wax+")) \
            or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        for path in paths:
            if not isinstance(path, (str, bytes, os.PathLike)):
                continue  # an open() of a file descriptor
            p = Path(os.fsdecode(path)).resolve()
            if event == "os.mkdir" and out_real.is_relative_to(p):
                continue  # creating --out's own parents
            if writes and "__pycache__" not in p.parts:  # the interpreter's own bytecode cache
                assert p.is_relative_to(out_real), (event, p)
                checked += 1
    assert checked > 10  # the hook did see the run's writes (metrics, checkpoints, final model)
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(out) or p in (tmp_path / "deep", out) for p in new)
    assert not any(marker in str(p) for p in new)
    assert not list(Path("/tmp").glob(f"{marker}*")) and not list(tmp_path.rglob(f"*{marker}*"))
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["step"] == 2
