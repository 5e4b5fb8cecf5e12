"""``check``: gate a run's over-smoothing curves against a committed baseline, per metric and layer.

For every selected ``(metric, layer)`` the difference ``current - baseline`` of the per-layer means is compared
with a tolerance band::

    allowed = atol + rtol * |baseline| + sigma * sqrt(se_baseline^2 + se_current^2),  se = std / sqrt(n_images)

``direction`` decides which side of the band counts: ``both`` fails on ``|diff| > allowed``; ``up`` only when
over-smoothing got worse by more than ``allowed`` (a metric whose registry entry says ``higher_is_smoother`` rose,
or one that says the opposite fell); ``down`` only when it got better. The command line is a thin wrapper::

    from oversmooth_cli.check import Tolerance, check_runs, write_outputs
    result = check_runs("ci/baseline", "runs/new", Tolerance(atol=0.02))
    write_outputs(result, report="report.md", junit="junit.xml", plot="diff.png")
    raise SystemExit(0 if result.passed else 1)
"""

from __future__ import annotations

import functools
import math
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import UserError
from .metrics import ATTENTION_METRICS, TOKEN_METRICS
from .report import Run, atomic_write, atomic_write_all, load_run, metric_order, metric_panels, save_figure

__all__ = [
    "CHECK_COLUMNS",
    "DIRECTIONS",
    "CheckGate",
    "CheckResult",
    "Tolerance",
    "check_runs",
    "compare_checked",
    "format_layers",
    "make_baseline",
    "parse_layers",
    "plot_check",
    "validate_comparable",
    "write_junit",
    "write_markdown",
    "write_outputs",
]

DIRECTIONS: dict[str, tuple[int, ...]] = {"both": (1, -1), "up": (1,), "down": (-1,)}
"""Which changes of over-smoothing fail: +1 = more over-smoothing, -1 = less."""

CHECK_COLUMNS = [
    "metric",
    "layer",
    "baseline",
    "current",
    "diff",
    "allowed",
    "lower",
    "upper",
    "se_baseline",
    "se_current",
    "n_baseline",
    "n_current",
    "passed",
]
"""One row per checked ``(metric, layer)``; ``lower``/``upper`` bound the accepted current value (may be infinite)."""

BASELINE_FILES = ("layers.csv", "summary.json")


# -- layer selections ---------------------------------------------------------------------------------------------
def parse_layers(spec: str) -> list[int]:
    """``"0-5,12"`` -> ``[0, 1, 2, 3, 4, 5, 12]`` (sorted, without repeats).

    Raises:
        UserError: an empty item, a non-integer, a negative layer or a reversed range.
    """
    out: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(item), int(item))
        except ValueError:
            raise UserError(
                f"--layers {spec!r}: {item!r} is not a layer or a range; write e.g. 0-5,12 (non-negative integers)"
            ) from None
        if a < 0 or b < a:
            raise UserError(f"--layers {spec!r}: {item!r} is not a range from low to high; write e.g. 0-5,12")
        out.update(range(a, b + 1))
    return sorted(out)


def _layer_list(layers: Sequence[int] | str | None) -> list[int] | None:
    """A layer selection as a list: ``"0-5,12"`` parsed (see :func:`parse_layers`), ``None`` kept."""
    if layers is None:
        return None
    return parse_layers(layers) if isinstance(layers, str) else list(layers)


def format_layers(layers: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 5, 12]`` -> ``"0-3,5,12"`` (``"none"`` when empty)."""
    xs = sorted(set(int(x) for x in layers))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts) or "none"


# -- validation ---------------------------------------------------------------------------------------------------
def validate_comparable(
    baseline: Run, current: Run, metrics: Sequence[str] | None = None, layers: Sequence[int] | None = None
) -> tuple[list[str], list[str]]:
    """Refuse two runs that cannot be compared; return the metrics to check and notes for the report.

    Args:
        baseline, current: the two runs.
        metrics: metrics to check (default: every metric of the baseline, which the current run must all have;
            metrics only the current run has are listed in the notes as not checked).
        layers: restrict to these layers; each must exist in the runs for at least one selected metric.

    Returns:
        ``(metrics, notes)``: the metrics in registry order and human-readable notes (e.g. what was not compared).

    Raises:
        UserError: differing ``metrics_version``, metrics or layers, saying exactly what differs.
    """
    notes: list[str] = []
    vb, vc = baseline.metrics_version, current.metrics_version
    if vb is not None and vc is not None:
        if vb != vc:
            raise UserError(
                f"metrics_version differs: baseline {vb}, current {vc}; the metric definitions changed, so "
                "measure the baseline again with this version and commit it (`oversmooth baseline`)"
            )
    else:
        missing = [name for name, v in (("baseline", vb), ("current", vc)) if v is None]
        verb = "has" if len(missing) == 1 else "have"
        notes.append(
            f"metrics_version not compared: {' and '.join(missing)} {verb} no summary.json with metrics_version"
        )

    if metrics:
        selected = metric_order(metrics)
        for name, run in (("baseline", baseline), ("current", current)):
            absent = [m for m in selected if m not in run.metrics]
            if absent:
                raise UserError(
                    f"metric {', '.join(absent)} not in {name} {run.layers_csv} (it has {', '.join(run.metrics)})"
                )
    else:
        selected = baseline.metrics
        only_b = [m for m in baseline.metrics if m not in current.metrics]
        only_c = [m for m in current.metrics if m not in baseline.metrics]
        if only_b:
            what = "; ".join(
                f"only {side} has {', '.join(ms)}" for side, ms in (("baseline", only_b), ("current", only_c)) if ms
            )
            raise UserError(
                f"metrics differ: baseline has {', '.join(baseline.metrics)}, current has "
                f"{', '.join(current.metrics) or 'none'} ({what}); pass --metric NAME to check only common ones"
            )
        if only_c:
            notes.append(f"not checked: {', '.join(only_c)} (only in the current run, not in the baseline)")

    differ = [
        (m, baseline.layers_of(m), current.layers_of(m))
        for m in selected
        if baseline.layers_of(m) != current.layers_of(m)
    ]
    if differ:
        all_b = {x for m in selected for x in baseline.layers_of(m)}
        all_c = {x for m in selected for x in current.layers_of(m)}
        detail = (
            f"baseline has {format_layers(all_b)}, current has {format_layers(all_c)}"
            if all_b != all_c
            else "; ".join(
                f"{m}: baseline has {format_layers(b)}, current has {format_layers(c)}" for m, b, c in differ
            )
        )
        raise UserError(f"layers differ: {detail}; compare runs of models with the same depth")

    if layers is not None:
        have = {layer for m in selected for layer in baseline.layers_of(m)}
        absent = [x for x in layers if x not in have]
        if absent:
            raise UserError(
                f"--layers asks for {format_layers(absent)}, which the runs do not have "
                f"(they have {format_layers(have)})"
            )
    if baseline.n_images != current.n_images:
        notes.append(f"image counts differ: baseline measured {baseline.n_images}, current {current.n_images}")
    return selected, notes


# -- the comparison -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """The tolerance band: ``atol + rtol * |baseline| + sigma * sqrt(se_b^2 + se_c^2)`` on the side(s) ``direction``."""

    atol: float = 0.02
    rtol: float = 0.0
    sigma: float = 0.0
    direction: str = "both"

    def __post_init__(self) -> None:
        for name in ("atol", "rtol", "sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"--{name} must be a finite number >= 0, got {value}")
        if self.direction not in DIRECTIONS:
            raise UserError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")

    def describe(self) -> str:
        return f"atol {self.atol:g}, rtol {self.rtol:g}, sigma {self.sigma:g}, direction {self.direction}"


def smoothing_sign(metric: str, direction: str = "both") -> int:
    """+1 when a higher value of ``metric`` means more over-smoothing, -1 when lower does (from the registry).

    A metric outside the registry can only be checked with ``direction="both"`` (its sign is then irrelevant).
    """
    definition = TOKEN_METRICS.get(metric) or ATTENTION_METRICS.get(metric)
    if definition is not None:
        return 1 if definition.higher_is_smoother else -1
    if direction != "both":
        raise UserError(
            f"metric {metric} is not in this version's registry, so its smoothing direction is unknown; "
            "use --direction both or leave it out with --metric"
        )
    return 1


def _standard_error(std: pd.Series, n: pd.Series) -> pd.Series:
    se = std.astype(float) / np.sqrt(n.astype(float).where(n > 0))
    return se.fillna(0.0)


def compare_checked(
    baseline: Run,
    current: Run,
    tolerance: Tolerance,
    metrics: Sequence[str],
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The :data:`CHECK_COLUMNS` table for already validated runs (pure: no I/O)."""
    keep = ["metric", "layer", "mean", "std", "n_images"]
    b = baseline.layers[keep][baseline.layers["metric"].isin(metrics)]
    c = current.layers[keep][current.layers["metric"].isin(metrics)]
    df = b.merge(c, on=["metric", "layer"], suffixes=("_b", "_c"), validate="one_to_one")
    if layers is not None:
        df = df[df["layer"].isin(layers)]
    df = df.assign(order=df["metric"].map({m: i for i, m in enumerate(metrics)})).sort_values(["order", "layer"])

    out = pd.DataFrame({"metric": df["metric"], "layer": df["layer"].astype(int)})
    out["baseline"] = df["mean_b"].astype(float)
    out["current"] = df["mean_c"].astype(float)
    out["diff"] = out["current"] - out["baseline"]
    out["se_baseline"] = _standard_error(df["std_b"], df["n_images_b"])
    out["se_current"] = _standard_error(df["std_c"], df["n_images_c"])
    out["allowed"] = (
        tolerance.atol
        + tolerance.rtol * out["baseline"].abs()
        + tolerance.sigma * np.sqrt(out["se_baseline"] ** 2 + out["se_current"] ** 2)
    )
    # Signs of the value changes that fail: +1 = a rise, -1 = a fall, per metric.
    signs = {m: {smoothing_sign(m, tolerance.direction) * d for d in DIRECTIONS[tolerance.direction]} for m in metrics}
    checks_rise = out["metric"].map(lambda m: 1 in signs[m]).astype(bool)
    checks_fall = out["metric"].map(lambda m: -1 in signs[m]).astype(bool)
    out["upper"] = np.where(checks_rise, out["baseline"] + out["allowed"], np.inf)
    out["lower"] = np.where(checks_fall, out["baseline"] - out["allowed"], -np.inf)
    rise_ok = ~checks_rise | (out["diff"] <= out["allowed"])
    fall_ok = ~checks_fall | (-out["diff"] <= out["allowed"])
    both_undefined = out["baseline"].isna() & out["current"].isna()
    out["passed"] = (rise_ok & fall_ok & out["diff"].notna()) | both_undefined
    out["n_baseline"] = df["n_images_b"].astype(int)
    out["n_current"] = df["n_images_c"].astype(int)
    return out[CHECK_COLUMNS].reset_index(drop=True)


@dataclass
class CheckResult:
    """The outcome of a check: one row per ``(metric, layer)`` (:data:`CHECK_COLUMNS`) plus its inputs."""

    rows: pd.DataFrame
    baseline: Run
    current: Run
    tolerance: Tolerance
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> pd.DataFrame:
        return self.rows[~self.rows["passed"]]

    @property
    def passed(self) -> bool:
        return bool(self.rows["passed"].all())

    def failing_layers(self) -> dict[str, list[int]]:
        """``{metric: [layer, ...]}`` of the failing rows."""
        f = self.failures
        return {m: sorted(int(x) for x in f.loc[f["metric"] == m, "layer"]) for m in f["metric"].unique()}

    def headline(self) -> str:
        n, k = len(self.rows), len(self.failures)
        if k == 0:
            return f"PASSED: all {n} (metric, layer) pairs within tolerance"
        where = "; ".join(
            f"{m} layer{'s' if len(ls) > 1 else ''} {format_layers(ls)}" for m, ls in self.failing_layers().items()
        )
        return f"FAILED: {k} of {n} (metric, layer) pairs outside tolerance ({where})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (failures only)."""
        return {
            "passed": self.passed,
            "baseline": str(self.baseline.source),
            "current": str(self.current.source),
            "tolerance": {
                "atol": self.tolerance.atol,
                "rtol": self.tolerance.rtol,
                "sigma": self.tolerance.sigma,
                "direction": self.tolerance.direction,
            },
            "checked": len(self.rows),
            "failed": len(self.failures),
            "failures": self.failures.drop(columns=["passed"]).to_dict(orient="records"),
            "notes": list(self.notes),
        }


def check_runs(
    baseline: str | Path | Run,
    current: str | Path | Run,
    tolerance: Tolerance | None = None,
    metrics: Sequence[str] | None = None,
    layers: Sequence[int] | str | None = None,
) -> CheckResult:
    """Load, validate and compare two runs.

    Args:
        baseline: the committed baseline (run folder or ``layers.csv``), or a loaded :class:`Run`.
        current: the run to check, likewise.
        tolerance: the band (default: ``atol=0.02``, both directions).
        metrics: metrics to check (default: every metric of the baseline; the current run must have them all).
        layers: layers to check, a list or a ``"0-5,12"`` string (default: all).

    Returns:
        A :class:`CheckResult`; ``result.passed`` is the verdict.

    Raises:
        UserError: unusable input (missing files, mismatched metrics, layers or ``metrics_version``).
    """
    tolerance = tolerance or Tolerance()
    b = baseline if isinstance(baseline, Run) else load_run(baseline)
    c = current if isinstance(current, Run) else load_run(current)
    layer_list = _layer_list(layers)
    selected, notes = validate_comparable(b, c, metrics, layer_list)
    rows = compare_checked(b, c, tolerance, selected, layer_list)
    return CheckResult(rows, b, c, tolerance, notes)


@dataclass(frozen=True)
class CheckGate:
    """A check whose baseline and settings are validated before the (slow) current run exists.

    ``measure --baseline`` prepares the gate first, so a bad baseline fails before any image is measured::

        gate = CheckGate.prepare("ci/baseline", Tolerance(atol=0.02), layers="0-5")
        result, written = gate.run("runs/new", report="report.md")
    """

    baseline: Run
    tolerance: Tolerance
    metrics: list[str] | None = None
    layers: list[int] | None = None

    @classmethod
    def prepare(
        cls,
        baseline: str | Path | Run,
        tolerance: Tolerance,
        metrics: Sequence[str] | None = None,
        layers: Sequence[int] | str | None = None,
    ) -> CheckGate:
        """Load the baseline and parse the layer selection (``"0-5,12"`` or a list).

        Raises:
            UserError: an unusable baseline or layer selection.
        """
        run = baseline if isinstance(baseline, Run) else load_run(baseline)
        return cls(run, tolerance, list(metrics) if metrics else None, _layer_list(layers))

    def run(
        self,
        current: str | Path | Run,
        report: str | Path | None = None,
        junit: str | Path | None = None,
        plot: str | Path | None = None,
    ) -> tuple[CheckResult, list[Path]]:
        """Check ``current`` and write the requested files; returns the result and the paths written."""
        result = check_runs(self.baseline, current, self.tolerance, self.metrics, self.layers)
        return result, write_outputs(result, report=report, junit=junit, plot=plot)


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


def markdown_report(result: CheckResult) -> str:
    """A Markdown summary for a pull-request comment: verdict, failing rows, settings, every row folded away."""
    icon = "✅" if result.passed else "❌"
    lines = [
        f"## {icon} oversmooth check: {result.headline()}",
        "",
        f"- baseline: {_describe_run(result.baseline)}",
        f"- current: {_describe_run(result.current)}",
        f"- tolerance: {result.tolerance.describe()} "
        "(allowed = atol + rtol·|baseline| + sigma·√(se_b² + se_c²), se = std/√n_images)",
        "",
    ]
    if not result.passed:
        lines += ["### Failing layers", "", *_md_table(result.failures), ""]
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
            ("tolerance", result.tolerance.describe()),
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
                failure.text = f"{text}\n{result.tolerance.describe()}"
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_junit(result: CheckResult, path: str | Path) -> Path:
    """Write :func:`junit_tree` atomically."""
    tree = junit_tree(result)
    return atomic_write(Path(path), lambda p: tree.write(p, encoding="utf-8", xml_declaration=True))


def plot_check(result: CheckResult):
    """One panel per metric: baseline and current curves, the accepted band shaded, failing layers marked."""
    metrics = list(dict.fromkeys(result.rows["metric"]))
    fig, axes = metric_panels(metrics)
    for ax, metric in zip(axes, metrics, strict=True):
        d = result.rows[result.rows["metric"] == metric].sort_values("layer")
        x = d["layer"].to_numpy()
        ax.plot(x, d["baseline"], marker="o", ms=3.5, lw=1.6, color="C0", label="baseline")
        ax.plot(x, d["current"], marker="s", ms=3.5, lw=1.6, color="C1", label="current")
        finite = np.concatenate([d[c].to_numpy(float) for c in ("baseline", "current", "lower", "upper")])
        finite = finite[np.isfinite(finite)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi), 1e-3) * 0.1
        ax.set_ylim(lo - pad, hi + pad)
        lower = np.clip(d["lower"].to_numpy(float), lo - pad, hi + pad)
        upper = np.clip(d["upper"].to_numpy(float), lo - pad, hi + pad)
        ax.fill_between(x, lower, upper, color="C0", alpha=0.18, lw=0, label="accepted band")
        bad = d[~d["passed"]]
        if len(bad):
            ax.scatter(bad["layer"], bad["current"], s=90, marker="x", color="red", lw=2.2, zorder=5, label="failing")
            for _, r in bad.iterrows():
                ax.annotate(
                    str(r["layer"]),
                    (r["layer"], r["current"]),
                    textcoords="offset points",
                    xytext=(5, 5),
                    fontsize=8,
                    color="red",
                )
        ax.legend(fontsize=8, loc="best")
    verdict = "passed" if result.passed else f"{len(result.failures)} of {len(result.rows)} failing"
    fig.suptitle(f"oversmooth check: {verdict} ({result.tolerance.describe()})", fontsize=10)
    return fig


def write_outputs(
    result: CheckResult,
    report: str | Path | None = None,
    junit: str | Path | None = None,
    plot: str | Path | None = None,
) -> list[Path]:
    """Write the requested Markdown report, JUnit XML and diff plot; return the paths written."""
    written = []
    if report is not None:
        written.append(write_markdown(result, report))
    if junit is not None:
        written.append(write_junit(result, junit))
    if plot is not None:
        written.append(save_figure(plot_check(result), Path(plot)))
    return written


# -- baselines ----------------------------------------------------------------------------------------------------
def make_baseline(run: str | Path, dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy ``layers.csv`` and ``summary.json`` of ``run`` into ``dest`` (a small folder meant to be committed).

    Both files are staged in ``dest`` first and then renamed into place, so an interrupted copy leaves the
    previous baseline intact. Other files in ``dest`` are kept.

    Raises:
        UserError: ``run`` is not a complete run, ``dest`` is a file, or it holds a baseline and not ``overwrite``.
    """
    src = load_run(run)
    if src.summary is None:
        raise UserError(f"{src.folder} has no summary.json beside layers.csv; a baseline needs both (run `measure`)")
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise UserError(f"baseline destination {dest} is a file; give a folder")
    targets = [dest / name for name in BASELINE_FILES]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise UserError(f"{dest} already holds a baseline ({existing[0].name}); pass --overwrite to update it")
    sources = [src.layers_csv, src.folder / "summary.json"]
    if any(s.resolve() == t.resolve() for s, t in zip(sources, targets, strict=True) if t.exists()):
        raise UserError(f"{run} and {dest} are the same folder; give another destination")
    return atomic_write_all({t: functools.partial(shutil.copyfile, s) for s, t in zip(sources, targets, strict=True)})
