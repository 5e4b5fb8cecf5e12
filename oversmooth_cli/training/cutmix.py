"""Patch CutMix: boxes snapped to the token grid, per-patch label targets, smoothed one-hot."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..reading.geometry import area_pool

__all__ = ["CutMixBox", "patch_area_fractions", "patch_cutmix", "rand_box", "smooth_one_hot"]


# -- targets and patch CutMix -----------------------------------------------------------------------------------
def smooth_one_hot(
    labels: torch.Tensor, num_classes: int, smoothing: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(B,)`` labels -> ``(B, C)`` targets ``(1 - s) * onehot + s / C`` (what ``F.cross_entropy`` smooths to)."""
    onehot = F.one_hot(labels, num_classes).to(dtype)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


@dataclass(frozen=True)
class CutMixBox:
    """Pasted box in pixels, half-open: rows ``top:bottom``, columns ``left:right``."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def area(self) -> int:
        return max(0, self.bottom - self.top) * max(0, self.right - self.left)


def _snap(v: int, step: float, limit: int) -> int:
    return min(limit, max(0, round(round(v / step) * step)))


def rand_box(
    height: int,
    width: int,
    lam: float,
    rng: random.Random,
    snap_to: tuple[float, float] | None = None,
) -> CutMixBox:
    """A CutMix box covering about ``1 - lam`` of the image (timm's ``rand_bbox``), optionally snapped to a grid.

    Args:
        height, width: image size in pixels.
        lam: kept fraction; the box side is ``sqrt(1 - lam)`` of the image side, clipped at the borders.
        rng: source of the box centre.
        snap_to: ``(cell_h, cell_w)`` in pixels: round every edge to the nearest cell boundary (then to a whole
            pixel), so each cell is wholly inside or wholly outside the box when the cells are whole pixels.
    """
    ratio = math.sqrt(max(0.0, 1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = max(0, cy - cut_h // 2), min(height, cy + cut_h // 2)
    left, right = max(0, cx - cut_w // 2), min(width, cx + cut_w // 2)
    if snap_to is not None:
        ph, pw = snap_to
        top, bottom = _snap(top, ph, height), _snap(bottom, ph, height)
        left, right = _snap(left, pw, width), _snap(right, pw, width)
    return CutMixBox(top, bottom, left, right)


def _grid_of(height: int, width: int, patch: tuple[int, int] | None, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        return int(grid[0]), int(grid[1])
    if patch is None:
        raise ValueError("give the token grid (rows, cols) or the patch size (patch_h, patch_w)")
    ph, pw = patch
    if height % ph or width % pw:
        raise ValueError(f"a {height}x{width} image does not tile into {ph}x{pw} patches")
    return height // ph, width // pw


def patch_area_fractions(
    box: CutMixBox,
    height: int,
    width: int,
    patch: tuple[int, int] | None = None,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Fraction of each token cell's area inside ``box``, ``(rows * cols,)`` row-major.

    Args:
        box: the pasted box.
        height, width: image size in pixels.
        patch: ``(patch_h, patch_w)``: cells of this size, which must tile the image.
        grid: ``(rows, cols)`` of tokens covering the image evenly (cells need not be whole pixels); wins over
            ``patch``.
    """
    grid = _grid_of(height, width, patch, grid)
    mask = torch.zeros(1, height * width, 1, dtype=torch.float64)
    mask.view(height, width)[box.top : box.bottom, box.left : box.right] = 1.0
    return area_pool(mask, (height, width), grid).reshape(-1).float()


def patch_cutmix(
    images: torch.Tensor,
    targets: torch.Tensor,
    patch: tuple[int, int] | None,
    alpha: float,
    rng: random.Random,
    snap: bool = True,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CutMixBox]:
    """Paste a box from the batch's mirror image (``flip(0)``, as timm pairs them) with per-token soft targets.

    Each token's target is ``(1 - a_p) y + a_p y'`` where ``a_p`` is the fraction of its cell's area inside the
    box; the image target is mixed by the pasted area ``A``: ``(1 - A) y + A y'``.

    Args:
        images: ``(B, C, H, W)``.
        targets: ``(B, K)`` soft image targets (label smoothing already applied).
        patch: ``(patch_h, patch_w)`` of the model's patch embedding (the token cells), or ``None`` with ``grid``.
        alpha: ``lam ~ Beta(alpha, alpha)``.
        rng: source of ``lam`` and the box.
        snap: snap the box to the cell grid (every token target is then one of the two labels when the cells are
            whole pixels).
        grid: ``(rows, cols)`` of the tokens the loss reads (the last token layer's grid: the coarsest one of a
            hierarchical model); wins over ``patch``.

    Returns:
        ``(mixed images, image targets (B, K), token targets (B, rows * cols, K), box)``.
    """
    _, _, height, width = images.shape
    rows, cols = _grid_of(height, width, patch, grid)
    lam = rng.betavariate(alpha, alpha)
    box = rand_box(height, width, lam, rng, (height / rows, width / cols) if snap else None)
    sl_rows, sl_cols = slice(box.top, box.bottom), slice(box.left, box.right)
    mixed = images.clone()
    mixed[:, :, sl_rows, sl_cols] = images.flip(0)[:, :, sl_rows, sl_cols]
    other = targets.flip(0)
    a = patch_area_fractions(box, height, width, grid=(rows, cols)).to(targets.device, targets.dtype)  # (n,)
    patch_targets = (1.0 - a)[None, :, None] * targets[:, None, :] + a[None, :, None] * other[:, None, :]
    area = box.area / (height * width)
    return mixed, (1.0 - area) * targets + area * other, patch_targets, box
