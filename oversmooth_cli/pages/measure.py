"""The report of a ``measure`` run folder (``report.html``), and the layer charts and per-head heatmaps the other
pages reuse.

Everything is read back from the run folder (``layers.csv``, ``heads.csv``, ``summary.json`` through
:func:`~oversmooth_cli.gate.runs.load_run`, which checks them against the run-file schema; ``patches.csv`` and
``patches.npz`` when present), so the page is the same whichever command wrote the folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..gate.runs import Run, load_run
from ..metrics.registry import ALL_METRICS, metric_label, metric_order, metric_range
from ..plots import stage_boundaries
from .document import KeyNumber, Section, details, document, grid, key_values, note, table
from .patches import patch_maps_html, read_patch_maps
from .svg import PALETTE, ColorScale, Html, Series, esc, heatmap, line_chart, number

__all__ = [
    "LAYER_AXIS",
    "head_heatmaps",
    "interval_text",
    "key_numbers",
    "keyed_grid",
    "layer_charts",
    "layer_tip",
    "layers_table",
    "measure_page",
    "measure_sections",
]


LAYER_AXIS = "layer (0 = block input)"


def _get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, ``None`` where an entry is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def interval_text(low: object, high: object) -> str:
    """``95% CI low to high``, or ``no interval (one image)`` when both ends are missing."""
    if all(isinstance(v, float) and math.isnan(v) for v in (low, high)) or low is None:
        return "no interval (one image)"
    return f"95% CI {number(low)} to {number(high)}"


def keyed_grid(
    table: pd.DataFrame,
    rows: tuple[str, Sequence[int]],
    cols: tuple[str, Sequence[int]],
    tip: Callable[[int, int, Any], str],
) -> tuple[list[list[float]], list[list[str]]]:
    """The ``mean`` of ``table`` as a heatmap's values, one row per value of column ``rows[0]`` (in the order
    ``rows[1]``) and one column per value of ``cols[0]``, nan where a cell has no row; and each cell's hover text,
    ``tip(row, col, the table's row or None)``."""
    (row_key, row_values), (col_key, col_values) = rows, cols
    cells = {(int(r[row_key]), int(r[col_key])): r for _, r in table.iterrows()}
    found = [[cells.get((a, b)) for b in col_values] for a in row_values]
    values = [[math.nan if r is None else float(r["mean"]) for r in line] for line in found]
    tips = [
        [tip(a, b, r) for b, r in zip(col_values, line, strict=True)] for a, line in zip(row_values, found, strict=True)
    ]
    return values, tips


def _direction(metric: str) -> str:
    definition = ALL_METRICS.get(metric)
    if definition is None:
        return ""
    return "higher = smoother" if definition.higher_is_smoother else "lower = smoother"


def layer_tip(row: pd.Series) -> str:
    """The hover text of one ``layers.csv`` row: layer (stage, tokens), mean, 95% interval, std and images."""
    where = []
    if "stage" in row and pd.notna(row["stage"]):
        where.append(f"stage {number(row['stage'])}")
    if "n_tokens" in row and pd.notna(row["n_tokens"]):
        where.append(f"{number(row['n_tokens'])} tokens")
    head = f"layer {number(row['layer'])}" + (f" ({', '.join(where)})" if where else "")
    return "\n".join(
        [
            head,
            f"mean {number(row['mean'])}",
            interval_text(row["ci95_low"], row["ci95_high"]),
            f"std {number(row['std'])}, {number(row['n_images'])} images",
        ]
    )


def _series(label: str, rows: pd.DataFrame, color: str, dashed: bool, band: bool) -> Series:
    return Series(
        label,
        rows["layer"].astype(float).tolist(),
        rows["mean"].astype(float).tolist(),
        rows["ci95_low"].astype(float).tolist() if band else None,
        rows["ci95_high"].astype(float).tolist() if band else None,
        color=color,
        dashed=dashed,
    )


def layer_charts(
    tables: Mapping[str, pd.DataFrame],
    *,
    colors: Mapping[str, str] | None = None,
    dashed: Collection[str] = (),
    metrics: Sequence[str] | None = None,
    bands: bool = True,
) -> Html:
    """One chart per metric (a ``div.metric-chart`` with ``data-metric``): for each table (``{label: layers}``) the
    mean per layer with its 95% band; hover shows the values of every table at that layer (all of the row's values
    when there is one table).

    Args:
        tables: ``layers.csv`` tables by label (``{"mean over images": layers}``, ``{"before": ..., "after": ...}``).
        colors: a colour per label (default: :data:`~.svg.PALETTE` in order).
        dashed: labels drawn dashed.
        metrics: the charts, in order (default: every metric of the tables, registry order).
        bands: draw the 95% bands (many overlapping lines read better without).
    """
    frames = list(tables.values())
    shown = list(metrics) if metrics is not None else metric_order({m for t in frames for m in t["metric"]})
    palette = dict(colors or {})
    charts = []
    for i, metric in enumerate(shown):
        series, tips = [], {}
        for j, (label, layers) in enumerate(tables.items()):
            rows = layers[layers["metric"] == metric].sort_values("layer")
            if rows.empty:
                continue
            series.append(_series(label, rows, palette.get(label, PALETTE[j % len(PALETTE)]), label in dashed, bands))
            if len(tables) == 1:
                tips = {float(r["layer"]): layer_tip(r) for _, r in rows.iterrows()}
        if not series:
            continue
        label = metric_label(metric)
        direction = _direction(metric)
        chart = line_chart(
            series,
            title=f"({chr(ord('a') + i % 26)}) {label}" + (f" ({direction})" if direction else ""),
            x_label=LAYER_AXIS,
            y_label=label,
            tips=tips or None,
            vlines=stage_boundaries(frames[0][frames[0]["metric"] == metric]),
        )
        charts.append(f'<div class="metric-chart" data-metric="{esc(metric)}">{chart}</div>')
    return grid(charts)


def head_heatmaps(heads: pd.DataFrame | None) -> Html:
    """One heads x layers heatmap per attention metric of ``heads.csv`` (``div.head-map`` with ``data-metric``);
    hover shows layer, head, mean, 95% interval, std and images."""
    if heads is None or heads.empty:
        return Html("")
    maps = []
    for metric in metric_order(heads["metric"].unique()):
        d = heads[heads["metric"] == metric]
        layers = sorted(int(x) for x in d["layer"].unique())
        head_ids = sorted(int(x) for x in d["head"].unique())

        def tip(h: int, layer: int, r: Any) -> str:
            if r is None:
                return f"layer {layer}, head {h}: no value"
            return (
                f"layer {layer}, head {h}\nmean {number(r['mean'])}\n"
                f"{interval_text(r['ci95_low'], r['ci95_high'])}\nstd {number(r['std'])}, "
                f"{number(r['n_images'])} images"
            )

        values, tips = keyed_grid(d, ("head", head_ids), ("layer", layers), tip)
        label = metric_label(metric)
        figure = heatmap(
            values,
            [str(h) for h in head_ids],
            [str(layer) for layer in layers],
            title=f"{label}: mean over images per head",
            tips=tips,
            scale=ColorScale.of(d["mean"]),
            x_label="layer",
            y_label="head",
            scale_label=label,
        )
        maps.append(f'<div class="head-map" data-metric="{esc(metric)}">{figure}</div>')
    return grid(maps)


def layers_table(layers: pd.DataFrame) -> Html:
    """Every ``layers.csv`` row, as the charts show it."""
    rows = layers.assign(order=layers["metric"].map({m: i for i, m in enumerate(metric_order(layers["metric"]))}))
    rows = rows.sort_values(["order", "layer"])
    cells = [
        [
            r["metric"],
            number(r["layer"]),
            number(r["mean"]),
            number(r["ci95_low"]),
            number(r["ci95_high"]),
            number(r["std"]),
            number(r["n_images"]),
        ]
        for _, r in rows.iterrows()
    ]
    headers = ["metric", "layer", "mean", "95% CI low", "95% CI high", "std", "images"]
    return table(headers, cells, numeric=range(1, 7))


def _range_text(metric: str) -> str:
    low, high = metric_range(metric)
    return f"[{number(low)}, {number(high)}]"


def _definitions(run: Run) -> Html:
    described = _get(run.summary, "metrics") or {}
    rows = []
    for metric in run.metrics:
        d = described.get(metric) if isinstance(described, Mapping) else None
        d = d if isinstance(d, Mapping) else {}
        rows.append(
            [
                Html(f"<code>{esc(metric)}</code>"),
                metric_label(metric),
                d.get("definition", ""),
                d.get("tokens", ""),
                d.get("layers", ""),
                _direction(metric),
                _range_text(metric),
                d.get("source", ""),
            ]
        )
    body = [table(["metric", "label", "definition", "tokens", "layers", "direction", "range", "source"], rows)]
    unavailable = {
        m: d["unavailable"]
        for m, d in (described.items() if isinstance(described, Mapping) else [])
        if isinstance(d, Mapping) and d.get("unavailable")
    }
    body += [note(f"{m} was not measured: {why}") for m, why in unavailable.items()]
    defs = run.definitions
    images = defs.get("images") or {}
    body.append(
        key_values(
            [
                ("metrics version", defs.get("metrics_version")),
                ("prefix tokens included", defs.get("include_prefix")),
                ("input size", " x ".join(map(str, defs["input_size"])) if defs.get("input_size") else None),
                ("patch tokens per layer", ", ".join(number(n) for n in defs.get("n_tokens") or []) or None),
                ("attention tap", defs.get("attention_tap")),
                ("image set", f"{images.get('count')} images, sha256 {images.get('sha256')}" if images else None),
                ("interval", _get(run.summary, "interval")),
            ]
        )
    )
    return Html("".join(body))


def _summary(run: Run) -> Html:
    s = run.summary or {}
    model, images, settings = _get(s, "model") or {}, _get(s, "images") or {}, _get(s, "run") or {}
    args = model.get("model_args")
    pairs = [
        ("model", model.get("name") or run.name),
        ("architecture", model.get("architecture")),
        ("family", model.get("family")),
        ("checkpoint", model.get("checkpoint")),
        ("checkpoint sha256", model.get("checkpoint_sha256")),
        ("model arguments", ", ".join(f"{k}={v}" for k, v in args.items()) if isinstance(args, Mapping) else None),
        ("images", images.get("source")),
        ("found / selected / measured", "/".join(number(images.get(k)) for k in ("found", "selected", "measured"))),
        ("skipped (unreadable)", images.get("skipped")),
        ("limit, seed", f"{number(images.get('limit'))}, {number(images.get('seed'))}" if images else None),
        ("device", settings.get("device")),
        ("dtype", settings.get("dtype")),
        ("metric arithmetic", settings.get("metric_dtype")),
        ("batch size, workers", f"{settings.get('batch_size')}, {settings.get('workers')}" if settings else None),
        ("attention tap", settings.get("attention_tap")),
        ("processes", settings.get("world_size")),
        ("time", f"{number(settings.get('seconds'), 4)} s" if settings.get("seconds") is not None else None),
        ("images per second", number(settings.get("images_per_second"), 4) if settings else None),
        ("versions", ", ".join(f"{k} {v}" for k, v in (_get(s, "versions") or {}).items()) or None),
        ("oversmooth", s.get("version")),
        ("written", s.get("created")),
        ("command", Html(f"<code>{esc(s['command'])}</code>") if s.get("command") else None),
    ]
    body = [key_values(pairs)]
    skipped = images.get("skipped_files") or []
    if skipped:
        rows = [[_get(f, "path") or f, _get(f, "reason") or ""] for f in skipped[:100]]
        more = f" (first 100 of {len(skipped)})" if len(skipped) > 100 else ""
        body.append(details(f"{len(skipped)} unreadable images, skipped{more}", table(["file", "reason"], rows)))
    info = _get(s, "layer_info")
    if isinstance(info, list) and info:
        rows = [
            [number(_get(i, "layer")), _get(i, "name"), number(_get(i, "stage")), number(_get(i, "n_tokens"))]
            for i in info
        ]
        body.append(details(f"{len(info)} layers", table(["layer", "module", "stage", "patch tokens"], rows)))
    return Html("".join(body))


def key_numbers(run: Run) -> list[KeyNumber]:
    """The header of a measure page: images, layers, metrics, last-layer token cosine, device and time."""
    s = run.summary or {}
    images = _get(s, "images") or {}
    out = [
        KeyNumber("images", number(run.n_images), f"of {number(images['found'])} found" if "found" in images else ""),
        KeyNumber("layers", number(run.n_layers), "blocks; layer 0 is the block input"),
        KeyNumber(
            "metrics", number(len(run.metrics)), ", ".join(run.metrics[:3]) + (" ..." if len(run.metrics) > 3 else "")
        ),
    ]
    cos = run.layers[run.layers["metric"] == "token_cosine"]
    if not cos.empty:
        last = cos.loc[cos["layer"].idxmax()]
        hint = f"layer {number(last['layer'])}, " + interval_text(last["ci95_low"], last["ci95_high"])
        out.append(KeyNumber("last-layer token cosine", number(last["mean"], 4), hint))
    settings = _get(s, "run") or {}
    if settings.get("device"):
        seconds = settings.get("seconds")
        out.append(KeyNumber("device", str(settings["device"]), f"{number(seconds, 3)} s" if seconds else ""))
    return out


def measure_sections(run: Run, prefix: str = "m") -> list[Section]:
    """The sections of a measure page (summary, curves, heads, patch maps, definitions, numbers); ``prefix`` keeps
    their ids unique when a page shows several runs."""
    sections = [
        Section(f"{prefix}-summary", "Summary", _summary(run), "The model, the images and how they were measured."),
        Section(
            f"{prefix}-curves",
            "Curves per layer",
            layer_charts({"mean over images": run.layers}),
            "Each metric's mean over images per layer, with its 95% interval (Student's t, clipped to the metric's "
            "range). Hover a layer for its values; dashed lines mark where a new stage starts.",
        ),
    ]
    heads = head_heatmaps(run.heads)
    if heads:
        sections.append(Section(f"{prefix}-heads", "Attention heads", heads, "Per-head means over images (heads.csv)."))
    maps = read_patch_maps(run.folder)
    if maps is not None:
        settings = _get(run.summary, "patch_maps")
        settings = settings if isinstance(settings, Mapping) else {}
        notes, attention = settings.get("notes"), settings.get("attention")
        told = [note(f"{k}: {v}") for k, v in notes.items()] if isinstance(notes, Mapping) else []
        told.append(
            key_values(
                [
                    ("sample images", settings.get("rule")),
                    ("attention maps of", ", ".join(map(str, attention)) if isinstance(attention, list) else None),
                ]
            )
        )
        sections.append(
            Section(
                f"{prefix}-patches",
                "Patch maps",
                Html("".join(told) + patch_maps_html([("", maps)], prefix)),
                "Sample images with each patch cell coloured by its value at the chosen layers (patches.csv); one "
                "colour scale per kind. Hover a cell for its layer, row, column and value.",
            )
        )
    sections += [
        Section(f"{prefix}-definitions", "Definitions", _definitions(run), "What each number means."),
        Section(f"{prefix}-numbers", "All numbers", details("layers.csv", layers_table(run.layers))),
    ]
    return sections


def measure_page(run: str | Path, title: str | None = None, folder_label: str | None = None) -> str:
    """The self-contained ``report.html`` of a measure run folder.

    Args:
        run: the run folder (``layers.csv``, ``heads.csv``, ``summary.json``; ``patches.csv`` / ``patches.npz``
            when present).
        title: the page title (default: ``oversmooth measure: <model>``).
        folder_label: how the page names the folder (default: ``run``); give the final path when ``run`` is the
            staging folder of :func:`~oversmooth_cli.io.staged_dir`.

    Raises:
        UserError: the folder's files break the run-file schema (:func:`~oversmooth_cli.gate.runs.load_run`).
    """
    loaded = load_run(run)
    created = _get(loaded.summary, "created")
    subtitle = (folder_label or str(loaded.folder)) + (f" · written {created}" if created else "")
    return document(
        title or f"oversmooth measure: {loaded.name}",
        measure_sections(loaded),
        subtitle=subtitle,
        numbers=key_numbers(loaded),
    )
