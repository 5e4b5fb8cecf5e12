"""The report of a ``check`` (``check --html FILE``): the verdict, the baseline and current curves with the accepted
band and the failing layers marked, the per-(metric, layer) table with failing rows highlighted, the tolerances,
both runs, the notes.

It is built from the :class:`~oversmooth_cli.gate.check.CheckResult` the check returns (its rows, both runs as read
back from their folders, the tolerance and the notes), so the page shows exactly what the verdict was computed from.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd

from ..gate.runs import Run
from ..metrics.registry import metric_label
from .document import KeyNumber, Section, document, grid, key_values, note, table
from .measure import LAYER_AXIS, stage_boundaries
from .svg import PALETTE, Html, Series, esc, line_chart, number

if TYPE_CHECKING:
    from ..gate.check import CheckResult

__all__ = ["band_text", "check_charts", "check_page", "check_table", "check_tip", "signed"]


def signed(x: object) -> str:
    """A difference with its sign (``+0.0123``), as the page writes it."""
    text = number(x)
    return text if text.startswith(("-", "–", "∞")) or text == "0" else f"+{text}"


def band_text(row: pd.Series) -> str:
    """The accepted difference: ``±a`` (both sides), ``≤ +a`` (only rises fail) or ``≥ -a`` (only falls fail)."""
    allowed = number(row["allowed"])
    rise, fall = math.isfinite(float(row["upper"])), math.isfinite(float(row["lower"]))
    if rise and fall:
        return f"±{allowed}"
    return f"≤ +{allowed}" if rise else f"≥ -{allowed}"


def check_tip(row: pd.Series) -> str:
    """The hover text of one checked layer: both values, the difference, the band and the result."""
    return "\n".join(
        [
            f"layer {number(row['layer'])}: {'ok' if row['passed'] else 'FAIL'}",
            f"baseline {number(row['baseline'])} ({number(row['n_baseline'])} images)",
            f"current {number(row['current'])} ({number(row['n_current'])} images)",
            f"difference {signed(row['diff'])}, allowed {band_text(row)}",
            f"accepted current {number(row['lower'])} to {number(row['upper'])}",
        ]
    )


def check_charts(result: CheckResult) -> Html:
    """One chart per checked metric (``div.metric-chart`` with ``data-metric``): baseline and current curves, the
    accepted band around the baseline, failing layers marked with a red cross (``path.mark`` with ``data-x``)."""
    t = result.tolerance
    charts = []
    for i, metric in enumerate(result.metrics):
        d = result.rows[result.rows["metric"] == metric].sort_values("layer")
        x = d["layer"].astype(float).tolist()
        band = f"accepted band (atol {t.atol_for(metric):g}, rtol {t.rtol_for(metric):g}, sigma {t.sigma:g})"
        series = [
            Series(band, x, None, d["lower"].astype(float).tolist(), d["upper"].astype(float).tolist(), PALETTE[0]),
            Series("baseline", x, d["baseline"].astype(float).tolist(), color=PALETTE[0], dashed=True),
            Series("current", x, d["current"].astype(float).tolist(), color=PALETTE[3]),
        ]
        bad = d[~d["passed"].astype(bool)]
        label = metric_label(metric)
        chart = line_chart(
            series,
            title=f"({chr(ord('a') + i % 26)}) {label}",
            x_label=LAYER_AXIS,
            y_label=label,
            tips={float(r["layer"]): check_tip(r) for _, r in d.iterrows()},
            marks=[(float(r["layer"]), float(r["current"])) for _, r in bad.iterrows()],
            marks_label="failing layer",
            vlines=stage_boundaries(result.current.layers[result.current.layers["metric"] == metric]),
        )
        charts.append(f'<div class="metric-chart" data-metric="{esc(metric)}">{chart}</div>')
    return grid(charts)


def check_table(rows: pd.DataFrame) -> Html:
    """The per-(metric, layer) table; failing rows have class ``fail`` (every row ``data-metric``, ``data-layer``)."""
    cells, classes, attrs = [], [], []
    for _, r in rows.iterrows():
        passed = bool(r["passed"])
        cells.append(
            [
                r["metric"],
                number(r["layer"]),
                number(r["baseline"]),
                number(r["current"]),
                signed(r["diff"]),
                band_text(r),
                f"{number(r['lower'])} to {number(r['upper'])}",
                "ok" if passed else "FAIL",
            ]
        )
        classes.append("" if passed else "fail")
        attrs.append({"data-metric": str(r["metric"]), "data-layer": number(r["layer"])})
    headers = ["metric", "layer", "baseline", "current", "difference", "allowed", "accepted current", "result"]
    return table(headers, cells, numeric=range(1, 7), row_classes=classes, row_attrs=attrs, cell_classes={7: "result"})


def _run_pairs(label: str, run: Run) -> list[tuple[str, object]]:
    s = run.summary or {}
    images = run.definitions.get("images") or {}
    return [
        (f"{label}", Html(f"<code>{esc(run.source)}</code>")),
        ("model", run.name),
        ("images", number(run.n_images)),
        ("image set", f"sha256 {images['sha256']}" if images.get("sha256") else None),
        ("metrics version", run.metrics_version),
        ("written", s.get("created")),
        ("oversmooth", s.get("version")),
    ]


def _verdict(result: CheckResult) -> Html:
    parts = [note(result.headline(), "pass" if result.passed else "fail")]
    if not result.passed:
        items = "".join(
            f"<li><code>{esc(m)}</code>: layer{'s' if len(ls) > 1 else ''} {esc(', '.join(map(str, ls)))}</li>"
            for m, ls in result.failing_layers().items()
        )
        parts += [Html(f"<p>Failing layers:</p><ul>{items}</ul>"), check_table(result.failures)]
    return Html("".join(parts))


def _tolerances(result: CheckResult) -> Html:
    t = result.tolerance
    rows = [
        [
            Html(f"<code>{esc(x['metric'])}</code>"),
            f"{x['atol']:g}",
            f"{x['rtol']:g}",
            x["atol_from"] if x["atol_from"] == x["rtol_from"] else f"{x['atol_from']}, {x['rtol_from']}",
        ]
        for x in result.tolerances()
    ]
    formula = (
        "allowed = atol + rtol · |baseline| + t_sigma · √(se_baseline² + se_current²), se = std / √images; "
        f"sigma {t.sigma:g} (as a Student-t multiplier at the Welch degrees of freedom), direction {t.direction} "
        "(both: either side fails; up: only a change toward more over-smoothing; down: only toward less)."
    )
    return Html(
        f'<p class="intro">{esc(formula)}</p>' + table(["metric", "atol", "rtol", "set by"], rows, numeric=(1, 2))
    )


def check_page(result: CheckResult, title: str | None = None) -> str:
    """The self-contained HTML report of a check (``check --html FILE``).

    Args:
        result: what :func:`~oversmooth_cli.gate.check.check_runs` (or :meth:`CheckGate.run
            <oversmooth_cli.gate.check.CheckGate.run>`) returned.
        title: the page title (default: ``oversmooth check: <current model>``).
    """
    n, k = len(result.rows), len(result.failures)
    t = result.tolerance
    numbers = [
        KeyNumber("verdict", "passed" if result.passed else "failed", f"{k} of {n} pairs outside the band"),
        KeyNumber("checked", number(n), f"(metric, layer) pairs, {len(result.metrics)} metrics"),
        KeyNumber("baseline images", number(result.baseline.n_images), result.baseline.name),
        KeyNumber("current images", number(result.current.n_images), result.current.name),
        KeyNumber("tolerance", f"sigma {t.sigma:g}", f"direction {t.direction}"),
    ]
    sections = [
        Section("verdict", "Verdict", _verdict(result)),
        Section(
            "curves",
            "Baseline and current",
            check_charts(result),
            "The baseline (dashed) and the current run per layer, the accepted band around the baseline shaded "
            "(a side that cannot fail reaches the frame); failing layers are marked with a red cross. Hover a layer "
            "for its numbers.",
        ),
        Section("table", "Every checked layer", check_table(result.rows), "Failing rows are highlighted."),
        Section("tolerances", "Tolerances", _tolerances(result)),
        Section(
            "runs",
            "Runs",
            grid(
                [key_values(_run_pairs("baseline", result.baseline)), key_values(_run_pairs("current", result.current))]
            ),
        ),
    ]
    if result.notes:
        sections.append(Section("notes", "Notes", Html("".join(note(x) for x in result.notes))))
    return document(
        title or f"oversmooth check: {result.current.name}",
        sections,
        subtitle=f"{result.current.source} against {result.baseline.source}",
        numbers=numbers,
        status=("pass", "PASSED") if result.passed else ("fail", "FAILED"),
    )
