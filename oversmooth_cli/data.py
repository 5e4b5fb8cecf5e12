"""Image discovery and robust decoding, streamed through a DataLoader with the model's own eval transform."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset

from .errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageBatch",
    "ImagePathDataset",
    "build_loader",
    "build_transform",
    "find_images",
    "load_rgb",
    "sample_paths",
    "shard_paths",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
ImageFile.LOAD_TRUNCATED_IMAGES = False


def find_images(source: str | Path) -> list[Path]:
    """Images named by ``source``: a folder (searched recursively), one image, or a text file of paths.

    Relative paths in a list file are resolved against the list's folder. The result is sorted, so runs
    are reproducible.
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise UserError(f"image path {source} does not exist")
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise UserError(f"no images in {source} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
        return paths
    if src.suffix.lower() in IMAGE_EXTENSIONS:
        return [src]
    try:
        lines = [ln.strip() for ln in src.read_text().splitlines()]
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a text list of paths") from e
    paths = [(src.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines if ln and ln[0] != "#"]
    if not paths:
        raise UserError(f"image list {source} names no images")
    return paths


def sample_paths(paths: Sequence[Path], limit: int | None, seed: int = 0) -> list[Path]:
    """A reproducible random sample of ``limit`` paths (all of them, in order, when ``limit`` is None)."""
    if limit is None or limit >= len(paths):
        return list(paths)
    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    picked = sorted(random.Random(seed).sample(range(len(paths)), limit))
    return [paths[i] for i in picked]


def shard_paths(paths: Sequence[Path], rank: int, world_size: int) -> list[Path]:
    """Disjoint shard of a path list for one process: every path in exactly one shard."""
    return list(paths[rank::world_size])


def _to_uint8(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images to 8 bits (PIL's own conversion clips them)."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return img
    arr = arr.astype(np.float64)
    lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") or arr.max() > 255 else (0.0, 255.0)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max()) or 1.0
    arr = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def load_rgb(path: str | Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image to 8-bit RGB: EXIF orientation applied; L, LA, P, RGBA, CMYK, YCbCr, 16-bit and float
    images converted; the first frame of an animation. ``draft_size`` lets a JPEG decode at a reduced
    power-of-two scale that still covers that size (``Image.draft``): much faster for large photos, and the
    eval resize that follows still sets the final size."""
    with Image.open(path) as im:
        if draft_size is not None and im.format == "JPEG":
            im.draft("RGB", draft_size)
        im.load()
        img = ImageOps.exif_transpose(im)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_uint8(img)
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


class ImagePathDataset(Dataset):
    """Paths -> ``(tensor or None, index, error or None)``; a file that fails to decode is reported, not raised."""

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable[[Image.Image], torch.Tensor],
        draft_size: tuple[int, int] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            return self.transform(load_rgb(self.paths[index], self.draft_size)), index, None
        except Exception as e:  # a corrupt file must not stall the run: report it
            return None, index, f"{type(e).__name__}: {e}"


ImageBatch = tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]


def collate_images(items: list[tuple[torch.Tensor | None, int, str | None]]) -> ImageBatch:
    """Stack the decoded images; return ``(images or None, their indices, [(index, error), ...])``."""
    good = [(x, i) for x, i, err in items if err is None]
    bad = [(i, err) for _x, i, err in items if err is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


def build_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform for a resolved data config."""
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)


def draft_size_for(data_config: dict[str, Any]) -> tuple[int, int]:
    """Smallest decode size that still covers the eval resize (input size divided by crop_pct)."""
    _, h, w = data_config["input_size"]
    crop = float(data_config.get("crop_pct") or 1.0)
    return int(np.ceil(w / crop)), int(np.ceil(h / crop))


def build_loader(
    paths: Sequence[Path],
    data_config: dict[str, Any],
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
    draft: bool = True,
) -> DataLoader:
    """Stream ``paths`` in order through the model's eval transform, in batches."""
    dataset = ImagePathDataset(paths, build_transform(data_config), draft_size_for(data_config) if draft else None)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
