"""Position rules of the families (:attr:`~oversmooth_cli.reading.registry.Group.positions`): which cells of a
block's input grid each attention window holds, in the order the model flattens them, or why its weights have no
positions (:data:`~oversmooth_cli.reading.geometry.PositionRule`). Used by the registry entries in
:mod:`oversmooth_cli.reading.families`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .geometry import WindowLayout, cell_centres, pool_cells, strided_cells, window_cells

__all__ = [
    "block_windows",
    "gcvit_windows",
    "hiera_windows",
    "maxvit_windows",
    "mixed_heads",
    "mobilevit_windows",
    "msra_windows",
    "nest_windows",
    "sam2_windows",
    "swin_windows",
    "twins_windows",
]


def _pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def swin_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout:
    """Swin / SwinV2 / SwinV2-CR blocks: cyclic shift by ``-shift_size``, pad, ``window_size`` windows."""
    block = model.get_submodule(name)
    return WindowLayout(grid, window_cells(grid, _pair(block.window_size), _pair(block.shift_size)))


def block_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout | None:
    """Blocks with a ``window_size`` (SAM, TinyViT, DaViT): pad, partition; ``0``: global attention (no windows)."""
    size = _pair(model.get_submodule(name).window_size)
    return WindowLayout(grid, window_cells(grid, size)) if all(size) else None


def twins_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout | None:
    """Twins: locally-grouped attention (``attn.ws``) in windows; global sub-sampled attention over the image."""
    ws = getattr(model.get_submodule(name).attn, "ws", None)
    return WindowLayout(grid, window_cells(grid, (ws, ws))) if ws else None


def maxvit_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout | None:
    """MaxViT: block attention (``window_partition``) or grid attention (``grid_partition``, dilated windows)."""
    block = model.get_submodule(name)
    if not hasattr(block, "partition_size"):  # CoAtNet / MaxViT transformer blocks attend over the whole map
        return None
    size = _pair(block.partition_size)
    return WindowLayout(grid, window_cells(grid, size) if block.partition_block else strided_cells(grid, size))


def gcvit_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout:
    """GCViT: windows; in global-query blocks every window's queries are the stage's global query tokens, a
    ``window_size`` grid pooled from the whole feature map."""
    block: Any = model.get_submodule(name)
    size = _pair(block.window_size)
    queries = None
    if block.attn.use_global:
        queries = (cell_centres(size) * torch.tensor([grid[0] / size[0], grid[1] / size[1]])).reshape(1, -1, 2)
    return WindowLayout(grid, window_cells(grid, size), queries)


def nest_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout:
    """NesT: the level's input is already cut into ``block_size`` blocks, ``(B, blocks, N, C)``; the grid is the
    level's feature map (blocks per side x block size)."""
    level: Any = model.get_submodule(name.split(".transformer_encoder")[0])
    side = math.isqrt(level.pos_embed.shape[1]) * level.block_size
    return WindowLayout((side, side), window_cells((side, side), _pair(level.block_size)))


def sam2_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout | None:
    """SAM2 Hiera: windows; at a stage change the queries are max-pooled by ``q_stride`` inside each window."""
    block = model.get_submodule(name)
    if not block.is_windowed:
        return None
    size = _pair(block.window_size)
    keys = window_cells(grid, size)
    return WindowLayout(grid, keys, pool_cells(keys, size, _pair(block.q_stride)) if block.q_stride else None)


def mobilevit_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout:
    """MobileViT: one sequence per pixel offset inside a ``patch_size`` patch, over the patches (a strided
    partition whose windows are the offsets)."""
    ph, pw = _pair(model.get_submodule(name.split(".transformer")[0]).patch_size)
    return WindowLayout(grid, strided_cells(grid, (grid[0] // ph, grid[1] // pw)))


def hiera_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout:
    """Hiera: tokens in the model's unrolled order (``model.unroll`` applied to the patch grid's cells), max-pooled
    ``prod(q_stride)`` at a time at every stage change; mask-unit attention splits them into ``num_windows`` units
    (token ``n`` in unit ``n % units``); pooled queries are the centre of the tokens they pool."""
    hiera: Any = model
    attn = hiera.get_submodule(name).attn
    patches = tuple(hiera.unroll.size)
    cells = hiera.unroll(cell_centres(patches).reshape(1, -1, 2))
    pool = math.prod(_pair(hiera.q_stride))
    while cells.shape[1] > grid[0] * grid[1]:
        cells = cells.view(1, pool, -1, 2).mean(dim=1)
    n = cells.shape[1]
    units = n // (attn.q_stride * attn.window_size) if attn.use_mask_unit_attn else 1
    keys = cells.view(n // units, units, 2).transpose(0, 1)
    queries = keys.reshape(units, attn.q_stride, -1, 2).mean(dim=1) if attn.q_stride > 1 else None
    return WindowLayout(patches, keys, queries)


def mixed_heads(model: nn.Module, name: str, grid: tuple[int, int]) -> str:
    """Talking-heads attention (CaiT, EfficientFormer-V2): the weights applied to the values mix the heads' softmax
    maps with signed weights, so a row is no distribution over keys and has no mean distance."""
    return "talking-heads weights (heads mixed after the softmax) are no distribution over keys: no mean distance"


def msra_windows(model: nn.Module, name: str, grid: tuple[int, int]) -> WindowLayout:
    """EfficientViT-MSRA: local windows of the attention's ``resolution``, the map padded to whole windows."""
    block: Any = model.get_submodule(name)
    size = _pair(block.mixer.m.attn.resolution)
    return WindowLayout(grid, window_cells(grid, size))
