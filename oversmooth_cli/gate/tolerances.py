"""Tolerances of the gate: each metric's default band from the registry, ``--atol`` / ``--rtol`` overrides, and which
direction of change counts as worse."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ..errors import UserError
from ..metrics.registry import ATTENTION_METRICS, TOKEN_METRICS, MetricDef
from .selection import DIRECTIONS

__all__ = ["Tolerance", "default_tolerance", "parse_tolerances", "tolerance_from_options"]


# -- the comparison -----------------------------------------------------------------------------------------------
_FALLBACK: dict[str, float] = {
    f.name: float(cast(float, f.default)) for f in dataclasses.fields(MetricDef) if f.name in ("atol", "rtol")
}
"""The tolerances of a metric this version does not know: the :class:`MetricDef` field defaults."""


def _registry(metric: str) -> MetricDef | None:
    return TOKEN_METRICS.get(metric) or ATTENTION_METRICS.get(metric)


def default_tolerance(metric: str) -> tuple[float, float]:
    """``(atol, rtol)`` of ``metric`` from the registry (:attr:`MetricDef.atol
    <oversmooth_cli.metrics.registry.MetricDef>`);
    a metric this version does not know gets the :class:`~oversmooth_cli.metrics.registry.MetricDef` field defaults."""
    definition = _registry(metric)
    if definition is None:
        return _FALLBACK["atol"], _FALLBACK["rtol"]
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
