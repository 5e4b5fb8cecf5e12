"""The input pipeline: image discovery and robust decoding, streamed through a DataLoader with the model's own eval
transform (``measure``), and labelled ImageFolder data with seeded augmentation and per-rank sampling (``finetune``).

What counts as the same images: a measured image is known by the SHA-256 of its file's bytes, computed from the very
bytes that are decoded (each file is read once, :func:`read_rgb`). The same file under another name or in another
folder is the same image; one changed byte (a pixel, or metadata) makes it another image.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import re
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import UserError
from .runtime import derive_seed, seeded

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageBatch",
    "ImagePathDataset",
    "LabelledImages",
    "Sample",
    "ShardSampler",
    "build_loader",
    "build_transform",
    "discover_classes",
    "file_digest",
    "find_images",
    "ignore_sigint",
    "load_rgb",
    "prepare_data",
    "read_rgb",
    "sample_paths",
    "shard_paths",
    "stratified_split",
    "train_transform",
]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


_BINARY = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
"""Control bytes no text list of paths holds (tabs, line ends and form feeds are text)."""


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
    with open(src, "rb") as f:
        data = f.read(1 << 16)  # binary data shows in the first bytes: a large non-list file is not read whole
        if not _BINARY.search(data):
            data += f.read()
    if _BINARY.search(data):
        raise UserError(
            f"{source} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a text list of paths "
            "(it holds binary data)"
        )
    lines = [ln.strip() for ln in os.fsdecode(data).splitlines()]  # names in any encoding, as the file system has them
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


def read_rgb(path: str | Path, draft_size: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """:func:`load_rgb` and the SHA-256 (hex) of the file's bytes: the file is read once, hashed, then decoded from
    those same bytes, so the hash names exactly what was measured."""
    data = Path(path).read_bytes()
    return _decode_rgb(_NamedBytes(data, str(path)), draft_size), hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path) -> str:
    """The SHA-256 (hex) of a file's bytes: what :func:`read_rgb` returns beside the decoded image."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _NamedBytes(io.BytesIO):
    """A file's bytes in memory that PIL's messages still name by the file's path."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def load_rgb(path: str | Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image to 8-bit RGB: EXIF orientation applied; L, LA, P, RGBA, CMYK, YCbCr, 16-bit and float
    images converted; the first frame of an animation. ``draft_size`` lets a JPEG decode at a reduced
    power-of-two scale that still covers that size (``Image.draft``): much faster for large photos, and the
    eval resize that follows still sets the final size.

    PIL's warnings while decoding (a large image, odd EXIF or palette data) are silenced: the image either decodes
    or raises, and an image over PIL's hard limit raises ``DecompressionBombError`` (skipped and listed by ``measure``).
    """
    return _decode_rgb(path, draft_size)


def _decode_rgb(source: str | Path | io.BytesIO, draft_size: tuple[int, int] | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(source) as im:
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
    """Paths -> ``(tensor or None, index, error or None)``; a file that fails to decode is reported, not raised.

    With ``digests``, items are ``(tensor or None, index, error or None, sha256 or None)``: the SHA-256 of the bytes
    that were decoded (:func:`read_rgb`), ``None`` for a file that failed.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable[[Image.Image], torch.Tensor],
        draft_size: tuple[int, int] | None = None,
        digests: bool = False,
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.draft_size = draft_size
        self.digests = digests

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple:
        digest = None
        try:
            path = self.paths[index]
            image, digest = read_rgb(path, self.draft_size) if self.digests else (load_rgb(path, self.draft_size), None)
            item: tuple = (self.transform(image), index, None)
        except Exception as e:  # a corrupt file must not stall the run: report it
            item, digest = (None, index, f"{type(e).__name__}: {e}"), None
        return (*item, digest) if self.digests else item


ImageBatch = tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]
"""``(images or None, their indices, [(index, error), ...])``; a loader built with ``digests=True`` adds a fourth
element: the SHA-256 of each decoded image, in the order of the indices."""


def collate_images(items: list[tuple]) -> tuple:
    """Stack the decoded images; return ``(images or None, their indices, [(index, error), ...])``, plus the decoded
    images' SHA-256 digests when the items carry them (:class:`ImagePathDataset` with ``digests``)."""
    good = [(item[0], item[1], item[3:]) for item in items if item[2] is None and item[0] is not None]
    bad = [(item[1], item[2]) for item in items if item[2] is not None]
    images = torch.stack([x for x, _, _ in good]) if good else None
    batch = (images, [i for _, i, _ in good], bad)
    if items and len(items[0]) > 3:
        return (*batch, [d[0] for _, _, d in good])
    return batch


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
    digests: bool = False,
) -> DataLoader:
    """Stream ``paths`` in order through the model's eval transform, in batches of :data:`ImageBatch`; with
    ``digests``, each batch also carries the SHA-256 of every decoded image's file (read once, while decoding)."""
    dataset = ImagePathDataset(
        paths, build_transform(data_config), draft_size_for(data_config) if draft else None, digests
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


# -- labelled images (ImageFolder layout) for training --------------------------------------------------------------
Sample = tuple[Path, int]
"""``(image path, class index)``."""


def discover_classes(root: str | Path, flag: str = "TRAIN_DIR") -> dict[str, list[Path]]:
    """Images per class of an ImageFolder layout ``root/<class>/...`` (classes sorted by name, files recursive)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a folder (expected {root}/<class>/<image>, the ImageFolder layout)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{flag} {root} has no class sub-folders; expected {root}/<class>/<image> (ImageFolder layout)")
    if len(classes) < 2:
        raise UserError(f"{flag} {root} has one class folder ({classes[0]}); classification needs at least 2 classes")
    per_class = {
        c: sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        for c in classes
    }
    empty = [c for c in classes if not per_class[c]]
    if empty:
        raise UserError(
            f"class folder {root / empty[0]} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
        )
    return per_class


def stratified_split(
    per_class: dict[str, list[Path]], fraction: float, seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Hold out ``round(fraction * n_c)`` random images of every class (each class keeps at least one for training)."""
    rng = random.Random(seed)
    train, val = {}, {}
    for c, paths in per_class.items():
        shuffled = list(paths)
        rng.shuffle(shuffled)
        k = min(len(paths) - 1, round(fraction * len(paths)))
        val[c], train[c] = sorted(shuffled[:k]), sorted(shuffled[k:])
    if not any(val.values()):
        raise UserError(f"--val-split {fraction} holds out no image; raise it or give --val-dir")
    return train, val


def _samples(per_class: dict[str, list[Path]], classes: list[str]) -> list[Sample]:
    return [(p, classes.index(c)) for c in classes for p in per_class.get(c, [])]


def prepare_data(
    train_dir: str | Path, val_dir: str | Path | None, val_split: float, seed: int
) -> tuple[list[str], list[Sample], list[Sample]]:
    """Class names, training samples and validation samples ``(path, label)``."""
    train = discover_classes(train_dir)
    classes = list(train)
    if val_dir is None:
        train, val = stratified_split(train, val_split, seed)
    else:
        val = discover_classes(val_dir, "--val-dir")
        if list(val) != classes:
            missing = sorted(set(classes) - set(val))
            extra = sorted(set(val) - set(classes))
            raise UserError(
                f"--val-dir {val_dir} has other classes than {train_dir}: missing {missing or 'none'}, "
                f"extra {extra or 'none'}; both need the same class folders"
            )
    return classes, _samples(train, classes), _samples(val, classes)


class LabelledImages(Dataset):
    """``(image tensor, label)``; with ``seed``, the augmentation of image ``i`` in epoch ``e`` is seeded by both."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, seed: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except Exception as e:
            raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
        if self.seed is None:
            return self.transform(image), label
        with seeded(derive_seed(self.seed, "item", self.epoch, index)):
            return self.transform(image), label


class ShardSampler(Sampler[int]):
    """This rank's part of a per-epoch permutation (padded by wrapping so every rank gets as many), minus ``skip``."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.rank, self.world, self.skip = n, seed, epoch, rank, world, skip

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        total = math.ceil(self.n / self.world) * self.world
        order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank :: self.world][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.world) - self.skip)


def ignore_sigint(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave Ctrl-C to the main process (which stops at the next step)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_transform(data_config: dict[str, Any], hflip: float, crop_scale: float) -> Callable:
    """timm's training transform for the model's data config (random-resized crop down to ``crop_scale`` of the
    area, horizontal flip with chance ``hflip``, colour jitter)."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(
        **{k: data_config[k] for k in keys if k in data_config},
        is_training=True,
        hflip=hflip,
        scale=(crop_scale, 1.0),
    )
