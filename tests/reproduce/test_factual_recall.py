"""The factual-recall recipe's head search (preflens/reproduce/factual_recall.py, steps 4-6): the
both-sign sweep over every head, the two-head grid, selection on the tuning prompts only and
evaluation on the held-out prompts. Generation under scaling is stubbed (seeded random rates per
prompt set and setting), so that the selection can be checked exactly; classify and DLA run on
toyworld with a handful of countries."""

from __future__ import annotations

import itertools
import random

import pytest

from preflens.errors import ConfigError
from preflens.reproduce import factual_recall as fr
from preflens.reproduce.common import RecipeContext

ALPHAS = (-1.0, 0.0, 2.0, 3.0)
CFG = fr.Config(pairs_per_country=1, max_new_tokens=2, head_alphas=(*ALPHAS, 1.0), sweep_tokens=2,
                pair_heads=3, max_countries=6)


def _canon(setting) -> tuple:
    items = setting.items() if isinstance(setting, dict) else (((l, h), a) for l, h, a in setting)
    return tuple(sorted((int(l), int(h), float(a)) for (l, h), a in items))


def _rate(which: str, scales: tuple) -> float:
    """The stub's in-context rate of a setting on one prompt set (independent seeded draws)."""
    return random.Random(f"{which}|{scales}").random()


class StubGrid:
    """Stands in for scaling_grid: records which prompt set each call got and returns rates that
    depend on the set ('tune' or 'eval') and the setting."""

    def __init__(self, tune_texts, eval_texts):
        self.sets = {tune_texts: "tune", eval_texts: "eval"}
        self.calls = []

    def __call__(self, lm, prompts, settings, **kwargs):
        which = self.sets[tuple(p.text for p in prompts)]  # KeyError: neither prompt set
        rows = []
        for s in settings:
            scales = _canon(s)
            self.calls.append((which, scales))
            ic = _rate(which, scales)
            rows.append({"scales": [list(x) for x in scales], "n": len(prompts), "in_context": ic,
                         "memorized": (1 - ic) / 2, "neither": (1 - ic) / 2, "counts": {}})
        return rows


@pytest.fixture(scope="module")
def stubbed(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("recall")
    ctx = RecipeContext(fr.PAPER, model="toyworld", device="cpu", out=out)
    tune = tuple(p.text for p in fr._prompts(ctx, CFG.max_countries, CFG.tune_seed, 1))
    held = tuple(p.text for p in fr._prompts(ctx, CFG.max_countries, CFG.eval_seed, 1))
    assert set(tune).isdisjoint(held)
    stub = StubGrid(tune, held)
    mp.setattr(fr, "scaling_grid", stub)
    results = fr.run(ctx, CFG)
    yield ctx, stub, results, out
    mp.undo()


def test_every_head_is_swept_with_both_signs_on_the_tuning_set(stubbed):
    ctx, stub, results, _ = stubbed
    n_layers, n_heads = len(results["head_attribution"]), len(results["head_attribution"][0])
    sweeps = results["sweeps"]
    assert sweeps["alphas"] == list(ALPHAS)  # α = 1 is not swept per head ...
    assert sweeps["baseline"]["alpha"] == 1.0  # ... but once, shared
    assert [e["head"] for e in sweeps["heads"]] == [[l, h] for l in range(n_layers) for h in range(n_heads)]
    for e in sweeps["heads"]:
        assert [r["alpha"] for r in e["rows"]] == list(ALPHAS)
        assert e["attribution"] == results["head_attribution"][e["head"][0]][e["head"][1]]
        for r in e["rows"]:
            assert r["in_context"] == _rate("tune", ((*e["head"], r["alpha"]),))
    single_calls = [c for c in stub.calls if len(c[1]) == 1 and c[0] == "tune"]
    assert len(single_calls) == n_layers * n_heads * len(ALPHAS)
    assert ("tune", ()) in stub.calls


def test_selection_on_tuning_prompts_evaluation_on_held_out(stubbed):
    _, stub, results, _ = stubbed
    heads = [(e["head"][0], e["head"][1]) for e in results["sweeps"]["heads"]]
    # best single: the (head, α) of highest tuning in-context rate over every head and α
    best = max(((l, h, a) for l, h in heads for a in ALPHAS), key=lambda s: _rate("tune", (s,)))
    sel = {s["name"]: s for s in results["selection"]["settings"]}
    assert sel["single"]["scales"] == [list(best)]
    # the pair candidates: the 3 heads whose best α is best, each with that α
    per_head = {(l, h): max(ALPHAS, key=lambda a: _rate("tune", ((l, h, a),))) for l, h in heads}
    top = sorted(per_head, key=lambda lh: -_rate("tune", ((*lh, per_head[lh]),)))[:3]
    assert [(c["head"][0], c["head"][1]) for c in results["selection"]["pair_candidates"]] == top
    pairs = results["sweeps"]["pairs"]
    assert len(pairs) == 3 and {tuple(map(tuple, p["heads"])) for p in pairs} == set(itertools.combinations(sorted(top), 2))
    all_pair_rows = []
    for p in pairs:
        (la, ha), (lb, hb) = p["heads"]
        side_a = [x for x in ALPHAS if (x < 1) == (per_head[(la, ha)] < 1)]
        side_b = [x for x in ALPHAS if (x < 1) == (per_head[(lb, hb)] < 1)]
        assert [r["scales"] for r in p["rows"]] == [[[la, ha, x], [lb, hb, y]] for x in side_a for y in side_b]
        all_pair_rows += p["rows"]
    best_pair = max(all_pair_rows, key=lambda r: _rate("tune", _canon(r["scales"])))
    assert sel["pair"]["scales"] == best_pair["scales"]
    # held-out: exactly one evaluation call per chosen setting, rates from the held-out prompts
    assert [c for c in stub.calls if c[0] == "eval"] == [
        ("eval", ()), ("eval", _canon(sel["single"]["scales"])), ("eval", _canon(sel["pair"]["scales"]))]
    for name in ("baseline", "single", "pair"):
        scales = _canon(sel[name]["scales"])
        assert sel[name]["tuning"]["in_context"] == _rate("tune", scales)
        assert sel[name]["held_out"]["in_context"] == _rate("eval", scales)
    s = results["scaling"]
    assert [*s["head"], s["alpha"]] == list(best)
    assert s["in_context_rate"] == _rate("eval", (best,)) and s["baseline_in_context_rate"] == _rate("eval", ())


def test_render_summary_and_rerun(stubbed):
    ctx, stub, results, out = stubbed
    paths = fr.render(results, ctx)
    assert {p.stem for p in paths} == {"head_attribution", "head_scaling", "dla_vs_causal", "rates_by_frequency"}
    text = fr.summary(results)
    assert "held-out" in text and "L{}H{}".format(*results["scaling"]["head"]) in text
    n_calls = len(stub.calls)
    again = RecipeContext(fr.PAPER, model="toyworld", device="cpu", out=out)
    assert fr.run(again, CFG) == results
    assert again.computed == [] and len(stub.calls) == n_calls  # every step reused


def test_swept_heads_and_best_gains():
    dla = [[0.1, -0.9], [0.5, 0.0]]
    assert fr.swept_heads(dla, None) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert fr.swept_heads(dla, 2) == [(0, 1), (1, 0)]
    sweeps = {"baseline": {"in_context": 0.5},
              "heads": [{"head": [0, 1], "attribution": -0.9,
                         "rows": [{"alpha": -1.0, "in_context": 0.1, "neither": 0.9},
                                  {"alpha": 0.0, "in_context": 0.4, "neither": 0.2},
                                  {"alpha": 2.0, "in_context": 0.7, "neither": 0.1}]},
                        {"head": [1, 0], "attribution": 0.5, "rows": [{"alpha": 3.0, "in_context": 0.5, "neither": 0}]}]}
    g = fr.best_gains(sweeps)
    assert g[0]["down"] == {"alpha": 0.0, "gain": pytest.approx(-0.1), "neither": 0.2}
    assert g[0]["up"] == {"alpha": 2.0, "gain": pytest.approx(0.2), "neither": 0.1}
    assert g[1]["down"] is None and g[1]["up"]["gain"] == 0.0


@pytest.mark.parametrize("bad", [dict(head_alphas=(1.0,)), dict(pair_heads=1), dict(sweep_heads=1)])
def test_bad_config_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        fr.Config(**bad)
