"""Tracked training runs: assemble the lens trackers for a run, and report on a run directory.

:func:`build_trackers` turns lens names into the trackers of :mod:`preflens.probes.trackers`,
:mod:`preflens.dynamics.trackers` and :mod:`preflens.attribution.tracker` over one shared probe
set; :func:`write_report` reads ``RUN_DIR/metrics.jsonl`` and ``RUN_DIR/tracked/<lens>.jsonl``
(a run that is still going is fine: a torn last line is skipped) and writes one multi-panel
figure per lens on the step axis, ``RUN_DIR/figures/<lens>.png``, and ``RUN_DIR/report.md``
with the headline numbers. :mod:`preflens.report_to` mirrors metrics rows to TensorBoard / W&B.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from preflens.data.io import atomic_write_text
from preflens.errors import ConfigError, DataError
from preflens.tracking import TRACKED_DIR, ProbeSet, read_jsonl, sample_probe_pairs

__all__ = ["LENSES", "REPORT_TO", "parse_lenses", "build_trackers", "run_callbacks", "load_run", "write_report",
           "MetricsMirror"]

LENSES = ("ranking", "displacement", "ches", "entanglement", "dla")
REPORT_TO = ("none", "tensorboard", "wandb")


def parse_lenses(spec: str | Sequence[str] | None) -> list[str]:
    """``"ranking,ches"`` / a list / ``"all"`` → lens names in :data:`LENSES` order (ConfigError
    ``track`` naming an unknown one). ``None`` or ``""`` → no lens."""
    if not spec:
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:
        return list(LENSES)
    bad = [n for n in names if n not in LENSES]
    if bad:
        raise ConfigError("track", f"unknown lens {bad[0]!r}", allowed=[*LENSES, "all"])
    return [n for n in LENSES if n in names]


def build_trackers(lm, probe_pairs: Sequence, lenses: Sequence[str], *, every: int = 10, n: int | None = 32,
                   seed: int = 0, loss: str = "dpo", loss_kwargs: dict | None = None, ghost_n: int = 8,
                   batch_size: int = 64) -> list:
    """The trackers of ``lenses`` over one probe set.

    Args:
        probe_pairs: the pairs to probe (e.g. the training pairs, or a ``--track-data`` file); a
            fixed seeded sample of ``n`` of them is used (:func:`preflens.tracking.sample_probe_pairs`;
            ``n=None`` keeps all).
        every: record every this many steps (and at the start and the last step).
        loss, loss_kwargs: the run's loss (the entanglement lens predicts its first-order effect).
        ghost_n: the entanglement lens takes gradients of the first ``ghost_n`` probe pairs.
    """
    lenses = parse_lenses(list(lenses))
    pairs = list(probe_pairs) if n is None else sample_probe_pairs(probe_pairs, n, seed)
    probes = ProbeSet(lm, pairs, batch_size=batch_size)
    out = []
    for lens in lenses:
        if lens in ("ranking", "displacement", "ches"):
            from preflens.probes import trackers as pt

            cls = {"ranking": pt.RankingTracker, "displacement": pt.DisplacementTracker, "ches": pt.ChesTracker}[lens]
            out.append(cls(lm, probes=probes, every=every))
        elif lens == "entanglement":
            from preflens.dynamics.trackers import EntanglementTracker

            out.append(EntanglementTracker(lm, probes=probes, every=every, loss=loss, loss_kwargs=loss_kwargs,
                                           ghost_n=ghost_n))
        else:
            from preflens.attribution.tracker import DlaTracker

            out.append(DlaTracker(lm, pairs, every=every))
    return out


def run_callbacks(lm, pairs: Sequence, *, track=None, track_every: int = 10, track_data=None, track_n: int = 32,
                  seed: int = 0, loss: str = "dpo", loss_kwargs: dict | None = None, report_to: str = "none",
                  config: dict | None = None) -> list:
    """The callbacks ``preflens train --track ... --report-to ...`` adds: the lens trackers, then
    the metrics mirror (last, so it sees every tracker's scalars).

    The probe set is a fixed sample (seed ``seed``) of ``track_n`` pairs from ``track_data`` (a
    JSONL file of pairs) or, without it, from the training ``pairs``. Errors name these
    parameters (the CLI maps them to ``--track``, ``--track-every``, ...).
    """
    lenses = parse_lenses(track)
    for name, value in (("track_every", track_every), ("track_n", track_n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
    if report_to not in REPORT_TO:
        raise ConfigError("report_to", f"unknown value {report_to!r}", allowed=REPORT_TO)
    if track_data is not None and not lenses:
        raise ConfigError("track_data", "given without track (which lenses to run)")
    out = []
    if lenses:
        from preflens.data import read_pairs

        probe_pairs = read_pairs(track_data) if track_data is not None else pairs
        out += build_trackers(lm, probe_pairs, lenses, every=track_every, n=track_n, seed=seed, loss=loss,
                              loss_kwargs=loss_kwargs)
    if report_to != "none":
        out.append(MetricsMirror(report_to, config=config))
    return out


# ----------------------------------------------------------------------------------------------
# reading a run
# ----------------------------------------------------------------------------------------------


def load_run(run_dir: str | Path) -> dict:
    """``{"metrics": [rows], "tracked": {lens: [records]}, "config": dict | None}`` of a run
    directory, read as far as it is written (DataError when it holds no ``metrics.jsonl``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise DataError(f"{run_dir} is not a training run directory (no metrics.jsonl)", field="run_dir")
    tracked = {}
    for lens in LENSES:
        path = run_dir / TRACKED_DIR / f"{lens}.jsonl"
        if path.is_file():
            tracked[lens] = read_jsonl(path)
    config = None
    if (run_dir / "config.json").is_file():
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except ValueError:
            config = None
    return {"metrics": read_jsonl(run_dir / "metrics.jsonl"), "tracked": tracked, "config": config}


# panel title -> [(series label, quantity)] per lens; quantities a run does not have are skipped
PANELS = {
    "training": {
        "loss": [("loss", "loss"), ("eval loss", "eval/loss")],
        "implicit rewards": [("chosen", "rewards/chosen"), ("rejected", "rewards/rejected"),
                             ("margin", "rewards/margins")],
        "accuracy (batch)": [("rewards/accuracies", "rewards/accuracies"), ("ranking", "ranking_accuracy")],
        "log π (batch mean, summed)": [("chosen", "logps/chosen"), ("rejected", "logps/rejected")],
    },
    "ranking": {
        "ranking accuracy (probe set)": [("R (summed, ≥)", "accuracy"), ("R̃ (per-token mean)", "accuracy_mean")],
        "flips since step 0": [("→ correct", "flipped_to_correct"), ("→ incorrect", "flipped_to_incorrect")],
    },
    "displacement": {
        "mean log π (summed)": [("chosen", "logp_chosen"), ("rejected", "logp_rejected")],
        "Δ log π since step 0": [("chosen", "delta_chosen"), ("rejected", "delta_rejected")],
        "peak-to-trough fall of log π(y⁺) (nats)": [("mean over probes", "max_drop_logp")],
        "probes with log π(y⁺) below step 0": [("fraction", "frac_chosen_down")],
        "single-token π(y⁺)": [("mean π(y⁺)", "single_prob_chosen"), ("peak-to-trough", "single_max_drop_prob")],
    },
    "ches": {
        "CHES (mean)": [("CHES", "ches_mean")],
        "LN-CHES (mean)": [("LN-CHES", "ln_ches_mean")],
        "Spearman(CHES, Δ log π⁺)": [("step-0 CHES", "spearman_initial"), ("current CHES", "spearman_current")],
    },
    "entanglement": {
        "gradient inner products": [("⟨g_w, g_l⟩", "mean_inner"), ("‖g_w‖²", "mean_norm_w_sq"),
                                    ("‖g_l‖²", "mean_norm_l_sq")],
        "cos(g_w, g_l)": [("mean cos", "mean_cos"), ("fraction cos > 0", "frac_cos_positive")],
        "predicted cases (first order)": [(c, f"cases/{c}") for c in
                                          ("ideal", "both_down", "both_up", "chosen_down_rejected_up")],
        "realised cases (between records)": [(c, f"realised_cases/{c}") for c in
                                             ("ideal", "both_down", "both_up", "chosen_down_rejected_up")],
        "sign agreement, predicted vs realised": [("Δ log π(y_w)", "sign_agreement_chosen"),
                                                  ("Δ log π(y_l)", "sign_agreement_rejected")],
    },
    "dla": {
        "logit(y⁺₁) − logit(y⁻₁)": [("logit difference", "logit_diff"), ("Σ heads' DLA", "heads_sum")],
    },
}


def _series(records: list[dict], key: str) -> list[float]:
    """``key`` of each record (a tracked record's ``metrics``, or a metrics row); NaN where absent."""
    out = []
    for r in records:
        v = r.get("metrics", r).get(key)
        out.append(float(v) if isinstance(v, (int, float)) else math.nan)
    return out


def _dla_heads(records: list[dict], k: int = 6) -> dict[str, list[float]]:
    """The ``k`` heads with the largest |mean DLA| at the last record, over the records."""
    with_heads = [r for r in records if isinstance(r.get("heads"), list)]
    if not with_heads:
        return {}
    last = with_heads[-1]["heads"]
    flat = sorted(((abs(v), l, h) for l, row in enumerate(last) for h, v in enumerate(row)), reverse=True)[:k]
    return {f"L{l}H{h}": [r["heads"][l][h] if isinstance(r.get("heads"), list) else math.nan for r in records]
            for _, l, h in flat}


def _figure(lens: str, records: list[dict], steps: list[int], path: Path, *, training: bool = False) -> Path | None:
    from preflens import plotting

    panels = {}
    for title, series in PANELS[lens].items():
        got = {label: _series(records, key) for label, key in series}
        got = {label: ys for label, ys in got.items() if any(not math.isnan(y) for y in ys)}
        if got:
            panels[title] = got
    if lens == "dla" and (heads := _dla_heads(records)):
        panels["top heads by |DLA| (mean over probes)"] = heads
    if not panels or not steps:
        return None
    fig = plotting.line_panels(panels, x={t: steps for t in panels}, xlabel="step",
                               title=("training" if training else f"tracked lens: {lens}"))
    return plotting.save_figure(fig, path)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(run_dir: str | Path, *, figures_dir: str | Path | None = None) -> dict:
    """Write the figures and ``RUN_DIR/report.md`` for a (possibly still running) run.

    Returns ``{"report": path, "figures": {name: path}}``. Figures go to ``RUN_DIR/figures``
    unless ``figures_dir``. The report lists, per lens, every scalar at the first and the last
    record and its range over the records, plus the training metrics of the last logged step.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    fig_dir = Path(figures_dir) if figures_dir is not None else run_dir / "figures"
    figures: dict[str, Path] = {}
    rows = run["metrics"]
    if rows:
        got = _figure("training", rows, [int(r["step"]) for r in rows], fig_dir / "training.png", training=True)
        if got:
            figures["training"] = got
    for lens, records in run["tracked"].items():
        got = _figure(lens, records, [int(r["step"]) for r in records], fig_dir / f"{lens}.png")
        if got:
            figures[lens] = got
    lines = [f"# Training report: `{run_dir}`", ""]
    cfg = run["config"] or {}
    last = rows[-1] if rows else {}
    total = cfg.get("total_steps") or cfg.get("steps")
    status = f"{last.get('step', 0)} steps logged" + (f" of {total}" if total else "")
    lines += [f"- status: {status}"]
    for key in ("loss", "loss_kwargs", "optimizer", "lr", "batch_size", "seed"):
        if key in cfg:
            lines.append(f"- {key}: `{json.dumps(cfg[key])}`")
    if last:
        lines += ["", f"## Training metrics at step {last.get('step')}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in last.items()
                  if k != "step" and not k.startswith("tracked/") and isinstance(v, (int, float))]
    if "training" in figures:
        lines += ["", f"![training]({_rel(figures['training'], run_dir)})"]
    for lens, records in run["tracked"].items():
        lines += ["", f"## Lens: {lens}", ""]
        if not records:
            lines.append("no record yet")
            continue
        first, final = records[0], records[-1]
        lines += [f"{len(records)} records, steps {first['step']} … {final['step']}.", "",
                  f"| quantity | step {first['step']} | step {final['step']} | min | max |", "|---|---|---|---|---|"]
        keys = list(dict.fromkeys(k for r in records for k in r.get("metrics", {})))
        for k in keys:
            ys = [y for y in _series(records, k) if not math.isnan(y)]
            lines.append(f"| {k} | {_fmt(first.get('metrics', {}).get(k))} | {_fmt(final.get('metrics', {}).get(k))} "
                         f"| {_fmt(min(ys) if ys else None)} | {_fmt(max(ys) if ys else None)} |")
        if lens in figures:
            lines += ["", f"![{lens}]({_rel(figures[lens], run_dir)})"]
    report = atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return {"report": report, "figures": figures}


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------
# mirroring metrics rows to TensorBoard / W&B
# ----------------------------------------------------------------------------------------------


def _need(module: str, backend: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError("report_to", f"{backend!r} needs the {module.split('.')[0]} package: "
                          "pip install 'preflens[track]'") from None


class MetricsMirror:
    """Training callback mirroring every ``metrics.jsonl`` row to TensorBoard or W&B (rank 0).

    A row is complete only after every callback's ``on_step`` has returned (the loop merges
    their scalars afterwards), so the row of step t is sent at step t + 1 and the last one at
    ``on_end``: each scalar under its metrics name at ``global_step`` = its step.

    * ``"tensorboard"``: :class:`torch.utils.tensorboard.SummaryWriter` in ``RUN_DIR/tensorboard``;
      a resumed run passes ``purge_step`` so that re-done steps replace the killed run's.
    * ``"wandb"``: ``wandb.init(mode="offline", dir=RUN_DIR)`` with ``WANDB_MODE=offline`` and
      ``WANDB_DIR`` set (no network; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads later);
      the run id is kept in the callback state, so a resumed run continues the same W&B run.
    """

    name = "report_to"

    def __init__(self, backend: str, *, config: dict | None = None, project: str = "preflens") -> None:
        if backend not in REPORT_TO or backend == "none":
            raise ConfigError("report_to", f"unknown value {backend!r}", allowed=REPORT_TO[1:])
        _need("torch.utils.tensorboard" if backend == "tensorboard" else "wandb", backend)
        self.backend, self.config, self.project = backend, dict(config or {}), project
        self.run_id: str | None = None
        self._writer = self._pending = None

    def on_train_begin(self, state) -> None:
        if not _main(state) or getattr(state, "out_dir", None) is None:
            return
        run_dir = Path(state.out_dir)
        if self.backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                         purge_step=int(state.step) + 1 if state.step else None)
        else:
            import os

            os.environ["WANDB_MODE"], os.environ["WANDB_DIR"] = "offline", str(run_dir)
            os.environ.setdefault("WANDB_SILENT", "true")
            wandb = _need("wandb", "wandb")
            if self.run_id is None:
                import secrets

                self.run_id = secrets.token_hex(4)  # os.urandom: no RNG stream of the run is touched
            self._writer = wandb.init(project=self.project, dir=str(run_dir), mode="offline", id=self.run_id,
                                      resume="allow", config=self.config, reinit="finish_previous")

    def _flush(self) -> None:
        row, self._pending = self._pending, None
        if row is None or self._writer is None:
            return
        step = int(row["step"])
        scalars = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.backend == "tensorboard":
            for k, v in scalars.items():
                self._writer.add_scalar(k, v, global_step=step)
        else:
            self._writer.log(scalars, step=step)

    def on_step(self, state) -> None:
        if self._writer is None:
            return None
        self._flush()
        self._pending = state.metrics  # the loop fills in the other callbacks' scalars in place
        return None

    def on_end(self, state) -> None:
        if self._writer is None:
            return
        self._flush()
        if self.backend == "tensorboard":
            self._writer.close()
        else:
            self._writer.finish()
        self._writer = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, d: dict) -> None:
        self.run_id = d.get("run_id")


def _main(state) -> bool:
    main = getattr(state, "is_main", None)
    return bool(main) if main is not None else int(getattr(state, "rank", 0) or 0) == 0
