"""Multi-process runs (2 CPU processes, gloo) against one process, and the speed options of ``measure``.

Under ``torchrun`` each rank measures a disjoint shard of the image list and the accumulators are summed, so the
tables must equal a one-process run up to float rounding, with every image counted once and rank 0 alone writing.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from oversmooth_cli.data import shard_paths
from oversmooth_cli.measuring.run import MeasureConfig, measure

from ._helpers import PHOTOS, invoke

pytestmark = pytest.mark.distributed

RUN_FILES = {"layers.csv", "heads.csv", "summary.json", "curves.png", "patches.csv", "patches.npz", "patches.png"}
RUN_FILES |= {"report.html"}
KEYS = ["metric", "layer"]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Seven real photos (PNG and JPEG, RGB, L, RGBA) and one unreadable file: 8 paths, uneven over 2 ranks."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("chelsea.png", "camera.png", "horse.png", "rocket.jpg", "coins.png", "china.jpg", "text.png"):
        shutil.copy(PHOTOS[name], folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_tables(got: pd.DataFrame, want: pd.DataFrame, keys: list[str]) -> None:
    """Same rows and image counts; statistics equal up to float rounding (batches and sum order differ)."""
    got, want = got.sort_values(keys).reset_index(drop=True), want.sort_values(keys).reset_index(drop=True)
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got[[*keys, "n_images"]], want[[*keys, "n_images"]], check_dtype=False)
    stats = ["mean", "std", "ci95_low", "ci95_high"]
    pd.testing.assert_frame_equal(got[stats], want[stats], check_exact=False, rtol=1e-5, atol=1e-9)


def assert_two_rank_run_equals_one_process(summary, out, tmp_path, folders, image_dir, tiny_folder):
    """Rank 0's run folder and summary: 7 of 8 images measured once, the broken one listed, tables equal to one
    process; returns that one-process result."""
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == folders
    assert summary["run"]["world_size"] == 2
    assert summary["images"]["found"] == summary["images"]["selected"] == 8
    assert summary["images"]["measured"] == 7 and summary["images"]["skipped"] == 1
    assert [s["path"] for s in summary["images"]["skipped_files"]] == [str(image_dir / "broken.jpg")]
    single = measure(str(tiny_folder), image_dir, MeasureConfig(device="cpu", batch_size=3), command="one process")
    assert single.summary["run"]["world_size"] == 1
    assert_same_tables(pd.read_csv(out / "layers.csv"), single.layers, KEYS)
    assert_same_tables(pd.read_csv(out / "heads.csv"), single.heads, [*KEYS, "head"])
    assert (pd.read_csv(out / "layers.csv")["n_images"] == 7).all()
    # the patch maps: the same sample images (chosen over the run's ordered images, not a rank's shard), same cells
    cells = ["image", "image_index", "layer", "kind", "row", "col"]
    got, want = (
        t.sort_values(cells).reset_index(drop=True) for t in (pd.read_csv(out / "patches.csv"), single.maps.cells)
    )
    pd.testing.assert_frame_equal(got[cells], want[cells], check_dtype=False)
    assert got["value"].to_numpy() == pytest.approx(want["value"].to_numpy(), rel=1e-5, abs=1e-6)
    return single


# -- sharding ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 8])
def test_shards_are_disjoint_and_cover_every_path(n: int, world: int) -> None:
    paths = [Path(f"img{i}.png") for i in range(n)]
    shards = [shard_paths(paths, r, world) for r in range(world)]
    flat = [p for s in shards for p in s]
    assert sorted(flat) == sorted(paths) and len(flat) == n  # none dropped, none twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced


# -- torchrun + CLI ------------------------------------------------------------------------------------------------
def test_torchrun_two_processes_equal_one_process(tmp_path: Path, tiny_folder: Path, image_dir: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["-m", "oversmooth_cli", "measure", str(tiny_folder), str(image_dir), "--out", str(out)]
    cmd += ["--device", "cpu", "--batch-size", "2", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    # Rank 0 alone prints and writes: one JSON document on stdout, one complete run folder, no staging leftovers.
    summary = json.loads(res.stdout)
    single = assert_two_rank_run_equals_one_process(
        summary, out, tmp_path, ["images", "run", "tiny-vit"], image_dir, tiny_folder
    )
    assert summary["layers"].keys() == single.summary["layers"].keys()


# -- torchrun's environment, emulated with torch.multiprocessing.spawn: the CLI and the library in a gloo group ------
def _rank_main(rank: int, world: int, port: int, paths: dict[str, str], result_dir: str) -> None:
    """One rank, started with the variables torchrun sets: run the CLI on the folder (it joins the group from the
    environment), then call :func:`measure` on one image inside the already initialised group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from oversmooth_cli import runtime
    from oversmooth_cli.measuring import run

    shards: list[list[str]] = []
    real_loader = run.build_loader

    def recording_loader(paths, *args, **kwargs):
        shards.append([str(p) for p in paths])
        return real_loader(paths, *args, **kwargs)

    run.build_loader = recording_loader
    try:
        args = ["measure", paths["model"], paths["folder"], "--out", paths["out"], "--device", "cpu", "-b", "2"]
        cli = invoke(*args, "--json")
        joined = dist.is_initialized() and dist.get_world_size() == world
        config = run.MeasureConfig(device="cpu", batch_size=2)
        one = run.measure(paths["model"], paths["one"], config, command="spawned")
        result = {
            "exit_code": cli.exit_code,
            "error": repr(cli.exception) if cli.exception else None,
            "stdout": cli.stdout,
            "joined": joined,
            "shards": shards,
            "one": {"layers": one.layers, "heads": one.heads, "summary": one.summary},
        }
        Path(result_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        runtime.shutdown()


def test_two_ranks_shard_once_sum_and_only_rank0_writes(tmp_path: Path, tiny_folder: Path, image_dir: Path) -> None:
    import torch.multiprocessing as mp

    results = tmp_path / "results"
    results.mkdir()
    out = tmp_path / "run"
    # "one" is a single image: rank 1 gets an empty shard and must still join every collective.
    paths = {"model": str(tiny_folder), "folder": str(image_dir), "one": str(image_dir / "horse.png"), "out": str(out)}
    mp.spawn(_rank_main, args=(2, free_port(), paths, str(results)), nprocs=2, join=True)
    ranks = [pickle.loads((results / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    assert [r["exit_code"] for r in ranks] == [0, 0], [r["error"] for r in ranks]
    assert all(r["joined"] for r in ranks)

    # Every path in exactly one rank's shard (the unreadable one included), for the folder and the single image.
    folder_shards = [r["shards"][0] for r in ranks]
    assert sorted(folder_shards[0] + folder_shards[1]) == sorted(str(p) for p in image_dir.iterdir())
    assert not set(folder_shards[0]) & set(folder_shards[1])
    assert [r["shards"][1] for r in ranks] == [[paths["one"]], []]

    # Rank 0 alone prints and writes: one JSON summary, one complete run folder, no staging leftovers.
    assert ranks[1]["stdout"] == ""
    summary = json.loads(ranks[0]["stdout"])
    assert_two_rank_run_equals_one_process(
        summary, out, tmp_path, ["images", "results", "run", "tiny-vit"], image_dir, tiny_folder
    )

    single_one = measure(str(tiny_folder), paths["one"], MeasureConfig(device="cpu"), command="one process")
    for r in ranks:  # every rank ends with the summed statistics
        assert r["one"]["summary"]["images"]["measured"] == 1 and r["one"]["summary"]["run"]["world_size"] == 2
        assert_same_tables(r["one"]["layers"], single_one.layers, KEYS)
        assert_same_tables(r["one"]["heads"], single_one.heads, [*KEYS, "head"])


# -- speed options ------------------------------------------------------------------------------------------------
def test_channels_last_gives_the_same_tables(tmp_path: Path, tiny_folder: Path, few_images: Path) -> None:
    common = ["measure", tiny_folder, few_images, "--device", "cpu", "--quiet"]
    plain = invoke(*common, "--out", tmp_path / "plain")
    fast = invoke(*common, "--out", tmp_path / "cl", "--channels-last")
    assert plain.exit_code == 0 and fast.exit_code == 0, plain.output + fast.output
    summary = json.loads((tmp_path / "cl" / "summary.json").read_text())
    assert summary["run"]["channels_last"] is True and summary["run"]["compile"] is False
    assert_same_tables(
        pd.read_csv(tmp_path / "cl" / "layers.csv"), pd.read_csv(tmp_path / "plain" / "layers.csv"), KEYS
    )


def test_channels_last_restores_the_model_layout(tiny_model, few_images: Path) -> None:
    from oversmooth_cli.reading.loading import LoadedModel, resolve_data_config

    loaded = LoadedModel(tiny_model, "tiny", "vit_tiny_patch16_224", resolve_data_config(tiny_model))
    measure(loaded, few_images, MeasureConfig(device="cpu", channels_last=True), command="t")
    assert tiny_model.patch_embed.proj.weight.is_contiguous()


def test_compile_failure_falls_back_with_one_warning_line(
    tmp_path: Path,
    tiny_folder: Path,
    few_images: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler\nlong traceback line")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    common = ["measure", tiny_folder, few_images, "--device", "cpu", "--quiet"]
    with caplog.at_level(logging.WARNING, logger="oversmooth_cli.measuring.run"):
        res = invoke(*common, "--out", tmp_path / "compiled", "--compile")
    assert res.exit_code == 0, res.output
    warnings = [r.getMessage() for r in caplog.records if r.name == "oversmooth_cli.measuring.run"]
    assert warnings == [
        "torch.compile failed (RuntimeError: InductorError: no working C++ compiler); measuring without compilation"
    ]
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["run"]["compile"] is True and summary["run"]["compiled"] is False
    assert summary["images"]["measured"] == 5
    plain = invoke(*common, "--out", tmp_path / "plain")
    assert plain.exit_code == 0
    assert_same_tables(
        pd.read_csv(tmp_path / "compiled" / "layers.csv"), pd.read_csv(tmp_path / "plain" / "layers.csv"), KEYS
    )


def test_compile_unavailable_at_wrap_time_also_falls_back(
    tiny_model, few_images: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from oversmooth_cli.reading.loading import LoadedModel, resolve_data_config

    def unsupported(fn, *args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    loaded = LoadedModel(tiny_model, "tiny", "vit_tiny_patch16_224", resolve_data_config(tiny_model))
    with caplog.at_level(logging.WARNING, logger="oversmooth_cli.measuring.run"):
        result = measure(loaded, few_images, MeasureConfig(device="cpu", compile=True), command="t")
    assert len(caplog.records) == 1 and "not supported on this Python" in caplog.records[0].getMessage()
    assert result.summary["run"]["compiled"] is False and result.summary["images"]["measured"] == 5
