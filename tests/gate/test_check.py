"""`oversmooth check`, `oversmooth baseline` and `measure --baseline` on real runs of tiny random-init ViTs."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from oversmooth_cli.errors import EXIT_BAD_INPUT, EXIT_FAILED_CHECK, UserError
from oversmooth_cli.gate.baseline import make_baseline
from oversmooth_cli.gate.check import check_runs
from oversmooth_cli.gate.reports import write_junit, write_markdown
from oversmooth_cli.gate.runs import load_run
from oversmooth_cli.gate.selection import format_layers, parse_layers
from oversmooth_cli.gate.tolerances import Tolerance, tolerance_from_options
from oversmooth_cli.measuring.run import MeasureConfig, measure
from oversmooth_cli.measuring.summary import write_run
from oversmooth_cli.metrics import formulas, registry
from oversmooth_cli.reading.loading import load_model

from .._helpers import PHOTOS, REPO, TINY_ARCH, TINY_ARGS, invoke, save_checkpoint_folder

pytestmark = pytest.mark.check

SHIFT = 0.05
# Hand-made regressions in the shifted copy: (metric, layer) -> added value.
SHIFTS = {
    ("token_cosine", 1): SHIFT,
    ("token_cosine", 3): -SHIFT,
    ("attention_std", 2): -SHIFT,
    ("attention_std", 3): SHIFT,
}
# token_cosine: higher = smoother; attention_std: lower = smoother. So "up" (worse) = rises of token_cosine and falls
# of attention_std; "down" (better) = the opposite.
WORSE = {("token_cosine", 1), ("attention_std", 2)}
ATTENTION_LIFT = 0.06
BETTER = {("token_cosine", 3), ("attention_std", 3)}
PHOTO_NAMES = ("astronaut.png", "camera.png", "chelsea.png", "coins.png")  # RGB and grayscale, PNG


def save_checkpoint(folder: Path, seed: int, depth: int) -> Path:
    """A `config.json` + `model.safetensors` folder of a tiny random-init ViT (loadable by `oversmooth measure`)."""
    args = {**TINY_ARGS, "depth": depth}
    torch.manual_seed(seed)
    return save_checkpoint_folder(load_model(TINY_ARCH, model_args=args).model, folder, args=args)


@dataclass
class Runs:
    root: Path
    images: Path  # a list file of 4 real photos
    ckpt_a: Path
    ckpt_b: Path
    run_a: Path  # checkpoint a
    run_a_again: Path  # checkpoint a, measured a second time
    run_b: Path  # checkpoint b (another random init, same architecture)
    run_depth2: Path  # another depth
    base: Path  # run_a with std set to 0.1 everywhere and attention_std raised by ATTENTION_LIFT
    shifted: Path  # base with SHIFTS applied


def mutate_run(src: Path, dest: Path, edit) -> Path:
    """Copy a run folder and rewrite its layers.csv with ``edit(df) -> df``."""
    shutil.copytree(src, dest)
    df = pd.read_csv(dest / "layers.csv")
    edit(df).to_csv(dest / "layers.csv", index=False)
    return dest


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("check")
    images = root / "images.txt"
    images.write_text("\n".join(str(PHOTOS[name]) for name in PHOTO_NAMES) + "\n")
    ckpt_a = save_checkpoint(root / "ckpt_a", seed=0, depth=3)
    ckpt_b = save_checkpoint(root / "ckpt_b", seed=1, depth=3)
    ckpt_2 = save_checkpoint(root / "ckpt_2", seed=0, depth=2)

    def run(ckpt: Path, name: str) -> Path:
        return write_run(measure(str(ckpt), images, MeasureConfig(device="cpu")), root / name)

    run_a = run(ckpt_a, "run_a")

    def std_01(df: pd.DataFrame) -> pd.DataFrame:
        # attention_std (~5e-4 here) is lifted so that the hand-made fall of SHIFT stays inside its range [0, 0.5]:
        # a negative value would be refused as unusable input, not read as a regression.
        df = df.assign(std=0.1)
        df.loc[df["metric"] == "attention_std", "mean"] += ATTENTION_LIFT
        return df

    def shift(df: pd.DataFrame) -> pd.DataFrame:
        df = std_01(df)
        for (m, layer), delta in SHIFTS.items():
            df.loc[(df["metric"] == m) & (df["layer"] == layer), "mean"] += delta
        return df

    base = mutate_run(run_a, root / "base", std_01)
    return Runs(
        root,
        images,
        ckpt_a,
        ckpt_b,
        run_a,
        run(ckpt_a, "run_a_again"),
        run(ckpt_b, "run_b"),
        run(ckpt_2, "run_depth2"),
        base,
        mutate_run(run_a, root / "shifted", shift),
    )


def failing(result) -> set[tuple[str, int]]:
    return {(r["metric"], int(r["layer"])) for _, r in result.failures.iterrows()}


def merged(baseline: Path, current: Path) -> pd.DataFrame:
    """Independent reference: the two layers.csv joined on (metric, layer), in float64."""
    b = pd.read_csv(baseline / "layers.csv")
    c = pd.read_csv(current / "layers.csv")
    return b.merge(c, on=["metric", "layer"], suffixes=("_b", "_c"))


# -- layer selections ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0-5,12", [0, 1, 2, 3, 4, 5, 12]), (" 3 , 1-2", [1, 2, 3]), ("4", [4]), ("2-2,2", [2])],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec) == expected
    assert parse_layers(format_layers(expected)) == expected


def test_format_layers_compacts_runs():
    assert format_layers([12, 0, 1, 2, 3, 5]) == "0-3,5,12"
    assert format_layers([]) == "none"


@pytest.mark.parametrize("spec", ["5-2", "a", "", "1,,2", "-1", "1-x"])
def test_parse_layers_rejects(spec):
    with pytest.raises(UserError, match="--layers"):
        parse_layers(spec)


# -- verdicts on real runs ----------------------------------------------------------------------------------------
def test_identical_runs_pass(runs):
    result = check_runs(runs.run_a, runs.run_a_again)
    assert result.passed
    assert len(result.rows) == 4 + 3  # token_cosine at layers 0-3, attention_std at 1-3
    assert (result.rows["diff"] == 0).all()
    assert result.notes == []
    r = invoke("check", runs.run_a, runs.run_a_again)
    assert r.exit_code == 0, r.output
    assert "PASSED: all 7" in r.output


def test_other_checkpoint_fails_exactly_where_curves_moved(runs):
    ref = merged(runs.run_a, runs.run_b)
    diffs = zip(ref["metric"], ref["layer"], ref["mean_c"] - ref["mean_b"], strict=True)
    expected = {(m, int(x)) for m, x, d in diffs if abs(d) > 0.02}
    assert expected and len(expected) < len(ref)  # the two random inits differ at some layers only
    result = check_runs(runs.run_a, runs.run_b, Tolerance(atol=0.02))
    assert failing(result) == expected
    r = invoke("check", runs.run_a, runs.run_b, "--atol", "0.02")  # 0.02 is no longer the default (issue 15)
    assert r.exit_code == EXIT_FAILED_CHECK, r.output
    assert f"FAILED: {len(expected)} of {len(ref)}" in r.output
    table_rows = [ln for ln in r.output.splitlines() if "│" in ln]
    assert len(table_rows) == len(expected)


def t_sigma_reference(sigma: float, se_b: np.ndarray, se_c: np.ndarray, n_b: np.ndarray, n_c: np.ndarray):
    """scipy's Student-t quantile at the normal coverage of ± sigma, Welch-Satterthwaite degrees of freedom."""
    stats = pytest.importorskip("scipy.stats")
    df = (se_b**2 + se_c**2) ** 2 / (se_b**4 / (n_b - 1) + se_c**4 / (n_c - 1))
    return stats.t.ppf(stats.norm.cdf(sigma), df)


def test_band_matches_float64_formula(runs):
    """The sigma term uses Student's t at the Welch-Satterthwaite degrees of freedom (4 images per side here)."""
    tol = Tolerance(atol=0.01, rtol=0.1, sigma=1.5, direction="both")
    result = check_runs(runs.run_a, runs.run_b, tol)
    ref = merged(runs.run_a, runs.run_b).sort_values(["metric", "layer"])
    rows = result.rows.sort_values(["metric", "layer"])
    n_b, n_c = ref["n_images_b"].to_numpy(float), ref["n_images_c"].to_numpy(float)
    se_b = ref["std_b"].to_numpy() / np.sqrt(n_b)
    se_c = ref["std_c"].to_numpy() / np.sqrt(n_c)
    t_sigma = t_sigma_reference(1.5, se_b, se_c, n_b, n_c)
    assert (t_sigma > 1.5).all()  # wider than the normal band at 4 images
    allowed = 0.01 + 0.1 * np.abs(ref["mean_b"].to_numpy()) + t_sigma * np.sqrt(se_b**2 + se_c**2)
    diff = ref["mean_c"].to_numpy() - ref["mean_b"].to_numpy()
    np.testing.assert_allclose(rows["allowed"].to_numpy(), allowed, rtol=1e-12, atol=0)
    np.testing.assert_allclose(rows["diff"].to_numpy(), diff, rtol=1e-12, atol=0)
    assert rows["passed"].tolist() == list(np.abs(diff) <= allowed)


@pytest.mark.parametrize(
    ("direction", "expected"),
    [("both", WORSE | BETTER), ("up", WORSE), ("down", BETTER)],
)
def test_hand_shifted_csv_fails_at_shifted_layers_only(runs, direction, expected):
    result = check_runs(runs.base, runs.shifted, Tolerance(direction=direction))
    assert failing(result) == expected
    r = invoke("check", runs.base, runs.shifted, "--direction", direction)
    assert r.exit_code == EXIT_FAILED_CHECK, r.output


def test_direction_bounds_follow_the_registry(runs):
    up = check_runs(runs.base, runs.shifted, Tolerance(direction="up")).rows.set_index(["metric", "layer"])
    # token_cosine (higher is smoother): rises are capped, falls are not; attention_std the other way round.
    assert np.isinf(up.loc[("token_cosine", 3), "lower"]) and np.isfinite(up.loc[("token_cosine", 3), "upper"])
    assert np.isinf(up.loc[("attention_std", 3), "upper"]) and np.isfinite(up.loc[("attention_std", 3), "lower"])


def test_direction_uses_registry_for_new_metrics(runs, tmp_path, monkeypatch):
    """A metric added to the registry later is gated by its own higher_is_smoother, with no code change."""
    monkeypatch.setitem(
        registry.TOKEN_METRICS,
        "patch_spread",
        registry.MetricDef("patch_spread", formulas.token_cosine, "token", "test metric", higher_is_smoother=False),
    )

    def add_metric(delta: float):
        def edit(df: pd.DataFrame) -> pd.DataFrame:
            extra = df[df["metric"] == "token_cosine"].assign(metric="patch_spread")
            extra.loc[extra["layer"] == 2, "mean"] += delta
            return pd.concat([df, extra])

        return edit

    base = mutate_run(runs.run_a, tmp_path / "b", add_metric(0.0))
    fell = mutate_run(runs.run_a, tmp_path / "fell", add_metric(-SHIFT))
    rose = mutate_run(runs.run_a, tmp_path / "rose", add_metric(+SHIFT))
    assert failing(check_runs(base, fell, Tolerance(direction="up"))) == {("patch_spread", 2)}
    assert failing(check_runs(base, rose, Tolerance(direction="up"))) == set()
    assert failing(check_runs(base, rose, Tolerance(direction="down"))) == {("patch_spread", 2)}


def test_unregistered_metric_is_unusable_input(runs, tmp_path):
    """A metric this version does not know is refused in one line (it was a silent pass with --direction both)."""

    def edit(df: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([df, df[df["metric"] == "token_cosine"].assign(metric="my_metric")])

    base = mutate_run(runs.run_a, tmp_path / "b", edit)
    cur = mutate_run(runs.run_a, tmp_path / "c", edit)
    with pytest.raises(UserError, match="metric in row 8 \\(my_metric layer 0\\) is 'my_metric'; expected a metric"):
        check_runs(base, cur)
    for args in (("check", base, cur), ("check", runs.run_a, cur, "--direction", "up"), ("compare", base, cur)):
        r = invoke(*args)
        assert r.exit_code == EXIT_BAD_INPUT, r.output
        assert "layers.csv: metric in row 8 (my_metric layer 0)" in r.output


@pytest.mark.parametrize(("sigma", "code"), [(0.0, EXIT_FAILED_CHECK), (0.2, EXIT_FAILED_CHECK), (1.0, 0)])
def test_sigma_widens_the_band_by_the_standard_error(runs, sigma, code):
    # std 0.1 over 4 images on both sides: se = 0.05 each, combined sqrt(2) * 0.05 = 0.0707, Welch df = 6.
    # sigma 0.2 (t 0.207): allowed 0.02 + 0.0146 = 0.035 < 0.05 (fails); sigma 1 (t 1.091): 0.02 + 0.077 = 0.097 > 0.05.
    result = check_runs(runs.base, runs.shifted, Tolerance(atol=0.02, rtol=0.0, sigma=sigma))
    t_sigma = t_sigma_reference(sigma, *(np.array([x]) for x in (0.05, 0.05, 4.0, 4.0)))[0] if sigma else 0.0
    np.testing.assert_allclose(result.rows["allowed"], 0.02 + t_sigma * math.sqrt(2) * 0.05, rtol=1e-9)
    r = invoke("check", runs.base, runs.shifted, "--sigma", sigma, "--atol", "0.02", "--rtol", "0")
    assert r.exit_code == code, r.output


def test_rtol_scales_with_the_baseline(runs):
    result = check_runs(runs.base, runs.shifted, Tolerance(atol=0.0, rtol=0.5))
    ref = pd.read_csv(runs.base / "layers.csv").set_index(["metric", "layer"])
    # token_cosine ~0.4: allowed ~0.2 > 0.05 passes; attention_std ~0.06: allowed ~0.03 < 0.05 fails.
    assert failing(result) == {("attention_std", 2), ("attention_std", 3)}
    rows = result.rows.set_index(["metric", "layer"])
    np.testing.assert_allclose(rows["allowed"], 0.5 * ref.loc[rows.index, "mean"].abs(), rtol=1e-12)


@pytest.mark.parametrize(
    ("spec", "expected_rows", "expected_failing"),
    [
        ("0-2", 3 + 2, {("token_cosine", 1), ("attention_std", 2)}),
        ("3", 2, {("token_cosine", 3), ("attention_std", 3)}),
        ("0,2", 2 + 1, {("attention_std", 2)}),
    ],
)
def test_layers_restricts_the_check(runs, spec, expected_rows, expected_failing):
    result = check_runs(runs.base, runs.shifted, layers=spec)
    assert len(result.rows) == expected_rows
    assert set(result.rows["layer"]) <= set(parse_layers(spec))
    assert failing(result) == expected_failing
    r = invoke("check", runs.base, runs.shifted, "--layers", spec)
    assert r.exit_code == EXIT_FAILED_CHECK


def test_layers_outside_the_runs_is_bad_input(runs):
    r = invoke("check", runs.base, runs.shifted, "--layers", "2-9")
    assert r.exit_code == EXIT_BAD_INPUT
    assert "--layers asks for 4-9, which the runs do not have (they have 0-3)" in r.output


def test_metric_restricts_the_check(runs):
    result = check_runs(runs.base, runs.shifted, metrics=["attention_std"])
    assert set(result.rows["metric"]) == {"attention_std"}
    assert failing(result) == {("attention_std", 2), ("attention_std", 3)}
    r = invoke("check", runs.base, runs.shifted, "--metric", "token_cosine", "--layers", "0,2")
    assert r.exit_code == 0, r.output
    r = invoke("check", runs.base, runs.shifted, "--metric", "token_cosine", "--metric", "attention_std")
    assert r.exit_code == EXIT_FAILED_CHECK


# -- unusable input: exit 2 with what differs ---------------------------------------------------------------------
def test_different_depth_is_bad_input(runs):
    r = invoke("check", runs.run_a, runs.run_depth2)
    assert r.exit_code == EXIT_BAD_INPUT
    assert "layers differ: baseline has 0-3, current has 0-2" in r.output


def test_different_metrics_is_bad_input(runs, tmp_path):
    only_tokens = mutate_run(runs.run_a, tmp_path / "tok", lambda df: df[df["metric"] == "token_cosine"])
    r = invoke("check", runs.run_a, only_tokens)
    assert r.exit_code == EXIT_BAD_INPUT
    assert "metrics differ: baseline has token_cosine, attention_std, current has token_cosine" in r.output
    assert "only baseline has attention_std" in r.output
    # Restricting to the common metric makes them comparable.
    assert invoke("check", runs.run_a, only_tokens, "--metric", "token_cosine").exit_code == 0
    r = invoke("check", runs.run_a, only_tokens, "--metric", "attention_std")
    assert r.exit_code == EXIT_BAD_INPUT
    assert "metric attention_std not in current" in r.output
    # The baseline defines what is gated: a metric only the current run has is left out, and the report says so.
    result = check_runs(only_tokens, runs.run_a)
    assert result.passed and set(result.rows["metric"]) == {"token_cosine"}
    assert result.notes == ["not checked: attention_std (only in the current run, not in the baseline)"]


def test_different_metrics_version_is_bad_input(runs, tmp_path):
    other = shutil.copytree(runs.run_a, tmp_path / "v99")
    summary = json.loads((other / "summary.json").read_text())
    summary["metrics_version"] = "99"
    (other / "summary.json").write_text(json.dumps(summary))
    r = invoke("check", runs.run_a, other)
    assert r.exit_code == EXIT_BAD_INPUT
    assert f"metrics_version differs: baseline {registry.METRICS_VERSION}, current 99" in r.output


def test_missing_or_malformed_input_is_bad_input(runs, tmp_path):
    r = invoke("check", runs.run_a, tmp_path / "nope")
    assert r.exit_code == EXIT_BAD_INPUT
    assert "nope does not exist" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("check", empty, runs.run_a)
    assert r.exit_code == EXIT_BAD_INPUT
    assert "has no layers.csv" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,metric,mean\n0,token_cosine,0.5\n")
    r = invoke("check", runs.run_a, bad)
    assert r.exit_code == EXIT_BAD_INPUT
    assert "lacks the columns std, ci95_low, ci95_high, n_images" in r.output
    dup = mutate_run(runs.run_a, tmp_path / "dup", lambda df: pd.concat([df, df.iloc[:1]]))
    r = invoke("check", runs.run_a, dup)
    assert r.exit_code == EXIT_BAD_INPUT
    assert "several rows for" in r.output


def test_bad_tolerance_is_bad_input(runs):
    assert invoke("check", runs.run_a, runs.run_a, "--atol", "-1").exit_code == EXIT_BAD_INPUT
    assert invoke("check", runs.run_a, runs.run_a, "--direction", "sideways").exit_code == EXIT_BAD_INPUT
    with pytest.raises(UserError, match="--sigma"):
        Tolerance(sigma=float("nan"))


def test_layers_csv_without_summary_compares_values_and_says_so(runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs.run_a / "layers.csv", bare / "layers.csv")
    result = check_runs(runs.run_a / "layers.csv", bare / "layers.csv")
    assert result.passed
    assert result.notes == ["metrics_version not compared: current has no summary.json with metrics_version"]
    report = tmp_path / "r.md"
    r = invoke("check", runs.run_a / "layers.csv", bare / "layers.csv", "--report", report)
    assert r.exit_code == 0, r.output
    assert "metrics_version not compared: current has no summary.json" in report.read_text()


def test_non_finite_current_value_is_unusable_input_not_a_regression(runs, tmp_path):
    """A NaN mean was a failing verdict (exit 1 naming layer 1); it is unusable input: exit 2 naming the cell."""

    def nan_at_1(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[(df["metric"] == "token_cosine") & (df["layer"] == 1), "mean"] = float("nan")
        return df

    cur = mutate_run(runs.run_a, tmp_path / "nan", nan_at_1)
    with pytest.raises(UserError, match=r"nan/layers.csv: mean in row 5 \(token_cosine layer 1\) is empty; expected a"):
        check_runs(runs.run_a, cur)
    r = invoke("check", runs.run_a, cur)
    assert r.exit_code == EXIT_BAD_INPUT, r.output
    assert "mean in row 5 (token_cosine layer 1) is empty; expected a finite number" in r.output


# -- report files -------------------------------------------------------------------------------------------------
def test_junit_markdown_and_plot_name_failing_layers(runs, tmp_path):
    out = tmp_path / "out"
    r = invoke(
        "check",
        runs.base,
        runs.shifted,
        "--report",
        out / "report.md",
        "--junit",
        out / "junit.xml",
        "--plot",
        out / "diff.png",
        "--html",
        out / "check.html",
    )
    assert r.exit_code == EXIT_FAILED_CHECK, r.output

    root = ET.parse(out / "junit.xml").getroot()
    assert root.tag == "testsuites"
    assert root.get("tests") == "7" and root.get("failures") == "4"
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == 7
    failed = {
        (c.get("classname").removeprefix("oversmooth."), c.get("name")) for c in cases if c.find("failure") is not None
    }
    assert failed == {(m, f"layer {layer}") for m, layer in WORSE | BETTER}
    for suite in root.findall("testsuite"):
        assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in suite.findall("testcase"))
    msg = next(c for c in cases if c.get("name") == "layer 1" and "token" in c.get("classname")).find("failure")
    default_atol = registry.TOKEN_METRICS["token_cosine"].atol  # the per-metric default (issue 15), was 0.02
    assert "difference +0.05" in msg.get("message") and f"allowed ±{default_atol:g}" in msg.get("message")

    md = (out / "report.md").read_text()
    assert md.startswith("## ❌ oversmooth check: FAILED: 4 of 7")
    failing_section = md.split("### Failing layers")[1].split("<details>")[0]
    listed = [ln.strip("| ").split(" | ")[:2] for ln in failing_section.splitlines() if ln.endswith("**FAIL** |")]
    assert sorted((m, int(layer)) for m, layer in listed) == sorted(WORSE | BETTER)
    assert md.count("**FAIL**") == 2 * 4  # failing table + the full table
    assert "token_cosine layers 1,3; attention_std layers 2-3" in md

    png = (out / "diff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    page = (out / "check.html").read_text(encoding="utf-8")  # opened in Chromium by tests/pages/test_browser.py
    failing_rows = set(re.findall(r'<tr class="fail" data-metric="(\w+)" data-layer="(\d+)"', page))
    assert {(m, int(layer)) for m, layer in failing_rows} == WORSE | BETTER
    assert "FAILED" in page and "http://" not in page and "https://" not in page


def test_report_of_a_pass(runs, tmp_path):
    result = check_runs(runs.run_a, runs.run_a_again)
    md = write_markdown(result, tmp_path / "r.md").read_text()
    assert md.startswith("## ✅ oversmooth check: PASSED: all 7")
    assert "### Failing layers" not in md
    root = ET.parse(write_junit(result, tmp_path / "j.xml")).getroot()
    assert root.get("failures") == "0" and len(root.findall(".//failure")) == 0


# -- baseline -----------------------------------------------------------------------------------------------------
def test_baseline_copies_the_two_files(runs, tmp_path):
    dest = tmp_path / "ci" / "baseline"
    r = invoke("baseline", runs.run_a, dest)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in dest.iterdir()) == ["layers.csv", "summary.json"]
    for name in ("layers.csv", "summary.json"):
        assert (dest / name).read_bytes() == (runs.run_a / name).read_bytes()
    assert invoke("check", dest, runs.run_a_again).exit_code == 0

    r = invoke("baseline", runs.run_b, dest)
    assert r.exit_code == EXIT_BAD_INPUT
    assert "already holds a baseline" in r.output
    (dest / "README.md").write_text("keep me")
    r = invoke("baseline", runs.run_b, dest, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (dest / "layers.csv").read_bytes() == (runs.run_b / "layers.csv").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "layers.csv", "summary.json"]


def test_baseline_needs_a_complete_run(runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs.run_a / "layers.csv", bare / "layers.csv")
    r = invoke("baseline", bare, tmp_path / "dest")
    assert r.exit_code == EXIT_BAD_INPUT
    assert "no summary.json" in r.output
    with pytest.raises(UserError, match="is a file"):
        make_baseline(runs.run_a, runs.run_a / "layers.csv")
    assert load_run(runs.run_a).metrics_version == registry.METRICS_VERSION


# -- measure --baseline -------------------------------------------------------------------------------------------
def test_measure_with_baseline_other_checkpoint_fails(runs, tmp_path):
    out = tmp_path / "m"
    junit = tmp_path / "junit.xml"
    r = invoke(
        "measure",
        runs.ckpt_b,
        runs.images,
        "--out",
        out,
        "--baseline",
        runs.run_a / "layers.csv",
        "--device",
        "cpu",
        "--junit",
        junit,
        "--layers",
        "1-3",
        "--direction",
        "up",
        "--atol",
        "0.02",  # 0.02 is no longer the default (issue 15)
    )
    ref = merged(runs.run_a, runs.run_b)
    defs = {**registry.TOKEN_METRICS, **registry.ATTENTION_METRICS}
    worse = {
        (m, int(x))
        for m, x, d in zip(ref["metric"], ref["layer"], ref["mean_c"] - ref["mean_b"], strict=True)
        if x >= 1 and (d if defs[m].higher_is_smoother else -d) > 0.02
    }
    assert worse  # the second random init is smoother at some layers
    assert r.exit_code == EXIT_FAILED_CHECK, r.output
    assert (out / "layers.csv").is_file()  # the run is kept for inspection
    cases = ET.parse(junit).getroot().findall(".//testcase")
    failed = {
        (c.get("classname").removeprefix("oversmooth."), int(c.get("name").split()[1]))
        for c in cases
        if c.find("failure") is not None
    }
    assert failed == worse
    assert all(int(c.get("name").split()[1]) >= 1 for c in cases)


def test_measure_with_unusable_baseline_fails_before_measuring(runs, tmp_path):
    out = tmp_path / "m"
    r = invoke("measure", runs.ckpt_a, runs.images, "--out", out, "--baseline", tmp_path / "missing")
    assert r.exit_code == EXIT_BAD_INPUT
    assert "missing does not exist" in r.output
    assert not out.exists()
    r = invoke("measure", runs.ckpt_a, runs.images, "--out", out, "--baseline", runs.run_a, "--layers", "x")
    assert r.exit_code == EXIT_BAD_INPUT
    assert not out.exists()


def test_measure_with_baseline_json_reports_the_verdict(runs, tmp_path):
    r = invoke(
        "measure",
        runs.ckpt_b,
        runs.images,
        "--out",
        tmp_path / "m",
        "--baseline",
        runs.run_b,
        "--json",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["check"]["passed"] is True
    assert summary["check"]["checked"] == 7 and summary["check"]["failures"] == []
    for name in ("layers.csv", "summary.json", "check.md", "junit.xml", "check.png"):  # default check file names
        assert (tmp_path / "m" / name).is_file(), name


# -- examples/ci: the commands of the Makefile and the GitHub workflow, run as written -------------------------------
CI_EXAMPLES = REPO / "examples" / "ci"


def oversmooth_commands(script: str, variables: dict[str, str], ref: str) -> list[list[str]]:
    """The ``oversmooth ...`` command lines of a shell script, variables substituted, as argv lists for CliRunner."""
    text = script.replace("\\\n", " ")
    for name, value in variables.items():
        text = text.replace(ref.format(name), value)
    return [shlex.split(ln)[1:] for ln in (raw.strip() for raw in text.splitlines()) if ln.startswith("oversmooth ")]


def tolerance_from_args(args: str) -> Tolerance:
    """``--atol attention_std=0.001 --sigma 2 --direction up`` -> the Tolerance the command line builds from it."""
    words = shlex.split(args)
    pairs = list(zip(words[::2], words[1::2], strict=True))
    opts = dict(pairs)
    return tolerance_from_options(
        atol=[v for k, v in pairs if k == "--atol"],
        rtol=[v for k, v in pairs if k == "--rtol"],
        sigma=float(opts.get("--sigma", 0.0)),
        direction=opts.get("--direction", "both"),
    )


def make_recipe(makefile: str, target: str) -> str:
    match = re.search(rf"^{target}:.*\n((?:\t.*(?:\n|$))+)", makefile.replace("\\\n", " "), flags=re.MULTILINE)
    assert match, f"no target {target}"
    return match.group(1)


def test_makefile_targets_make_a_baseline_then_gate_on_it(runs, tmp_path):
    makefile = (CI_EXAMPLES / "Makefile").read_text()
    check_args = re.search(r"^CHECK_ARGS\s*\?=\s*(.*)$", makefile, flags=re.MULTILINE).group(1)
    variables = {
        "OVERSMOOTH": "oversmooth",
        "CHECKPOINT": str(runs.ckpt_a),
        "IMAGES": str(runs.images),
        "BASELINE": str(tmp_path / "baseline"),
        "RUN_DIR": str(tmp_path / "run"),
        "CHECK_ARGS": check_args,
    }
    for argv in oversmooth_commands(make_recipe(makefile, "oversmooth-baseline"), variables, "$({})"):
        r = invoke(*argv)
        assert r.exit_code == 0, (argv, r.output)
    assert sorted(p.name for p in (tmp_path / "baseline").iterdir()) == ["layers.csv", "summary.json"]
    (check,) = oversmooth_commands(make_recipe(makefile, "oversmooth-check"), variables, "$({})")
    assert check[:1] == ["measure"] and "--baseline" in check
    r = invoke(*check)
    assert r.exit_code == 0, r.output
    assert "PASSED: all 7" in r.output
    assert ET.parse(tmp_path / "run" / "junit.xml").getroot().get("failures") == "0"
    assert (tmp_path / "run" / "report.md").read_text().startswith("## ✅ oversmooth check: PASSED")
    assert (tmp_path / "run" / "check.png").is_file()  # --plot not given: the default name inside the run folder


def test_github_workflow_step_runs_as_written(runs, tmp_path):
    workflow = (CI_EXAMPLES / "oversmooth.yml").read_text()
    env = dict(re.findall(r"^  ([A-Z_]+): (.*?)(?:\s+#.*)?$", workflow, flags=re.MULTILINE))
    assert {"CHECKPOINT", "IMAGES", "BASELINE", "CHECK_ARGS", "RUN_DIR"} <= set(env)
    assert (REPO / env["IMAGES"]).is_dir()  # the pinned images are in the repo
    env.update(CHECKPOINT=str(runs.ckpt_b), IMAGES=str(runs.images), BASELINE=str(runs.run_a))
    env["RUN_DIR"] = str(tmp_path / env["RUN_DIR"])
    (argv,) = oversmooth_commands(workflow, env, "${}")
    assert argv[:1] == ["measure"] and "--baseline" in argv
    r = invoke(*argv)
    ref = check_runs(runs.run_a, runs.run_b, tolerance_from_args(env["CHECK_ARGS"]))
    assert r.exit_code == (0 if ref.passed else EXIT_FAILED_CHECK), r.output
    for name in ("report.md", "junit.xml", "diff.png", "layers.csv"):
        assert (Path(env["RUN_DIR"]) / name).is_file(), name
