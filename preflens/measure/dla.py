"""``measure dla``: per-head direct logit attribution of target vs foil on any prompts; head scaling.

Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language Models", EMNLP
2023 (arXiv 2310.15910), Sec. 5 (per-head DLA of the in-context vs memorized answer) and Sec. 6
(scaling one head's output), generalized to any ``{prompt, target, foil}`` records by
:func:`preflens.attribution.heads.head_attribution`: by default the first-token logit difference
``logit[t] - logit[f]`` at the last prompt position, decomposed exactly per head on a
compatibility-mode bridge; ``answer="full"`` gives the first-order direct attribution of the
summed full-answer log-prob difference (see that function for the conventions). ``scales``
(``"L.H=a1,a2"``) re-measures the target-vs-foil difference with query head (L, H)'s output scaled
by each alpha (:func:`preflens.attribution.scaling.scale_heads`).

Per-item row: ``difference`` (the model's target-minus-foil score), ``heads`` (``[n_layers][n_heads]``
attributions), ``top_heads`` (the ``top_k`` heads by |attribution| as ``["L{l}H{h}", value]``),
``valid`` (False when target and foil share the first token: zero direction) and, with scales,
``scaled`` (``{"L.H=alpha": difference}``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preflens.attribution.heads import ANSWERS, head_attribution, select_heads
from preflens.attribution.scaling import scale_heads
from preflens.errors import ConfigError

NAME = "dla"
KIND = "forward"
REFERENCE = None


def parse_scale(spec: str) -> list[tuple[int, int, float]]:
    """``"L.H=a1,a2,..."`` -> ``[(L, H, a1), (L, H, a2), ...]`` (ConfigError naming ``scales``)."""
    head, sep, alphas = str(spec).partition("=")
    layer, dot, h = head.partition(".")
    try:
        if not (sep and dot):
            raise ValueError
        out = [(int(layer), int(h), float(a)) for a in alphas.split(",") if a.strip()]
    except ValueError:
        raise ConfigError("scales", f"expected L.H=ALPHA[,ALPHA...], got {spec!r}") from None
    if not out or any(a != a or abs(a) == float("inf") for _, _, a in out):
        raise ConfigError("scales", f"expected finite alphas in {spec!r}")
    return out


@dataclass(frozen=True)
class Options:
    """``answer``: ``"first-token"`` (default) or ``"full"``; ``position``: prompt position of the
    first-token difference (default -1); ``top_k`` heads per item and in the summary; ``scales``:
    head-scaling sweep points, each ``"L.H=alpha[,alpha...]"``."""

    answer: str = "first-token"
    position: int = -1
    top_k: int = 3
    scales: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.answer not in ANSWERS:
            raise ConfigError("answer", f"unknown value {self.answer!r}", allowed=ANSWERS)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError("top_k", f"must be a positive integer, got {self.top_k!r}")
        if isinstance(self.scales, str):
            object.__setattr__(self, "scales", (self.scales,))
        object.__setattr__(self, "scales", tuple(self.scales))
        for s in self.scales:
            parse_scale(s)

    def points(self) -> list[tuple[int, int, float]]:
        return [p for s in self.scales for p in parse_scale(s)]


def load_items(data, format=None, *, split=None, tokenizer=None, limit=None, sample=None, seed=0,
               on_error="raise") -> list[dict]:
    """``{prompt, target, foil}`` records (:func:`preflens.data.adapters.load_triples`)."""
    from preflens.data.adapters import load_triples

    if format is not None:
        raise ConfigError("format", "the dla lens reads {prompt, target, foil} records; leave it unset")
    return load_triples(data, split=split, limit=limit, sample=sample, seed=seed, on_error=on_error)


def prepare(lm, reference, opts: Options) -> dict:
    """One compatibility-mode bridge for the whole run (DLA needs it; scaling hooks live on it)."""
    bridge = lm.bridge(compat=True)
    L, H = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    for layer, head, _ in opts.points():
        if not (0 <= layer < L and 0 <= head < H):
            raise ConfigError("scales", f"head {layer}.{head} outside {L} layers x {H} heads")
    return {"bridge": bridge}


def _label(layer: int, head: int, alpha: float) -> str:
    return f"{layer}.{head}={alpha:g}"


def score_chunk(lm, reference, items, opts: Options, batch_size: int, *, bridge) -> list[dict]:
    args = ([it["prompt"] for it in items], [it["target"] for it in items], [it["foil"] for it in items])
    kw = dict(answer=opts.answer, position=opts.position, batch_size=batch_size)
    res = head_attribution(lm, *args, bridge=bridge, **kw)
    L, H, n = res.per_head.shape
    rows = []
    for i in range(n):
        a = res.per_head[:, :, i]
        flat = sorted(((abs(float(a[l, h])), l, h) for l in range(L) for h in range(H)), key=lambda x: -x[0])
        rows.append({"difference": float(res.difference[i]), "valid": bool(res.valid[i]),
                     "heads": a.tolist(),
                     "top_heads": [[f"L{l}H{h}", float(a[l, h])] for _, l, h in flat[:opts.top_k]]})
    for layer, head, alpha in opts.points():
        with scale_heads(lm, {(layer, head): alpha}, bridge=bridge):
            diff = head_attribution(lm, *args, bridge=bridge, **kw).difference
        for i, row in enumerate(rows):
            row.setdefault("scaled", {})[_label(layer, head, alpha)] = float(diff[i])
    return rows


def summarize(rows, opts: Options, has_reference: bool) -> dict:
    """Mean attribution over valid items, the top heads each way, and the scaling sweep."""
    valid = [r for r in rows if r["valid"]]
    out: dict = {"n_items": len(rows), "n_valid": len(valid), "answer": opts.answer}
    diff = torch.tensor([r["difference"] for r in rows], dtype=torch.float64)
    out["difference"] = {"mean": float(diff.mean()), "fraction_target_preferred": float((diff > 0).double().mean())}
    if valid:
        mean = torch.tensor([r["heads"] for r in valid], dtype=torch.float64).mean(0)
        k = min(opts.top_k, mean.numel())
        top = select_heads(mean.float(), k=k)
        out["mean_attribution"] = mean.tolist()
        out["top_heads"] = {"promote_target": [[f"L{l}H{h}", s] for l, h, s in top["in_context"]],
                            "promote_foil": [[f"L{l}H{h}", s] for l, h, s in top["memory"]]}
    if opts.scales:
        sweep = {}
        for layer, head, alpha in opts.points():
            key = _label(layer, head, alpha)
            d = torch.tensor([r["scaled"][key] for r in rows], dtype=torch.float64)
            sweep[key] = {"head": [layer, head], "alpha": alpha, "mean_difference": float(d.mean()),
                          "fraction_target_preferred": float((d > 0).double().mean())}
        out["scaled"] = sweep
    return out


def figure(rows, summary: dict):
    from preflens import plotting

    if "mean_attribution" not in summary:
        return plotting.grouped_bars(["all"], {"mean difference": [summary["difference"]["mean"]]},
                                     ylabel="target - foil", title="no item with a non-zero direction")
    m = summary["mean_attribution"]
    return plotting.heatmap(m, xlabel="head", ylabel="layer",
                            title=f"mean direct attribution to target - foil ({summary['answer']}, "
                                  f"{summary['n_valid']} items)")
