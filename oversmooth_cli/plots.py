"""Every figure oversmooth draws, one function per figure; the only module that imports matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axis import Axis
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator

from .io import atomic_write
from .metrics.registry import metric_label, metric_order

if TYPE_CHECKING:
    from .gate.check import CheckResult
    from .gate.compare import CompareResult

__all__ = [
    "metric_panels",
    "plot_check",
    "plot_compare",
    "plot_curves",
    "plot_head_heatmap",
    "plot_monitor_heatmap",
    "plot_patch_maps",
    "plot_seeds",
    "plot_side_by_side",
    "plot_training",
    "save_figure",
    "stage_boundaries",
]


def plot_side_by_side(
    layers: dict[str, pd.DataFrame], histories: dict[str, pd.DataFrame], table: pd.DataFrame, verdict: str
) -> Any:
    """(a) token cosine over layers, before / control / treated, 95% bands; (b) val top-1, (c) train CE and val loss,
    (d) last-layer token cosine per epoch, both arms."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    colours = {"before": "0.45", "control": "C0", "treated": "C3"}
    for arm, df in layers.items():
        rows = df[df["metric"] == "token_cosine"].sort_values("layer")
        axes[0].plot(rows["layer"], rows["mean"], marker="o", ms=3, color=colours[arm], label=arm)
        axes[0].fill_between(rows["layer"], rows["ci95_low"], rows["ci95_high"], color=colours[arm], alpha=0.18)
    axes[0].set_xlabel("layer")
    _integer_ticks(axes[0].xaxis)
    axes[0].set_title(f"(a) {metric_label('token_cosine')} (95% bands)", loc="left", fontsize=11)
    for arm in ("control", "treated"):
        h = histories[arm]
        c = colours[arm]
        axes[1].plot(h["epoch"], h["val_top1"], marker="o", ms=3, color=c, label=arm)
        axes[2].plot(h["epoch"], h["train_ce"], marker="o", ms=3, color=c, label=f"{arm} train CE")
        axes[2].plot(h["epoch"], h["val_loss"], "--", marker="s", ms=3, color=c, label=f"{arm} val loss")
        axes[3].plot(h["epoch"], h["val_token_cosine"], marker="o", ms=3, color=c, label=arm)
    axes[1].set_title("(b) val top-1 (%)", loc="left", fontsize=11)
    axes[2].set_title("(c) cross-entropy", loc="left", fontsize=11)
    axes[3].set_title("(d) val last-layer token cosine", loc="left", fontsize=11)
    for ax in axes[1:]:
        ax.set_xlabel("epoch (0: before training)")
        _integer_ticks(ax.xaxis)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(verdict, fontsize=9)
    fig.tight_layout()
    return fig


def plot_seeds(layers: dict[int, dict[str, pd.DataFrame]], table: pd.DataFrame, verdict: str) -> Any:
    """``--control --seeds``: (a) token cosine over layers, before / control / treated, one line per seed; (b) the
    last-layer token cosine and (c) the val top-1 of both arms, one pair per seed, joined."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    colours = {"before": "0.45", "control": "C0", "treated": "C3"}
    for seed, arms in layers.items():
        for arm, df in arms.items():
            rows = df[df["metric"] == "token_cosine"].sort_values("layer")
            label = arm if seed == next(iter(layers)) else None
            axes[0].plot(rows["layer"], rows["mean"], marker="o", ms=2, lw=1, color=colours[arm], label=label)
    axes[0].set_xlabel("layer")
    _integer_ticks(axes[0].xaxis)
    axes[0].set_title(f"(a) {metric_label('token_cosine')}, every seed", loc="left", fontsize=11)
    for ax, column, title in (
        (axes[1], "cosine", "(b) last-layer token cosine"),
        (axes[2], "top1", "(c) val top-1 (%)"),
    ):
        for row in table.itertuples():
            pair = [getattr(row, f"control_{column}"), getattr(row, f"treated_{column}")]
            ax.plot([0, 1], pair, color="0.6", lw=1, zorder=1)
            ax.scatter([0, 1], pair, c=[colours["control"], colours["treated"]], zorder=2)
            ax.annotate(f"seed {row.seed}", (1, pair[1]), xytext=(5, 0), textcoords="offset points", fontsize=8)
        ax.set_xticks([0, 1], ["control (--loss none)", "treated (losses)"])
        ax.set_xlim(-0.3, 1.5)
        ax.set_title(title, loc="left", fontsize=11)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(verdict, fontsize=8, wrap=True)
    fig.tight_layout()
    return fig


def plot_compare(result: CompareResult, ci: bool = False, title: str | None = None):
    """One panel per metric, one line per run (with its 95% interval over images shaded when ``ci``)."""
    metrics = list(dict.fromkeys(result.table["metric"]))
    xlabel = "relative depth (layer / L)" if result.relative_depth else "layer (0 = block input)"
    fig, axes = metric_panels(metrics, xlabel, integer_x=not result.relative_depth)
    for ax, metric in zip(axes, metrics, strict=True):
        for j, label in enumerate(result.labels):
            d = result.curve(j, metric)
            if d.empty:
                continue
            color = f"C{j % 10}"
            ax.plot(d["x"], d["mean"], marker="o", ms=3.5, lw=1.6, color=color, label=label)
            if ci:
                ax.fill_between(d["x"], d["ci95_low"], d["ci95_high"], color=color, alpha=0.12, lw=0)
        ax.legend(fontsize=8, loc="best")
    shaded = " (shaded: 95% CI over images)" if ci else ""
    fig.suptitle(f"{title or f'oversmooth compare: {len(result.runs)} runs'}{shaded}", fontsize=10)
    return fig


def _integer_ticks(axis: Axis) -> None:
    """Whole-number ticks on ``axis`` (layers, epochs, steps), keeping matplotlib's automatic tick spacing."""
    locator = axis.get_major_locator()
    if isinstance(locator, MaxNLocator):
        locator.set_params(integer=True)


# -- figures ------------------------------------------------------------------------------------------------------
def panel_grid(n: int) -> tuple[int, int]:
    """``(rows, columns)`` of a figure with one panel per metric: two columns up to four panels, then three."""
    ncols = max(1, min(2 if n <= 4 else 3, n))
    return math.ceil(max(n, 1) / ncols), ncols


def metric_panels(
    metrics: Sequence[str],
    xlabel: str = "layer (0 = block input)",
    integer_x: bool = True,
    panel_size: tuple[float, float] = (5.6, 4.0),
    layout: str | None = "constrained",
) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure with one panel per metric, titled "(a) <label>", axes labelled, a light grid; spare cells hidden.

    Returns:
        The figure and one axes per metric, in the order of ``metrics``.
    """
    nrows, ncols = panel_grid(len(metrics))
    width, height = panel_size
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout=layout)
    axes = list(grid.flat)
    for i, (ax, metric) in enumerate(zip(axes, metrics, strict=False)):
        ax.set_title(f"({chr(ord('a') + i)}) {metric_label(metric)}", loc="left", fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label(metric))
        ax.grid(alpha=0.3)
        if integer_x:
            _integer_ticks(ax.xaxis)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    return fig, axes[: len(metrics)]


def stage_boundaries(layers: pd.DataFrame) -> list[float]:
    """x positions (half-way between two layers) where a new stage starts; empty for a single-stage model."""
    if "stage" not in layers.columns:
        return []
    stages = layers[["layer", "stage"]].drop_duplicates().sort_values("layer")
    change = stages["stage"].ne(stages["stage"].shift()) & stages["stage"].shift().notna()
    return [float(layer) - 0.5 for layer in stages.loc[change, "layer"]]


def plot_curves(layers: pd.DataFrame, title: str | None = None) -> plt.Figure:
    """One panel per metric (the paper's Figure 1 for the two default metrics): mean per layer with the 95% band.

    Dashed vertical lines mark where a new stage starts (hierarchical models; see :func:`stage_boundaries`).
    """
    metrics = metric_order(layers["metric"].unique())
    fig, axes = metric_panels(metrics, panel_size=(5.2, 3.8), layout=None)
    first, last = layers["layer"].min(), layers["layer"].max()
    for i, (ax, metric) in enumerate(zip(axes, metrics, strict=True)):
        d = layers[layers["metric"] == metric].sort_values("layer")
        ax.plot(d["layer"], d["mean"], marker="o", ms=3.5, lw=1.6, color="C0", label="mean over images")
        ax.fill_between(d["layer"], d["ci95_low"], d["ci95_high"], color="C0", alpha=0.25, lw=0, label="95% CI")
        ax.set_xlim(first - 0.4, last + 0.4)  # the same layer axis in every panel
        ax.ticklabel_format(axis="y", useOffset=False)  # plain values, no "+4.17" offset above the axis
        for boundary in stage_boundaries(layers):
            ax.axvline(boundary, color="0.55", lw=0.9, ls="--", zorder=0)
        if i == 0:
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    return fig


def plot_head_heatmap(heads: pd.DataFrame, metric: str, title: str | None = None) -> plt.Figure:
    """Heads x layers heatmap of one attention metric's per-head means (``heads.csv`` rows of ``metric``).

    Raises:
        ValueError: ``heads`` has no rows for ``metric``.
    """
    d = heads[heads["metric"] == metric]
    if d.empty:
        raise ValueError(f"no per-head rows for {metric}")
    grid = d.pivot_table(index="head", columns="layer", values="mean", aggfunc="first").sort_index()
    n_heads, n_layers = grid.shape
    fig, ax = plt.subplots(figsize=(min(16.0, 2.2 + 0.55 * n_layers), min(12.0, 1.6 + 0.4 * n_heads)))
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n_layers), [str(c) for c in grid.columns])
    ax.set_yticks(range(n_heads), [str(h) for h in grid.index])
    for axis, ticks in ((ax.xaxis, n_layers), (ax.yaxis, n_heads)):
        if ticks > 24:
            axis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    label = metric_label(metric)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(f"{label}: mean over images per head" if title is None else f"{title}\n{label} per head", fontsize=10)
    fig.tight_layout()
    return fig


def plot_monitor_heatmap(
    history: pd.DataFrame, metrics: Sequence[str] | None = None, title: str | None = None
) -> plt.Figure:
    """Layer x training-step heatmap of each metric's mean over the probe images (a monitor's history).

    Args:
        history: :data:`~oversmooth_cli.measuring.monitor.MONITOR_COLUMNS` rows (``monitor.csv``).
        metrics: the panels, in order (default: ``token_cosine`` and ``attention_std`` when measured, else every
            metric of the history); metrics the history lacks are left out.
        title: figure title.

    Raises:
        ValueError: ``history`` has no rows for any of ``metrics``.
    """
    present = metric_order(history["metric"].unique())
    wanted = metrics or [m for m in ("token_cosine", "attention_std") if m in present] or present
    shown = [m for m in wanted if m in present]
    if not shown:
        raise ValueError(f"the history has no rows for {', '.join(wanted) or 'any metric'}")
    fig, axes = metric_panels(shown, xlabel="training step", integer_x=True, panel_size=(6.0, 4.0))
    for ax, metric in zip(axes, shown, strict=True):
        grid = history[history["metric"] == metric].pivot_table(
            index="layer", columns="step", values="mean", aggfunc="first"
        )
        steps, layers = grid.columns.to_numpy(dtype=float), grid.index.to_numpy(dtype=float)
        mids = (steps[1:] + steps[:-1]) / 2
        half = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5
        x_edges = [steps[0] - half, *mids, steps[-1] + half]
        y_edges = [*(layers - 0.5), layers[-1] + 0.5]
        mesh = ax.pcolormesh(x_edges, y_edges, grid.to_numpy(dtype=float), cmap="viridis", shading="flat")
        for boundary in stage_boundaries(history[history["metric"] == metric]):
            ax.axhline(boundary, color="white", lw=0.9, ls="--")
        if len(steps) <= 12:
            ax.set_xticks(steps)
        ax.set_ylabel("layer (0 = block input)")
        _integer_ticks(ax.yaxis)
        ax.grid(False)
        fig.colorbar(mesh, ax=ax, label=f"{metric_label(metric)} (mean over probe)")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def save_figure(fig: plt.Figure, path: Path, dpi: int = 130) -> Path:
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def plot_training(history: pd.DataFrame, title: str | None = None) -> plt.Figure:
    """Loss terms, validation accuracy and last-layer token cosine per epoch (a ``finetune`` run's history)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    loss_cols = [*(c for c in history.columns if c.startswith("train_")), "val_loss"]
    for col in loss_cols:
        if col in history and history[col].notna().any():
            style = "--" if col == "val_loss" else "-"
            axes[0].plot(history["epoch"], history[col], style, marker="o", ms=3, label=col)
    axes[0].set_title("(a) loss terms (unweighted)", loc="left", fontsize=11)
    for col in ("val_top1", "val_top5"):
        if history[col].notna().any():
            axes[1].plot(history["epoch"], history[col], marker="o", ms=3, label=col)
    axes[1].set_title("(b) validation accuracy (%)", loc="left", fontsize=11)
    axes[2].plot(history["epoch"], history["val_token_cosine"], marker="o", ms=3, color="C3", label="last layer")
    axes[2].set_title(f"(c) validation {metric_label('token_cosine')}", loc="left", fontsize=11)
    for ax in axes:
        ax.set_xlabel("epoch")
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_check(result: CheckResult):
    """One panel per metric: baseline and current curves, the accepted band shaded, failing layers marked."""
    metrics = list(dict.fromkeys(result.rows["metric"]))
    fig, axes = metric_panels(metrics)
    for ax, metric in zip(axes, metrics, strict=True):
        d = result.rows[result.rows["metric"] == metric].sort_values("layer")
        x = d["layer"].to_numpy()
        ax.plot(x, d["baseline"], marker="o", ms=3.5, lw=1.6, color="C0", label="baseline")
        ax.plot(x, d["current"], marker="s", ms=3.5, lw=1.6, color="C1", label="current")
        finite = np.concatenate([d[c].to_numpy(float) for c in ("baseline", "current", "lower", "upper")])
        finite = finite[np.isfinite(finite)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi), 1e-3) * 0.1
        ax.set_ylim(lo - pad, hi + pad)
        lower = np.clip(d["lower"].to_numpy(float), lo - pad, hi + pad)
        upper = np.clip(d["upper"].to_numpy(float), lo - pad, hi + pad)
        band = f"accepted band (atol {result.tolerance.atol_for(metric):g}, rtol {result.tolerance.rtol_for(metric):g})"
        ax.fill_between(x, lower, upper, color="C0", alpha=0.18, lw=0, label=band)
        bad = d[~d["passed"]]
        if len(bad):
            ax.scatter(bad["layer"], bad["current"], s=90, marker="x", color="red", lw=2.2, zorder=5, label="failing")
            for _, r in bad.iterrows():
                ax.annotate(
                    str(r["layer"]),
                    (r["layer"], r["current"]),
                    textcoords="offset points",
                    xytext=(5, 5),
                    fontsize=8,
                    color="red",
                )
        ax.legend(fontsize=8, loc="best")
    verdict = "passed" if result.passed else f"{len(result.failures)} of {len(result.rows)} failing"
    t = result.tolerance
    fig.suptitle(f"oversmooth check: {verdict} (sigma {t.sigma:g}, direction {t.direction})", fontsize=10)
    return fig


PATCH_MAP_STYLE = {
    "similarity": ("viridis", "similarity: mean cosine to the other patches"),
    "attention": ("magma", "attention to each patch (mean over heads)"),
}
"""Colour map and colour-bar label of each kind of per-patch map."""


def _cell_mesh(cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell edges in pixels ``(x edges, y edges)`` and the ``(rows, cols)`` values of one map's cells."""
    rows, cols = int(cells["row"].max()) + 1, int(cells["col"].max()) + 1
    values = np.full((rows, cols), np.nan)
    values[cells["row"].to_numpy(int), cells["col"].to_numpy(int)] = cells["value"].to_numpy(float)
    by_col = cells.drop_duplicates("col").sort_values("col")
    by_row = cells.drop_duplicates("row").sort_values("row")
    x_edges = np.append(by_col["x0"].to_numpy(float), by_col["x1"].to_numpy(float)[-1])
    y_edges = np.append(by_row["y0"].to_numpy(float), by_row["y1"].to_numpy(float)[-1])
    return x_edges, y_edges, values


def plot_patch_maps(
    inputs: np.ndarray, names: Sequence[str], indices: Sequence[int], cells: pd.DataFrame, title: str | None = None
) -> plt.Figure:
    """Per-patch maps over their images: a set of rows per kind of map (similarity, then attention when there is
    any), one row per sample image in each, one column per layer; each map drawn on its layer's grid over the model
    input, one colour scale per kind shared by all its panels, with its colour bar beside its rows.

    Args:
        inputs: ``(K, H, W, 3)`` uint8 model inputs.
        names: the K images' names (the row labels show the file name).
        indices: the K images' ``image_index`` in ``cells``.
        cells: ``patches.csv`` rows (:data:`~oversmooth_cli.reading.patch_maps.PATCH_COLUMNS`).
        title: figure title.
    """
    kinds = [k for k in PATCH_MAP_STYLE if k in set(cells["kind"])]
    layers = sorted(int(x) for x in cells["layer"].unique())
    nrows, ncols = max(1, len(indices) * len(kinds)), max(1, len(layers))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.1 + 1.75 * ncols, 0.5 + 1.75 * nrows), squeeze=False,
                             layout="constrained")  # fmt: skip
    norms = {}
    for kind in kinds:
        v = cells.loc[cells["kind"] == kind, "value"].to_numpy(float)
        lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
        norms[kind] = Normalize(lo, hi if hi > lo else lo + 1e-6)
    rows_of: dict[str, list[Any]] = {kind: [] for kind in kinds}
    for r, (kind, i) in enumerate((kind, i) for kind in kinds for i in range(len(indices))):
        height, width = inputs[i].shape[:2]
        mine = cells[(cells["image_index"] == indices[i]) & (cells["kind"] == kind)]
        for c, layer in enumerate(layers):
            ax = axes[r, c]
            ax.imshow(inputs[i], extent=(0, width, height, 0), interpolation="nearest")
            one = mine[mine["layer"] == layer]
            if len(one):
                x_edges, y_edges, values = _cell_mesh(one)
                ax.pcolormesh(x_edges, y_edges, values, cmap=PATCH_MAP_STYLE[kind][0], norm=norms[kind], alpha=0.7)
            else:
                ax.text(0.5, 0.5, "no map", transform=ax.transAxes, ha="center", va="center", fontsize=7,
                        color="white", bbox={"facecolor": "0.2", "alpha": 0.6, "lw": 0})  # fmt: skip
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"layer {layer}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{Path(names[i]).name}\n{kind}", fontsize=7)
        rows_of[kind].extend(axes[r, :])
    for kind in kinds:
        cmap, label = PATCH_MAP_STYLE[kind]
        fig.colorbar(ScalarMappable(norm=norms[kind], cmap=cmap), ax=rows_of[kind], label=label, shrink=0.6)
    if title:
        fig.suptitle(f"{title} · per-patch maps", fontsize=10)
    return fig
