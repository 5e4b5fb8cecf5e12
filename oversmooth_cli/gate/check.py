"""``check``: gate a run's over-smoothing curves against a committed baseline, per metric and layer.

For every selected ``(metric, layer)`` the difference ``current - baseline`` of the per-layer means is compared
with a tolerance band::

    allowed = atol + rtol * |baseline| + t_sigma * sqrt(se_baseline^2 + se_current^2),  se = std / sqrt(n_images)

``sigma`` counts standard errors of the difference, and at small image counts a normal band of ``sigma`` standard
errors covers less than it claims. So ``t_sigma`` is the Student-t multiplier with the same coverage as ``± sigma``
under the normal distribution (:func:`~oversmooth_cli.metrics.intervals.t_multiplier`), at the Welch-Satterthwaite
degrees of freedom of the two means, ``(se_b^2 + se_c^2)^2 / (se_b^4 / (n_b - 1) + se_c^4 / (n_c - 1))``: with 4
images on each side and equal spread (6 degrees of freedom) ``sigma 2`` widens to 2.52 standard errors; with many
images ``t_sigma`` is ``sigma``. A side measured on one image has no standard error (no spread to estimate): it adds
nothing to the band, and the check's notes say so when ``sigma`` is set.

``atol`` and ``rtol`` are per metric: the registry holds a default for each (:attr:`MetricDef.atol
<oversmooth_cli.metrics.registry.MetricDef>`, set from the metric's scale), ``Tolerance(atol=...)`` sets one value for
every
metric and ``Tolerance(metric_atol={...})`` overrides single metrics. ``direction`` decides which side of the band
counts: ``both`` fails on ``|diff| > allowed``; ``up`` only when over-smoothing got worse by more than ``allowed``
(a metric whose registry entry says ``higher_is_smoother`` rose, or one that says the opposite fell); ``down`` only
when it got better.

Two runs are compared only when their recorded definitions agree (:func:`validate_definitions`: metrics_version,
each metric's definition, ``--include-prefix``, input size and token grid, the image set); ``check``, ``compare``
and ``measure --baseline`` all go through it. The command line is a thin wrapper::

    from oversmooth_cli.gate.reports import Tolerance, check_runs, write_outputs
    result = check_runs("ci/baseline", "runs/new", Tolerance(metric_atol={"token_cosine": 0.02}))
    write_outputs(result, report="report.md", junit="junit.xml", plot="diff.png", html="check.html")
    raise SystemExit(0 if result.passed else 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..metrics.intervals import t_multiplier
from .comparable import validate_comparable
from .reports import write_outputs
from .runs import Run, load_run
from .selection import DIRECTIONS, _layer_list, format_layers
from .tolerances import Tolerance, smoothing_sign

__all__ = ["CHECK_COLUMNS", "CheckGate", "CheckResult", "check_runs", "compare_checked", "sigma_multipliers"]


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


def _standard_error(std: pd.Series, n: pd.Series) -> pd.Series:
    se = std.astype(float) / np.sqrt(n.astype(float).where(n > 1))
    return se.fillna(0.0)


def _welch_df(se_b: float, se_c: float, n_b: float, n_c: float) -> float:
    """Welch-Satterthwaite degrees of freedom of a difference of two means (sides without a standard error left
    out); ``inf`` when neither side has one (the sigma term is then 0 whatever the multiplier)."""
    parts = [(se**2, n - 1.0) for se, n in ((se_b, n_b), (se_c, n_c)) if n > 1 and se > 0]
    if not parts:
        return math.inf
    return sum(v for v, _ in parts) ** 2 / sum(v**2 / df for v, df in parts)


def sigma_multipliers(sigma: float, rows: pd.DataFrame) -> pd.Series:
    """``t_sigma`` per row of a check table (columns ``se_baseline``, ``se_current``, ``n_baseline``,
    ``n_current``): the Student-t multiplier with the normal coverage of ``± sigma`` (see the module docstring)."""
    cols = ("se_baseline", "se_current", "n_baseline", "n_current")
    return pd.Series(
        [t_multiplier(sigma, _welch_df(*(float(r[c]) for c in cols))) for _, r in rows.iterrows()],
        index=rows.index,
        dtype=float,
    )


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
    out["n_baseline"] = df["n_images_b"].astype(int)
    out["n_current"] = df["n_images_c"].astype(int)
    per_metric = tolerance.per_metric(metrics)
    atol = out["metric"].map({m: a for m, (a, _) in per_metric.items()}).astype(float)
    rtol = out["metric"].map({m: r for m, (_, r) in per_metric.items()}).astype(float)
    t_sigma = sigma_multipliers(tolerance.sigma, out) if tolerance.sigma > 0 else 0.0
    out["allowed"] = (
        atol + rtol * out["baseline"].abs() + t_sigma * np.sqrt(out["se_baseline"] ** 2 + out["se_current"] ** 2)
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

    @property
    def metrics(self) -> list[str]:
        """The checked metrics, in report order."""
        return list(dict.fromkeys(self.rows["metric"]))

    def tolerances(self) -> list[dict[str, Any]]:
        """One entry per checked metric: ``metric``, ``atol``, ``rtol`` and where each comes from (``atol_from``,
        ``rtol_from``: ``default``, ``--atol`` or ``--atol METRIC=``)."""
        t = self.tolerance
        return [
            {
                "metric": m,
                "atol": t.atol_for(m),
                "rtol": t.rtol_for(m),
                "atol_from": t.origin(m, "atol"),
                "rtol_from": t.origin(m, "rtol"),
            }
            for m in self.metrics
        ]

    def describe_tolerance(self) -> str:
        """:meth:`Tolerance.describe` for the checked metrics."""
        return self.tolerance.describe(self.metrics)

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
            "tolerance": self.tolerance.to_dict(self.metrics),
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
    *,
    allow_other_images: bool = False,
) -> CheckResult:
    """Load, validate and compare two runs.

    Args:
        baseline: the committed baseline (run folder or ``layers.csv``), or a loaded :class:`Run`.
        current: the run to check, likewise.
        tolerance: the band (default: each metric's registry tolerance, both directions, no sigma term).
        metrics: metrics to check (default: every metric of the baseline; the current run must have them all).
        layers: layers to check, a list or a ``"0-5,12"`` string (default: all).
        allow_other_images: compare runs measured on different image sets (refused otherwise).

    Returns:
        A :class:`CheckResult`; ``result.passed`` is the verdict.

    Raises:
        UserError: unusable input (missing files; definitions, metrics or layers that differ; see
            :func:`validate_comparable`).
    """
    tolerance = tolerance or Tolerance()
    b = baseline if isinstance(baseline, Run) else load_run(baseline)
    c = current if isinstance(current, Run) else load_run(current)
    layer_list = _layer_list(layers)
    selected, notes = validate_comparable(b, c, metrics, layer_list, allow_other_images=allow_other_images)
    unused = [
        f"--{which} {m}="
        for which in ("atol", "rtol")
        for m in getattr(tolerance, f"metric_{which}")
        if m not in selected
    ]
    if unused:
        notes.append(
            f"{', '.join(unused)} not used: {'that metric is' if len(unused) == 1 else 'those metrics are'} not checked"
        )
    rows = compare_checked(b, c, tolerance, selected, layer_list)
    single = [name for name, n in (("baseline", rows["n_baseline"]), ("current", rows["n_current"])) if (n < 2).any()]
    if tolerance.sigma > 0 and single:
        notes.append(
            f"--sigma adds nothing for {' and '.join(single)}: one image has no standard error (measure more images)"
        )
    return CheckResult(rows, b, c, tolerance, notes)


@dataclass(frozen=True)
class CheckGate:
    """A check whose baseline and settings are validated before the (slow) current run exists.

    ``measure --baseline`` prepares the gate first, so a bad baseline fails before any image is measured::

        gate = CheckGate.prepare("ci/baseline", Tolerance(sigma=2), layers="0-5")
        result, written = gate.run("runs/new", report="report.md")
    """

    baseline: Run
    tolerance: Tolerance
    metrics: list[str] | None = None
    layers: list[int] | None = None
    allow_other_images: bool = False

    @classmethod
    def prepare(
        cls,
        baseline: str | Path | Run,
        tolerance: Tolerance,
        metrics: Sequence[str] | None = None,
        layers: Sequence[int] | str | None = None,
        allow_other_images: bool = False,
    ) -> CheckGate:
        """Load the baseline and parse the layer selection (``"0-5,12"`` or a list).

        Raises:
            UserError: an unusable baseline or layer selection.
        """
        run = baseline if isinstance(baseline, Run) else load_run(baseline)
        return cls(run, tolerance, list(metrics) if metrics else None, _layer_list(layers), allow_other_images)

    def run(
        self,
        current: str | Path | Run,
        report: str | Path | None = None,
        junit: str | Path | None = None,
        plot: str | Path | None = None,
        html: str | Path | None = None,
    ) -> tuple[CheckResult, list[Path]]:
        """Check ``current`` and write the requested files; returns the result and the paths written."""
        result = check_runs(
            self.baseline,
            current,
            self.tolerance,
            self.metrics,
            self.layers,
            allow_other_images=self.allow_other_images,
        )
        return result, write_outputs(result, report=report, junit=junit, plot=plot, html=html)
