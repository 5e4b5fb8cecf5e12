"""Shared fixtures: tiny timm ViTs, checkpoints saved by the tests and folders of real photos (from tests/data and
examples/, inside the repository). The plain helpers and constants they use are in ``_helpers.py``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests._helpers")

import torch  # noqa: E402

from ._helpers import PHOTOS, SEED, TINY_ARCH, TINY_ARGS, save_checkpoint_folder  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One definition of slow (see the ``slow`` marker in pyproject.toml): every multi-process test is slow too."""
    for item in items:
        if item.get_closest_marker("distributed") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(SEED)


@pytest.fixture
def tiny_model():
    import timm

    torch.manual_seed(SEED)
    return timm.create_model(TINY_ARCH, pretrained=False, num_classes=10, **TINY_ARGS).eval()


@pytest.fixture
def tiny_folder(tmp_path: Path, tiny_model) -> Path:
    return save_checkpoint_folder(tiny_model, tmp_path / "tiny-vit")


@pytest.fixture
def few_images(tmp_path: Path) -> Path:
    """Five real photos of mixed modes (RGB, L, RGBA, JPEG) copied into a folder."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("chelsea.png", "camera.png", "horse.png"):
        shutil.copy(PHOTOS[name], folder / name)
    for name in ("rocket.jpg", "coins.png"):
        shutil.copy(PHOTOS[name], folder / "sub" / name)
    return folder
