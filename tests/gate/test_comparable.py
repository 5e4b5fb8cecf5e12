"""The gate compares like with like (issue 15): recorded definitions, refusals, per-metric default tolerances.

Runs are real measurements of tiny random-init timm ViTs on real photos; "other" runs differ in exactly one recorded
setting (``--include-prefix``, the image set, the input size, the patch grid, the attention tap).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from oversmooth_cli.data import file_digest, read_rgb
from oversmooth_cli.errors import EXIT_BAD_INPUT, EXIT_FAILED_CHECK, UserError
from oversmooth_cli.gate.check import check_runs
from oversmooth_cli.gate.compare import compare_runs
from oversmooth_cli.gate.runs import load_run
from oversmooth_cli.gate.tolerances import Tolerance, parse_tolerances, tolerance_from_options
from oversmooth_cli.measuring.run import MeasureConfig, measure
from oversmooth_cli.measuring.summary import describe_image_set, write_run
from oversmooth_cli.metrics import registry
from oversmooth_cli.reading.loading import load_model

from .._helpers import PHOTOS, TINY_ARCH, TINY_ARGS, invoke, save_checkpoint_folder

pytestmark = pytest.mark.check

PHOTO_NAMES = ("astronaut.png", "camera.png", "chelsea.png", "coins.png")
DEPTH12 = {**TINY_ARGS, "depth": 12}
"""The issue's 12-block case at tiny width: 16 patch tokens + 1 class token, 32-wide, 2 heads."""
KNOWN = ", ".join(registry.ALL_METRICS)


def tiny(args: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return load_model(TINY_ARCH, model_args=args or TINY_ARGS)


@dataclass
class Runs:
    root: Path
    ckpt: Path
    images: Path  # list file of the 4 photos
    patch: Path  # patch tokens only (the default)
    patch_again: Path  # the same, measured again with the qk tap instead of inline
    prefix: Path  # --include-prefix
    three_photos: Path  # another image set (3 of the 4 photos)
    size48: Path  # another input size (48 px)
    patch4: Path  # the same input size, another token grid (4 px patches: 64 tokens)
    deep: Path  # 12 blocks
    deep_again: Path  # 12 blocks, measured again


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("gate")
    images = root / "images.txt"
    images.write_text("\n".join(str(PHOTOS[n]) for n in PHOTO_NAMES) + "\n")
    ckpt = save_checkpoint_folder(tiny().model, root / "ckpt")

    def run(name: str, model, imgs=images, **kw) -> Path:
        return write_run(measure(model, imgs, MeasureConfig(device="cpu", **kw)), root / name)

    deep = tiny(DEPTH12)
    return Runs(
        root,
        ckpt,
        images,
        run("patch", str(ckpt)),
        run("patch_again", str(ckpt), attention_tap="qk"),
        run("prefix", str(ckpt), include_prefix=True),
        run("three", str(ckpt), [PHOTOS[n] for n in PHOTO_NAMES[:3]]),
        run("size48", tiny({**TINY_ARGS, "img_size": 48})),
        run("patch4", tiny({**TINY_ARGS, "patch_size": 4})),
        run("deep", deep),
        run("deep_again", deep, batch_size=1),
    )


def edit_summary(src: Path, dest: Path, edit) -> Path:
    """Copy a run folder and rewrite its summary.json with ``edit(summary)`` (in place)."""
    shutil.copytree(src, dest)
    summary = json.loads((dest / "summary.json").read_text())
    edit(summary)
    (dest / "summary.json").write_text(json.dumps(summary))
    return dest


def one_error_line(result) -> str:
    """The single line a refused command prints (exit 2), without its ``Error:`` prefix."""
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0].removeprefix("Error: ")


# -- what summary.json records -------------------------------------------------------------------------------------
def test_summary_records_definitions(runs):
    d = json.loads((runs.patch / "summary.json").read_text())["definitions"]
    assert d["metrics_version"] == registry.METRICS_VERSION and d["include_prefix"] is False
    assert d["metrics"]["token_cosine"] == {
        k: registry.describe_metric("token_cosine")[k] for k in ("definition", "tokens", "prefix_included", "layers")
    }
    assert set(d["metrics"]) == {"token_cosine", "attention_std"}
    assert d["input_size"] == [3, 32, 32]
    assert d["n_tokens"] == [16] * (TINY_ARGS["depth"] + 1)  # 4 x 4 patches of 8 px
    assert d["images"]["count"] == 4 and len(d["images"]["sha256"]) == 64
    assert d["attention_tap"] == "inline"
    p = json.loads((runs.prefix / "summary.json").read_text())["definitions"]
    assert p["include_prefix"] is True and p["metrics"]["token_cosine"]["prefix_included"] is True
    assert json.loads((runs.patch4 / "summary.json").read_text())["definitions"]["n_tokens"][0] == 64


def test_image_set_is_known_by_content(tmp_path):
    """The same bytes under other names or folders are the same set, in any order; one changed pixel is another."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "c").mkdir(parents=True)
    shutil.copy(PHOTOS["camera.png"], tmp_path / "a" / "camera.png")
    shutil.copy(PHOTOS["coins.png"], tmp_path / "a" / "sub" / "coins.png")
    shutil.copy(PHOTOS["camera.png"], tmp_path / "b" / "c" / "x.png")
    shutil.copy(PHOTOS["coins.png"], tmp_path / "b" / "y.png")
    a = [tmp_path / "a" / "camera.png", tmp_path / "a" / "sub" / "coins.png"]
    b = [tmp_path / "b" / "y.png", tmp_path / "b" / "c" / "x.png"]
    same = describe_image_set([file_digest(p) for p in a])
    assert same == describe_image_set([file_digest(p) for p in b])
    assert same["count"] == 2 and same["by"] == "content" and len(same["sha256"]) == 64
    assert same["digests"] == sorted(file_digest(p)[:16] for p in a)
    # Read once while decoding: the loader's digest is the file's.
    assert read_rgb(a[0])[1] == file_digest(a[0]) == hashlib.sha256(a[0].read_bytes()).hexdigest()
    pixels = np.asarray(Image.open(a[0])).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(tmp_path / "changed.png")
    changed = describe_image_set([file_digest(tmp_path / "changed.png"), file_digest(a[1])])
    assert changed["count"] == 2 and changed["sha256"] != same["sha256"]
    assert describe_image_set([file_digest(a[0])] * 2)["count"] == 2  # named twice: measured twice


def test_the_same_images_by_folder_parent_folder_list_or_other_names_are_the_same_set(runs, tmp_path):
    """Measured as a folder, as its parent, through a list file or copied under other names: one image set (the
    relative paths differed, so check refused these as "image sets differ"); one changed pixel is refused, saying how
    many images differ."""
    folder = tmp_path / "photos" / "set"
    folder.mkdir(parents=True)
    renamed = tmp_path / "renamed"
    (renamed / "deeper").mkdir(parents=True)
    for i, name in enumerate(PHOTO_NAMES):
        shutil.copy(PHOTOS[name], folder / name)
        shutil.copy(PHOTOS[name], (renamed / "deeper" if i % 2 else renamed) / f"img{i}.png")
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(f"photos/set/{n}" for n in reversed(PHOTO_NAMES)) + "\n")
    model = load_model(str(runs.ckpt))
    cpu = MeasureConfig(device="cpu")
    outs = [write_run(measure(model, src, cpu), tmp_path / f"run{i}") for i, src in
            enumerate((folder, tmp_path / "photos", listed, renamed))]  # fmt: skip
    sets = [json.loads((o / "summary.json").read_text())["definitions"]["images"] for o in outs]
    assert all(s["sha256"] == sets[0]["sha256"] and s["count"] == 4 for s in sets), sets
    for o in outs[1:]:
        assert check_runs(outs[0], o).notes == []
        assert invoke("check", runs.patch, o).exit_code == 0  # the list-file run of the fixture: the same images
    pixels = np.asarray(Image.open(folder / "camera.png")).copy()
    pixels[5, 5] = 255 - pixels[5, 5]
    Image.fromarray(pixels).save(renamed / "deeper" / "img1.png")  # camera.png, one pixel changed
    changed = write_run(measure(model, renamed, cpu), tmp_path / "changed")
    line = one_error_line(invoke("check", outs[0], changed))
    assert line.startswith("image sets differ: baseline measured 4 images (sha256 ")
    assert ": 1 of baseline's images is not in current, 1 of current's not in baseline; measure the same" in line


# -- refusals: exit 2, one line naming the difference -------------------------------------------------------------
def test_include_prefix_against_patch_only_is_refused_by_check_compare_and_measure(runs, tmp_path):
    line = one_error_line(invoke("check", runs.patch, runs.prefix))
    assert line == (
        "token_cosine definitions differ: baseline measured patch tokens (prefix tokens excluded), current measured "
        "all tokens (prefix tokens included: --include-prefix); measure both the same way (with or without "
        "--include-prefix)"
    )
    assert "token_cosine definitions differ" in one_error_line(invoke("check", runs.prefix, runs.patch))
    line = one_error_line(invoke("compare", runs.patch, runs.prefix, "--out", tmp_path / "c.png"))
    assert line.startswith("token_cosine definitions differ:")
    assert not (tmp_path / "c.png").exists()
    out = tmp_path / "m"
    r = invoke("measure", runs.ckpt, runs.images, "--out", out, "--device", "cpu", "--include-prefix", "--baseline",
               runs.patch)  # fmt: skip
    assert one_error_line(r).startswith("token_cosine definitions differ: baseline measured patch tokens")
    # Only attention_std, whose definition --include-prefix does not change: comparable.
    assert invoke("check", runs.patch, runs.prefix, "--metric", "attention_std").exit_code == 0


def test_other_image_set_is_refused_unless_allowed(runs, tmp_path):
    line = one_error_line(invoke("check", runs.patch, runs.three_photos))
    assert line.startswith("image sets differ: baseline measured 4 images (sha256 ")
    assert line.endswith(
        "current 3 (sha256 "
        + json.loads((runs.three_photos / "summary.json").read_text())["definitions"]["images"]["sha256"][:12]
        + "): 1 of baseline's images is not in current, 0 of current's not in baseline; measure the same images "
        "(same files, same --limit and --seed) or pass --allow-other-images"
    )
    r = invoke("check", runs.patch, runs.three_photos, "--allow-other-images", "--atol", "1", "--rtol", "1")
    assert r.exit_code == 0, r.output
    assert "compared anyway (--allow-other-images)" in r.output
    assert one_error_line(invoke("compare", runs.patch, runs.three_photos, "--out", tmp_path / "c.png"))
    r = invoke("compare", runs.patch, runs.three_photos, "--out", tmp_path / "c.png", "--allow-other-images")
    assert r.exit_code == 0, r.output
    single = PHOTOS["camera.png"]
    r = invoke("measure", runs.ckpt, single, "--out", tmp_path / "m1", "--device", "cpu", "--baseline", runs.patch)
    assert one_error_line(r).startswith("image sets differ: baseline measured 4 images")
    r = invoke("measure", runs.ckpt, single, "--out", tmp_path / "m2", "--device", "cpu", "--baseline", runs.patch,
               "--allow-other-images", "--json")  # fmt: skip
    assert r.exit_code in (0, EXIT_FAILED_CHECK), r.output
    assert any("compared anyway" in n for n in json.loads(r.stdout)["check"]["notes"])


def test_metrics_version_is_compared_in_check_and_compare(runs, tmp_path):
    def bump(summary: dict) -> None:
        summary["metrics_version"] = summary["definitions"]["metrics_version"] = "99"

    other = edit_summary(runs.patch, tmp_path / "v99", bump)
    line = one_error_line(invoke("check", runs.patch, other))
    assert line.startswith(f"metrics_version differs: baseline {registry.METRICS_VERSION}, current 99;")
    line = one_error_line(invoke("compare", runs.patch, other, "--out", tmp_path / "c.png", "--label", "a",
                                 "--label", "b"))  # fmt: skip
    assert line.startswith(f"metrics_version differs: 'a' {registry.METRICS_VERSION}, 'b' 99;")


def test_changed_metric_definition_is_refused(runs, tmp_path):
    def reword(summary: dict) -> None:
        summary["definitions"]["metrics"]["attention_std"]["definition"] = "something else"

    other = edit_summary(runs.patch, tmp_path / "reworded", reword)
    line = one_error_line(invoke("check", runs.patch, other))
    assert line.startswith('attention_std definitions differ: baseline has definition "population std of each')
    assert line.endswith("current has 'something else'; measure both with the same oversmooth version")
    assert invoke("check", runs.patch, other, "--metric", "token_cosine").exit_code == 0


def test_input_size_and_token_grid_are_refused_by_the_gate_and_noted_by_compare(runs, tmp_path):
    line = one_error_line(invoke("check", runs.patch, runs.size48))
    assert line == (
        "input size differs: baseline 3x32x32, current 3x48x48; measure both at the same image size (the model's "
        "data config, e.g. --model-arg img_size)"
    )
    line = one_error_line(invoke("check", runs.patch, runs.patch4))
    assert line == (
        "token grids differ: layer 0 has 16 patch tokens in baseline, 64 in current; measure the same model at the "
        "same image size"
    )
    # compare overlays different models: the geometry is a note, not a refusal.
    result = compare_runs([runs.patch, runs.patch4], labels=["p8", "p4"])
    assert result.notes == [
        "token grids differ: layer 0 has 16 patch tokens in 'p8', 64 in 'p4': attention metrics scale with the "
        "number of keys, so read them with care"
    ]


def test_attention_tap_is_recorded_but_not_compared(runs):
    taps = {json.loads((r / "summary.json").read_text())["definitions"]["attention_tap"] for r in (runs.patch,
            runs.patch_again)}  # fmt: skip
    assert taps == {"inline", "qk"}
    result = check_runs(runs.patch, runs.patch_again)
    assert result.passed and result.notes == []
    assert invoke("check", runs.patch, runs.patch_again).exit_code == 0


def test_summary_without_definitions_block_still_loads_and_says_what_was_not_compared(runs, tmp_path):
    """A summary.json written before the block: what it recorded elsewhere is compared, the image set is not."""

    def legacy(summary: dict) -> None:
        del summary["definitions"]

    old = edit_summary(runs.patch, tmp_path / "old", legacy)
    assert load_run(old).definitions["include_prefix"] is False
    result = check_runs(old, runs.patch)
    assert result.passed
    assert result.notes == [
        "image set not compared: baseline has no image hash in summary.json (measured with an older oversmooth)"
    ]
    assert one_error_line(invoke("check", old, runs.prefix)).startswith("token_cosine definitions differ")
    assert one_error_line(invoke("check", old, runs.size48)).startswith("input size differs")


# -- per-metric default tolerances --------------------------------------------------------------------------------
def test_every_metric_has_a_default_tolerance_in_the_registry():
    for name, m in registry.ALL_METRICS.items():
        assert m.atol >= 0 and m.rtol >= 0 and (m.atol > 0 or m.rtol > 0), name
    t = Tolerance()
    assert (t.atol_for("token_cosine"), t.rtol_for("token_cosine")) == (0.01, 0.0)
    assert (t.atol_for("attention_std"), t.rtol_for("attention_std")) == (1e-6, 0.05)


def test_identical_remeasurement_passes_with_the_defaults(runs):
    result = check_runs(runs.deep, runs.deep_again)  # measured twice, batch size 32 and 1
    assert result.passed and len(result.rows) == 13 + 12
    assert result.rows["diff"].abs().max() < 1e-6
    r = invoke("check", runs.deep, runs.deep_again)
    assert r.exit_code == 0, r.output
    assert "PASSED: all 25" in r.output


def test_attention_std_30_percent_lower_at_every_layer_fails_with_the_defaults(runs, tmp_path):
    """The issue's case: 12 blocks, attention std 30% lower everywhere. The old default (--atol 0.02) let it pass."""
    lower = tmp_path / "lower"
    shutil.copytree(runs.deep, lower)
    df = pd.read_csv(lower / "layers.csv")
    rows = df["metric"] == "attention_std"
    assert df.loc[rows, "mean"].max() < 0.02  # tiny random-init values: an absolute 0.02 band is blind to them
    df.loc[rows, ["mean", "ci95_low", "ci95_high"]] *= 0.7
    df.to_csv(lower / "layers.csv", index=False)

    result = check_runs(runs.deep, lower)
    assert not result.passed
    assert result.failing_layers() == {"attention_std": list(range(1, 13))}
    r = invoke("check", runs.deep, lower)
    assert r.exit_code == EXIT_FAILED_CHECK, r.output
    assert "attention_std layers 1-12" in r.output
    assert invoke("check", runs.deep, lower, "--atol", "0.02", "--rtol", "0").exit_code == 0  # the old default
    # --direction up: lower attention std is more over-smoothing, so it still fails.
    assert invoke("check", runs.deep, lower, "--direction", "up").exit_code == EXIT_FAILED_CHECK


def test_report_prints_the_per_metric_tolerances(runs, tmp_path):
    report = tmp_path / "r.md"
    r = invoke("check", runs.patch, runs.patch_again, "--report", report)
    assert r.exit_code == 0, r.output
    assert "tolerance: token_cosine atol 0.01 rtol 0; attention_std atol 1e-06 rtol 0.05; sigma 0; direction both" in (
        r.output
    )
    md = report.read_text()
    assert "### Tolerances" in md
    assert "| token_cosine | 0.01 | 0 | default |" in md
    assert "| attention_std | 1e-06 | 0.05 | default |" in md
    r = invoke("check", runs.patch, runs.patch_again, "--report", report, "--atol", "attention_std=0.001",
               "--atol", "0.05")  # fmt: skip
    assert r.exit_code == 0, r.output
    md = report.read_text()
    assert "| token_cosine | 0.05 | 0 | --atol, default |" in md
    assert "| attention_std | 0.001 | 0.05 | --atol attention_std=, default |" in md


# -- --atol / --rtol METRIC=VALUE ---------------------------------------------------------------------------------
def test_per_metric_tolerance_parsing():
    assert parse_tolerances(["attention_std=0.001", "0.05"]) == (0.05, {"attention_std": 0.001})
    assert parse_tolerances(None) == (None, {})
    t = tolerance_from_options(["attention_std=0.001", "0.05"], ["effective_rank=0.1"], sigma=2, direction="up")
    assert t.per_metric(["token_cosine", "attention_std", "effective_rank"]) == {
        "token_cosine": (0.05, 0.0),  # the bare --atol; the registry's rtol
        "attention_std": (0.001, 0.05),  # METRIC= wins over the bare value
        "effective_rank": (0.05, 0.1),
    }
    assert (t.sigma, t.direction) == (2, "up")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--atol", "nope=0.1"], f"--atol nope=0.1: unknown metric 'nope'; known: {KNOWN}"),
        (["--rtol", "attention=0.1"], f"--rtol attention=0.1: unknown metric 'attention'; known: {KNOWN}"),
        (["--atol", "x"], "--atol x: x is not a number; give VALUE (every metric) or METRIC=VALUE"),
        (["--atol", "token_cosine="], "--atol token_cosine=: nothing is not a number"),
        (["--atol", "0.1", "--atol", "0.2"], "--atol is given twice without a metric (0.1 and 0.2)"),
        (["--atol", "token_cosine=0.1", "--atol", "token_cosine=0.2"], "--atol token_cosine= is given twice"),
        (["--atol", "attention_std=-1"], "--atol attention_std= must be a finite number >= 0, got -1.0"),
        (["--rtol", "nan"], "--rtol must be a finite number >= 0, got nan"),
    ],
)
def test_bad_tolerance_options_are_one_line(runs, args, message):
    assert one_error_line(invoke("check", runs.patch, runs.patch_again, *args)).startswith(message)


def test_per_metric_override_changes_only_that_metric(runs):
    result = check_runs(runs.patch, runs.patch_again, tolerance_from_options(["attention_std=0.001", "0.05"]))
    allowed = result.rows.groupby("metric")["allowed"]
    assert allowed.min()["token_cosine"] == allowed.max()["token_cosine"] == 0.05
    base = result.rows[result.rows["metric"] == "attention_std"]
    pd.testing.assert_series_equal(base["allowed"], 0.001 + 0.05 * base["baseline"].abs(), check_names=False)
    assert result.to_dict()["tolerance"]["atol"] == {"token_cosine": 0.05, "attention_std": 0.001}
    unused = check_runs(runs.patch, runs.patch_again, tolerance_from_options(["effective_rank=0.5"]))
    assert unused.notes == ["--atol effective_rank= not used: that metric is not checked"]


def test_tolerance_rejects_unknown_metrics_in_the_library():
    with pytest.raises(UserError, match="unknown metric 'nope'"):
        Tolerance(metric_atol={"nope": 0.1})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda df: df.iloc[0:0], "has no rows"),
        (
            lambda df: df.assign(mean=df["mean"].astype(object).where(df.index != 0, "abc")),
            "mean in row 1 (attention_std layer 1) is 'abc'; expected a finite number",
        ),
        (
            lambda df: df.assign(layer=df["layer"].astype(object).where(df.index != 0, "x")),
            "layer in row 1 (attention_std layer x) is 'x'; expected a whole number >= 0",
        ),
    ],
    ids=["header-only", "text-mean", "text-layer"],
)
def test_malformed_baseline_tables_are_bad_input_not_a_verdict(runs, tmp_path, edit, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    edit(pd.read_csv(runs.patch / "layers.csv")).to_csv(bad / "layers.csv", index=False)
    shutil.copy(runs.patch / "summary.json", bad / "summary.json")
    result = invoke("check", str(bad), str(runs.patch))
    assert result.exit_code == EXIT_BAD_INPUT
    assert message in one_error_line(result)
