"""The report of real finetune run folders: a 1-epoch ``--control`` run of the tiny ViT (training curves, the
monitor heatmap, before / after curves and patch maps, the side-by-side and the control arm's curves), its control
twin as a plain run, and a ``--control --seeds`` folder (the pooled verdict and the per-seed table)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from oversmooth_cli.pages.finetune import finetune_page
from oversmooth_cli.pages.svg import number

from .dom import bad_geometry, decode_png, image_defs, offline_problems, parse

pytestmark = [pytest.mark.finetune, pytest.mark.cli, pytest.mark.slow]


@pytest.fixture(scope="module")
def control_page(control_run):
    return parse(finetune_page(control_run))


def _section_ids(root) -> list[str]:
    return [s.attrs["id"] for s in root.find_all("section")]


def test_a_control_run_has_every_section_and_refers_to_nothing_outside(control_page, control_run):
    root = control_page
    assert offline_problems(root) == [] and bad_geometry(root) == []
    assert _section_ids(root) == ["f-run", "f-training", "f-monitor", "f-layers", "f-patches", "f-control"]
    assert root.find("head").find("title").text == "oversmooth finetune --control: vit_tiny_patch16_224"
    config = json.loads((control_run / "config.json").read_text())
    assert "cos x1.0, cons x0.5, token x1.0" in root.find("section", id="f-run").text
    assert config["finetune"]["train_dir"] in root.find("section", id="f-run").text


def test_the_training_curves_hover_the_values_of_history_csv(control_page, control_run):
    history = pd.read_csv(control_run / "history.csv")
    charts = control_page.find("section", id="f-training").find_all("div", cls="history-chart")
    assert len(charts) == 3  # loss terms, accuracy, token cosine
    loss, accuracy, cosine = charts
    for _, r in history.iterrows():
        epoch = str(r["epoch"])
        assert f"val_top1: {number(r['val_top1'])}" in accuracy.find("rect", cls="hit", data_x=epoch).title
        assert f"last layer: {number(r['val_token_cosine'])}" in cosine.find("rect", cls="hit", data_x=epoch).title
        tip = loss.find("rect", cls="hit", data_x=epoch).title
        assert tip.startswith(f"epoch {epoch}\n") and f"val_loss: {number(r['val_loss'])}" in tip
        if r["epoch"] > 0:
            for term in ("train_loss", "train_ce", "train_cos", "train_cons", "train_token"):
                assert f"{term}: {number(r[term])}" in tip


def test_the_monitor_heatmap_has_one_cell_per_layer_and_step(control_page, control_run):
    monitor = pd.read_csv(control_run / "monitor.csv")
    maps = {m.attrs["data-metric"]: m for m in control_page.find_all("div", cls="monitor-map")}
    assert sorted(maps) == sorted(monitor.metric.unique())
    for metric, rows in monitor.groupby("metric"):
        cells = maps[metric].find_all("rect", cls="cell")
        assert len(cells) == rows["layer"].nunique() * rows["step"].nunique() == len(rows)
        tips = {c.title.split("\n")[0]: c.title for c in cells}
        for _, r in rows.iterrows():
            assert f"\nmean {number(r['mean'])}\n" in tips[f"step {r['step']}, layer {r['layer']}"]
        assert cells[0].title.startswith(f"step {rows['step'].min()}, layer {rows['layer'].max()}")  # deepest on top


def test_before_and_after_curves_hover_both_runs(control_page, control_run):
    before = pd.read_csv(control_run / "before" / "layers.csv")
    after = pd.read_csv(control_run / "after" / "layers.csv")
    section = control_page.find("section", id="f-layers")
    charts = {c.attrs["data-metric"]: c for c in section.find_all("div", cls="metric-chart")}
    assert sorted(charts) == sorted(before.metric.unique())
    for (_, b), (_, a) in zip(before.iterrows(), after.iterrows(), strict=True):
        tip = charts[b["metric"]].find("rect", cls="hit", data_x=str(b["layer"])).title
        for label, r in (("before", b), ("after", a)):
            assert f"{label}: {number(r['mean'])} (95% CI {number(r['ci95_low'])} to {number(r['ci95_high'])})" in tip


def test_patch_maps_of_before_and_after_share_one_scale_per_kind(control_page, control_run):
    section = control_page.find("section", id="f-patches")
    rows = section.find_all("div", cls="patch-row")
    labels = [r.find("div", cls="patch-name").find("span", cls="muted").text for r in rows]
    assert labels == ["before", "after"] * 4  # 2 kinds x 2 images
    assert len(section.find_all("div", cls="scale")) == 2
    for stage in ("before", "after"):
        table = pd.read_csv(control_run / stage / "patches.csv")
        assert len(section.find_all("svg", cls="patch", data_kind="similarity")) == 2 * 2 * 2  # images x layers x runs
        assert table.groupby(["image", "layer", "kind"]).size().eq(16).all()
    images = image_defs(control_page)
    assert len(images) == 2  # before and after show the same two inputs: embedded once each
    for image in images.values():
        assert decode_png(image.attrs["href"]).shape == (32, 32, 3)


def test_the_side_by_side_shows_the_verdict_the_arms_and_the_control_curves(control_page, control_run):
    side = json.loads((control_run / "side_by_side.json").read_text())
    section = control_page.find("section", id="f-control")
    assert side["verdict"] in section.text and "McNemar" in section.text
    for arm in side["rows"]:
        cells = [td.text for td in section.find("tr", data_arm=arm["arm"]).find_all("td")]
        assert cells[1] == number(arm["val_top1"], 4) and cells[3] == number(arm["token_cosine"])
        assert cells[4] == f"{number(arm['token_cosine_ci95_low'])} to {number(arm['token_cosine_ci95_high'])}"
    chart = section.find("div", cls="metric-chart", data_metric="token_cosine")
    assert [s.text for s in chart.find("div", cls="legend").children][:3] == [
        "before",
        "control",
        "treated",
    ]
    twin = pd.read_csv(control_run / "control" / "after" / "layers.csv")
    last = twin[(twin.metric == "token_cosine") & (twin.layer == twin.layer.max())].iloc[0]
    assert f"control: {number(last['mean'])}" in chart.find("rect", cls="hit", data_x=str(last["layer"])).title
    histories = section.find_all("div", cls="history-chart")
    assert len(histories) == 3 and "control val_top1" in histories[1].text and "treated val_top1" in histories[1].text
    header = control_page.find("header").text
    diff = float(side["rows"][2]["token_cosine"]) - float(side["rows"][1]["token_cosine"])
    assert f"{diff:+.3f}" in header


def test_the_control_twin_is_a_plain_run(control_run):
    root = parse(finetune_page(control_run / "control"))
    assert root.find("head").find("title").text == "oversmooth finetune: vit_tiny_patch16_224"
    assert "f-control" not in _section_ids(root) and "none (cross-entropy only)" in root.text
    assert offline_problems(root) == []


def test_an_interrupted_run_shows_what_it_has(control_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "history.csv"):
        shutil.copy(control_run / name, run / name)
    shutil.copytree(control_run / "before", run / "before")
    root = parse(finetune_page(run))
    assert _section_ids(root) == ["f-run", "f-training", "f-layers", "f-patches"]
    assert offline_problems(root) == []


def test_a_seeds_run_has_the_pooled_verdict_and_one_row_per_seed(seeds_run):
    root = parse(finetune_page(seeds_run))
    assert offline_problems(root) == [] and bad_geometry(root) == []
    pooled = json.loads((seeds_run / "pooled.json").read_text())
    assert root.find("head").find("title").text == "oversmooth finetune --control --seeds: vit_tiny_patch16_224"
    assert pooled["verdict"] in root.find("section", id="verdict").text
    for row in pooled["rows"]:
        cells = [td.text for td in root.find("tr", data_seed=str(row["seed"])).find_all("td")]
        assert cells == [
            str(row["seed"]),
            number(row["treated_top1"], 4),
            number(row["control_top1"], 4),
            number(row["top1_diff"], 4),
            number(row["mcnemar_p"], 3),
            number(row["treated_cosine"]),
            number(row["control_cosine"]),
            number(row["cosine_diff"]),
            str(row["n_images"]),
        ]
    stats = pooled["pooled"]["cosine_diff"]
    verdict_table = root.find("section", id="verdict").find("tbody").find_all("tr")[0]
    assert [td.text for td in verdict_table.find_all("td")][1:] == [
        number(stats["mean"], 4),
        f"{number(stats['ci95_low'], 4)} to {number(stats['ci95_high'], 4)}",
    ]
    charts = root.find("section", id="curves").find_all("div", cls="metric-chart")
    assert {c.attrs["data-metric"] for c in charts} == {"token_cosine", "attention_std"}
    legend = [s.text for s in charts[0].find("div", cls="legend").children]
    assert legend == ["seed 0 treated", "seed 0 control", "seed 1 treated", "seed 1 control"]  # no bands: no CI key
    assert len(root.find("section", id="seeds").find_all("details")) == 2
