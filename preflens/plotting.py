"""Figure helpers for the reproduction recipes: small, consistent, PNG only (Agg backend).

Each helper draws one figure from plain arrays and writes it atomically (temp file + rename), so
a killed run never leaves a half-written PNG behind.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["save_figure", "line_panels", "heatmap", "scatter_with_curve", "grouped_bars", "legend_outside",
           "histograms"]


def save_figure(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically and close it."""
    from preflens.data.io import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def line_panels(
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    xlabel: str = "step",
    ylabels: Mapping[str, str] | None = None,
    title: str | None = None,
    ncols: int | None = None,
    x: Mapping[str, Sequence[float]] | None = None,
    legend: str = "inside",
):
    """One subplot per panel; each panel maps a series label to its y values.

    ``x`` optionally maps a panel name to its x values (default: 0, 1, 2, … = the index).
    ``legend``: ``"inside"`` one legend per panel (best place), ``"outside"`` one legend for the
    figure, right of the panels, off the data (panels must share their series labels), ``"none"``.
    """
    n = len(panels)
    ncols = ncols or min(n, 3)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items()):
        for label, ys in series.items():
            xs = x[name] if x and name in x else np.arange(len(ys))
            ax.plot(xs, ys, label=label, lw=1.4, marker="." if x and name in x else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        if ylabels and name in ylabels:
            ax.set_ylabel(ylabels[name])
        if len(series) > 1 and legend == "inside":
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if legend == "outside":
        legend_outside(fig, axes.flat[0])
    return fig


def legend_outside(fig, ax, **kwargs) -> None:
    """One legend for the whole figure from ``ax``'s labelled artists, right of every panel
    (``save_figure``'s tight bounding box keeps it in the PNG)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                   frameon=False, **kwargs)


def heatmap(
    values,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    center_zero: bool = True,
    cbar_label: str | None = None,
):
    """A diverging heatmap centred at 0 (blue positive, red negative) with a colour bar."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * values.shape[1] + 2), max(3, 0.35 * values.shape[0] + 1.5)))
    if center_zero:
        vmax = float(np.nanmax(np.abs(values))) or 1.0
        im = ax.imshow(values, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    else:
        im = ax.imshow(values, cmap="viridis", aspect="auto")
    cbar = fig.colorbar(im, ax=ax)
    if cbar_label:
        cbar.set_label(cbar_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), xticklabels, rotation=90, fontsize=7)
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)), yticklabels, fontsize=7)
    fig.tight_layout()
    return fig


def scatter_with_curve(
    x,
    y,
    *,
    curve: tuple[Sequence[float], Sequence[float]] | None = None,
    colors=None,
    xlabel: str,
    ylabel: str,
    title: str,
    curve_label: str | None = None,
    color_labels: Mapping[object, str] | None = None,
    legend: str = "inside",
):
    """Scatter (optionally coloured by a category) with an analytic curve on top.

    ``color_labels`` maps a category to its legend label (categories absent from it keep their
    own name); ``legend``: ``"inside"``, ``"outside"`` (right of the axes) or ``"none"``.
    """
    fig, ax = plt.subplots(figsize=(5, 3.8))
    x, y = np.asarray(x, float), np.asarray(y, float)
    if colors is None:
        ax.scatter(x, y, s=10, alpha=0.6)
    else:
        colors = np.asarray(colors)
        for value in np.unique(colors):
            sel = colors == value
            label = color_labels.get(value, str(value)) if color_labels else str(value)
            ax.scatter(x[sel], y[sel], s=10, alpha=0.6, label=label)
    if curve is not None:
        ax.plot(curve[0], curve[1], "k-", lw=1.5, label=curve_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if (colors is not None or curve_label) and legend == "inside":
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if legend == "outside":
        legend_outside(fig, ax)
    return fig


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    title: str,
    xlabel: str | None = None,
    errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    legend: str = "inside",
):
    """Grouped bar chart: one group per x label, one bar per series.

    ``errors`` optionally maps a series to ``(low, high)`` per group: an error bar from ``low``
    to ``high`` (absolute values, e.g. the min and max over seeds). ``legend``: ``"inside"``,
    ``"outside"`` (right of the axes, off the bars) or ``"none"``.
    """
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(groups) * max(1, len(series)) / 2 + 3), 3.6))
    width = 0.8 / max(1, len(series))
    xs = np.arange(len(groups))
    for k, (label, values) in enumerate(series.items()):
        pos = xs + (k - (len(series) - 1) / 2) * width
        ax.bar(pos, values, width, label=label)
        if errors and label in errors:
            lo, hi = (np.asarray(v, float) for v in errors[label])
            v = np.asarray(values, float)
            ax.errorbar(pos, v, yerr=[v - lo, hi - v], fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_xticks(xs, groups, rotation=30 if max(map(len, groups)) > 6 else 0, fontsize=8)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1 and legend == "inside":
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    if len(series) > 1 and legend == "outside":
        legend_outside(fig, ax)
    return fig


def histograms(panels: Mapping[str, Sequence[float]], *, title: str | None = None, bins: int = 40,
               ncols: int | None = None):
    """One histogram per panel (name -> values; ``None`` values are skipped)."""
    n = len(panels)
    ncols = ncols or min(n, 4)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, panels.items()):
        v = np.asarray([x for x in values if x is not None], float)
        ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.8)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
