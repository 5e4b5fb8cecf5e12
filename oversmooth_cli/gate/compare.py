"""``compare``: overlay the per-layer curves of several runs and write them as one wide table.

Runs of models with different depths line up by relative depth (``layer / L``) with ``relative_depth=True``::

    from oversmooth_cli.gate.compare import compare_runs, write_compare
    result = compare_runs(["runs/before", "runs/after"], labels=["before", "after"])
    write_compare(result, "compare.png")  # also writes compare.csv beside it
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..io import atomic_write
from ..metrics.registry import metric_order
from ..plots import plot_compare, save_figure
from .comparable import validate_definitions
from .runs import Run, load_run

__all__ = ["CompareResult", "compare_runs", "default_labels", "wide_table", "write_compare"]


DEPTH_DECIMALS = 6
"""Relative depths are rounded to this many decimals so that e.g. 1/2 and 2/4 share a row."""


@dataclass
class CompareResult:
    """Several runs, their labels, and the wide table (one row per metric and layer or relative depth)."""

    runs: list[Run]
    labels: list[str]
    relative_depth: bool
    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def curve(self, index: int, metric: str) -> pd.DataFrame:
        """Run ``index``'s rows of ``metric`` in long form (``x`` = layer or relative depth, ``mean``, the 95%
        interval), sorted by ``x``."""
        return _long(self.runs[index], self.labels[index], self.relative_depth, [metric]).sort_values("x")


def default_labels(runs: Sequence[Run]) -> list[str]:
    """Model names from ``summary.json``; runs sharing a name get their folder name added, then a number."""
    names = [r.name for r in runs]
    counts = Counter(names)
    labels = [f"{n} ({r.folder.resolve().name})" if counts[n] > 1 else n for n, r in zip(names, runs, strict=True)]
    seen: Counter[str] = Counter()
    counts = Counter(labels)
    out = []
    for label in labels:
        seen[label] += 1
        out.append(f"{label} #{seen[label]}" if counts[label] > 1 else label)
    return out


def _long(run: Run, label: str, relative_depth: bool, metrics: Sequence[str]) -> pd.DataFrame:
    d = run.layers[run.layers["metric"].isin(metrics)]
    x = (d["layer"] / run.n_layers).round(DEPTH_DECIMALS) if relative_depth else d["layer"].astype(int)
    return pd.DataFrame(
        {
            "metric": d["metric"],
            "x": x,
            "label": label,
            "mean": d["mean"].astype(float),
            "ci95_low": pd.to_numeric(d["ci95_low"], errors="coerce"),
            "ci95_high": pd.to_numeric(d["ci95_high"], errors="coerce"),
        }
    )


def wide_table(
    runs: Sequence[Run], labels: Sequence[str], relative_depth: bool = False, metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """``metric, layer|relative_depth, <label>...``: each run's per-layer mean, empty where a run has no such row."""
    metrics = metric_order(metrics or {m for r in runs for m in r.metrics})
    x_col = "relative_depth" if relative_depth else "layer"
    long = pd.concat([_long(r, lab, relative_depth, metrics) for r, lab in zip(runs, labels, strict=True)])
    wide = long.pivot(index=["metric", "x"], columns="label", values="mean").reset_index()
    wide = wide.reindex(columns=["metric", "x", *labels])
    wide["order"] = wide["metric"].map({m: i for i, m in enumerate(metrics)})
    wide = wide.sort_values(["order", "x"]).drop(columns="order").rename(columns={"x": x_col})
    wide.columns.name = None
    return wide.reset_index(drop=True)


def compare_runs(
    sources: Sequence[str | Path | Run],
    labels: Sequence[str] | None = None,
    relative_depth: bool = False,
    metrics: Sequence[str] | None = None,
    *,
    allow_other_images: bool = False,
) -> CompareResult:
    """Load several runs and build their wide table.

    Every run is checked against the first with :func:`~oversmooth_cli.gate.comparable.validate_definitions`, as
    ``check``
    does, except that a different input size or token grid (different models) is a note, not a refusal.

    Args:
        sources: run folders or ``layers.csv`` files (or loaded :class:`~oversmooth_cli.gate.runs.Run` objects).
        labels: one legend label per run (default: :func:`default_labels`).
        relative_depth: align runs by ``layer / L`` instead of the layer index.
        metrics: metrics to show (default: every metric any run has).
        allow_other_images: accept runs measured on different image sets (with a note).

    Raises:
        UserError: no runs, a label count that does not match, repeated labels, an unknown metric, or runs whose
            definitions differ (metrics_version, a metric's definition such as ``--include-prefix``, image set).
    """
    if not sources:
        raise UserError("give at least one run folder to compare")
    runs = [s if isinstance(s, Run) else load_run(s) for s in sources]
    if labels:
        if len(labels) != len(runs):
            raise UserError(f"got {len(labels)} --label for {len(runs)} runs; give one --label per run, in order")
        repeated = [lab for lab, n in Counter(labels).items() if n > 1]
        if repeated:
            raise UserError(f"--label {repeated[0]!r} is given twice; labels name the columns of compare.csv")
        labels = list(labels)
    else:
        labels = default_labels(runs)
    available = {m for r in runs for m in r.metrics}
    if metrics:
        unknown = [m for m in metrics if m not in available]
        if unknown:
            raise UserError(f"metric {', '.join(unknown)} is in none of the runs (they have {', '.join(available)})")
    notes: list[str] = []
    shown = metric_order(metrics) if metrics else sorted(available)
    for run, label in zip(runs[1:], labels[1:], strict=True):
        common = [m for m in shown if m in runs[0].metrics and m in run.metrics]
        names = (repr(labels[0]), repr(label))
        for note in validate_definitions(
            runs[0], run, common, allow_other_images=allow_other_images, gate=False, names=names
        ):
            if note not in notes:
                notes.append(note)
    depths = {r.n_layers for r in runs}
    if len(depths) > 1 and not relative_depth:
        notes.append(f"runs have different depths ({', '.join(map(str, sorted(depths)))}); try --relative-depth")
    table = wide_table(runs, labels, relative_depth, metrics)
    return CompareResult(runs, labels, relative_depth, table, notes)


def write_compare(
    result: CompareResult, out: str | Path, csv: str | Path | None = None, ci: bool = False
) -> tuple[Path, Path]:
    """Write the figure to ``out`` and the wide table to ``csv`` (default: ``compare.csv`` beside ``out``)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a PNG file name such as {out / 'compare.png'}")
    csv_path = Path(csv) if csv is not None else out.parent / "compare.csv"
    if csv_path.resolve() == out.resolve():
        raise UserError(f"the figure and the table would both be written to {out}; give --out a .png name")
    atomic_write(csv_path, lambda p: result.table.to_csv(p, index=False))
    save_figure(plot_compare(result, ci), out)
    return out, csv_path
