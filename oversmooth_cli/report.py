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

from .errors import UserError
from .metrics import ATTENTION_METRICS, TOKEN_METRICS

__all__ = [
    "HEAD_COLUMNS",
    "LAYER_COLUMNS",
    "METRIC_LABELS",
    "atomic_write",
    "check_out_dir",
    "plot_curves",
    "read_layers",
    "staged_dir",
    "write_json",
]

LAYER_COLUMNS = ["layer", "metric", "mean", "std", "ci95_low", "ci95_high", "n_images"]
HEAD_COLUMNS = ["layer", "metric", "head", "mean", "std", "ci95_low", "ci95_high", "n_images"]
METRIC_LABELS = {
    "token_cosine": "token cosine similarity",
    "attention_std": "attention std",
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
    missing = [c for c in LAYER_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}; is it a layers.csv from oversmooth?")
    return df


def plot_curves(layers: pd.DataFrame, title: str | None = None) -> plt.Figure:
    """One panel per metric (the paper's Figure 1 for the two default metrics): mean per layer with the 95% band."""
    metrics = metric_order(layers["metric"].unique())
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for i, (ax, metric) in enumerate(zip(axes.flat, metrics, strict=False)):
        d = layers[layers["metric"] == metric].sort_values("layer")
        ax.plot(d["layer"], d["mean"], marker="o", ms=3.5, lw=1.6, color="C0", label="mean over images")
        ax.fill_between(d["layer"], d["ci95_low"], d["ci95_high"], color="C0", alpha=0.25, lw=0, label="95% CI")
        ax.set_title(f"({chr(ord('a') + i)}) {METRIC_LABELS.get(metric, metric)}", loc="left", fontsize=11)
        ax.set_xlabel("layer (0 = block input)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: Path, dpi: int = 130) -> Path:
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
