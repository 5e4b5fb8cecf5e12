"""Run outputs: one row schema to CSV / JSON, PNG figures, and atomic writes of a whole run folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from .errors import UserError
from .metrics import ATTENTION_METRICS, TOKEN_METRICS

__all__ = [
    "HEAD_COLUMNS",
    "LAYER_COLUMNS",
    "METRIC_LABELS",
    "atomic_write",
    "check_out_dir",
    "default_mode",
    "plot_curves",
    "plot_head_heatmap",
    "read_layers",
    "stage_boundaries",
    "staged_dir",
    "write_json",
]

LAYER_COLUMNS = ["layer", "stage", "n_tokens", "metric", "mean", "std", "ci95_low", "ci95_high", "n_images"]
LAYER_DEFAULTS = {"stage": 0, "n_tokens": float("nan")}
"""Columns a ``layers.csv`` written before hierarchical models were supported lacks, and what they read as."""
HEAD_COLUMNS = ["layer", "metric", "head", "mean", "std", "ci95_low", "ci95_high", "n_images"]
METRIC_LABELS = {
    "token_cosine": "token cosine similarity",
    "rank_collapse": "rank-collapse residual",
    "effective_rank": "effective rank",
    "token_abs_cosine": "mean |cosine| (incl. diagonal)",
    "cls_patch_cosine": "class-patch cosine",
    "layer_cka": "CKA with previous layer",
    "attention_std": "attention std",
    "attention_entropy": "attention entropy (nats)",
    "attention_entropy_normalised": "attention entropy / log K",
    "attention_distance": "mean attention distance (px)",
    "cross_layer_attention_similarity": "attention similarity to previous layer",
}


def metric_order(names) -> list[str]:
    """Metrics in registry order (token metrics first), unknown names last, alphabetically."""
    known = [*TOKEN_METRICS, *ATTENTION_METRICS]
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless ``overwrite``; call before the work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file; give a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --out")


def default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open``/``mkdir`` would give under the current umask (temp files default to 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename, on failure it is removed.

    Readers never see a half-written run: ``out`` holds either the previous complete run or the new one.
    """
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield stage
        stage.chmod(default_mode(directory=True))
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "run")
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (same folder, same filesystem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any) -> str:
    """JSON text with NaN written as null (strict JSON for other tools)."""

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, Mapping):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(json.loads(json.dumps(obj, default=_json_default))), indent=2, allow_nan=False)


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(to_json(obj) + "\n"))


def read_layers(source: str | Path) -> pd.DataFrame:
    """``layers.csv`` of a run folder (or the CSV itself), validated against :data:`LAYER_COLUMNS`."""
    path = Path(source)
    if path.is_dir():
        path = path / "layers.csv"
    if not path.is_file():
        raise UserError(f"{source} has no layers.csv (give a run folder written by `oversmooth measure`)")
    df = pd.read_csv(path)
    for column, value in LAYER_DEFAULTS.items():
        if column not in df.columns:
            df.insert(LAYER_COLUMNS.index(column), column, value)
    missing = [c for c in LAYER_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}; is it a layers.csv from oversmooth?")
    return df


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
    ncols = min(2 if len(metrics) <= 4 else 3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    first, last = layers["layer"].min(), layers["layer"].max()
    for i, (ax, metric) in enumerate(zip(axes.flat, metrics, strict=False)):
        d = layers[layers["metric"] == metric].sort_values("layer")
        ax.plot(d["layer"], d["mean"], marker="o", ms=3.5, lw=1.6, color="C0", label="mean over images")
        ax.fill_between(d["layer"], d["ci95_low"], d["ci95_high"], color="C0", alpha=0.25, lw=0, label="95% CI")
        ax.set_title(f"({chr(ord('a') + i)}) {METRIC_LABELS.get(metric, metric)}", loc="left", fontsize=11)
        ax.set_xlabel("layer (0 = block input)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.set_xlim(first - 0.4, last + 0.4)  # the same layer axis in every panel
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.ticklabel_format(axis="y", useOffset=False)  # plain values, no "+4.17" offset above the axis
        for boundary in stage_boundaries(layers):
            ax.axvline(boundary, color="0.55", lw=0.9, ls="--", zorder=0)
        if i == 0:
            ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
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
    label = METRIC_LABELS.get(metric, metric)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(f"{label}: mean over images per head" if title is None else f"{title}\n{label} per head", fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: Path, dpi: int = 130) -> Path:
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
