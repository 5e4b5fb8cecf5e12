"""The measurements behind ``check``'s per-metric default tolerances (the README's *Default tolerances* table).

For one model it measures every metric (``--metrics all``, CPU) on a pool of real images and prints, per metric,
how far re-measurements of the same model move the per-layer means:

- the same images again: an identical run, batch size 1 instead of 32, the ``qk`` and ``softmax`` taps instead of
  ``inline`` (float rounding only);
- the same images under bf16 autocast against float32 (what ``--amp`` does on a GPU: the largest difference a
  re-measurement of the same checkpoint on the same images can show);
- different images: five random halves of the pool (``limit=N/2, seed=0..4``), every pair of them.

Each line gives the largest absolute difference over the layers and the largest relative one (difference over
``|baseline|``), and for the halves the median over the 10 pairs too. A default should sit well above the first two
and below the third.

Usage::

    python scripts/tolerance_evidence.py digits    # examples/digits-vit on the 40 digits of examples/images
    python scripts/tolerance_evidence.py tiny12    # random-init 12-block ViT of width 32 (32 px, 16 patches)
    python scripts/tolerance_evidence.py tiny224   # random-init vit_tiny_patch16_224 (12 blocks, 196 patches)
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from oversmooth_cli.measuring.config import MeasureConfig
from oversmooth_cli.measuring.run import measure
from oversmooth_cli.reading.loading import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]
DIGITS = sorted((REPO / "examples" / "images" / "digits").glob("*.png"))
TRAIN_DIGITS = sorted((REPO / "tests" / "data" / "digits" / "train").rglob("*.png"))
PHOTOS = sorted(
    p
    for folder in (REPO / "examples" / "photos", REPO / "tests" / "data" / "photos")
    for p in folder.iterdir()
    if p.suffix in (".png", ".jpg")
)


def setup(name: str) -> tuple[LoadedModel, list[Path]]:
    """The model and the image pool of one experiment."""
    torch.manual_seed(0)
    if name == "digits":
        return load_model(str(REPO / "examples" / "digits-vit")), DIGITS
    if name == "tiny12":
        args = {"img_size": 32, "patch_size": 8, "depth": 12, "embed_dim": 32, "num_heads": 2}
        return load_model("vit_tiny_patch16_224", model_args=args), TRAIN_DIGITS + DIGITS
    return load_model("vit_tiny_patch16_224"), PHOTOS + TRAIN_DIGITS[:20]


def means(loaded: LoadedModel, images: list[Path], **kw) -> pd.Series:
    """``{(metric, layer): mean}`` of one measurement."""
    config = MeasureConfig(device="cpu", metrics="all", **kw)
    return measure(loaded, images, config).layers.set_index(["metric", "layer"])["mean"]


def differences(a: pd.Series, b: pd.Series) -> dict[str, tuple[float, float]]:
    """``{metric: (largest |b - a|, largest |b - a| / |a|)}`` over the layers."""
    diff = (b - a).abs()
    rel = diff / a.abs().replace(0, np.nan)
    return {m: (float(diff[m].max()), float(rel[m].max())) for m in a.index.get_level_values(0).unique()}


def show(title: str, rows: dict[str, tuple[float, float]]) -> None:
    print(f"## {title}")
    for metric, (absolute, relative) in rows.items():
        print(f"  {metric:34s} max|d| {absolute:9.3g}   max rel {relative:9.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("digits", "tiny12", "tiny224"))
    loaded, images = setup(parser.parse_args().model)
    base = means(loaded, images)
    print(f"{len(images)} images; per-layer means range per metric:")
    for metric in base.index.get_level_values(0).unique():
        print(f"  {metric:34s} {base[metric].abs().min():.3g} .. {base[metric].abs().max():.3g}")
    show("identical re-run", differences(base, means(loaded, images)))
    show("batch size 1 vs 32", differences(base, means(loaded, images, batch_size=1)))
    for tap in ("qk", "softmax"):
        show(f"tap {tap} vs inline", differences(base, means(loaded, images, attention_tap=tap)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # measure's own autocast is CUDA-only; this one wraps it
        show("bf16 autocast vs float32", differences(base, means(loaded, images)))
    half = len(images) // 2
    halves = [means(loaded, images, limit=half, seed=seed) for seed in range(5)]
    pairs: dict[str, list[tuple[float, float]]] = {}
    for a, b in itertools.combinations(halves, 2):
        for metric, value in differences(a, b).items():
            pairs.setdefault(metric, []).append(value)
    print(f"## {half} of {len(images)} images, 5 seeds, 10 pairs: median (max) over the pairs")
    for metric, values in pairs.items():
        v = np.array(values)
        print(
            f"  {metric:34s} max|d| {np.median(v[:, 0]):9.3g} ({v[:, 0].max():.3g})   "
            f"max rel {np.median(v[:, 1]):9.3g} ({v[:, 1].max():.3g})"
        )


if __name__ == "__main__":
    main()
