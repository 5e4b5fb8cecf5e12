"""Moved in 0.2: ``oversmooth_cli.report`` is now :mod:`oversmooth_cli.io`, :mod:`oversmooth_cli.gate.runs`,
:mod:`oversmooth_cli.metrics.registry`, :mod:`oversmooth_cli.plots`.

This alias keeps code written for 0.1 (and its README) working; it warns once and goes in 0.3.
"""

from __future__ import annotations

from ._moved import moved
from .gate.runs import Run, load_run, read_definitions
from .io import (
    HEAD_COLUMNS,
    LAYER_COLUMNS,
    atomic_write,
    atomic_write_all,
    check_out_dir,
    default_mode,
    read_layers,
    staged_dir,
    to_json,
    write_json,
)
from .metrics.registry import metric_label, metric_order
from .plots import (
    metric_panels,
    plot_curves,
    plot_head_heatmap,
    plot_monitor_heatmap,
    plot_training,
    save_figure,
    stage_boundaries,
)

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

moved(__name__, "oversmooth_cli.io, oversmooth_cli.gate.runs, oversmooth_cli.metrics.registry, oversmooth_cli.plots")
