"""The report of a real measure run (the bundled digits ViT on the 40 bundled digits, every metric): it parses, it
refers to nothing outside itself, it draws one chart per metric whose hover texts hold layers.csv's values, one
heatmap per attention metric of heads.csv, and the patch maps of patches.csv / patches.npz with the inputs embedded
losslessly and one colour scale per kind; it stays far under 2 MB."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from oversmooth_cli.errors import UserError
from oversmooth_cli.pages.document import write_page
from oversmooth_cli.pages.measure import measure_page
from oversmooth_cli.pages.svg import VIRIDIS, ColorScale, number

from .conftest import MEASURED_MAPS
from .dom import bad_geometry, decode_png, image_defs, offline_problems, parse

MAX_BYTES = 2_000_000


@pytest.fixture(scope="module")
def page(patched_run):
    html = measure_page(patched_run)
    return html, parse(html)


def test_the_page_parses_and_refers_to_nothing_outside_it(page, patched_run):
    html, root = page
    assert offline_problems(root) == []
    assert bad_geometry(root) == []
    assert "http://" not in html and "https://" not in html  # not even as text in an attribute or a script
    assert len(root.find_all("script")) == 1
    summary = json.loads((patched_run / "summary.json").read_text())
    assert root.find("head").find("title").text == f"oversmooth measure: {summary['model']['name']}"


def test_the_header_has_the_runs_key_numbers(page, patched_run):
    _, root = page
    layers = pd.read_csv(patched_run / "layers.csv")
    header = {n.find("div", cls="label").text: n.find("div", cls="value").text for n in root.find_all(cls="number")}
    last = layers[(layers.metric == "token_cosine") & (layers.layer == layers.layer.max())].iloc[0]
    assert header["images"] == "40" and header["layers"] == "8" and header["device"] == "cpu"
    assert header["metrics"] == str(layers.metric.nunique())
    assert header["last-layer token cosine"] == number(last["mean"], 4)
    toc = [a.attrs["href"] for a in root.find("nav", cls="toc").find_all("a")]
    assert toc == ["#m-summary", "#m-curves", "#m-heads", "#m-patches", "#m-definitions", "#m-numbers"]
    assert all(root.find_all("section", id=target[1:]) for target in toc)


def test_one_chart_per_metric_whose_hover_holds_the_values_of_layers_csv(page, patched_run):
    _, root = page
    layers = pd.read_csv(patched_run / "layers.csv")
    charts = {
        c.attrs["data-metric"]: c for c in root.find("section", id="m-curves").find_all("div", cls="metric-chart")
    }
    assert sorted(charts) == sorted(layers.metric.unique()) and len(charts) == 11
    for metric, rows in layers.groupby("metric"):
        chart = charts[metric]
        assert len(chart.find_all("svg")) == 1
        assert len(chart.find_all("circle", cls="pt")) == len(rows)
        for _, r in rows.iterrows():
            tip = chart.find("rect", cls="hit", data_x=str(r["layer"])).title
            assert tip.startswith(f"layer {r['layer']} (stage 0, {r['n_tokens']} tokens)\n"), tip
            assert f"\nmean {number(r['mean'])}\n" in tip
            assert f"\n95% CI {number(r['ci95_low'])} to {number(r['ci95_high'])}\n" in tip
            assert tip.endswith(f"std {number(r['std'])}, {r['n_images']} images")
            assert float(number(r["mean"])) == pytest.approx(r["mean"], rel=5e-6)  # the page's digits are enough


def test_one_heatmap_per_attention_metric_with_every_head_and_layer(page, patched_run):
    _, root = page
    heads = pd.read_csv(patched_run / "heads.csv")
    maps = {m.attrs["data-metric"]: m for m in root.find_all("div", cls="head-map")}
    assert sorted(maps) == sorted(heads.metric.unique())
    for metric, rows in heads.groupby("metric"):
        cells = maps[metric].find_all("rect", cls="cell")
        assert len(cells) == len(rows) == rows["head"].nunique() * rows["layer"].nunique()
        tips = {c.title.split("\n")[0]: c.title for c in cells}
        scale = ColorScale.of(rows["mean"])
        for _, r in rows.iterrows():
            tip = tips[f"layer {r['layer']}, head {r['head']}"]
            assert f"\nmean {number(r['mean'])}\n" in tip
        fills = {c.title.split("\n")[0]: c.attrs["fill"] for c in cells}
        lowest, highest = rows.loc[rows["mean"].idxmin()], rows.loc[rows["mean"].idxmax()]
        assert fills[f"layer {lowest['layer']}, head {lowest['head']}"] == scale.color(lowest["mean"]) == VIRIDIS[0]
        assert fills[f"layer {highest['layer']}, head {highest['head']}"] == VIRIDIS[-1]


def test_patch_maps_embed_each_input_losslessly_with_its_cells(page, patched_run):
    _, root = page
    table = pd.read_csv(patched_run / "patches.csv")
    npz = np.load(patched_run / "patches.npz")
    inputs, names = npz["inputs"], [str(n) for n in npz["names"]]
    images = image_defs(root)
    assert len(images) == len(names)  # each input once, shown through <use>
    for name, image in zip(names, inputs, strict=True):
        for kind, layers in MEASURED_MAPS.items():
            for layer in layers:
                svg = root.find("svg", cls="patch", data_image=name, data_layer=str(layer), data_kind=kind)
                target = svg.find("use").attrs["href"][1:]
                pixels = decode_png(images[target].attrs["href"])
                assert pixels.shape == image.shape == (32, 32, 3) and np.array_equal(pixels, image)
                cells = table[(table.image == name) & (table.layer == layer) & (table.kind == kind)]
                rects = svg.find("g", cls="cells").find_all("rect")
                assert len(rects) == len(cells) == 64
                for rect, (_, c) in zip(rects, cells.sort_values(["row", "col"]).iterrows(), strict=True):
                    assert (
                        rect.title == f"layer {layer}, row {c['row']}, col {c['col']}: {kind} {number(c['value'], 4)}"
                    )
                    assert (rect.attrs["x"], rect.attrs["width"]) == (number(c["x0"]), number(c["x1"] - c["x0"]))
    for kind, cells in table.groupby("kind"):  # one scale per kind, over every image and layer
        section = root.find("section", id="m-patches")
        fills = {}
        for svg in section.find_all("svg", cls="patch", data_kind=kind):
            for rect in svg.find("g", cls="cells").find_all("rect"):
                fills[(svg.attrs["data-image"], svg.attrs["data-layer"], rect.title)] = rect.attrs["fill"]
        for c, colour in (
            (cells.loc[cells.value.idxmin()], VIRIDIS[0]),
            (cells.loc[cells.value.idxmax()], VIRIDIS[-1]),
        ):
            tip = f"layer {c['layer']}, row {c['row']}, col {c['col']}: {kind} {number(c['value'], 4)}"
            assert fills[(c["image"], str(c["layer"]), tip)] == colour


def test_a_measure_report_on_the_example_images_stays_under_2_mb(page, tmp_path):
    html, _ = page
    path = write_page(html, tmp_path / "report.html")
    size = path.stat().st_size
    assert size == len(html.encode("utf-8")) and size < MAX_BYTES, size


def test_a_run_without_patch_files_has_no_patch_section(measured_run):
    root = parse(measure_page(measured_run))
    assert root.find_all("section", id="m-patches") == [] and root.find_all("image") == []
    assert len(root.find_all("div", cls="metric-chart")) == 11


def test_unusable_patch_files_are_named_and_left_out(patched_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(patched_run, run)
    table = pd.read_csv(run / "patches.csv")
    table.drop(columns=["x1"]).to_csv(run / "patches.csv", index=False)
    root = parse(measure_page(run))
    assert "patches.csv lacks the columns x1" in root.find("section", id="m-patches").text
    assert root.find_all("svg", cls="patch") == []
    table.to_csv(run / "patches.csv", index=False)
    (run / "patches.npz").unlink()
    root = parse(measure_page(run))  # the cells without the images
    assert "patches.npz is missing" in root.text and root.find_all("image") == []
    assert len(root.find_all("svg", cls="patch")) == sum(len(v) for v in MEASURED_MAPS.values()) * 4


def test_text_from_the_run_files_is_escaped(measured_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(measured_run, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["model"]["name"] = '<script>alert("x")</script>'
    summary["command"] = "oversmooth measure <img src=https://example.com/x.png>"
    (run / "summary.json").write_text(json.dumps(summary))
    html = measure_page(run)
    root = parse(html)
    assert len(root.find_all("script")) == 1 and root.find_all("img") == []
    assert root.find("head").find("title").text == 'oversmooth measure: <script>alert("x")</script>'
    assert offline_problems(root) == []


def test_a_folder_that_breaks_the_schema_is_refused(measured_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(measured_run, run)
    layers = pd.read_csv(run / "layers.csv")
    layers.loc[0, "mean"] = float("nan")
    layers.to_csv(run / "layers.csv", index=False)
    with pytest.raises(UserError, match=r"layers\.csv"):
        measure_page(run)
