"""A finetune run's record and its files over training: the options (``config.json``, ``seeds.json``),
``history.csv`` (the curves per epoch, one run or the arms of ``--control`` side by side), ``monitor.csv`` (the
layer x step heatmaps); those files are read leniently (an absent or damaged file leaves its part out of the page)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..metrics.registry import metric_label, metric_order
from .document import details, grid, key_values, table
from .measure import interval_text, keyed_grid
from .svg import PALETTE, ColorScale, Html, Series, esc, heatmap, line_chart, number

__all__ = [
    "ARM_COLORS",
    "LOSS_COLUMNS",
    "has_values",
    "history_charts",
    "history_table",
    "monitor_heatmaps",
    "read_csv",
    "read_json",
    "run_options",
]


ARM_COLORS = {"before": "#7f7f7f", "after": PALETTE[1], "treated": PALETTE[1], "control": PALETTE[0]}
"""Before grey, after / treated red, control blue (the colours of ``side_by_side.png``)."""

LOSS_COLUMNS = ("train_loss", "train_ce", "train_cos", "train_cons", "train_token", "val_loss")
"""The loss columns of ``history.csv`` the loss chart draws (those with values)."""


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; ``None`` when the file is absent, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path) if path.is_file() else None
    except (OSError, ValueError, pd.errors.ParserError):
        return None


def has_values(history: pd.DataFrame, column: str) -> bool:
    return column in history.columns and bool(pd.to_numeric(history[column], errors="coerce").notna().any())


def _epoch_series(history: pd.DataFrame, column: str, label: str, color: str, dashed: bool = False) -> Series:
    values = pd.to_numeric(history[column], errors="coerce").astype(float)
    return Series(label, history["epoch"].astype(float).tolist(), values.tolist(), color=color, dashed=dashed)


def history_charts(histories: Mapping[str, pd.DataFrame]) -> Html:
    """The training curves per epoch (epoch 0: before the first step): the loss terms, validation top-1 / top-5 and
    the validation last-layer token cosine. One history: every column its own line; several (``{"treated": ...,
    "control": ...}``): the arms side by side in their colours."""
    one = len(histories) == 1
    panels: list[tuple[str, str, list[Series]]] = [
        ("loss terms (unweighted means)", "loss", []),
        ("validation accuracy (%)", "top-1 (%)", []),
        (f"validation last-layer {metric_label('token_cosine')}", metric_label("token_cosine"), []),
    ]
    for a, (arm, h) in enumerate(histories.items()):
        arm_color = ARM_COLORS.get(arm, PALETTE[a % len(PALETTE)])
        for i, column in enumerate(c for c in LOSS_COLUMNS if has_values(h, c)):
            if one or column in ("train_ce", "val_loss"):
                color = PALETTE[i % len(PALETTE)] if one else arm_color
                label = column if one else f"{arm} {column}"
                panels[0][2].append(_epoch_series(h, column, label, color, dashed=column == "val_loss"))
        for column, dashed in (("val_top1", False), ("val_top5", True)):
            if has_values(h, column):
                label = column if one else f"{arm} {column}"
                color = (PALETTE[0] if column == "val_top1" else PALETTE[2]) if one else arm_color
                panels[1][2].append(_epoch_series(h, column, label, color, dashed))
        if has_values(h, "val_token_cosine"):
            label = "last layer" if one else arm
            panels[2][2].append(_epoch_series(h, "val_token_cosine", label, PALETTE[1] if one else arm_color))
    charts = [
        line_chart(
            series,
            title=f"({chr(ord('a') + i)}) {title}",
            x_label="epoch (0: before training)",
            y_label=y_label,
            x_name="epoch",
        )
        for i, (title, y_label, series) in enumerate(panels)
        if series
    ]
    return grid([f'<div class="history-chart">{c}</div>' for c in charts])


def history_table(history: pd.DataFrame) -> Html:
    columns = [c for c in history.columns if c != "cons_sim" and (c == "epoch" or has_values(history, c))]
    rows = [[number(r[c]) for c in columns] for _, r in history.iterrows()]
    return table(columns, rows, numeric=range(len(columns)))


def monitor_heatmaps(monitor: pd.DataFrame) -> Html:
    """One layer x step heatmap per metric of ``monitor.csv`` (deepest layer on top; ``div.monitor-map`` with
    ``data-metric``); hover shows step, layer, mean, 95% interval and probe images."""
    maps = []
    for metric in metric_order(monitor["metric"].unique()):
        d = monitor[monitor["metric"] == metric]
        steps = sorted(int(s) for s in d["step"].unique())
        layers = sorted((int(x) for x in d["layer"].unique()), reverse=True)

        def tip(layer: int, step: int, r: Any) -> str:
            if r is None:
                return f"step {step}, layer {layer}: no value"
            return (
                f"step {step}, layer {layer}\nmean {number(r['mean'])}\n"
                f"{interval_text(r['ci95_low'], r['ci95_high'])}\n{number(r['n_images'])} probe images"
            )

        values, tips = keyed_grid(d, ("layer", layers), ("step", steps), tip)
        label = metric_label(metric)
        figure = heatmap(
            values,
            [str(x) for x in layers],
            [str(s) for s in steps],
            title=f"{label} per layer and training step",
            tips=tips,
            scale=ColorScale.of(d["mean"]),
            x_label="training step",
            y_label="layer",
            scale_label=f"{label} (mean over the probe)",
        )
        maps.append(f'<div class="monitor-map" data-metric="{esc(metric)}">{figure}</div>')
    return grid(maps)


def run_options(ft: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> Html:
    """The options of a finetune run: ``ft`` is ``config.json``'s ``finetune`` record (or ``seeds.json``'s
    ``run``), ``config`` the whole ``config.json`` (architecture, classes)."""
    cfg = ft.get("config") or {}
    losses = cfg.get("losses") or []
    weights = ", ".join(f"{t} x{cfg.get(f'w_{t}')}" for t in losses) if losses else "none (cross-entropy only)"
    args = ft.get("model_args") or (config or {}).get("model_args")
    pairs = [
        ("model", ft.get("model") or (config or {}).get("architecture")),
        ("model arguments", ", ".join(f"{k}={v}" for k, v in args.items()) if isinstance(args, Mapping) else None),
        ("classes", ", ".join(map(str, (config or {}).get("label_names") or [])) or None),
        ("training images", ft.get("train_dir")),
        ("validation images", ft.get("val_dir") or (f"{cfg.get('val_split')} of the training images" if cfg else None)),
        ("loss terms", weights),
        ("epochs, batch size", f"{cfg.get('epochs')}, {cfg.get('batch_size')}" if cfg else None),
        (
            "learning rate",
            f"{cfg.get('lr')} (min {cfg.get('min_lr')}, warmup {cfg.get('warmup_epochs')} epochs)" if cfg else None,
        ),
        ("seed", cfg.get("seed")),
    ]
    body = [key_values(pairs)]
    if cfg:
        body.append(details("every option", key_values([(k, json.dumps(v)) for k, v in cfg.items()])))
    read = ft.get("losses_read")
    if isinstance(read, Mapping):
        body.append(details("what the loss terms read", key_values([(k, json.dumps(v)) for k, v in read.items()])))
    return Html("".join(body))
