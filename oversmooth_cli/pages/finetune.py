"""The report of a ``finetune`` run folder (``report.html``): the run's options, the training curves per epoch
(``history.csv``), the monitor's layer x step heatmap (``monitor.csv``), the before / after curves (``before/`` and
``after/``, their patch maps when present) and, for ``--control``, the side-by-side verdict with the control arm's
curves (:mod:`.control`). A ``--control --seeds`` folder (``seeds.json``) gets the pooled page (:mod:`.seeds`).

Every part is read from the folder and left out when its files are absent (an interrupted run has no ``after/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..gate.runs import Run, load_run
from ..metrics.registry import metric_order
from .control import control_body
from .document import KeyNumber, Section, details, document, table, write_page
from .history import (
    ARM_COLORS,
    has_values,
    history_charts,
    history_table,
    monitor_heatmaps,
    read_csv,
    read_json,
    run_options,
)
from .measure import layer_charts
from .patches import patch_maps_html, read_patch_maps
from .seeds import is_seeds_run, seeds_sections
from .svg import Html, esc, number

__all__ = ["finetune_page", "finetune_sections"]


def _last_layer_changes(before: Run, after: Run) -> Html:
    rows = []
    for metric in metric_order(set(before.metrics) | set(after.metrics)):
        b = before.layers[before.layers["metric"] == metric]
        a = after.layers[after.layers["metric"] == metric]
        if b.empty or a.empty:
            continue
        bl, al = b.loc[b["layer"].idxmax()], a.loc[a["layer"].idxmax()]
        diff = float(al["mean"]) - float(bl["mean"])
        rows.append(
            [
                Html(f"<code>{esc(metric)}</code>"),
                number(al["layer"]),
                number(bl["mean"]),
                number(al["mean"]),
                f"{'+' if diff > 0 else ''}{number(diff)}",
            ]
        )
    return table(["metric", "last layer", "before", "after", "change"], rows, numeric=(1, 2, 3, 4))


def _numbers(
    history: pd.DataFrame | None, config: Mapping[str, Any] | None, report: Mapping[str, Any] | None
) -> list[KeyNumber]:
    out = []
    cfg = ((config or {}).get("finetune") or {}).get("config") or {}
    if cfg:
        losses = ", ".join(cfg.get("losses") or []) or "none"
        out.append(KeyNumber("loss terms", losses, f"{cfg.get('epochs')} epochs"))
    if history is not None and len(history):
        first, last = history.iloc[0], history.iloc[-1]
        span = f"epoch {number(first['epoch'])} → {number(last['epoch'])}"
        if has_values(history, "val_top1"):
            value = f"{number(first['val_top1'], 4)} → {number(last['val_top1'], 4)}"
            out.append(KeyNumber("val top-1 (%)", value, span))
        if has_values(history, "val_token_cosine"):
            value = f"{number(first['val_token_cosine'], 3)} → {number(last['val_token_cosine'], 3)}"
            out.append(KeyNumber("last-layer token cosine", value, f"validation, {span}"))
    arms = {r.get("arm"): r for r in (report or {}).get("rows") or [] if isinstance(r, Mapping)}
    if report and "treated" in arms and "control" in arms:
        diff = float(arms["treated"]["token_cosine"]) - float(arms["control"]["token_cosine"])
        hint = f"McNemar p = {number(report.get('p_value'), 3)} on val top-1"
        out.append(KeyNumber("cosine vs --loss none", f"{diff:+.3f}", hint))
    return out


def finetune_sections(run: str | Path, prefix: str = "f") -> tuple[list[Section], list[KeyNumber]]:
    """The sections and header numbers of one finetune run folder (not a ``--seeds`` folder); ``prefix`` keeps the
    ids unique.

    Raises:
        UserError: a ``before/``, ``after/`` or ``control/after/`` folder breaks the run-file schema.
    """
    run = Path(run)
    config = read_json(run / "config.json")
    history = read_csv(run / "history.csv")
    before = load_run(run / "before") if (run / "before" / "layers.csv").is_file() else None
    after = load_run(run / "after") if (run / "after" / "layers.csv").is_file() else None
    report = read_json(run / "side_by_side.json")
    options = run_options((config or {}).get("finetune") or {}, config)
    sections = [Section(f"{prefix}-run", "Run", options, "The model, the data and the options.")]
    if history is not None and "epoch" in history.columns:
        body = history_charts({"run": history}) + details("history.csv", history_table(history))
        intro = "Per epoch (epoch 0: the validation before the first step); hover an epoch for its values."
        sections.append(Section(f"{prefix}-training", "Training", Html(body), intro))
    monitor = read_csv(run / "monitor.csv")
    if monitor is not None and not monitor.empty:
        intro = "The monitor's fixed probe of validation images, measured every N optimizer steps (monitor.csv)."
        sections.append(Section(f"{prefix}-monitor", "Monitor", monitor_heatmaps(monitor), intro))
    measured = {label: r for label, r in (("before", before), ("after", after)) if r is not None}
    if measured:
        body = layer_charts({k: r.layers for k, r in measured.items()}, colors=ARM_COLORS)
        if before is not None and after is not None:
            body = Html(body + "<h3>Last layer</h3>" + _last_layer_changes(before, after))
        intro = "The measure runs on the validation images before training and with the final weights (95% bands)."
        sections.append(Section(f"{prefix}-layers", "Before and after", body, intro))
    maps = [(label, m) for label, r in measured.items() if (m := read_patch_maps(r.folder)) is not None]
    if maps:
        intro = "Before and after on one colour scale per kind; hover a cell for its layer, row, column and value."
        sections.append(Section(f"{prefix}-patches", "Patch maps", patch_maps_html(maps, prefix), intro))
    if report is not None:
        intro = "The same run without the loss terms (same seed, samples, augmentations and CutMix draws)."
        body = control_body(run, report, before, after)
        sections.append(Section(f"{prefix}-control", "Control: the --loss none twin", body, intro))
    return sections, _numbers(history, config, report)


def finetune_page(run: str | Path, title: str | None = None) -> str:
    """The self-contained ``report.html`` of a finetune run folder: with ``--control`` the side-by-side too; a
    ``--control --seeds`` folder gets the pooled verdict and the per-seed table (:func:`~.seeds.seeds_sections`).

    Args:
        run: the run folder ``finetune`` wrote (its ``--out``).
        title: the page title (default: ``oversmooth finetune: <model>``).

    Raises:
        UserError: a ``before/``, ``after/`` or ``control/after/`` folder breaks the run-file schema.
    """
    folder = Path(run)
    if is_seeds_run(folder):
        sections, numbers = seeds_sections(folder)
        model = ((read_json(folder / "seeds.json") or {}).get("run") or {}).get("model")
        kind = "finetune --control --seeds"
    else:
        sections, numbers = finetune_sections(folder)
        config = read_json(folder / "config.json") or {}
        model = (config.get("finetune") or {}).get("model") or config.get("architecture")
        kind = "finetune --control" if (folder / "side_by_side.json").is_file() else "finetune"
    return document(
        title or f"oversmooth {kind}: {model or folder.resolve().name}",
        sections,
        subtitle=str(folder),
        numbers=numbers,
    )


def write_finetune_page(run: str | Path) -> Path:
    """Write ``report.html`` (:func:`finetune_page`) into the finetune run folder ``run``, atomically."""
    return write_page(finetune_page(run), Path(run) / "report.html")
