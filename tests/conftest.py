"""Shared fixtures: real images from ../shared/data, tiny timm ViT configs and checkpoints saved by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PHOTOS = SHARED_DATA / "images"
DIGITS = SHARED_DATA / "digits"

TINY_ARCH = "vit_tiny_patch16_224"
TINY_ARGS = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}
"""A 3-block ViT on 32 px images: 16 patch tokens + 1 class token, runs in milliseconds on a CPU."""

SEED = 0


def tiny_cli_args(args: dict | None = None) -> list[str]:
    """``--model-arg`` flags for a tiny timm model on the command line."""
    out = []
    for k, v in (args or TINY_ARGS).items():
        out += ["--model-arg", f"{k}={json.dumps(v)}"]
    return out


def save_checkpoint_folder(
    model: torch.nn.Module, folder: Path, arch: str = TINY_ARCH, args: dict | None = None
) -> Path:
    """The timm / Hugging Face layout: config.json + model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = {
        "architecture": arch,
        "num_classes": model.num_classes,
        "model_args": args or TINY_ARGS,
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0},
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(SEED)


@pytest.fixture(scope="session")
def photos() -> Path:
    assert PHOTOS.is_dir(), f"real test images expected in {PHOTOS} (../shared/data beside the repo)"
    return PHOTOS


@pytest.fixture
def tiny_model():
    import timm

    torch.manual_seed(SEED)
    return timm.create_model(TINY_ARCH, pretrained=False, num_classes=10, **TINY_ARGS).eval()


@pytest.fixture
def tiny_folder(tmp_path: Path, tiny_model) -> Path:
    return save_checkpoint_folder(tiny_model, tmp_path / "tiny-vit")


@pytest.fixture
def few_images(tmp_path: Path, photos: Path) -> Path:
    """Five real photos of mixed modes (RGB, L, RGBA, JPEG) copied into a folder."""
    import shutil

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("chelsea.png", "camera.png", "horse.png"):
        shutil.copy(photos / name, folder / name)
    for name in ("rocket.jpg", "coins.png"):
        shutil.copy(photos / name, folder / "sub" / name)
    return folder
