"""Where tokens sit in the model input: patch grids and token positions in pixels.

:func:`patch_geometry` reads a timm model's patch grid from its ``patch_embed``; :func:`infer_grid` finds the grid
behind a token count (dynamic image sizes); :func:`patch_positions` and :func:`pairwise_distances` give the pixel
positions and query-key distances that position-based metrics (``attention_distance``) need.

Attention whose keys are not the model's whole patch grid (windows, stages of hierarchical models, pooled keys) is
placed by :class:`AttentionPositions`: every token of a ``(rows, cols)`` token grid sits at the centre of the image
region its cell covers (the stage's stride is the input size over the grid), and a family's position rule
(:attr:`~oversmooth_cli.reading.registry.Group.positions`) says which cells each attention window holds, in the order
the model flattens them (:func:`window_cells`, :func:`strided_cells`, :func:`pool_cells`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "AttentionPositions",
    "PatchGeometry",
    "PositionRule",
    "TokenPositions",
    "WindowLayout",
    "area_pool",
    "area_weights",
    "cell_boxes",
    "cell_centres",
    "grid_positions",
    "infer_grid",
    "pairwise_distances",
    "patch_geometry",
    "patch_positions",
    "pool_cells",
    "query_key_distances",
    "strided_cells",
    "window_cells",
]


if TYPE_CHECKING:
    from .registry import BlockSpec, FamilyAdapter


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
    grid: tuple[int, int], patch: tuple[float, float], num_prefix: int = 0, device: torch.device | str = "cpu"
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


class TokenPositions(NamedTuple):
    """Pixel positions ``(y, x)`` of one attention's queries ``(..., T, 2)`` and keys ``(..., S, 2)``.

    ``NaN`` marks a token without a position: a prefix (class) token, or padding a model adds to fill whole windows.
    Such keys are left out of a row (its weights renormalised); such query rows give ``0`` and ``row_scale`` (all
    query rows / rows with a position) turns the mean over all rows into the mean over rows with a position.
    ``missing`` says why the measured query rows have no position at all (empty: they have one).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    missing: str = ""
    row_scale: float = 1.0


def query_key_distances(
    positions: TokenPositions | None, start: int, rows: int, keys: int, batch: tuple[int, int] | None = None
) -> torch.Tensor | str:
    """Distances in pixels ``(..., 1, rows, keys)`` between the query rows ``start:start + rows`` and the keys of an
    attention placed at ``positions`` (of the batch rows ``batch = (b0, n)``, when the positions are per batch row);
    a string says why there are none."""
    if positions is not None and positions.missing:
        return positions.missing
    if positions is None or positions.keys.shape[-2] != keys:
        return "no patch positions for the attention keys of at least one layer"
    queries, key_pos = positions.queries[..., start : start + rows, :], positions.keys
    if batch is not None:  # per-batch-row positions (B, T, 2): the block's rows
        queries, key_pos = (
            p[batch[0] : sum(batch)] if p.dim() == 3 and p.shape[0] > 1 else p for p in (queries, key_pos)
        )
    d = pairwise_distances(queries, key_pos)
    return d.unsqueeze(-3) if d.dim() == 3 else d


@dataclass(frozen=True)
class WindowLayout:
    """Which cells of a token grid each attention window holds (what a family's position rule returns).

    Attributes:
        grid: ``(rows, cols)`` of the grid the coordinates are in; a cell is ``input size / grid`` pixels.
        keys: ``(windows, S, 2)`` cell coordinates of every window's keys, in the model's token order; the centre of
            cell ``(i, j)`` is ``(i + 0.5, j + 0.5)``.
        queries: ``(windows or 1, T, 2)`` coordinates of the queries when they are not the keys (pooled queries,
            GCViT's global queries); ``None``: the keys.
    """

    grid: tuple[int, int]
    keys: torch.Tensor
    queries: torch.Tensor | None = None


PositionRule = Callable[[nn.Module, str, tuple[int, int]], "WindowLayout | str | None"]
"""``f(model, block_name, grid)`` -> where a block's attention queries and keys sit, given its input token grid
``(rows, cols)``: its windows (:class:`WindowLayout`); ``None``: queries and keys each cover the whole image (the
default for blocks without a rule); a string: why they have no positions."""


def cell_centres(grid: tuple[int, int]) -> torch.Tensor:
    """``(rows, cols, 2)`` float64 centres ``(i + 0.5, j + 0.5)`` of a grid's cells."""
    ys = torch.arange(grid[0], dtype=torch.float64) + 0.5
    xs = torch.arange(grid[1], dtype=torch.float64) + 0.5
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)


def cell_boxes(grid: tuple[int, int], image: tuple[int, int]) -> torch.Tensor:
    """``(rows * cols, 4)`` float64 pixel boxes ``(x0, y0, x1, y1)`` of a ``(rows, cols)`` token grid covering an
    ``image`` of ``(height, width)`` pixels, row-major as the tokens: cell ``(i, j)`` spans ``x`` from ``j * width /
    cols`` to ``(j + 1) * width / cols`` and ``y`` likewise (the stage's stride is the input size over the grid, as
    :class:`AttentionPositions` places tokens); the boxes tile the image."""
    (rows, cols), (height, width) = grid, image
    ys = torch.arange(rows + 1, dtype=torch.float64) * height / rows  # the last edge is exactly the height
    xs = torch.arange(cols + 1, dtype=torch.float64) * width / cols
    y0, x0 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4)


def window_cells(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Cell coordinates ``(windows, wh * ww, 2)`` of non-overlapping windows as timm partitions a ``(rows, cols)``
    map (Swin ``window_partition``): a cyclic shift by ``-shift`` (``torch.roll``), zero padding at the bottom and
    right up to whole windows, windows row-major, tokens row-major inside each window.

    A shifted window holds the cells the roll brings into it (cells of the opposite image edge included); padding
    cells are ``NaN`` (they cover no part of the image).
    """
    (gh, gw), (wh, ww) = grid, window
    hp, wp = gh + (-gh % wh), gw + (-gw % ww)
    rows = torch.arange(hp)
    cols = torch.arange(wp)
    rows = torch.where(rows < gh, (rows + shift[0]) % gh + 0.5, math.nan).double()
    cols = torch.where(cols < gw, (cols + shift[1]) % gw + 0.5, math.nan).double()
    cells = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    cells[~torch.isfinite(cells).all(dim=-1)] = math.nan
    return cells.view(hp // wh, wh, wp // ww, ww, 2).permute(0, 2, 1, 3, 4).reshape(-1, wh * ww, 2)


def strided_cells(grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Cell coordinates ``(windows, sh * sw, 2)`` of a strided (dilated) partition: window ``(i, j)`` holds the cells
    ``(a * rows / sh + i, b * cols / sw + j)`` for ``a < sh``, ``b < sw`` (MaxViT ``grid_partition``; MobileViT's
    sequences, one per pixel offset inside a patch, are this with ``size`` = the number of patches)."""
    (gh, gw), (sh, sw) = grid, size
    cells = cell_centres(grid)
    return cells.view(sh, gh // sh, sw, gw // sw, 2).permute(1, 3, 0, 2, 4).reshape(-1, sh * sw, 2)


def pool_cells(cells: torch.Tensor, window: tuple[int, int], pool: tuple[int, int]) -> torch.Tensor:
    """``(windows, (wh / ph) * (ww / pw), 2)``: each window's ``(wh, ww)`` row-major cells pooled ``(ph, pw)`` at a
    time (the centre of the pooled region; ``NaN`` if it pools padding), as a strided pooling of queries inside each
    window does."""
    (wh, ww), (ph, pw) = window, pool
    pooled = cells.view(-1, wh // ph, ph, ww // pw, pw, 2).mean(dim=(2, 4))
    return pooled.reshape(cells.shape[0], -1, 2)


def grid_positions(
    n_tokens: int, prefix: int, image: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(n_tokens, 2)`` pixel positions: ``prefix`` leading ``NaN`` rows, then a row-major token grid covering the
    ``image`` (the grid behind the count, shaped like the image: :func:`infer_grid`), each token at its cell's
    centre; all ``NaN`` when no token is past the prefix."""
    n = n_tokens - prefix
    if n < 1:
        return torch.full((n_tokens, 2), math.nan, device=device)
    grid = infer_grid(n, image)
    return patch_positions(grid, (image[0] / grid[0], image[1] / grid[1]), prefix, device)


def _unplaced(reason: str) -> TokenPositions:
    """Positions of an attention that cannot be placed: empty, with the reason."""
    return TokenPositions(torch.empty(0, 2), torch.empty(0, 2), reason)


def _image_module(model: nn.Module, adapter: FamilyAdapter) -> nn.Module | None:
    """The module whose first input is the image: the first of the adapter's ``image_input`` the model has, else
    (none given) the first registered ``Conv2d`` taking the model's input channels (timm's stems and patch
    embeddings)."""
    named = dict(model.named_modules())
    for name in adapter.image_input:
        if name in named:
            return named[name]
    if adapter.image_input:
        return None
    channels = int(getattr(model, "in_chans", 0) or getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0])
    return next((m for m in named.values() if isinstance(m, nn.Conv2d) and m.in_channels == channels), None)


class AttentionPositions:
    """Query and key positions in input pixels of attention whose keys are not the model's whole patch grid, or
    whose family has a position rule.

    Hooks (removed by the caller): the module that takes the image records the input size, each attention block's
    input records its token grid (from a ``NHWC`` / ``NCHW`` shape, else the grid behind its token count shaped like
    the image). Then a block without a window rule has its queries and keys each on a grid covering the image (pooled
    keys, subsampled queries: the grid behind their count); a block with one (:class:`WindowLayout`) has the cells
    its rule gives, window by window, repeated for every image of the batch (or the rule's reason for none).

    Args:
        model: the model.
        adapter: its family adapter.
        count_tokens: ``f(block_input, spec)`` -> the tokens per image (prefix included) of a block's input.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, count_tokens: Callable[[Any, BlockSpec], int]):
        self.model, self.adapter, self.count_tokens = model, adapter, count_tokens
        self.image: tuple[int, int] | None = None
        self.grids: dict[str, tuple[int, int]] = {}
        self._cache: dict[tuple, TokenPositions] = {}

    def install(self, specs: list[BlockSpec]) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks recording the input size and each attention block's grid; none when no module takes the image."""
        found = _image_module(self.model, self.adapter)
        if found is None:
            return []
        handles = [found.register_forward_pre_hook(self._record_image)]
        for spec in specs:
            if spec.attention is not None:
                handles.append(spec.module.register_forward_pre_hook(self._grid_recorder(spec)))
        return handles

    def _record_image(self, _module: nn.Module, args: tuple) -> None:
        self.image = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    def _grid_recorder(self, spec: BlockSpec) -> Callable:
        def record(_module: nn.Module, args: tuple) -> None:
            if self.image is not None:
                n = self.count_tokens(args, spec) - spec.prefix
                shape = self.adapter.token_grid(args, spec)
                self.grids[spec.name] = shape if shape and shape[0] * shape[1] == n else infer_grid(n, self.image)

        return record

    def __call__(
        self, spec: BlockSpec, rows: int, windows: int, queries: int, keys: int, device: torch.device
    ) -> TokenPositions:
        """Positions of a block's ``queries`` and ``keys`` for each of its ``rows`` batch rows (``windows`` per image,
        image-major); when there are none, ``missing`` says why."""
        if self.image is None:
            return _unplaced(f"no module taking the image ran before {spec.name}: the input size is unknown")
        grid = self.grids.get(spec.name)
        key = (spec.name, grid, self.image, rows, windows, queries, keys, str(device))
        if key not in self._cache:
            self._cache[key] = self._place(spec, grid, rows, windows, queries, keys, device)
        return self._cache[key]

    def _place(
        self, spec: BlockSpec, grid: tuple[int, int] | None, rows: int, windows: int, queries: int, keys: int, device
    ) -> TokenPositions:
        image, prefix = self.image, spec.prefix
        assert image is not None  # __call__ places nothing before the input size is known
        rule = spec.group.positions
        layout = rule(self.model, spec.name, grid) if rule is not None and grid is not None else None
        if isinstance(layout, str):
            return _unplaced(f"{spec.name}: {layout}")
        if layout is None:
            if windows > 1:
                return _unplaced(
                    f"{spec.name} attends in {windows} windows per image and its family has no position rule"
                )
            q = grid_positions(queries, prefix, image, device)
            all_placed = bool(torch.isfinite(q[spec.query_prefix :]).all())
            missing = "" if all_placed else f"the queries of {spec.name} are prefix (class) tokens, without a position"
            return TokenPositions(q, grid_positions(keys, prefix, image, device), missing)
        q = layout.keys if layout.queries is None else layout.queries
        if layout.keys.shape[:2] != (windows, keys) or q.shape[-2] != queries or prefix:
            return _unplaced(
                f"{spec.name}: its position rule gives {layout.keys.shape[0]} windows of {layout.keys.shape[1]} keys "
                f"and {q.shape[-2]} queries, the attention has {windows} of {keys} keys and {queries} queries"
            )
        scale = torch.tensor([image[0] / layout.grid[0], image[1] / layout.grid[1]], dtype=torch.float64)
        q = q.expand(windows, -1, -1)
        placed = int(torch.isfinite(q).all(dim=-1).sum())
        if not placed:
            return _unplaced(f"no query of {spec.name} has a position")
        images = rows // windows
        k = (layout.keys * scale).float().repeat(images, 1, 1)
        q = (q * scale).float().repeat(images, 1, 1)
        return TokenPositions(q.to(device), k.to(device), row_scale=windows * queries / placed)


def area_weights(source: int, target: int) -> torch.Tensor:
    """``(target, source)`` float64: the share of target cell ``i`` that source cell ``j`` covers, when both split the
    same extent into equal cells (``source`` and ``target`` of them). Rows sum to 1; each cell's value is then the
    area average of the cells it overlaps (the same as adaptive average pooling when ``source`` is a multiple of
    ``target``, and also exact when it is not)."""
    s = torch.arange(source + 1, dtype=torch.float64) / source
    t = torch.arange(target + 1, dtype=torch.float64) / target
    overlap = (torch.minimum(t[1:, None], s[None, 1:]) - torch.maximum(t[:-1, None], s[None, :-1])).clamp(min=0)
    return overlap * target


def area_pool(tokens: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """Row-major tokens ``(..., rows * cols, C)`` of a ``grid`` covering the image, averaged by area onto the ``to``
    grid over the same image: ``(..., to_rows * to_cols, C)``; every output token is the area-weighted mean of the
    input tokens whose cells overlap its cell (:func:`area_weights`). Computed in the tokens' dtype."""
    if tuple(grid) == tuple(to):
        return tokens
    (rows, cols), (to_rows, to_cols) = grid, to
    w_rows = area_weights(rows, to_rows).to(tokens.device, tokens.dtype)
    w_cols = area_weights(cols, to_cols).to(tokens.device, tokens.dtype)
    x = tokens.unflatten(-2, (rows, cols))
    out = torch.einsum("ir,jc,...rcd->...ijd", w_rows, w_cols, x)
    return out.flatten(-3, -2)
