"""Confidence intervals of a mean over images: Student's t with ``N - 1`` degrees of freedom, clipped to the metric's
range.

Every per-layer value is a mean over ``N`` images, and its 95% interval is::

    mean ± t(0.975, N - 1) · std / √N,  then clipped to the metric's range (``MetricDef.range``)

``t(p, df)`` is the quantile of Student's t distribution (:func:`t_quantile`: 12.71 at ``df = 1``, 2.78 at 4, 1.98 at
100, 1.96 in the limit), so an interval over two images is as wide as the data allow instead of the normal
approximation's ``± 1.96·std/√N``, which is far too narrow at small ``N``. With one image there is no spread to
estimate and no interval is claimed (``NaN``, an empty cell in the CSV). ``summary.json`` says which interval was used
(:data:`INTERVAL`).

The quantile is computed here, in float64 with :mod:`math` only (no scipy): the t distribution function through the
regularised incomplete beta function (a continued fraction), inverted by bisection on the upper
tail to a relative 1e-14.
"""

from __future__ import annotations

import functools
import math

__all__ = [
    "INTERVAL",
    "LEVEL",
    "half_width",
    "mean_interval",
    "normal_cdf",
    "t_cdf",
    "t_multiplier",
    "t_quantile",
    "t_upper",
]


LEVEL = 0.95
"""Two-sided coverage of every interval over images."""


INTERVAL = "student-t 95%, clipped to the metric's range"
"""How ``ci95_low`` / ``ci95_high`` are computed, as ``summary.json``'s ``interval`` records it."""


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """Distribution function of Student's t with ``df > 0`` degrees of freedom."""
    if df <= 0 or math.isnan(x) or math.isnan(df):
        return math.nan
    if math.isinf(x):
        return 1.0 if x > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))  # P(T > |x|)
    return 1.0 - tail if x > 0 else tail


def normal_cdf(x: float) -> float:
    """Standard normal distribution function."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``math.inf`` for ``df = inf``: the normal one).

    Exact closed forms for ``df`` 1 and 2; otherwise the root of :func:`t_cdf` by bisection on a bracket that grows
    until it holds the root. ``NaN`` for ``p`` outside (0, 1) or ``df <= 0``.
    """
    if not 0.0 < p < 1.0 or not df > 0:
        return math.nan
    if p == 0.5:
        return 0.0
    sign, q = (1.0, 1.0 - p) if p > 0.5 else (-1.0, p)  # q: the tail to reach, kept exact for small p
    return sign * _t_upper(q, float(df))


def t_upper(q: float, df: float) -> float:
    """The ``x`` with ``P(T > x) = q``: :func:`t_quantile` at ``1 - q``, exact for small ``q`` (``inf`` at 0)."""
    if q <= 0.0:
        return math.inf
    if q >= 1.0 or not df > 0:
        return math.nan
    return t_quantile(1.0 - q, df) if q > 0.5 else _t_upper(q, float(df))


def t_multiplier(sigma: float, df: float) -> float:
    """The Student-t multiplier with the coverage of ``± sigma`` under the normal distribution: at ``df`` degrees of
    freedom, ``± t_multiplier(sigma, df)`` standard errors cover what ``± sigma`` would with infinitely many samples
    (``sigma`` itself for ``df = inf``; ``0`` for ``sigma = 0``)."""
    if sigma <= 0.0:
        return 0.0
    if math.isinf(df):
        return sigma
    return t_upper(0.5 * math.erfc(sigma / math.sqrt(2.0)), df)


@functools.lru_cache(maxsize=4096)
def _t_upper(q: float, df: float) -> float:
    """The ``x > 0`` with ``P(T > x) = q`` for ``0 < q < 1/2``."""
    if df == 1:
        return 1.0 / math.tan(math.pi * q)
    if df == 2:
        return (1.0 - 2.0 * q) / math.sqrt(2.0 * q * (1.0 - q))
    if math.isinf(df):

        def tail(x: float) -> float:
            return 0.5 * math.erfc(x / math.sqrt(2.0))

    else:

        def tail(x: float) -> float:
            return 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))

    lo, hi = 0.0, 1.0
    while tail(hi) > q:
        lo, hi = hi, 2.0 * hi
    for _ in range(400):
        mid = 0.5 * (lo + hi)
        if tail(mid) > q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return 0.5 * (lo + hi)


def half_width(std: float, n: float, level: float = LEVEL) -> float:
    """``t((1 + level) / 2, n - 1) · std / √n``: half the interval of a mean over ``n`` samples (``NaN``: ``n < 2``)."""
    if not n >= 2 or math.isnan(std):
        return math.nan
    return t_quantile(0.5 + level / 2.0, float(n - 1)) * std / math.sqrt(n)


def mean_interval(
    mean: float,
    std: float,
    n: float,
    bounds: tuple[float, float] = (-math.inf, math.inf),
    level: float = LEVEL,
) -> tuple[float, float]:
    """The interval of a mean over ``n`` samples with sample standard deviation ``std``: Student's t with ``n - 1``
    degrees of freedom, clipped to ``bounds`` (the metric's range); ``(nan, nan)`` when ``n < 2`` (none is claimed).
    """
    half = half_width(std, n, level)
    if math.isnan(half) or math.isnan(mean):
        return math.nan, math.nan
    lo, hi = bounds
    return max(mean - half, lo), min(mean + half, hi)
