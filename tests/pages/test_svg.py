"""The pages' building blocks on hand-made values: numbers, escaping, the colour scale, ticks, the line chart (gaps,
infinite band edges, hover columns, marks), the heatmap, the document shell and its atomic write."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from oversmooth_cli.pages.document import SCRIPT, KeyNumber, Section, document, key_values, table, write_page
from oversmooth_cli.pages.patches import png_data_uri
from oversmooth_cli.pages.svg import VIRIDIS, ColorScale, Html, Series, esc, heatmap, line_chart, nice_ticks, number

from .dom import bad_geometry, decode_png, offline_problems, parse


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.123456789, "0.123457"),
        (15.72420301437378, "15.7242"),
        (0.00045461348418029957, "0.000454613"),
        (np.float64(-0.25), "-0.25"),
        (-0.0, "0"),
        (25.0, "25"),
        (np.int64(40), "40"),
        (7, "7"),
        (math.nan, "–"),
        (None, "–"),
        (math.inf, "∞"),
        (-math.inf, "-∞"),
        (True, "True"),
        ("cpu", "cpu"),
    ],
)
def test_number_writes_six_significant_digits_and_spells_out_the_rest(value, text):
    assert number(value) == text


def test_number_round_trips_to_six_significant_digits():
    for x in np.random.default_rng(0).normal(size=200) * 10.0 ** np.random.default_rng(1).integers(-6, 4, 200):
        assert float(number(x)) == pytest.approx(x, rel=5e-6)


def test_esc_escapes_markup_and_passes_html_through():
    assert esc('<b a="1">&\'') == "&lt;b a=&quot;1&quot;&gt;&amp;&#x27;"
    assert esc(Html("<b>ok</b>")) == "<b>ok</b>"
    assert isinstance(esc(3), Html) and esc(3) == "3"


def test_colour_scale_spans_the_values_and_greys_out_missing_ones():
    scale = ColorScale.of([0.2, float("nan"), -1.0, 3.0, float("inf")])
    assert (scale.low, scale.high) == (-1.0, 3.0)
    assert scale.color(-1.0) == VIRIDIS[0] and scale.color(3.0) == VIRIDIS[-1]
    assert scale.color(-5.0) == VIRIDIS[0] and scale.color(9.0) == VIRIDIS[-1]  # clipped
    assert scale.color(math.nan) == scale.color(None) == "#d9d9d9"
    assert ColorScale.of([]) == ColorScale(0.0, 1.0)
    assert ColorScale(2.0, 2.0).color(2.0) == ColorScale(0.0, 1.0).color(0.5)  # no width: the middle
    legend = parse(f"<!DOCTYPE html><div>{scale.legend('a <label>')}</div>")
    assert "a <label>" in legend.text and "-1" in legend.text and "3" in legend.text


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (0.0568, 0.0573), (15.5, 17.2), (-3e-7, 5e-7), (1, 9)])
def test_ticks_are_round_and_inside_the_range(low, high):
    ticks = nice_ticks(low, high)
    assert 3 <= len(ticks) <= 11
    assert all(low - 1e-12 <= t <= high + 1e-12 for t in ticks)
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5, 10))


def _chart(series, **kw):
    page = parse("<!DOCTYPE html>" + line_chart(series, title="t", x_label="layer", y_label="v", **kw))
    return page.find("svg", cls="chart"), page


def test_line_chart_breaks_lines_at_missing_values_and_hovers_every_x():
    s = Series(
        "mean",
        [0, 1, 2, 3, 4],
        [0.1, 0.2, math.nan, 0.4, 0.5],
        [0.0, 0.1, math.nan, 0.3, 0.4],
        [0.2, 0.3, math.nan, 0.5, 0.6],
    )
    svg, page = _chart([s])
    assert len(svg.find_all("polyline")) == 2  # 0-1 and 3-4
    assert len(svg.find_all("path", cls="band")) == 2
    assert len(svg.find_all("circle", cls="pt")) == 4
    hits = svg.find_all("rect", cls="hit")
    assert [h.attrs["data-x"] for h in hits] == ["0", "1", "2", "3", "4"]
    assert hits[1].title == "layer 1\nmean: 0.2 (95% CI 0.1 to 0.3)"
    assert hits[2].title == "layer 2\nmean: –"  # no value, no interval claimed
    assert bad_geometry(page) == []


def test_line_chart_draws_infinite_band_edges_on_the_frame_and_marks_points():
    x = [1, 2, 3]
    band = Series("band", x, None, [-math.inf, 0.1, 0.2], [0.5, math.inf, 0.6])
    line = Series("current", x, [0.3, 0.9, 0.4])
    svg, page = _chart([band, line], marks=[(2, 0.9)], tips={2.0: "custom <tip>"})
    assert bad_geometry(page) == []
    frame = svg.find("rect", cls="frame")
    top, bottom = float(frame.attrs["y"]), float(frame.attrs["y"]) + float(frame.attrs["height"])
    ys = [
        float(v)
        for v in svg.find("path", cls="band")
        .attrs["d"]
        .replace("M", "")
        .replace("Z", "")
        .replace("L", "")
        .split()[1::2]
    ]
    assert min(ys) == pytest.approx(top) and max(ys) == pytest.approx(bottom)
    assert [m.attrs["data-x"] for m in svg.find_all("path", cls="mark")] == ["2"]
    assert svg.find("rect", cls="hit", data_x="2").title == "custom <tip>"
    assert "failing" in page.find("div", cls="legend").text


def test_line_chart_without_values_says_so():
    page = parse("<!DOCTYPE html>" + line_chart([], title="empty", x_label="x", y_label="y"))
    assert page.find_all("svg") == [] and "no values" in page.text


def test_heatmap_has_one_cell_per_value_with_its_hover_text():
    values = [[0.0, 1.0, math.nan], [0.5, 0.25, 0.75]]
    tips = [[f"r{r} c{c}" for c in range(3)] for r in range(2)]
    scale = ColorScale.of(v for row in values for v in row)
    page = parse(
        "<!DOCTYPE html>"
        + heatmap(
            values,
            ["a", "b"],
            ["0", "1", "2"],
            title="h",
            tips=tips,
            scale=scale,
            x_label="layer",
            y_label="head",
            scale_label="s",
        )
    )
    cells = page.find_all("rect", cls="cell")
    assert [c.title for c in cells] == ["r0 c0", "r0 c1", "r0 c2", "r1 c0", "r1 c1", "r1 c2"]
    assert [c.attrs["fill"] for c in cells[:3]] == [VIRIDIS[0], VIRIDIS[-1], "#d9d9d9"]
    with pytest.raises(ValueError):
        heatmap(
            values, ["a"], ["0", "1", "2"], title="h", tips=tips, scale=scale, x_label="", y_label="", scale_label=""
        )


def test_document_is_self_contained_and_escapes_everything():
    evil = '<script>alert("x")</script>'
    html = document(
        evil,
        [Section("s1", evil, table([evil], [[evil, Html("<b>kept</b>")]]), intro=evil)],
        subtitle=evil,
        numbers=[KeyNumber(evil, evil, evil)],
        status=("fail", evil),
    )
    page = parse(html)
    assert offline_problems(page) == []
    scripts = page.find_all("script")
    assert len(scripts) == 1 and scripts[0].text == SCRIPT
    assert page.find("b").text == "kept"
    assert page.find("nav", cls="toc").find("a").attrs["href"] == "#s1"
    assert page.find("head").find("title").text == evil
    assert key_values([("a", None), ("b", "")]) == ""  # nothing to show: no empty table


def test_the_content_security_policy_allows_exactly_the_inline_script():
    import base64
    import hashlib

    page = parse(document("t", []))
    policy = page.find("meta", http_equiv="Content-Security-Policy").attrs["content"]
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy


def test_write_page_replaces_the_file_atomically(tmp_path):
    target = tmp_path / "sub" / "report.html"
    assert write_page("<p>one</p>", target) == target
    write_page("<p>two</p>", target)
    assert target.read_text(encoding="utf-8") == "<p>two</p>"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]  # no temporary file left
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # the umask's mode, not mkstemp's


def test_png_data_uri_is_lossless_and_shrinks_only_large_inputs():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(png_data_uri(small)), small)
    large = rng.integers(0, 256, (500, 400, 3), dtype=np.uint8)
    assert decode_png(png_data_uri(large, max_px=384)).shape == (384, 307, 3)
