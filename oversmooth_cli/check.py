"""``check``: gate a run's over-smoothing curves against a committed baseline, per metric and layer.

For every selected ``(metric, layer)`` the difference ``current - baseline`` of the per-layer means is compared
with a tolerance band::

    allowed = atol + rtol * |baseline| + sigma * sqrt(se_baseline^2 + se_current^2),  se = std / sqrt(n_images)

``atol`` and ``rtol`` are per metric: the registry holds a default for each (:attr:`MetricDef.atol
<oversmooth_cli.metrics.MetricDef>`, set from the metric's scale), ``Tolerance(atol=...)`` sets one value for every
metric and ``Tolerance(metric_atol={...})`` overrides single metrics. ``direction`` decides which side of the band
counts: ``both`` fails on ``|diff| > allowed``; ``up`` only when over-smoothing got worse by more than ``allowed``
(a metric whose registry entry says ``higher_is_smoother`` rose, or one that says the opposite fell); ``down`` only
when it got better.

Two runs are compared only when their recorded definitions agree (:func:`validate_definitions`: metrics_version,
each metric's definition, ``--include-prefix``, input size and token grid, the image set); ``check``, ``compare``
and ``measure --baseline`` all go through it. The command line is a thin wrapper::

    from oversmooth_cli.check import Tolerance, check_runs, write_outputs
    result = check_runs("ci/baseline", "runs/new", Tolerance(metric_atol={"token_cosine": 0.02}))
    write_outputs(result, report="report.md", junit="junit.xml", plot="diff.png")
    raise SystemExit(0 if result.passed else 1)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import UserError
from .metrics import ATTENTION_METRICS, TOKEN_METRICS, MetricDef
from .report import Run, atomic_write, atomic_write_all, load_run, metric_order, metric_panels, save_figure

__all__ = [
    "CHECK_COLUMNS",
    "DIRECTIONS",
    "CheckGate",
    "CheckResult",
    "Tolerance",
    "check_runs",
    "compare_checked",
    "default_tolerance",
    "format_layers",
    "make_baseline",
    "parse_layers",
    "parse_tolerances",
    "plot_check",
    "tolerance_from_options",
    "validate_comparable",
    "validate_definitions",
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
def _sides(items: Sequence[tuple[str, Any]]) -> str:
    """``"baseline has"`` / ``"baseline and current have"`` for the names whose value is missing."""
    missing = [name for name, value in items if value is None]
    return f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'}"


def _tokens_text(definition: Mapping[str, Any]) -> str:
    return str(definition.get("tokens") or ("prefix tokens too" if definition.get("prefix_included") else "?"))


def validate_definitions(
    a: Run,
    b: Run,
    metrics: Sequence[str],
    *,
    allow_other_images: bool = False,
    gate: bool = True,
    names: tuple[str, str] = ("baseline", "current"),
) -> list[str]:
    """Refuse two runs whose numbers mean different things; return notes on what could not be compared.

    The one place that decides whether two runs' values may be compared, used by ``check``, ``measure --baseline``
    and ``compare``. It compares the runs' recorded definitions (:attr:`Run.definitions`): ``metrics_version``;
    each metric of ``metrics`` that both runs have (its definition, token set, e.g. patch tokens only vs
    ``--include-prefix``, and layers); the model input size and the patch tokens per layer; the image set (count
    and hash of the relative paths). The attention tap is recorded but not compared (the taps agree to 1e-5).

    Args:
        a, b: the two runs (baseline and current for a check).
        metrics: the metrics whose definitions matter.
        allow_other_images: accept a different image set (with a note) instead of refusing it.
        gate: ``True`` for a check of one model against its baseline: a different input size or token grid is
            refused. ``False`` for ``compare``, whose runs may be different models: those become notes.
        names: how the messages call the two runs.

    Returns:
        Human-readable notes (e.g. what an older ``summary.json`` does not record, so was not compared).

    Raises:
        UserError: one line naming the first difference and how to measure comparable runs.
    """
    na, nb = names
    da, db = a.definitions, b.definitions
    notes = _check_version(a, b, names, gate)
    images_compared = False
    if da and db:  # a run without summary.json is already named in the note above
        notes += _check_metric_definitions(da, db, metrics, names)
        notes += _check_geometry(da, db, names, gate)
        images_compared, image_notes = _check_image_set(da, db, names, allow_other_images)
        notes += image_notes
    if not images_compared and a.n_images != b.n_images:
        notes.append(f"image counts differ: {na} measured {a.n_images}, {nb} {b.n_images}")
    return notes


def _check_version(a: Run, b: Run, names: tuple[str, str], gate: bool) -> list[str]:
    """Refuse different ``metrics_version``s; a note when a run does not record one."""
    (na, nb), va, vb = names, a.metrics_version, b.metrics_version
    if va is None or vb is None:
        return [f"metrics_version not compared: {_sides([(na, va), (nb, vb)])} no summary.json with metrics_version"]
    if va != vb:
        advice = (
            "the metric definitions changed, so measure the baseline again with this version and commit it "
            "(`oversmooth baseline`)"
            if gate
            else "the metric definitions changed between them; measure both with the same version"
        )
        raise UserError(f"metrics_version differs: {na} {va}, {nb} {vb}; {advice}")
    return []


def _check_metric_definitions(
    da: Mapping[str, Any], db: Mapping[str, Any], metrics: Sequence[str], names: tuple[str, str]
) -> list[str]:
    """Refuse a metric measured on other tokens (``--include-prefix``), with another definition or other layers."""
    (na, nb), ma, mb = names, da.get("metrics"), db.get("metrics")
    if ma is None or mb is None:
        return [f"metric definitions not compared: {_sides([(na, ma), (nb, mb)])} none recorded"]
    for m in metrics:
        x, y = ma.get(m), mb.get(m)
        if x is None or y is None:
            continue
        if (x.get("tokens"), x.get("prefix_included")) != (y.get("tokens"), y.get("prefix_included")):
            how = " (with or without --include-prefix)" if da.get("include_prefix") != db.get("include_prefix") else ""
            raise UserError(
                f"{m} definitions differ: {na} measured {_tokens_text(x)}, {nb} measured {_tokens_text(y)}; "
                f"measure both the same way{how}"
            )
        for key in ("definition", "layers"):
            if key in x and key in y and x[key] != y[key]:
                raise UserError(
                    f"{m} definitions differ: {na} has {key} {x[key]!r}, {nb} has {y[key]!r}; measure both "
                    "with the same oversmooth version"
                )
    return []


def _check_geometry(da: Mapping[str, Any], db: Mapping[str, Any], names: tuple[str, str], gate: bool) -> list[str]:
    """Refuse (``gate``) or note (``compare``) a different input size or token grid."""
    na, nb = names
    size_a, size_b = da.get("input_size"), db.get("input_size")
    grid_a, grid_b = da.get("n_tokens") or [], db.get("n_tokens") or []
    grid = [(i, x, y) for i, (x, y) in enumerate(zip(grid_a, grid_b, strict=False)) if None not in (x, y) and x != y]
    if size_a is not None and size_b is not None and size_a != size_b:
        what = f"input size differs: {na} {'x'.join(map(str, size_a))}, {nb} {'x'.join(map(str, size_b))}"
        advice = "measure both at the same image size (the model's data config, e.g. --model-arg img_size)"
    elif grid:
        layer, x, y = grid[0]
        what = f"token grids differ: layer {layer} has {x} patch tokens in {na}, {y} in {nb}"
        advice = "measure the same model at the same image size"
    else:
        return []
    if gate:
        raise UserError(f"{what}; {advice}")
    return [f"{what}: attention metrics scale with the number of keys, so read them with care"]


def _check_image_set(
    da: Mapping[str, Any], db: Mapping[str, Any], names: tuple[str, str], allow_other_images: bool
) -> tuple[bool, list[str]]:
    """Refuse another image set unless ``allow_other_images``; returns whether the sets were compared, and notes."""
    (na, nb), ia, ib = names, da.get("images"), db.get("images")
    if ia is None or ib is None:
        return False, [
            f"image set not compared: {_sides([(na, ia), (nb, ib)])} no image hash in summary.json "
            "(measured with an older oversmooth)"
        ]
    if (ia["count"], ia["sha256"]) == (ib["count"], ib["sha256"]):
        return True, []
    what = (
        f"image sets differ: {na} measured {ia['count']} images (sha256 {ia['sha256'][:12]}), "
        f"{nb} {ib['count']} (sha256 {ib['sha256'][:12]})"
    )
    if not allow_other_images:
        raise UserError(
            f"{what}; measure the same images (same folder or list, same --limit and --seed) or pass "
            "--allow-other-images"
        )
    return True, [f"{what}; compared anyway (--allow-other-images)"]


def validate_comparable(
    baseline: Run,
    current: Run,
    metrics: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    *,
    allow_other_images: bool = False,
) -> tuple[list[str], list[str]]:
    """Refuse two runs that cannot be compared; return the metrics to check and notes for the report.

    Args:
        baseline, current: the two runs.
        metrics: metrics to check (default: every metric of the baseline, which the current run must all have;
            metrics only the current run has are listed in the notes as not checked).
        layers: restrict to these layers; each must exist in the runs for at least one selected metric.
        allow_other_images: accept runs measured on different images (see :func:`validate_definitions`).

    Returns:
        ``(metrics, notes)``: the metrics in registry order and human-readable notes (e.g. what was not compared).

    Raises:
        UserError: differing definitions (:func:`validate_definitions`), metrics or layers, saying exactly what
            differs.
    """
    common = [m for m in (metric_order(metrics) if metrics else baseline.metrics) if m in current.metrics]
    notes = validate_definitions(baseline, current, common, allow_other_images=allow_other_images)

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
    return selected, notes


# -- the comparison -----------------------------------------------------------------------------------------------
_FALLBACK = {f.name: f.default for f in dataclasses.fields(MetricDef) if f.name in ("atol", "rtol")}


def _registry(metric: str) -> MetricDef | None:
    return TOKEN_METRICS.get(metric) or ATTENTION_METRICS.get(metric)


def default_tolerance(metric: str) -> tuple[float, float]:
    """``(atol, rtol)`` of ``metric`` from the registry (:attr:`MetricDef.atol <oversmooth_cli.metrics.MetricDef>`);
    a metric this version does not know gets the :class:`~oversmooth_cli.metrics.MetricDef` field defaults."""
    definition = _registry(metric)
    if definition is None:
        return float(_FALLBACK["atol"]), float(_FALLBACK["rtol"])
    return float(definition.atol), float(definition.rtol)


def _check_value(flag: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise UserError(f"{flag} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class Tolerance:
    """The tolerance band: ``atol + rtol * |baseline| + sigma * sqrt(se_b^2 + se_c^2)`` on the side(s) ``direction``.

    ``atol`` and ``rtol`` are resolved per metric: ``metric_atol`` / ``metric_rtol`` first (``--atol METRIC=VALUE``),
    then ``atol`` / ``rtol`` for every metric (a bare ``--atol VALUE``), then the metric's registry default
    (:func:`default_tolerance`).
    """

    atol: float | None = None
    rtol: float | None = None
    sigma: float = 0.0
    direction: str = "both"
    metric_atol: Mapping[str, float] = field(default_factory=dict)
    metric_rtol: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("atol", "rtol", "sigma"):
            value = getattr(self, name)
            if value is not None:
                _check_value(f"--{name}", value)
        for flag, per_metric in (("--atol", self.metric_atol), ("--rtol", self.metric_rtol)):
            for metric, value in per_metric.items():
                if _registry(metric) is None:
                    known = ", ".join([*TOKEN_METRICS, *ATTENTION_METRICS])
                    raise UserError(f"{flag} {metric}=: unknown metric {metric!r}; known: {known}")
                _check_value(f"{flag} {metric}=", value)
        if self.direction not in DIRECTIONS:
            raise UserError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")

    def atol_for(self, metric: str) -> float:
        """The absolute tolerance that applies to ``metric``."""
        if metric in self.metric_atol:
            return float(self.metric_atol[metric])
        return float(self.atol) if self.atol is not None else default_tolerance(metric)[0]

    def rtol_for(self, metric: str) -> float:
        """The relative tolerance that applies to ``metric``."""
        if metric in self.metric_rtol:
            return float(self.metric_rtol[metric])
        return float(self.rtol) if self.rtol is not None else default_tolerance(metric)[1]

    def origin(self, metric: str, which: str) -> str:
        """Where the ``which`` (``"atol"`` or ``"rtol"``) of ``metric`` comes from: ``--atol METRIC=``, ``--atol``
        or ``default`` (the registry)."""
        if metric in getattr(self, f"metric_{which}"):
            return f"--{which} {metric}="
        return f"--{which}" if getattr(self, which) is not None else "default"

    def per_metric(self, metrics: Iterable[str]) -> dict[str, tuple[float, float]]:
        """``{metric: (atol, rtol)}`` for ``metrics``."""
        return {m: (self.atol_for(m), self.rtol_for(m)) for m in metrics}

    def describe(self, metrics: Iterable[str] = ()) -> str:
        """One line: each metric's atol and rtol, then sigma and direction (``metrics`` empty: the settings)."""
        metrics = list(metrics)
        if metrics:
            bands = "; ".join(f"{m} atol {a:g} rtol {r:g}" for m, (a, r) in self.per_metric(metrics).items())
        else:
            given = [f"{name} {getattr(self, name):g}" for name in ("atol", "rtol") if getattr(self, name) is not None]
            given += [
                f"{flag} {m}={v:g}"
                for flag, d in (("atol", self.metric_atol), ("rtol", self.metric_rtol))
                for m, v in d.items()
            ]
            bands = ", ".join(given) or "atol and rtol: each metric's default"
        return f"{bands}; sigma {self.sigma:g}; direction {self.direction}"

    def to_dict(self, metrics: Iterable[str]) -> dict[str, Any]:
        """The tolerance that applied to ``metrics``: ``atol`` and ``rtol`` as ``{metric: value}``, sigma, direction."""
        per = self.per_metric(metrics)
        return {
            "atol": {m: a for m, (a, _) in per.items()},
            "rtol": {m: r for m, (_, r) in per.items()},
            "sigma": self.sigma,
            "direction": self.direction,
        }


def parse_tolerances(values: Sequence[str] | None, flag: str = "--atol") -> tuple[float | None, dict[str, float]]:
    """``--atol`` / ``--rtol`` values: ``["attention_std=0.001", "0.05"]`` -> ``(0.05, {"attention_std": 0.001})``.

    A bare ``VALUE`` sets every metric (at most one); ``METRIC=VALUE`` sets one metric and wins over the bare value.

    Raises:
        UserError: a value that is not a number, an unknown metric, or a metric (or the bare value) given twice.
    """
    every: float | None = None
    per_metric: dict[str, float] = {}
    for raw in values or ():
        name, sep, text = str(raw).rpartition("=")
        name = name.strip()
        try:
            value = float(text)
        except ValueError:
            raise UserError(
                f"{flag} {raw}: {text.strip() or 'nothing'} is not a number; give VALUE (every metric) or "
                f"METRIC=VALUE, e.g. {flag} attention_std=0.001"
            ) from None
        if not sep:
            if every is not None:
                raise UserError(
                    f"{flag} is given twice without a metric ({every:g} and {value:g}); give one VALUE for every "
                    "metric and METRIC=VALUE for single metrics"
                )
            every = value
            continue
        if _registry(name) is None:
            known = ", ".join([*TOKEN_METRICS, *ATTENTION_METRICS])
            raise UserError(f"{flag} {raw}: unknown metric {name!r}; known: {known}")
        if name in per_metric:
            raise UserError(f"{flag} {name}= is given twice ({per_metric[name]:g} and {value:g}); give it once")
        per_metric[name] = value
    return every, per_metric


def tolerance_from_options(
    atol: Sequence[str] | None = None,
    rtol: Sequence[str] | None = None,
    sigma: float = 0.0,
    direction: str = "both",
) -> Tolerance:
    """The :class:`Tolerance` the command-line options describe (``--atol``/``--rtol`` as :func:`parse_tolerances`)."""
    atol_all, atol_per = parse_tolerances(atol, "--atol")
    rtol_all, rtol_per = parse_tolerances(rtol, "--rtol")
    return Tolerance(atol_all, rtol_all, sigma, direction, atol_per, rtol_per)


def smoothing_sign(metric: str, direction: str = "both") -> int:
    """+1 when a higher value of ``metric`` means more over-smoothing, -1 when lower does (from the registry).

    A metric outside the registry can only be checked with ``direction="both"`` (its sign is then irrelevant).
    """
    definition = _registry(metric)
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
    per_metric = tolerance.per_metric(metrics)
    atol = out["metric"].map({m: a for m, (a, _) in per_metric.items()}).astype(float)
    rtol = out["metric"].map({m: r for m, (_, r) in per_metric.items()}).astype(float)
    out["allowed"] = (
        atol
        + rtol * out["baseline"].abs()
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
        band = f"accepted band (atol {result.tolerance.atol_for(metric):g}, rtol {result.tolerance.rtol_for(metric):g})"
        ax.fill_between(x, lower, upper, color="C0", alpha=0.18, lw=0, label=band)
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
    t = result.tolerance
    fig.suptitle(f"oversmooth check: {verdict} (sigma {t.sigma:g}, direction {t.direction})", fontsize=10)
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
