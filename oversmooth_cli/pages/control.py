"""``finetune --control``: the side-by-side of a run and its ``--loss none`` twin, from ``side_by_side.json``,
``control/after/`` and both ``history.csv``: the verdict, the arms table (val top-1 with its Wilson interval,
last-layer token cosine with its interval), McNemar's numbers, the curves per layer and per epoch of both arms."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..gate.runs import Run, load_run
from .document import note, table
from .history import ARM_COLORS, history_charts, read_csv
from .measure import layer_charts
from .svg import Html, esc, number

__all__ = ["arms_table", "control_body"]


def arms_table(report: Mapping[str, Any]) -> Html:
    """The arms of a ``side_by_side.json`` (before, control, treated): val top-1 with its Wilson interval, last-layer
    token cosine with its interval, images."""
    rows = []
    for r in report.get("rows") or []:
        rows.append(
            [
                r.get("arm", ""),
                number(r.get("val_top1"), 4),
                f"{number(r.get('val_top1_ci95_low'), 4)} to {number(r.get('val_top1_ci95_high'), 4)}",
                number(r.get("token_cosine")),
                f"{number(r.get('token_cosine_ci95_low'))} to {number(r.get('token_cosine_ci95_high'))}",
                number(r.get("n_images")),
            ]
        )
    headers = ["arm", "val top-1 (%)", "95% Wilson interval", "last-layer token cosine", "95% interval", "images"]
    return table(headers, rows, numeric=(1, 2, 3, 4, 5), row_attrs=[{"data-arm": str(r[0])} for r in rows])


def control_body(out: Path, report: Mapping[str, Any], before: Run | None, after: Run | None) -> Html:
    """The ``--control`` section: the verdict, the arms, McNemar's numbers, the before / control / treated curves
    per layer and both arms' training curves."""
    verdict = str(report.get("verdict", ""))
    parts = [note(verdict) if verdict else Html("")]
    parts.append(arms_table(report))
    if "p_value" in report:
        parts.append(
            Html(
                f'<p class="intro">{esc(report.get("test", "McNemar exact test"))}: '
                f"{esc(number(report.get('treated_only_right')))} images right only with the losses, "
                f"{esc(number(report.get('control_only_right')))} only without; "
                f"p = {esc(number(report['p_value'], 3))} "
                f"(alpha {esc(number(report.get('alpha')))}).</p>"
            )
        )
    twin = out / "control"
    tables = {}
    if before is not None:
        tables["before"] = before.layers
    if (twin / "after" / "layers.csv").is_file():
        tables["control"] = load_run(twin / "after").layers
    if after is not None:
        tables["treated"] = after.layers
    if tables:
        parts += [Html("<h3>Curves per layer: before, control, treated</h3>"), layer_charts(tables, colors=ARM_COLORS)]
    histories = {
        arm: h
        for arm, h in (("control", read_csv(twin / "history.csv")), ("treated", read_csv(out / "history.csv")))
        if h is not None
    }
    if histories:
        parts += [Html("<h3>Training per epoch: control and treated</h3>"), history_charts(histories)]
    return Html("".join(parts))
