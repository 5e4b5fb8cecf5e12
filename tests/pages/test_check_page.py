"""The report of a real check: a measure run against a copy with token_cosine at one layer moved out of its band.
The failing row and the failing point are marked and nothing else is; a passing check marks nothing; a one-sided
band reaches the frame instead of drawing an infinity; the page refers to nothing outside itself."""

from __future__ import annotations

import shutil

import pytest

from oversmooth_cli.gate.check import check_runs
from oversmooth_cli.gate.tolerances import Tolerance
from oversmooth_cli.pages.gate import check_page, signed
from oversmooth_cli.pages.svg import number

from .dom import bad_geometry, offline_problems, parse

pytestmark = pytest.mark.check

LAYER, SHIFT = 5, 0.1


@pytest.fixture(scope="module")
def shifted_run(measured_run, tmp_path_factory):
    """The measure run with token_cosine at layer 5 raised by 0.1 (its interval with it)."""
    import pandas as pd

    out = tmp_path_factory.mktemp("pages-check") / "current"
    shutil.copytree(measured_run, out)
    layers = pd.read_csv(out / "layers.csv")
    moved = (layers.metric == "token_cosine") & (layers.layer == LAYER)
    layers.loc[moved, ["mean", "ci95_low", "ci95_high"]] += SHIFT
    layers.to_csv(out / "layers.csv", index=False)
    return out


@pytest.fixture(scope="module")
def failing(measured_run, shifted_run):
    result = check_runs(measured_run, shifted_run)
    assert not result.passed
    return result, parse(check_page(result))


def test_the_failing_layer_is_marked_in_the_table_and_the_chart(failing):
    result, root = failing
    assert offline_problems(root) == [] and bad_geometry(root) == []
    assert root.find("span", cls="status").text == "FAILED" and "fail" in root.find("span", cls="status").attrs["class"]
    table = root.find("section", id="table")
    failing_rows = [(r.attrs["data-metric"], r.attrs["data-layer"]) for r in table.find_all("tr", cls="fail")]
    assert failing_rows == [("token_cosine", str(LAYER))]
    assert len(table.find_all("tr")) == len(result.rows) + 1  # every checked pair, and the header
    row = table.find("tr", cls="fail")
    bad = result.rows[(result.rows.metric == "token_cosine") & (result.rows.layer == LAYER)].iloc[0]
    cells = [td.text for td in row.find_all("td")]
    assert cells[:5] == [
        "token_cosine",
        str(LAYER),
        number(bad["baseline"]),
        number(bad["current"]),
        signed(bad["diff"]),
    ]
    assert cells[-1] == "FAIL" and cells[5] == f"±{number(bad['allowed'])}"
    marks = [
        (m.parent.parent.parent.attrs["data-metric"], m.attrs["data-x"]) for m in root.find_all("path", cls="mark")
    ]
    assert marks == [("token_cosine", str(LAYER))]  # chart div > figure > svg > path
    chart = root.find("div", cls="metric-chart", data_metric="token_cosine")
    tip = chart.find("rect", cls="hit", data_x=str(LAYER)).title
    assert tip.startswith(f"layer {LAYER}: FAIL\n") and f"current {number(bad['current'])} (40 images)" in tip
    assert chart.find("rect", cls="hit", data_x="4").title.startswith("layer 4: ok\n")
    verdict = root.find("section", id="verdict")
    assert result.headline() in verdict.text and verdict.find_all("tr", cls="fail")


def test_one_chart_per_checked_metric_with_baseline_current_and_band(failing):
    result, root = failing
    charts = root.find("section", id="curves").find_all("div", cls="metric-chart")
    assert [c.attrs["data-metric"] for c in charts] == result.metrics
    for chart in charts:
        svg = chart.find("svg")
        assert len(svg.find_all("path", cls="band")) == 1 and len(svg.find_all("polyline")) == 2
        legend = chart.find("div", cls="legend").text
        assert "baseline" in legend and "current" in legend and "accepted band" in legend


def test_a_passing_check_marks_nothing(measured_run):
    result = check_runs(measured_run, measured_run)
    root = parse(check_page(result))
    assert result.passed and root.find("span", cls="status").text == "PASSED"
    assert root.find_all("tr", cls="fail") == [] and root.find_all("path", cls="mark") == []
    assert offline_problems(root) == []


def test_a_one_sided_band_is_drawn_to_the_frame(measured_run, shifted_run):
    result = check_runs(measured_run, shifted_run, Tolerance(direction="down", sigma=2))
    root = parse(check_page(result))
    assert bad_geometry(root) == []
    assert result.passed  # a rise is not checked with --direction down (token cosine: higher is smoother)
    row = root.find("tr", data_metric="token_cosine", data_layer=str(LAYER))
    assert row.find_all("td")[5].text.startswith("≥ -") and "to ∞" in row.find_all("td")[6].text
