"""`oversmooth measure` end to end through the CLI, on real images and checkpoints the tests save."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from oversmooth_cli.io import HEAD_COLUMNS, LAYER_COLUMNS
from oversmooth_cli.measuring.config import MeasureConfig
from oversmooth_cli.measuring.run import measure
from oversmooth_cli.metrics.accumulate import RunningMoments

from .._helpers import TINY_ARCH, TINY_ARGS, brute_token_cosine, invoke, reference_states, tiny_cli_args

pytestmark = pytest.mark.cli


def test_measure_writes_every_output(tiny_folder, few_images, tmp_path):
    out = tmp_path / "run"
    res = invoke("measure", tiny_folder, few_images, "--out", out, "--device", "cpu", "-b", "2")
    assert res.exit_code == 0, res.output
    written = sorted(p.name for p in out.iterdir())
    tables = ["layers.csv", "heads.csv", "summary.json", "curves.png"]
    assert written == sorted([*tables, "patches.csv", "patches.npz", "patches.png", "report.html"])
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers.columns) == LAYER_COLUMNS
    depth = TINY_ARGS["depth"]
    cos = layers[layers.metric == "token_cosine"]
    std = layers[layers.metric == "attention_std"]
    assert cos.layer.tolist() == list(range(depth + 1)) and std.layer.tolist() == list(range(1, depth + 1))
    assert (layers.n_images == 5).all()
    assert cos["mean"].between(-1, 1).all() and (std["mean"] >= 0).all()
    assert (layers.ci95_low <= layers["mean"]).all() and (layers["mean"] <= layers.ci95_high).all()
    heads = pd.read_csv(out / "heads.csv")
    assert list(heads.columns) == HEAD_COLUMNS and len(heads) == depth * TINY_ARGS["num_heads"]
    for layer, group in heads.groupby("layer"):
        assert group["mean"].mean() == pytest.approx(std[std.layer == layer]["mean"].item(), abs=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics_version"] == "1" and summary["model"]["architecture"] == TINY_ARCH
    assert summary["images"]["measured"] == 5 and summary["images"]["skipped"] == 0
    assert summary["model"]["checkpoint_sha256"] and summary["run"]["device"] == "cpu"
    assert summary["run"]["attention_tap"] == "inline", "auto resolves to inline on CPU and says so"
    assert summary["command"].startswith("oversmooth measure")
    assert summary["layers"]["token_cosine"] == pytest.approx(cos["mean"].tolist())
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "token_cosine" in res.stdout and "Wrote" in res.stdout
    assert "patches.png" in res.stdout and "report.html" in res.stdout
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_cli_equals_library_and_float64_reference(tiny_folder, few_images, tmp_path):
    """The CLI calls the library; the per-layer mean equals the mean of per-image float64 values."""
    from oversmooth_cli.data import build_loader, find_images
    from oversmooth_cli.reading.loading import load_model

    res = invoke("measure", tiny_folder, few_images, "--out", tmp_path / "r", "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output
    layers = pd.read_csv(tmp_path / "r" / "layers.csv")
    loaded = load_model(str(tiny_folder))
    ((x, _, _),) = list(build_loader(find_images(few_images), loaded.data_config, batch_size=16))
    with torch.no_grad():
        states = reference_states(loaded.model, x)
    for l, h in enumerate(states):
        want = brute_token_cosine(h[:, 1:]).mean().item()
        got = layers[(layers.metric == "token_cosine") & (layers.layer == l)]["mean"].item()
        assert got == pytest.approx(want, abs=1e-5)


def test_every_attention_tap_gives_the_same_tables(tiny_folder, few_images, tmp_path):
    tables = {}
    for tap in ("auto", "qk", "inline", "softmax"):
        out = tmp_path / tap
        res = invoke("measure", tiny_folder, few_images, "--out", out, "--device", "cpu", "--attention-tap", tap, "-q")
        assert res.exit_code == 0, res.output
        assert json.loads((out / "summary.json").read_text())["run"]["attention_tap"] == tap.replace("auto", "inline")
        tables[tap] = pd.read_csv(out / "layers.csv")
    for tap, table in tables.items():
        assert table[["metric", "layer"]].equals(tables["qk"][["metric", "layer"]]), tap
        assert table["mean"].to_numpy() == pytest.approx(tables["qk"]["mean"].to_numpy(), abs=1e-6), tap


def test_json_prints_only_the_summary(tiny_folder, few_images, tmp_path):
    res = invoke("measure", tiny_folder, few_images, "--out", tmp_path / "j", "--json", "--device", "cpu")
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["images"]["measured"] == 5 and data["out"] == str(tmp_path / "j")


def test_timm_name_with_model_args_and_limit(few_images, tmp_path):
    args = ["measure", TINY_ARCH, few_images, "--out", tmp_path / "n", "--limit", "3", "--seed", "1", "-q"]
    res = invoke(*args, *tiny_cli_args())
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "n" / "layers.csv").n_images.unique().tolist() == [3]


def test_unreadable_file_is_skipped_listed_or_fatal_with_strict(tiny_folder, few_images, tmp_path):
    (few_images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = invoke("measure", tiny_folder, few_images, "--out", tmp_path / "s", "-q")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["images"]["skipped"] == 1 and summary["images"]["measured"] == 5
    assert summary["images"]["skipped_files"][0]["path"].endswith("broken.jpg")
    res = invoke("measure", tiny_folder, few_images, "--out", tmp_path / "strict", "--fail-on-unreadable", "-q")
    assert res.exit_code == 2
    assert "broken.jpg" in res.stderr and "--fail-on-unreadable" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "strict").exists(), "nothing half-written after a failure"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")], "no temp folder left"


def test_out_folder_is_protected_unless_overwrite(tiny_folder, few_images, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = invoke("measure", tiny_folder, few_images, "--out", out, "-q")
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    assert (out / "keep.txt").exists()
    res = invoke("measure", tiny_folder, few_images, "--out", out, "-q", "--overwrite")
    assert res.exit_code == 0 and (out / "layers.csv").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t, f, i: ["measure", t / "missing.pth", i], "does not exist"),
        (lambda t, f, i: ["measure", f, t / "nothing-here"], "does not exist"),
        (lambda t, f, i: ["measure", f, t / "empty"], "no images in"),
        (lambda t, f, i: ["measure", "vit_tiny_patch16_22", i], "did you mean vit_tiny_patch16_224"),
        (lambda t, f, i: ["measure", f, i, "--device", "cuda"], "no CUDA device"),
        (lambda t, f, i: ["measure", "resnet18", i], "family 'resnet'"),
        (lambda t, f, i: ["measure", f, i, "--model-arg", "depth=5"], "missing"),
        (lambda t, f, i: ["measure", f / "model.safetensors", i, "--arch", "nope_vit"], "unknown timm model"),
        (lambda t, f, i: ["measure", f, i, "--model-arg", "oops"], "KEY=VALUE"),
    ],
    ids=[
        "missing-model",
        "missing-images",
        "empty-folder",
        "unknown-name",
        "no-cuda",
        "no-attention",
        "key-misfit",
        "bad-arch",
        "bad-model-arg",
    ],
)
def test_bad_input_exits_2_with_one_line(make_args, message, tiny_folder, few_images, tmp_path):
    if torch.cuda.is_available() and message == "no CUDA device":
        pytest.skip("CUDA is available here")
    (tmp_path / "empty").mkdir()
    res = invoke(*make_args(tmp_path, tiny_folder, few_images), "--out", tmp_path / "o", "-q")
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert res.stderr.strip().startswith("Error:") and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_no_strict_loads_and_lists_misfits(tiny_folder, few_images, tmp_path):
    res = invoke(
        "measure", tiny_folder, few_images, "--out", tmp_path / "ns", "--allow-key-mismatch", "-q", "--model-arg",
        "depth=4",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    load = json.loads((tmp_path / "ns" / "summary.json").read_text())["model"]["load"]
    assert "blocks.3.attn.qkv.weight" in load["missing_keys"]


def test_old_spelling_no_strict_still_allows_a_key_mismatch(tiny_folder, few_images, tmp_path):
    """``--no-strict`` (before ``--allow-key-mismatch``) still works, hidden from --help."""
    res = invoke(
        "measure", tiny_folder, few_images, "--out", tmp_path / "ns", "-q", "--no-strict", "--model-arg", "depth=4"
    )
    assert res.exit_code == 0, res.output
    load = json.loads((tmp_path / "ns" / "summary.json").read_text())["model"]["load"]
    assert "blocks.3.attn.qkv.weight" in load["missing_keys"]
    res = invoke("measure", tiny_folder, few_images, "--out", tmp_path / "s", "-q", "--model-arg", "depth=4")
    assert res.exit_code == 2 and "--allow-key-mismatch" in res.stderr
    assert "--no-strict" not in invoke("measure", "--help").output


def test_old_spelling_strict_still_fails_on_an_unreadable_image(tiny_folder, few_images, tmp_path):
    """``--strict`` (before ``--fail-on-unreadable``) still works, hidden from --help."""
    (few_images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = invoke("measure", tiny_folder, few_images, "--out", tmp_path / "strict", "--strict", "-q")
    assert res.exit_code == 2 and "broken.jpg" in res.stderr and "--fail-on-unreadable" in res.stderr
    assert not (tmp_path / "strict").exists()
    assert "--strict" not in invoke("measure", "--help").output


def test_pickled_model_needs_trust(tiny_model, few_images, tmp_path):
    torch.save(tiny_model, tmp_path / "whole.pt")
    res = invoke("measure", tmp_path / "whole.pt", few_images, "--out", tmp_path / "p", "-q")
    assert res.exit_code == 2 and "--trust-checkpoint" in res.stderr
    res = invoke("measure", tmp_path / "whole.pt", few_images, "--out", tmp_path / "p", "-q", "--trust-checkpoint")
    assert res.exit_code == 0, res.output


def test_streaming_keeps_constant_state(tiny_folder, few_images, tmp_path):
    """60 images through batches of 4: the accumulator holds fixed-size sums, equal to a one-batch run."""
    listing = tmp_path / "many.txt"
    paths = sorted(p for p in few_images.rglob("*.*"))
    listing.write_text("\n".join(str(paths[i % len(paths)]) for i in range(60)))
    streamed = measure(str(tiny_folder), listing, MeasureConfig(batch_size=4, device="cpu"))
    one = measure(str(tiny_folder), listing, MeasureConfig(batch_size=60, device="cpu"))
    acc = streamed.accumulator
    assert acc.n_images == 60
    states = list(acc.layers.values()) + list(acc.heads.values())
    assert all(isinstance(m, RunningMoments) for m in states)
    assert sum(m.state().numel() for m in states) == sum(
        m.state().numel() for m in list(one.accumulator.layers.values()) + list(one.accumulator.heads.values())
    )
    assert not any(isinstance(v, list) for v in vars(acc).values())
    pd.testing.assert_frame_equal(streamed.layers, one.layers, atol=1e-6, rtol=0)


def test_python_m_and_help_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "oversmooth_cli", "measure", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--batch-size" in out.stdout and "token_cosine" in out.stdout
    out = subprocess.run([sys.executable, "-m", "oversmooth_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("oversmooth ")


def test_no_applicable_metric_is_bad_input(few_images, tmp_path):
    res = invoke(
        "measure",
        "test_vit2",
        few_images,
        "--model-arg",
        "img_size=32",
        "--metrics",
        "cls_patch_cosine",
        "--out",
        tmp_path / "o",
        "-q",
    )
    assert res.exit_code == 2 and "no selected metric applies" in res.stderr and "class token" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_unwritable_output_is_exit_2_and_a_bug_is_exit_3(tiny_folder, few_images, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = invoke("measure", tiny_folder, few_images, "--out", blocker / "run", "-q")
    assert res.exit_code == 2 and "cannot access" in res.stderr and "Traceback" not in res.output

    import oversmooth_cli.measuring.run as M

    def boom(*_a, **_k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(M, "measure_batches", boom)
    res = invoke("measure", tiny_folder, few_images, "--out", tmp_path / "bug", "-q")
    assert res.exit_code == 3, "a crash must never look like a failed check (1) or bad input (2)"
    assert "internal error RuntimeError: simulated bug" in res.stderr and "OVERSMOOTH_DEBUG" in res.stderr
    assert not (tmp_path / "bug").exists()


def test_worker_traceback_is_reduced_to_its_message():
    from oversmooth_cli.cli.app import one_line

    wrapped = (
        "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise UserError(m)\n'
        "oversmooth_cli.errors.UserError: cannot read image a.png: OSError: broken\n"
    )
    assert one_line(wrapped) == "cannot read image a.png: OSError: broken"
    assert one_line("plain\nmessage") == "plain message"


def test_choices_the_command_line_shows_are_the_librarys():
    """``--attention-tap`` and ``--direction`` offer exactly the values the library accepts, in its order."""
    from oversmooth_cli.gate.selection import DIRECTIONS
    from oversmooth_cli.measuring.config import ATTENTION_TAPS

    for command, flag, values in (("measure", "--attention-tap", ATTENTION_TAPS), ("check", "--direction", DIRECTIONS)):
        help_text = " ".join(invoke(command, "--help", env={"COLUMNS": "200"}).output.split())
        assert f"{flag} [{'|'.join(values)}]" in help_text or f"{flag} <{'|'.join(values)}>" in help_text
