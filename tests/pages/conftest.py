"""Real run folders for the page tests, made by the real commands: the bundled digits ViT measured on the bundled
digits (every metric), a 1-epoch ``finetune --control`` of the tiny 2-block ViT on real digits, and its ``--seeds``
twin. Patch maps (``patches.csv`` / ``patches.npz``) are written by :func:`write_patch_fixture` from the real
digits, to the file contract the pages read, so the page tests do not depend on how a run chooses its maps.

No fixture here is autouse: the browser tests in this folder have their own.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from .._helpers import (
    DIGITS_VAL,
    REPO,
    TINY_ARCH,
    TINY_ARGS_DEPTH2,
    digit_folders,
    invoke,
    tiny_cli_args,
    torch_threads,
)

PATCH_FILES = ("patches.csv", "patches.npz", "patches.png")
FINETUNE_OPTIONS = ["--epochs", "1", "--batch-size", "8", "--device", "cpu", "--lr", "2e-3", "--loss", "cos,cons,token"]
MEASURED_MAPS = {"similarity": [0, 2, 4, 6, 8], "attention": [2, 4, 6, 8]}
"""The layers of the measure run's patch fixture, per kind (as a run of the 8-block digits ViT would choose)."""


def model_input(path: Path, size: int) -> np.ndarray:
    """A real image as the 32 px models see it: RGB, resized bicubic, ``uint8``."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def write_patch_fixture(
    folder: Path,
    images: Sequence[Path],
    indices: Sequence[int],
    grid: int,
    layers: Mapping[str, Sequence[int]],
    size: int = 32,
    offset: float = 0.0,
) -> pd.DataFrame:
    """``patches.csv`` and ``patches.npz`` in ``folder`` for real ``images`` (``image_index`` = ``indices``, their
    positions in the run), a ``grid`` x ``grid`` cell map at each of ``layers`` per kind. Values come from each
    cell's brightness: ``similarity`` in [-1, 1] (plus ``offset``), ``attention`` a distribution over the cells.
    Replaces any patch files already there; returns the table."""
    for name in PATCH_FILES:
        (folder / name).unlink(missing_ok=True)
    inputs = np.stack([model_input(p, size) for p in images])
    names = [p.relative_to(REPO).as_posix() if p.is_relative_to(REPO) else p.name for p in images]
    cell = size // grid
    rows = []
    for image, name, index in zip(inputs, names, indices, strict=True):
        bright = image.astype(float).mean(axis=2).reshape(grid, cell, grid, cell).mean(axis=(1, 3)) / 255.0
        for kind, kind_layers in layers.items():
            for layer in kind_layers:
                depth = layer / 10.0
                values = (
                    (2 * bright - 1) * (1 - depth) + depth + offset
                    if kind == "similarity"
                    else ((bright + 0.05 * (1 + depth)) / (bright + 0.05 * (1 + depth)).sum())
                )
                for r in range(grid):
                    for c in range(grid):
                        box = (float(c * cell), float(r * cell), float((c + 1) * cell), float((r + 1) * cell))
                        rows.append([name, index, layer, kind, r, c, *box, float(values[r, c])])
    columns = ["image", "image_index", "layer", "kind", "row", "col", "x0", "y0", "x1", "y1", "value"]
    table = pd.DataFrame(rows, columns=columns)
    table.to_csv(folder / "patches.csv", index=False)
    np.savez(folder / "patches.npz", inputs=inputs, names=np.array(names))
    return table


@pytest.fixture(scope="session")
def measured_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``measure`` of the bundled digits ViT on the 40 bundled digits, every metric, through the library and
    ``write_run``; no patch files."""
    from oversmooth_cli import MeasureConfig, measure, write_run

    out = tmp_path_factory.mktemp("pages-measure") / "run"
    with torch_threads(1):
        result = measure(
            REPO / "examples" / "digits-vit",
            DIGITS_VAL,
            MeasureConfig(device="cpu", batch_size=64, metrics="all", maps=0),
        )
    write_run(result, out)
    return out


@pytest.fixture(scope="session")
def patched_run(measured_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`measured_run` with the patch maps of 4 of its digits (8 x 8 cells of 4 px, :data:`MEASURED_MAPS`)."""
    out = tmp_path_factory.mktemp("pages-patched") / "run"
    shutil.copytree(measured_run, out)
    images = sorted(DIGITS_VAL.glob("*.png"))
    chosen = [0, 13, 26, 39]
    write_patch_fixture(out, [images[i] for i in chosen], chosen, grid=8, layers=MEASURED_MAPS)
    return out


def _finetune(root: Path, *extra: str) -> Path:
    train, val = digit_folders(root / "digits", ("0", "1", "2", "3"), train=4, val=2)
    out = root / "run"
    with torch_threads(1):
        res = invoke(
            "finetune",
            TINY_ARCH,
            train,
            "--val-dir",
            val,
            "--out",
            out,
            *extra,
            *FINETUNE_OPTIONS,
            *tiny_cli_args(TINY_ARGS_DEPTH2),
        )
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def seeds_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch ``finetune --control --seeds 0,1`` of the tiny 2-block ViT on 16 real digits (8 validation)."""
    return _finetune(tmp_path_factory.mktemp("pages-seeds"), "--control", "--seeds", "0,1")


@pytest.fixture(scope="session")
def control_run(seeds_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``finetune --control`` run folder: the seeds run's ``seed-0`` (bit for bit a separate ``--control --seed 0``
    run), copied, with patch maps of 2 validation digits in ``before/`` and ``after/`` (4 x 4 cells of 8 px;
    ``after`` shifted by 0.1)."""
    out = tmp_path_factory.mktemp("pages-control") / "run"
    shutil.copytree(seeds_run / "seed-0", out)
    val = sorted((seeds_run.parent / "digits" / "val").rglob("*.png"))[:2]
    layers = {"similarity": [0, 2], "attention": [1, 2]}
    for stage, offset in (("before", 0.0), ("after", 0.1)):
        write_patch_fixture(out / stage, val, [0, 1], grid=4, layers=layers, offset=offset)
    return out
