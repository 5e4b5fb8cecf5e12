"""Where tokens sit in the model input: patch grids and token positions in pixels.

:func:`patch_geometry` reads a timm model's patch grid from its ``patch_embed``; :func:`infer_grid` finds the grid
behind a token count (dynamic image sizes); :func:`patch_positions` and :func:`pairwise_distances` give the pixel
positions and query-key distances that position-based metrics (``attention_distance``) need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

__all__ = [
    "PatchGeometry",
    "infer_grid",
    "pairwise_distances",
    "patch_geometry",
    "patch_grid",
    "patch_positions",
]


@dataclass(frozen=True)
class PatchGeometry:
    """Where patch tokens sit in the model input: the default patch grid, a patch's stride in pixels, and whether
    the model accepts other image sizes (``dynamic_img_size``: the grid then follows the token count)."""

    grid: tuple[int, int]
    stride: tuple[float, float]
    dynamic: bool = False


def patch_geometry(model: nn.Module) -> PatchGeometry | None:
    """The patch grid of a timm model, read from ``patch_embed`` (``grid_size``, and ``img_size`` or ``patch_size``).

    The stride is ``img_size / grid_size`` (a patch's extent in input pixels, also for hybrid stems) and falls back
    to ``patch_size``. ``None`` when the model has no such patch embedding.
    """
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if grid is None:
        return None
    grid = (int(grid[0]), int(grid[1]))
    img = getattr(pe, "img_size", None)
    patch = getattr(pe, "patch_size", None)
    if img is not None:
        stride = (float(img[0]) / grid[0], float(img[1]) / grid[1])
    elif patch is not None:
        stride = (float(patch[0]), float(patch[1]))
    else:
        return None
    return PatchGeometry(grid, stride, bool(getattr(model, "dynamic_img_size", False)))


def infer_grid(n_patches: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The patch grid behind ``n_patches`` tokens: ``grid`` when it fits, else (dynamic image size) the factor pair
    ``(rows, cols)`` whose aspect ratio is closest to ``grid``'s (a square grid for a square number of patches;
    on a tie, the landscape pair with ``rows < cols``).

    Raises:
        ValueError: ``n_patches < 1``.
    """
    if n_patches < 1:
        raise ValueError(f"no patch tokens to place on a grid ({n_patches})")
    if grid[0] * grid[1] == n_patches:
        return int(grid[0]), int(grid[1])
    aspect = math.log(grid[0] / grid[1])
    pairs = [(r, n_patches // r) for r in range(1, n_patches + 1) if n_patches % r == 0]
    return min(pairs, key=lambda rc: (round(abs(math.log(rc[0] / rc[1]) - aspect), 9), rc[0] > rc[1]))


def patch_positions(
    grid: tuple[int, int], patch: tuple[int, int], num_prefix: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Pixel coordinates ``(y, x)`` of every token's patch centre in the model input, row-major as timm flattens.

    Args:
        grid: ``(rows, cols)`` of patches.
        patch: ``(height, width)`` of a patch in input pixels.
        num_prefix: leading tokens without a position (class, distillation, register tokens): ``NaN`` rows.
        device: where the tensor lives.

    Returns:
        ``(num_prefix + rows * cols, 2)`` float32.
    """
    rows, cols = grid
    ys = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) * patch[0]
    xs = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) * patch[1]
    centres = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
    prefix = torch.full((num_prefix, 2), math.nan, dtype=torch.float32, device=device)
    return torch.cat([prefix, centres])


def pairwise_distances(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(..., Q, K)`` between positions ``(..., Q, 2)`` and ``(..., K, 2)``; ``NaN`` propagates."""
    return (query_pos.unsqueeze(-2) - key_pos.unsqueeze(-3)).pow(2).sum(dim=-1).sqrt()


def patch_grid(model: nn.Module, data_config: dict) -> tuple[tuple[int, int], int]:
    """``((patch_h, patch_w), n_patches)`` of the model's patch embedding at the data config's input size (the grid
    that patch CutMix and ``l_token`` work on).

    Raises:
        UserError: the model has no ``patch_embed.patch_size``, or the input size does not tile into whole patches.
    """
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "patch_size", None)
    if size is None:
        raise UserError(f"{type(model).__name__} has no patch_embed.patch_size; patch CutMix and --loss token need it")
    ph, pw = (size, size) if isinstance(size, int) else tuple(size)
    _, h, w = data_config["input_size"]
    if h % ph or w % pw:
        raise UserError(f"input size {h}x{w} does not tile into {ph}x{pw} patches; patch CutMix needs whole patches")
    return (ph, pw), (h // ph) * (w // pw)
