"""Run files: the row schemas of ``layers.csv`` / ``heads.csv``, reading a run back (:func:`load_run`), JSON,
the per-metric figure panels every plot shares (:func:`metric_panels`), and atomic writes of files and run folders."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    "Run",
    "atomic_write",
    "atomic_write_all",
    "check_out_dir",
    "default_mode",
    "load_run",
    "metric_label",
    "metric_order",
    "metric_panels",
    "plot_curves",
    "plot_head_heatmap",
    "plot_monitor_heatmap",
    "plot_training",
    "read_definitions",
    "read_layers",
    "save_figure",
    "stage_boundaries",
    "staged_dir",
    "to_json",
    "write_json",
]

LAYER_COLUMNS = ["layer", "stage", "n_tokens", "metric", "mean", "std", "ci95_low", "ci95_high", "n_images"]
LAYER_DEFAULTS = {"stage": 0, "n_tokens": float("nan")}
"""Columns a ``layers.csv`` written before hierarchical models were supported lacks, and what they read as."""
HEAD_COLUMNS = ["layer", "metric", "head", "mean", "std", "ci95_low", "ci95_high", "n_images"]


def metric_order(names) -> list[str]:
    """Metrics in registry order (token metrics first), unknown names last, alphabetically."""
    known = [*TOKEN_METRICS, *ATTENTION_METRICS]
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))


def metric_label(name: str) -> str:
    """The figure label of a metric (its registry ``label``; its name when this version's registry does not know it)."""
    definition = TOKEN_METRICS.get(name) or ATTENTION_METRICS.get(name)
    return (definition.label if definition is not None else "") or name


def check_out_dir(out: Path, overwrite: bool, hint: str | None = None) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless ``overwrite``; call before the work.

    ``hint`` replaces the advice after "exists and is not empty; " (default: pass --overwrite or another --out).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file; give a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {out} exists and is not empty; {hint or 'pass --overwrite or choose another --out'}"
        )


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
    return atomic_write_all({path: write})[0]


def atomic_write_all(writes: Mapping[Path, Callable[[Path], Any]]) -> list[Path]:
    """Write every file to a temporary sibling first, then rename them all into place.

    A failure or an interruption before the renames leaves every target as it was. Returns the target paths.
    """
    staged: list[Path] = []
    try:
        for path, write in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            staged.append(Path(tmp))
            write(Path(tmp))
            os.chmod(tmp, default_mode())
        for tmp, path in zip(staged, writes, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in staged:
            if tmp.exists():
                tmp.unlink()
    return list(writes)


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


# -- reading a run back ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One run's per-layer table and (when present) its ``summary.json``."""

    source: Path
    layers_csv: Path
    layers: pd.DataFrame = field(repr=False)
    summary: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def folder(self) -> Path:
        return self.layers_csv.parent

    @property
    def metrics_version(self) -> str | None:
        v = (self.summary or {}).get("metrics_version", self.definitions.get("metrics_version"))
        return None if v is None else str(v)

    @property
    def definitions(self) -> dict[str, Any]:
        """What the numbers mean (``summary.json``'s ``definitions``; see :func:`read_definitions`)."""
        return read_definitions(self.summary)

    @property
    def name(self) -> str:
        """The model name recorded in ``summary.json``, else the run folder's name."""
        model = (self.summary or {}).get("model")
        name = model.get("name") if isinstance(model, dict) else None
        return str(name) if name else (self.folder.resolve().name or str(self.source))

    @property
    def metrics(self) -> list[str]:
        return metric_order(self.layers["metric"].unique())

    def layers_of(self, metric: str) -> list[int]:
        return sorted(int(x) for x in self.layers.loc[self.layers["metric"] == metric, "layer"])

    @property
    def n_layers(self) -> int:
        """Depth ``L`` (``summary.json``'s ``n_layers``, else the deepest layer in ``layers.csv``)."""
        n = (self.summary or {}).get("n_layers")
        return int(n) if isinstance(n, int) and n > 0 else int(self.layers["layer"].max())

    @property
    def n_images(self) -> int:
        return int(self.layers["n_images"].max()) if len(self.layers) else 0


DEFINITION_KEYS = ("metrics_version", "include_prefix", "metrics", "input_size", "n_tokens", "images")
"""The compared entries of ``summary.json``'s ``definitions`` (``attention_tap`` is recorded, not compared)."""
METRIC_DEFINITION_KEYS = ("definition", "tokens", "prefix_included", "layers")
"""The compared entries of one metric's definition."""


def read_definitions(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``definitions`` block of a ``summary.json``: what two runs must share for their numbers to compare.

    A summary written before the block existed gives what it recorded elsewhere (``metrics_version``,
    ``run.include_prefix``, ``metrics``, ``data_config.input_size``, ``layer_info``), without ``images``; no summary
    gives ``{}``. Entries of the wrong type are left out, so they read as not recorded.
    """
    if not isinstance(summary, Mapping):
        return {}
    block = summary.get("definitions")
    if isinstance(block, Mapping):
        raw = dict(block)
    else:
        run = summary.get("run") if isinstance(summary.get("run"), Mapping) else {}
        data_config = summary.get("data_config") if isinstance(summary.get("data_config"), Mapping) else {}
        info = summary.get("layer_info")
        raw = {
            "metrics_version": summary.get("metrics_version"),
            "include_prefix": run.get("include_prefix"),
            "metrics": summary.get("metrics"),
            "input_size": data_config.get("input_size"),
            "n_tokens": [x.get("n_tokens") for x in info if isinstance(x, Mapping)] if isinstance(info, list) else None,
        }
    out: dict[str, Any] = {}
    if raw.get("metrics_version") is not None:
        out["metrics_version"] = str(raw["metrics_version"])
    if isinstance(raw.get("include_prefix"), bool):
        out["include_prefix"] = raw["include_prefix"]
    if isinstance(raw.get("metrics"), Mapping):
        out["metrics"] = {
            str(name): {k: d[k] for k in METRIC_DEFINITION_KEYS if k in d}
            for name, d in raw["metrics"].items()
            if isinstance(d, Mapping) and d.get("measured", True) is not False
        }
    if isinstance(raw.get("input_size"), list):
        out["input_size"] = list(raw["input_size"])
    if isinstance(raw.get("n_tokens"), list):
        out["n_tokens"] = list(raw["n_tokens"])
    images = raw.get("images")
    if isinstance(images, Mapping) and isinstance(images.get("sha256"), str) and isinstance(images.get("count"), int):
        out["images"] = {"count": images["count"], "sha256": images["sha256"], "relative_to": images.get("relative_to")}
    if "attention_tap" in raw:
        out["attention_tap"] = raw["attention_tap"]
    return out


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; write the run again with `oversmooth measure`") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; is it a summary.json from oversmooth?")
    return data


def load_run(source: str | Path) -> Run:
    """Load a run folder (``layers.csv`` + ``summary.json``) or a ``layers.csv`` (``summary.json`` read beside it).

    Raises:
        UserError: missing path, unreadable or malformed ``layers.csv``, duplicate ``(metric, layer)`` rows.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source} does not exist; give a run folder written by `oversmooth measure` or its layers.csv")
    csv = path / "layers.csv" if path.is_dir() else path
    try:
        df = read_layers(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {csv} as a layers.csv: {str(e).splitlines()[0]}") from e
    if df.empty:
        raise UserError(f"{csv} has no rows; measure the run again with `oversmooth measure`")
    df = df.copy()
    for col in ("layer", "mean", "std", "n_images"):
        converted = pd.to_numeric(df[col], errors="coerce")
        junk = converted.isna() & (df[col].notna() if col in ("mean", "std") else True)  # an undefined mean is NaN
        if junk.any():
            bad = df[col][junk].iloc[0]
            raise UserError(f"{csv}: column {col} holds non-numbers ({bad!r}); is it a layers.csv from oversmooth?")
        df[col] = converted
    df["layer"] = df["layer"].astype(int)
    df["metric"] = df["metric"].astype(str)
    dup = df[df.duplicated(["metric", "layer"], keep=False)]
    if len(dup):
        first = dup.iloc[0]
        raise UserError(f"{csv} has several rows for {first['metric']} layer {first['layer']}; one row each expected")
    return Run(path, csv, df, _read_summary(csv.parent / "summary.json"))


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
            ax.xaxis.get_major_locator().set_params(integer=True)
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
        history: :data:`~oversmooth_cli.monitor.MONITOR_COLUMNS` rows (``monitor.csv``).
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
        ax.yaxis.get_major_locator().set_params(integer=True)
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
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
