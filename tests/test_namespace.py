"""The curated top-level namespace: every advertised name resolves to its owner's object."""

import importlib

import preflens


def test_every_exported_name_resolves_to_the_owning_module():
    for name, module in preflens._EXPORTS.items():
        assert getattr(preflens, name) is getattr(importlib.import_module(module), name), name
    assert set(preflens._EXPORTS) <= set(dir(preflens))


def test_unknown_name_is_an_attribute_error():
    try:
        preflens.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")
