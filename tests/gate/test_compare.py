"""`oversmooth compare` on real runs of tiny random-init ViTs of depth 2, 3 and 4."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from oversmooth_cli.errors import EXIT_BAD_INPUT, UserError
from oversmooth_cli.gate.compare import compare_runs, default_labels
from oversmooth_cli.gate.runs import load_run
from oversmooth_cli.measuring.run import MeasureConfig, measure
from oversmooth_cli.measuring.summary import write_run
from oversmooth_cli.reading.loading import load_model

from .._helpers import PHOTOS, TINY_ARCH, TINY_ARGS, invoke

pytestmark = pytest.mark.check

ARCH = TINY_ARCH
DEPTHS = (2, 3, 4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """``{depth: run folder}``, each measured on the same 3 real photos."""
    root = tmp_path_factory.mktemp("compare")
    images = [PHOTOS[name] for name in ("astronaut.png", "camera.png", "chelsea.png")]
    out = {}
    for depth in DEPTHS:
        torch.manual_seed(depth)
        model = load_model(ARCH, model_args={**TINY_ARGS, "depth": depth})
        out[depth] = write_run(measure(model, images, MeasureConfig(device="cpu")), root / f"depth{depth}")
    return out


def means(run: Path) -> pd.Series:
    """Independent reference: ``{(metric, layer): mean}`` straight from a run's layers.csv."""
    return pd.read_csv(run / "layers.csv").set_index(["metric", "layer"])["mean"]


def test_compare_writes_png_and_wide_csv(runs, tmp_path):
    out = tmp_path / "figs" / "compare.png"
    r = invoke("compare", *runs.values(), "--out", out)
    assert r.exit_code == 0, r.output
    labels = [f"{ARCH} (depth{d})" for d in DEPTHS]  # same model name: the folder tells them apart
    table = pd.read_csv(out.parent / "compare.csv")
    assert list(table.columns) == ["metric", "layer", *labels]
    assert list(zip(table["metric"], table["layer"], strict=True)) == [
        *(("token_cosine", layer) for layer in range(5)),
        *(("attention_std", layer) for layer in range(1, 5)),
    ]
    for depth, label in zip(DEPTHS, labels, strict=True):
        ref = means(runs[depth])
        for metric, layer, value in zip(table["metric"], table["layer"], table[label], strict=True):
            if (metric, layer) in ref.index:
                assert value == pytest.approx(ref[(metric, layer)], rel=1e-12, abs=0)
            else:
                assert np.isnan(value) and layer > depth
    assert "runs have different depths (2, 3, 4); try --relative-depth" in r.output
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 1000 and img.height > 400


def test_relative_depth_aligns_layer_over_depth(runs, tmp_path):
    out = tmp_path / "rel.png"
    r = invoke(
        "compare",
        *runs.values(),
        "--out",
        out,
        "--relative-depth",
        "--label",
        "two",
        "--label",
        "three",
        "--label",
        "four",
    )
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "compare.csv")
    assert list(table.columns) == ["metric", "relative_depth", "two", "three", "four"]
    tok = table[table["metric"] == "token_cosine"].set_index("relative_depth")
    expected_x = sorted({round(layer / d, 6) for d in DEPTHS for layer in range(d + 1)})
    assert tok.index.tolist() == pytest.approx(expected_x)
    half = tok.loc[0.5]
    assert half["two"] == pytest.approx(means(runs[2])[("token_cosine", 1)], rel=1e-12)
    assert half["four"] == pytest.approx(means(runs[4])[("token_cosine", 2)], rel=1e-12)
    assert np.isnan(half["three"])  # 1.5 is not a layer of the depth-3 model
    end = tok.loc[1.0]
    for name, depth in (("two", 2), ("three", 3), ("four", 4)):
        assert end[name] == pytest.approx(means(runs[depth])[("token_cosine", depth)], rel=1e-12)
    assert Image.open(out).format == "PNG"


def test_metric_label_and_csv_options(runs, tmp_path):
    csv = tmp_path / "tables" / "tokens.csv"
    r = invoke(
        "compare",
        runs[2],
        runs[3] / "layers.csv",
        "--out",
        tmp_path / "t.png",
        "--csv",
        csv,
        "--metric",
        "token_cosine",
        "--label",
        "a",
        "--label",
        "b",
        "--ci",
    )
    assert r.exit_code == 0, r.output
    table = pd.read_csv(csv)
    assert set(table["metric"]) == {"token_cosine"}
    assert list(table.columns) == ["metric", "layer", "a", "b"]
    assert not (tmp_path / "compare.csv").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label", "only-one"], "got 1 --label for 3 runs"),
        (["--label", "x", "--label", "x", "--label", "y"], "--label 'x' is given twice"),
        (["--metric", "nope"], "metric nope is in none of the runs"),
    ],
)
def test_bad_options_are_bad_input(runs, tmp_path, extra, message):
    r = invoke("compare", *runs.values(), "--out", tmp_path / "c.png", *extra)
    assert r.exit_code == EXIT_BAD_INPUT
    assert message in r.output
    assert not (tmp_path / "c.png").exists()


def test_missing_run_and_folder_out_are_bad_input(runs, tmp_path):
    r = invoke("compare", runs[2], tmp_path / "missing", "--out", tmp_path / "c.png")
    assert r.exit_code == EXIT_BAD_INPUT
    assert "missing does not exist" in r.output
    r = invoke("compare", runs[2], "--out", tmp_path)
    assert r.exit_code == EXIT_BAD_INPUT
    assert "is a folder" in r.output


def test_default_labels_disambiguate_before_after(runs, tmp_path):
    before = shutil.copytree(runs[3], tmp_path / "ft" / "before")
    after = shutil.copytree(runs[3], tmp_path / "ft" / "after")
    assert default_labels([load_run(before), load_run(after)]) == [f"{ARCH} (before)", f"{ARCH} (after)"]
    assert default_labels([load_run(before)]) == [ARCH]  # a unique model name is the label as it is
    twins = [load_run(before), load_run(before / "layers.csv")]
    assert default_labels(twins) == [f"{ARCH} (before) #1", f"{ARCH} (before) #2"]
    result = compare_runs([before, after], labels=["before", "after"])
    assert (result.table["before"] == result.table["after"]).all()
    assert result.notes == []


def test_wide_table_without_runs_is_refused():
    with pytest.raises(UserError, match="at least one run"):
        compare_runs([])
