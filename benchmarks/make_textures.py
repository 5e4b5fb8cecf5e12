"""Make a second labelled data set, of another kind than the digits: grayscale texture crops, one class per source.

Six photographs of ``../shared/data/images`` (brick, grass, gravel, cell, hubble_deep_field, retina: CC0 or public
domain, see that folder's README) are converted to grayscale; each class is crops of one of them, of a random side
between 48 and 112 pixels, resized to 32 x 32. Training crops come from the top 70% of the image, validation crops
from the bottom 30%, so no pixel is in both. Seeded, so the set is the same on every machine::

    python benchmarks/make_textures.py runs/textures      # runs/textures/{train,val}/<class>/*.png

Used by ``benchmarks/defaults_sweep.py --data textures`` to check the finetune defaults away from the digits.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "data" / "images"
SOURCES = {
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "cell": "cell.png",
    "hubble": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
}
"""Class name -> source image."""


def crops(image: Image.Image, rows: tuple[float, float], n: int, rng: random.Random) -> list[Image.Image]:
    """``n`` random square crops (side 48-112 px) whose rows lie within the ``rows`` fraction of the image, 32 px."""
    width, height = image.size
    top, bottom = int(rows[0] * height), int(rows[1] * height)
    out = []
    for _ in range(n):
        side = rng.randint(48, min(112, bottom - top, width))
        x, y = rng.randint(0, width - side), rng.randint(top, bottom - side)
        out.append(image.crop((x, y, x + side, y + side)).resize((32, 32), Image.Resampling.BILINEAR))
    return out


def make(out: Path, train: int = 120, val: int = 40, seed: int = 0) -> Path:
    """Write ``out/train/<class>/`` (``train`` crops per class) and ``out/val/<class>/`` (``val``); returns ``out``."""
    rng = random.Random(seed)
    for name, file in SOURCES.items():
        image = Image.open(IMAGES / file).convert("L")
        for split, rows, n in (("train", (0.0, 0.7), train), ("val", (0.7, 1.0), val)):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(crops(image, rows, n, rng)):
                crop.save(folder / f"{name}-{i:03d}.png")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=REPO / "runs" / "textures")
    args = parser.parse_args(argv)
    if not IMAGES.is_dir():
        print(f"needs ../shared/data/images beside the repository ({IMAGES} is missing)", file=sys.stderr)
        return 2
    print(make(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
