"""The report's figures as inline SVG, drawn by small pure functions: numbers as the page writes them, escaping, a
colour scale, a line chart with 95% bands and hover values, a heatmap with hover values.

Nothing here reads files or keeps state: every function takes plain values and returns markup (an :class:`Html`
string). Hover values are SVG ``<title>`` elements, so a browser shows them without any script; the page's small
inline script (:mod:`.document`) turns them into instant tooltips.
"""

from __future__ import annotations

import html
import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "FAIL_COLOR",
    "PALETTE",
    "VIRIDIS",
    "ColorScale",
    "Html",
    "Series",
    "esc",
    "heatmap",
    "line_chart",
    "nice_ticks",
    "number",
]


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
"""Line colours, in the order series get them (matplotlib's ``tab10``, the figures' colours)."""

FAIL_COLOR = "#d62728"
"""Failing layers and values outside the band."""

VIRIDIS = ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725")
"""Stops of the sequential colour scale (matplotlib's viridis, as the PNG heatmaps use): perceptually even, readable
in grey and by most colour-blind readers."""

MISSING_COLOR = "#d9d9d9"
"""A cell without a value."""


class Html(str):
    """Markup that is already safe to put in the page: :func:`esc` passes it through unchanged."""

    __slots__ = ()


def esc(value: object) -> Html:
    """``value`` as HTML text (``html.escape``, quotes included); :class:`Html` is passed through."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def number(value: object, digits: int = 6) -> str:
    """How the page writes a value: whole numbers as they are, other numbers to ``digits`` significant digits, a
    missing value (``None``, NaN) as ``–``, infinities as ``∞`` / ``-∞``; anything else as ``str``.

    Every hover text, table cell and test of the page goes through this one function.
    """
    if value is None or isinstance(value, bool):
        return "–" if value is None else str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if not isinstance(value, numbers.Real):
        return str(value)
    x = float(value)
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x + 0.0:.{digits}g}"  # + 0.0: no "-0"


def _finite(values: Iterable[object]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        try:
            x = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            out.append(x)
    return out


def _c(v: float) -> str:
    """A coordinate: at most two decimals, no trailing zeros."""
    text = f"{v:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# -- colour scale -------------------------------------------------------------------------------------------------
def _rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


@dataclass(frozen=True)
class ColorScale:
    """A linear colour scale from ``low`` to ``high`` through :data:`VIRIDIS` (values outside are clipped)."""

    low: float
    high: float
    stops: tuple[str, ...] = VIRIDIS

    @classmethod
    def of(cls, values: Iterable[object]) -> ColorScale:
        """The scale spanning the finite ``values`` (``[0, 1]`` when there are none)."""
        finite = _finite(values)
        return cls(min(finite), max(finite)) if finite else cls(0.0, 1.0)

    def position(self, value: float) -> float:
        """Where ``value`` sits on the scale, 0 to 1 (0.5 when the scale has no width)."""
        if self.high <= self.low:
            return 0.5
        return min(1.0, max(0.0, (value - self.low) / (self.high - self.low)))

    def color(self, value: object) -> str:
        """``#rrggbb`` of ``value``; :data:`MISSING_COLOR` for a missing or infinite value."""
        finite = _finite([value])
        if not finite:
            return MISSING_COLOR
        t = self.position(finite[0]) * (len(self.stops) - 1)
        i = min(int(t), len(self.stops) - 2)
        a, b = _rgb(self.stops[i]), _rgb(self.stops[i + 1])
        f = t - i
        return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))

    def legend(self, label: str) -> Html:
        """A colour bar (a CSS gradient) with the low, middle and high values and ``label``."""
        gradient = ", ".join(self.stops)
        mid = (self.low + self.high) / 2
        return Html(
            f'<div class="scale"><span class="scale-label">{esc(label)}</span>'
            f'<span class="scale-end">{esc(number(self.low, 4))}</span>'
            f'<span class="scale-bar" style="background:linear-gradient(to right, {gradient})" '
            f'title="{esc(number(self.low, 4))} to {esc(number(self.high, 4))}">'
            f'<span class="scale-mid">{esc(number(mid, 4))}</span></span>'
            f'<span class="scale-end">{esc(number(self.high, 4))}</span></div>'
        )


# -- axes ---------------------------------------------------------------------------------------------------------
def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) inside ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= high + step * 1e-9 and k < 1000:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _tick_text(value: float, ticks: Sequence[float]) -> str:
    """A tick label with as many decimals as the tick spacing needs (scientific notation for tiny or huge values)."""
    if len(ticks) < 2:
        return number(value, 4)
    step = abs(ticks[1] - ticks[0])
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if decimals > 6 or max(abs(t) for t in ticks) >= 1e6:
        magnitude = math.floor(math.log10(max(abs(t) for t in ticks) or 1.0))
        return f"{value + 0.0:.{max(2, magnitude + decimals + 1)}g}"
    return f"{value + 0.0:.{decimals}f}"


@dataclass(frozen=True)
class _Frame:
    """The plot area of a chart and the maps from data to SVG coordinates."""

    width: float
    height: float
    left: float
    top: float
    right: float
    bottom: float
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    @property
    def inner(self) -> tuple[float, float, float, float]:
        return self.left, self.top, self.width - self.left - self.right, self.height - self.top - self.bottom

    def x(self, v: float) -> float:
        x0, _, w, _ = self.inner
        lo, hi = self.x_range
        return x0 + (v - lo) / (hi - lo) * w

    def y(self, v: float) -> float:
        _, y0, _, h = self.inner
        lo, hi = self.y_range
        v = min(max(v, lo), hi)  # an infinite band edge sits on the frame
        return y0 + h - (v - lo) / (hi - lo) * h


def _axes(frame: _Frame, xs: Sequence[float], x_label: str, y_label: str) -> list[str]:
    x0, y0, w, h = frame.inner
    parts = [f'<rect class="frame" x="{_c(x0)}" y="{_c(y0)}" width="{_c(w)}" height="{_c(h)}"/>']
    y_ticks = nice_ticks(*frame.y_range)
    for t in y_ticks:
        y = _c(frame.y(t))
        parts.append(f'<line class="grid" x1="{_c(x0)}" x2="{_c(x0 + w)}" y1="{y}" y2="{y}"/>')
        parts.append(
            f'<text class="tick" x="{_c(x0 - 6)}" y="{y}" dy="0.32em" text-anchor="end">'
            f"{esc(_tick_text(t, y_ticks))}</text>"
        )
    integer = all(float(v).is_integer() for v in xs)
    x_ticks = (
        [t for t in nice_ticks(min(xs), max(xs), 10, integer) if t in xs] if integer else nice_ticks(*frame.x_range)
    )
    for t in x_ticks:
        x = _c(frame.x(t))
        parts.append(f'<line class="tickmark" x1="{x}" x2="{x}" y1="{_c(y0 + h)}" y2="{_c(y0 + h + 4)}"/>')
        parts.append(
            f'<text class="tick" x="{x}" y="{_c(y0 + h + 16)}" text-anchor="middle">'
            f"{esc(number(t) if integer else _tick_text(t, x_ticks))}</text>"
        )
    parts.append(
        f'<text class="axis-label" x="{_c(x0 + w / 2)}" y="{_c(frame.height - 6)}" text-anchor="middle">'
        f"{esc(x_label)}</text>"
    )
    parts.append(
        f'<text class="axis-label" transform="translate(13 {_c(y0 + h / 2)}) rotate(-90)" '
        f'text-anchor="middle">{esc(y_label)}</text>'
    )
    return parts


# -- line chart ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One line of a chart: ``y`` over ``x`` (``None``: a band only), an optional band ``low`` .. ``high``
    (NaN leaves a gap; an infinite edge is drawn on the frame), its colour and whether the line is dashed."""

    label: str
    x: Sequence[float]
    y: Sequence[float] | None = None
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    color: str = PALETTE[0]
    dashed: bool = False

    def value_at(self, x: float) -> tuple[float, float, float]:
        """``(y, low, high)`` at ``x`` (NaN where absent)."""
        for i, xi in enumerate(self.x):
            if xi == x:
                return tuple(  # type: ignore[return-value]
                    float(s[i]) if s is not None else math.nan for s in (self.y, self.low, self.high)
                )
        return math.nan, math.nan, math.nan


def _runs(points: Sequence[tuple[float, ...]]) -> list[list[tuple[float, ...]]]:
    """Consecutive points whose values are all finite-or-infinite numbers (NaN breaks a run)."""
    out: list[list[tuple[float, ...]]] = [[]]
    for p in points:
        if any(math.isnan(v) for v in p[1:]):
            out.append([])
        else:
            out[-1].append(p)
    return [r for r in out if r]


def _band(frame: _Frame, s: Series) -> list[str]:
    assert s.low is not None and s.high is not None
    points = sorted(zip(map(float, s.x), map(float, s.low), map(float, s.high), strict=True))
    parts = []
    for run in _runs(points):
        if len(run) == 1:
            (x, lo, hi) = run[0]
            parts.append(
                f'<rect class="band" x="{_c(frame.x(x) - 3)}" y="{_c(frame.y(hi))}" width="6" '
                f'height="{_c(frame.y(lo) - frame.y(hi))}" fill="{s.color}"/>'
            )
            continue
        top = " L".join(f"{_c(frame.x(x))} {_c(frame.y(hi))}" for x, _, hi in run)
        bottom = " L".join(f"{_c(frame.x(x))} {_c(frame.y(lo))}" for x, lo, _ in reversed(run))
        parts.append(f'<path class="band" d="M{top} L{bottom} Z" fill="{s.color}"/>')
    return parts


def _line(frame: _Frame, s: Series) -> list[str]:
    assert s.y is not None
    points = sorted(zip(map(float, s.x), map(float, s.y), strict=True))
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    parts = []
    for run in _runs([p for p in points if not math.isinf(p[1])]):
        if len(run) > 1:
            coords = " ".join(f"{_c(frame.x(x))},{_c(frame.y(y))}" for x, y in run)
            parts.append(f'<polyline class="line" points="{coords}" stroke="{s.color}"{dash}/>')
        fill = "var(--bg)" if s.dashed else s.color
        parts += [
            f'<circle class="pt" cx="{_c(frame.x(x))}" cy="{_c(frame.y(y))}" r="3" fill="{fill}" stroke="{s.color}"/>'
            for x, y in run
        ]
    return parts


def _default_tip(series: Sequence[Series], x: float, x_name: str) -> str:
    lines = [f"{x_name} {number(x)}"]
    for s in series:
        y, lo, hi = s.value_at(x)
        text = number(y) if s.y is not None else ""
        if s.low is not None and not (math.isnan(lo) and math.isnan(hi)):
            text += f" (95% CI {number(lo)} to {number(hi)})"
        if text:
            lines.append(f"{s.label}: {text.strip()}")
    return "\n".join(lines)


def _legend(series: Sequence[Series], marks_label: str | None) -> str:
    items = []
    for s in series:
        if s.y is None:
            key = f'<span class="key key-band" style="background:{s.color}"></span>'
        else:
            style = "dashed" if s.dashed else "solid"
            key = f'<span class="key key-line" style="border-top:2px {style} {s.color}"></span>'
        items.append(f"<span>{key}{esc(s.label)}</span>")
    if any(s.low is not None and s.y is not None for s in series):
        items.append('<span><span class="key key-band" style="background:#888"></span>95% CI over images</span>')
    if marks_label:
        items.append(f'<span><span class="key key-mark">×</span>{esc(marks_label)}</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def _y_range(series: Sequence[Series], limits: tuple[float, float] | None) -> tuple[float, float]:
    if limits is not None:
        return limits
    values = _finite(v for s in series for seq in (s.y, s.low, s.high) if seq is not None for v in seq)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = 0.07 * (hi - lo) if hi > lo else max(abs(hi), 1e-3) * 0.1
    return lo - pad, hi + pad


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_name: str = "layer",
    tips: Mapping[float, str] | None = None,
    marks: Sequence[tuple[float, float]] = (),
    marks_label: str = "failing",
    vlines: Sequence[float] = (),
    size: tuple[int, int] = (480, 280),
) -> Html:
    """A ``<figure>``: the series as lines with points (and bands), a legend, and one hover column per x value.

    Args:
        series: the lines, drawn in order (bands first).
        title: the caption above the chart.
        x_label, y_label: axis labels.
        x_name: how the hover text names an x value (``layer 3``, ``epoch 2``).
        tips: hover text per x value (default: every series' value and band at that x).
        marks: ``(x, y)`` points marked with a red cross (class ``mark``, ``data-x``): failing layers.
        marks_label: the legend entry of the marks.
        vlines: x positions of dashed vertical lines (stage boundaries).
        size: the SVG's width and height in CSS pixels (it scales down with the page).
    """
    xs = sorted({float(x) for s in series for x in s.x})
    if not xs:
        return Html(
            f'<figure class="chart-box"><figcaption>{esc(title)}</figcaption><p class="muted">no values</p></figure>'
        )
    gaps = [b - a for a, b in itertools.pairwise(xs)] or [1.0]
    half = min(gaps) / 2
    frame = _Frame(
        *size,
        left=58,
        top=10,
        right=12,
        bottom=42,
        x_range=(xs[0] - half, xs[-1] + half),
        y_range=_y_range(series, None),
    )
    parts = _axes(frame, xs, x_label, y_label)
    _, y0, _, h = frame.inner
    for v in vlines:
        parts.append(
            f'<line class="vline" x1="{_c(frame.x(v))}" x2="{_c(frame.x(v))}" y1="{_c(y0)}" y2="{_c(y0 + h)}"/>'
        )
    for s in series:
        if s.low is not None and s.high is not None:
            parts += _band(frame, s)
    for s in series:
        if s.y is not None:
            parts += _line(frame, s)
    for x, y in marks:
        cx, cy = frame.x(float(x)), frame.y(float(y))
        parts.append(
            f'<path class="mark" data-x="{esc(number(x))}" d="M{_c(cx - 5)} {_c(cy - 5)} L{_c(cx + 5)} '
            f'{_c(cy + 5)} M{_c(cx - 5)} {_c(cy + 5)} L{_c(cx + 5)} {_c(cy - 5)}" stroke="{FAIL_COLOR}"/>'
        )
    edges = [xs[0] - half, *((a + b) / 2 for a, b in itertools.pairwise(xs)), xs[-1] + half]
    for i, x in enumerate(xs):
        tip = (tips or {}).get(x) or _default_tip(series, x, x_name)
        left, right = frame.x(edges[i]), frame.x(edges[i + 1])
        parts.append(
            f'<rect class="hit" data-x="{esc(number(x))}" x="{_c(left)}" y="{_c(y0)}" '
            f'width="{_c(right - left)}" height="{_c(h)}"><title>{esc(tip)}</title></rect>'
        )
    svg = (
        f'<svg class="chart" viewBox="0 0 {size[0]} {size[1]}" width="{size[0]}" height="{size[1]}" role="img" '
        f'aria-label="{esc(title)}">{"".join(parts)}</svg>'
    )
    legend = _legend(series, marks_label if marks else None)
    return Html(
        f'<figure class="chart-box" style="width:{size[0]}px"><figcaption>{esc(title)}</figcaption>{svg}{legend}'
        "</figure>"
    )


# -- heatmap ------------------------------------------------------------------------------------------------------
def _label_every(n: int, room: float, per_label: float) -> int:
    return max(1, math.ceil(n * per_label / max(room, 1.0)))


def heatmap(
    values: Sequence[Sequence[float]],
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str,
    tips: Sequence[Sequence[str]],
    scale: ColorScale,
    x_label: str,
    y_label: str,
    scale_label: str,
) -> Html:
    """A ``<figure>``: one coloured cell per value (``values[row][column]``, row 0 at the top), hover text per cell
    (``tips``, same shape), the row and column labels, and the colour bar.

    Raises:
        ValueError: ``values``, ``tips``, ``rows`` and ``columns`` disagree in shape.
    """
    if len(values) != len(rows) or len(tips) != len(rows):
        raise ValueError("heatmap: values, tips and rows differ in length")
    if any(len(r) != len(columns) or len(t) != len(columns) for r, t in zip(values, tips, strict=True)):
        raise ValueError("heatmap: a row's values or tips differ in length from the columns")
    n_rows, n_cols = len(rows), len(columns)
    cell_w = max(min(44.0, max(2.0, 600.0 / max(n_cols, 1))), 200.0 / max(n_cols, 1))
    cell_h = max(min(24.0, max(4.0, 260.0 / max(n_rows, 1))), 80.0 / max(n_rows, 1))
    left, top, bottom = 52.0, 6.0, 40.0
    width, height = left + n_cols * cell_w + 8, top + n_rows * cell_h + bottom
    parts = []
    for i, (row, row_tips) in enumerate(zip(values, tips, strict=True)):
        y = top + i * cell_h
        for j, (v, tip) in enumerate(zip(row, row_tips, strict=True)):
            parts.append(
                f'<rect class="cell" x="{_c(left + j * cell_w)}" y="{_c(y)}" width="{_c(cell_w)}" '
                f'height="{_c(cell_h)}" fill="{scale.color(v)}"><title>{esc(tip)}</title></rect>'
            )
    every = _label_every(n_rows, n_rows * cell_h, 12)
    for i in range(0, n_rows, every):
        parts.append(
            f'<text class="tick" x="{_c(left - 5)}" y="{_c(top + (i + 0.5) * cell_h)}" dy="0.32em" '
            f'text-anchor="end">{esc(rows[i])}</text>'
        )
    every = _label_every(n_cols, n_cols * cell_w, 24)
    for j in range(0, n_cols, every):
        parts.append(
            f'<text class="tick" x="{_c(left + (j + 0.5) * cell_w)}" y="{_c(top + n_rows * cell_h + 14)}" '
            f'text-anchor="middle">{esc(columns[j])}</text>'
        )
    parts.append(
        f'<text class="axis-label" x="{_c(left + n_cols * cell_w / 2)}" y="{_c(height - 6)}" '
        f'text-anchor="middle">{esc(x_label)}</text>'
    )
    parts.append(
        f'<text class="axis-label" transform="translate(13 {_c(top + n_rows * cell_h / 2)}) rotate(-90)" '
        f'text-anchor="middle">{esc(y_label)}</text>'
    )
    w, h = math.ceil(width), math.ceil(height)
    svg = (
        f'<svg class="heatmap" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="{esc(title)}">{"".join(parts)}</svg>'
    )
    return Html(
        f'<figure class="chart-box" style="width:{max(w, 320)}px"><figcaption>{esc(title)}</figcaption>{svg}'
        f"{scale.legend(scale_label)}</figure>"
    )
