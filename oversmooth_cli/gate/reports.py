"""The gate's reports: Markdown (for a pull-request comment) and JUnit XML."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..io import atomic_write
from ..plots import plot_check, save_figure
from .runs import Run

if TYPE_CHECKING:
    from .check import CheckResult

__all__ = ["write_junit", "write_markdown", "write_outputs"]


# -- outputs ------------------------------------------------------------------------------------------------------
def fmt(x: float, signed: bool = False) -> str:
    """Four significant digits; ``nan`` and infinities spelled out."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def band_text(row: pd.Series | dict) -> str:
    """The accepted difference: ``±a`` (both sides), ``≤ +a`` (only rises capped) or ``≥ -a`` (only falls capped)."""
    a = fmt(float(row["allowed"]))
    rise, fall = math.isfinite(row["upper"]), math.isfinite(row["lower"])
    if rise and fall:
        return f"±{a}"
    return f"≤ +{a}" if rise else f"≥ -{a}"


def _describe_run(run: Run) -> str:
    return f"`{run.source}` ({run.name}, {run.n_images} images)"


def _md_table(rows: pd.DataFrame) -> list[str]:
    lines = ["| metric | layer | baseline | current | difference | allowed | result |", "|---|--:|--:|--:|--:|--:|---|"]
    for _, r in rows.iterrows():
        lines.append(
            f"| {r['metric']} | {r['layer']} | {fmt(r['baseline'])} | {fmt(r['current'])} | "
            f"{fmt(r['diff'], signed=True)} | {band_text(r)} | {'ok' if r['passed'] else '**FAIL**'} |"
        )
    return lines


def _md_tolerances(result: CheckResult) -> list[str]:
    lines = ["| metric | atol | rtol | set by |", "|---|--:|--:|---|"]
    for t in result.tolerances():
        origin = t["atol_from"] if t["atol_from"] == t["rtol_from"] else f"{t['atol_from']}, {t['rtol_from']}"
        lines.append(f"| {t['metric']} | {t['atol']:g} | {t['rtol']:g} | {origin} |")
    return lines


def markdown_report(result: CheckResult) -> str:
    """A Markdown summary for a pull-request comment: verdict, failing rows, tolerances, every row folded away."""
    icon = "✅" if result.passed else "❌"
    t = result.tolerance
    lines = [
        f"## {icon} oversmooth check: {result.headline()}",
        "",
        f"- baseline: {_describe_run(result.baseline)}",
        f"- current: {_describe_run(result.current)}",
        f"- tolerance: per metric below, sigma {t.sigma:g}, direction {t.direction} "
        "(allowed = atol + rtol·|baseline| + sigma·√(se_b² + se_c²), se = std/√n_images)",
        "",
    ]
    if not result.passed:
        lines += ["### Failing layers", "", *_md_table(result.failures), ""]
    lines += ["### Tolerances", "", *_md_tolerances(result), ""]
    lines += [
        f"<details><summary>All {len(result.rows)} checked (metric, layer) pairs</summary>",
        "",
        *_md_table(result.rows),
        "",
        "</details>",
        "",
    ]
    if result.notes:
        lines += ["### Notes", "", *[f"- {n}" for n in result.notes], ""]
    return "\n".join(lines)


def write_markdown(result: CheckResult, path: str | Path) -> Path:
    """Write :func:`markdown_report` atomically."""
    text = markdown_report(result)
    return atomic_write(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def junit_tree(result: CheckResult) -> ET.ElementTree:
    """JUnit XML: one ``<testsuite>`` per metric, one ``<testcase name="layer N">`` per layer; failures say why."""
    root = ET.Element(
        "testsuites",
        name="oversmooth check",
        tests=str(len(result.rows)),
        failures=str(len(result.failures)),
        errors="0",
    )
    for metric in dict.fromkeys(result.rows["metric"]):
        rows = result.rows[result.rows["metric"] == metric]
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"oversmooth check {metric}",
            tests=str(len(rows)),
            failures=str(int((~rows["passed"]).sum())),
            errors="0",
            skipped="0",
            time="0",
        )
        props = ET.SubElement(suite, "properties")
        for key, value in (
            ("baseline", str(result.baseline.source)),
            ("current", str(result.current.source)),
            ("tolerance", result.describe_tolerance()),
        ):
            ET.SubElement(props, "property", name=key, value=value)
        for _, r in rows.iterrows():
            case = ET.SubElement(
                suite, "testcase", classname=f"oversmooth.{metric}", name=f"layer {r['layer']}", time="0"
            )
            text = (
                f"{metric} layer {r['layer']}: baseline {fmt(r['baseline'])}, current {fmt(r['current'])}, "
                f"difference {fmt(r['diff'], signed=True)}, allowed {band_text(r)}"
            )
            if r["passed"]:
                ET.SubElement(case, "system-out").text = text
            else:
                failure = ET.SubElement(case, "failure", message=text, type="OversmoothingRegression")
                failure.text = f"{text}\n{result.tolerance.describe([metric])}"
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_junit(result: CheckResult, path: str | Path) -> Path:
    """Write :func:`junit_tree` atomically."""
    tree = junit_tree(result)
    return atomic_write(Path(path), lambda p: tree.write(p, encoding="utf-8", xml_declaration=True))


def write_outputs(
    result: CheckResult,
    report: str | Path | None = None,
    junit: str | Path | None = None,
    plot: str | Path | None = None,
    html: str | Path | None = None,
) -> list[Path]:
    """Write the requested Markdown report, JUnit XML, diff plot and self-contained HTML page
    (:func:`~oversmooth_cli.pages.gate.check_page`); return the paths written."""
    from ..pages.document import write_page
    from ..pages.gate import check_page

    written = []
    if report is not None:
        written.append(write_markdown(result, report))
    if junit is not None:
        written.append(write_junit(result, junit))
    if plot is not None:
        written.append(save_figure(plot_check(result), Path(plot)))
    if html is not None:
        written.append(write_page(check_page(result), html))
    return written
