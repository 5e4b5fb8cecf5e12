"""Per-patch maps of a few sample images: how alike each patch token is to the others, and where attention goes.

``measure --maps K`` draws, for up to K sample images (:func:`choose_images`) at about five layers
(:func:`choose_layers`), one value per patch on each layer's own token grid:

* ``similarity``: each patch token's mean cosine to the image's other patch tokens (:func:`patch_similarity`),
  ``s_i = (u_i . sum_j u_j - |u_i|^2) / (n - 1)``, with ``u_i`` the patch tokens normalised exactly as
  :func:`~oversmooth_cli.metrics.formulas.token_cosine` normalises them (prefix tokens excluded). Their mean over the
  patches is the image's ``token_cosine`` at that layer. One O(n d) pass per image and layer.
* ``attention`` (blocks with token attention that attend over the whole image in one window): the class token's
  attention to each patch key (its softmax row restricted to the patch keys), or, without a class token, the mean of
  the patch queries' rows; averaged over heads (:func:`key_attention`). It comes from the attention the capture
  already reads for the metrics in the same forward pass: the model's probabilities (``softmax`` tap), or the
  capture's attention kernel (:func:`~oversmooth_cli.reading.attention.iter_attention_blocks`) on the ``q`` and ``k``
  the tap reads (``qk`` / ``inline``), for the sample images' batch rows only (the class token: one query row).
  Windowed families (Swin, MaxViT, NesT...) and blocks placed by a window rule get no attention map: a class-token
  or average-query row over the whole image does not exist there; ``notes`` says so.

Each map lives on the grid of its layer (hierarchical models: the stage's grid), every cell a box of model-input
pixels (:func:`~oversmooth_cli.reading.geometry.cell_boxes`), as the ``attention_distance`` metric places tokens.

:class:`PatchMapper` is the collector an :class:`~oversmooth_cli.reading.capture.OversmoothingCapture` holds when
asked (``patch_maps=True``, which only ``measure`` does: never the monitor nor the losses); its hooks return at once
in batches without a sample image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..metrics.formulas import EPS, to_float
from .attention import iter_attention_blocks
from .geometry import PatchGeometry, cell_boxes, infer_grid

if TYPE_CHECKING:
    from .capture import LayerContext
    from .registry import BlockSpec, FamilyAdapter

__all__ = [
    "MAP_KINDS",
    "MAP_LAYERS",
    "PATCH_COLUMNS",
    "UNORDERED_TOKENS",
    "PatchMap",
    "PatchMapRecords",
    "PatchMapper",
    "choose_images",
    "choose_layers",
    "display_image",
    "key_attention",
    "merge_records",
    "patch_similarity",
]


PATCH_COLUMNS: tuple[str, ...] = (
    "image",
    "image_index",
    "layer",
    "kind",
    "row",
    "col",
    "x0",
    "y0",
    "x1",
    "y1",
    "value",
)
"""The columns of ``patches.csv``: one row per map cell."""


MAP_KINDS: tuple[str, ...] = ("similarity", "attention")
"""The kinds of map, in the order they are drawn."""


MAP_LAYERS = 5
"""Layers mapped per sample image (fewer for shallow models): evenly spaced over the token layers."""


UNORDERED_TOKENS: dict[str, str] = {
    "nest": "NesT blocks hold image blocks (blocks x tokens), not a row-major token map",
    "hiera": "Hiera keeps its tokens in mask-unit (unrolled) order, not a row-major token map",
}
"""Adapters whose blocks keep their tokens in an order of their own: no map can be placed on their grid."""


def _spread(n: int, k: int) -> list[int]:
    """``min(k, n)`` positions evenly spaced over ``0..n-1``: ``i (n - 1) / (k - 1)`` rounded half up, first and last
    included (``[0]`` for ``k = 1``)."""
    k = min(k, n)
    if k <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({math.floor(i * (n - 1) / (k - 1) + 0.5) for i in range(k)})


def choose_images(n_images: int, k: int) -> list[int]:
    """Positions of the ``k`` sample images in a run's ordered list of ``n_images``: evenly spaced, the first and the
    last included (``round(i (N - 1) / (K - 1))``, half up); all of them when ``k >= n_images``."""
    return _spread(n_images, k)


def choose_layers(token_layers: Sequence[int], count: int = MAP_LAYERS) -> list[int]:
    """About ``count`` of the layers that have token metrics: ``round(linspace(0, len - 1, count))`` over them, so the
    first (layer 0, the block input) and the last are always in."""
    layers = sorted(token_layers)
    return [layers[i] for i in _spread(len(layers), count)]


def patch_similarity(tokens: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Each patch token's mean cosine to the other tokens of its image, ``(..., n, d)`` -> ``(..., n)``.

    ``s_i = (u_i . s - |u_i|^2) / (n - 1)`` with ``u_i = h_i / max(|h_i|, eps)`` and ``s = sum_j u_j``, computed as
    :func:`~oversmooth_cli.metrics.formulas.token_cosine` computes ``s`` (float32 or wider, autocast off): the mean
    of ``s_i`` over the tokens is ``token_cosine``.

    Raises:
        ValueError: fewer than 2 tokens.
    """
    x = to_float(tokens)
    n = x.shape[-2]
    if n < 2:
        raise ValueError(f"patch_similarity needs at least 2 tokens per image, got {n}")
    norms = torch.linalg.vector_norm(x, dim=-1)
    inv = norms.clamp_min(eps).reciprocal()
    with torch.autocast(device_type=x.device.type, enabled=False):
        s = (inv.unsqueeze(-2) @ x).squeeze(-2)
        dots = (x @ s.unsqueeze(-1)).squeeze(-1) * inv
    return (dots - (norms * inv).square()) / (n - 1)


def key_attention(rows: torch.Tensor, key_prefix: int) -> torch.Tensor:
    """Per-head attention to each patch key, ``(B, H, Q, S)`` probability rows -> ``(B, H, S - key_prefix)``: the mean
    of the given query rows (one row: the class token's), the ``key_prefix`` prefix keys left out (not renormalised:
    what the rows give the prefix keys is missing from the map)."""
    return to_float(rows[..., key_prefix:]).mean(dim=-2)


def display_image(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised model input ``(3, H, W)`` as a displayable ``(H, W, 3)`` uint8 image: ``x std + mean`` (the data
    config's), clipped to [0, 1]."""
    m = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    pixels = np.clip(np.asarray(x, dtype=np.float64) * s + m, 0.0, 1.0)
    return np.rint(pixels * 255.0).astype(np.uint8).transpose(1, 2, 0)


@dataclass(frozen=True)
class PatchMap:
    """One map: ``values`` (row-major over ``grid``) of one sample image at one layer.

    Attributes:
        image_index: the image's position in the run's ordered image list.
        layer: the layer (0 = block input).
        kind: ``similarity`` or ``attention`` (:data:`MAP_KINDS`).
        grid: ``(rows, cols)`` of the layer's tokens (attention: its patch keys).
        image: ``(height, width)`` of the model input in pixels.
        values: ``(rows * cols,)`` float64.
    """

    image_index: int
    layer: int
    kind: str
    grid: tuple[int, int]
    image: tuple[int, int]
    values: np.ndarray

    def cells(self) -> dict[str, np.ndarray]:
        """The map's ``patches.csv`` columns from ``row`` to ``value``: each cell's grid position, its box of input
        pixels ``(x0, y0, x1, y1)`` and its value."""
        rows, cols = self.grid
        index = np.arange(rows * cols)
        boxes = cell_boxes(self.grid, self.image).numpy()
        return {
            "row": index // cols,
            "col": index % cols,
            **{name: boxes[:, i] for i, name in enumerate(("x0", "y0", "x1", "y1"))},
            "value": np.asarray(self.values, dtype=np.float64),
        }


@dataclass
class PatchMapRecords:
    """What one process's capture mapped (picklable, gathered over processes by :func:`merge_records`).

    Attributes:
        layers: the layers chosen for maps.
        maps: every map, in the order they were made.
        inputs: ``{image index: (3, H, W) float32}`` normalised model input of each sample image.
        notes: ``{kind: why some layer has no map of that kind}`` (the first reason).
        attention: which rows the attention maps average: ``class token`` / ``mean over patch queries``.
    """

    layers: list[int]
    maps: list[PatchMap] = field(default_factory=list)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)


def merge_records(parts: Sequence[PatchMapRecords | None]) -> PatchMapRecords | None:
    """Every process's records as one (maps and inputs by image index); ``None`` when no process mapped."""
    given = [p for p in parts if p is not None]
    if not given:
        return None
    out = PatchMapRecords(list(given[0].layers))
    for part in given:
        out.maps.extend(part.maps)
        out.inputs.update(part.inputs)
        for kind, why in part.notes.items():
            out.notes.setdefault(kind, why)
        out.attention.extend(a for a in part.attention if a not in out.attention)
    out.maps.sort(key=lambda m: (m.image_index, MAP_KINDS.index(m.kind), m.layer))
    return out


def _bias_rows(bias: torch.Tensor | None, rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The batch rows ``rows`` of an additive logit bias, when it has one per batch row (else it broadcasts)."""
    if bias is None or bias.dim() < 4 or bias.shape[0] != batch or batch == 1:
        return bias
    return bias[rows]


class PatchMapper:
    """The per-patch maps of the sample images of a running forward pass, fed by an
    :class:`~oversmooth_cli.reading.capture.OversmoothingCapture`'s hooks.

    :meth:`begin` names the batch rows of the sample images before the forward pass and :meth:`end` keeps their maps
    (on the CPU) after it; in between, each hook at a chosen layer maps those rows. Between batches, or in a batch
    without a sample image, every hook returns at once.

    Args:
        adapter: the model's family adapter.
        geometry: the model's patch grid (``None``: not a single-grid model).
        layers: the layers to map (:func:`choose_layers`).
        attends: the capture reads attention (an attention metric is measured); else no attention maps.
        max_elements: block budget of the attention kernel (probability elements).
    """

    def __init__(
        self,
        adapter: FamilyAdapter,
        geometry: PatchGeometry | None,
        layers: Sequence[int],
        attends: bool = True,
        max_elements: int = 1 << 24,
    ) -> None:
        self.adapter, self.geometry, self.max_elements = adapter, geometry, max_elements
        self.records = PatchMapRecords(list(layers))
        if not attends:
            self.records.notes["attention"] = "no attention metric is measured: attention maps come from its attention"
        self._wanted = frozenset(layers)
        self._rows: dict[int, int] = {}
        self._index = torch.empty(0, dtype=torch.long)
        self._image = (0, 0)
        self._pending: dict[tuple[int, str], tuple[tuple[int, int], torch.Tensor, int]] = {}

    def begin(self, rows: Mapping[int, int], images: torch.Tensor) -> None:
        """The sample images of the next forward pass: ``{batch row: image index}``; their model inputs
        ``images[row]`` (``(B, 3, H, W)``, normalised) are kept for display."""
        self._rows = dict(sorted(rows.items()))
        self._index = torch.tensor(list(self._rows), dtype=torch.long)
        self._image = (int(images.shape[-2]), int(images.shape[-1]))
        for row, index in self._rows.items():
            self.records.inputs[index] = images[row].detach().float().cpu().numpy()
        self._pending.clear()

    def end(self) -> None:
        """Keep the forward pass's maps (one device-to-host copy per map); no sample rows until the next
        :meth:`begin`."""
        for (layer, kind), (grid, sums, count) in self._pending.items():
            values = (sums.double() / count).cpu().numpy()
            for j, index in enumerate(self._rows.values()):
                self.records.maps.append(PatchMap(index, layer, kind, grid, self._image, values[j]))
        self._pending.clear()
        self._rows = {}

    def _active(self, layer: int) -> bool:
        return bool(self._rows) and layer in self._wanted

    def _note(self, kind: str, why: str) -> None:
        self.records.notes.setdefault(kind, why)

    def _add(self, layer: int, kind: str, grid: tuple[int, int], values: torch.Tensor, count: int = 1) -> None:
        """Add ``values`` ``(samples, n)`` (a sum over ``count`` heads) to the layer's map of that kind."""
        key = (layer, kind)
        kept = self._pending.get(key)
        if kept is None:
            self._pending[key] = (grid, values, count)
        elif kept[0] == grid:  # an attention read in several calls (one per head): the heads add up
            self._pending[key] = (grid, kept[1] + values, kept[2] + count)
        else:
            self._note(kind, f"layer {layer}'s attention was read on grids {kept[0]} and {grid}")

    # -- grids ---------------------------------------------------------------------------------------------------
    def _grid(self, n: int) -> tuple[int, int]:
        """The grid of ``n`` row-major tokens covering the image: the model's patch grid when it is theirs (the grid
        behind the count for dynamic sizes), else the grid behind the count shaped like the input."""
        g = self.geometry
        if self.adapter.patch_grid and g is not None and (g.grid[0] * g.grid[1] == n or g.dynamic):
            return infer_grid(n, g.grid)
        return infer_grid(n, self._image)

    def _token_grid(self, spec: BlockSpec, value: Any, tokens: torch.Tensor) -> tuple[int, int] | str:
        """Where a layer's ``(B, T, C)`` tokens sit: a ``NHWC`` / ``NCHW`` output's own grid, else the grid behind
        their count; a string says why they cannot be placed."""
        n = tokens.shape[1] - spec.prefix
        if self.adapter.name in UNORDERED_TOKENS:
            return UNORDERED_TOKENS[self.adapter.name]
        if self.adapter.tokens(value, spec).shape[0] != tokens.shape[0]:
            return f"{spec.name} folds several sequences per image into the batch: not a row-major token map"
        shape = self.adapter.token_grid(value, spec)
        return shape if shape is not None and shape[0] * shape[1] == n else self._grid(n)

    def _key_grid(self, ctx: LayerContext, spec: BlockSpec, keys: int) -> tuple[int, int] | str:
        """Where an attention's patch keys sit, or why there is no class-token / average-query map over the image."""
        if ctx.windows > 1:
            return f"{spec.name} attends in {ctx.windows} windows per image: no attention row spans the image"
        if ctx.geometry is None and (spec.group.positions is not None or self.adapter.name in UNORDERED_TOKENS):
            return f"{spec.name}'s attention has a position rule of its family (windows, mixed heads): no map"
        if keys - spec.prefix < 2:
            return f"{spec.name} attends over {keys - spec.prefix} patch key(s)"
        return self._grid(keys - spec.prefix)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def on_tokens(self, layer: int, spec: BlockSpec, value: Any, tokens: torch.Tensor) -> None:
        """The similarity map of a layer's tokens ``(B, T, C)`` (prefix first; ``value``: the block's output or
        inputs they were read from)."""
        if not self._active(layer):
            return
        grid = self._token_grid(spec, value, tokens)
        if isinstance(grid, str):
            self._note("similarity", grid)
            return
        with torch.no_grad():
            rows = tokens.detach()[self._index.to(tokens.device), spec.prefix :]
            self._add(layer, "similarity", grid, patch_similarity(rows))

    def on_qk(
        self,
        ctx: LayerContext,
        spec: BlockSpec,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None,
    ) -> None:
        """The attention map from ``q``, ``k`` ``(B, H, T, dh)``: the capture's kernel on the sample rows (the class
        token's query row, else every patch query row)."""
        if not self._active(ctx.layer):
            return
        grid = self._key_grid(ctx, spec, k.shape[-2])
        if isinstance(grid, str):
            self._note("attention", grid)
            return
        with torch.no_grad():
            index = self._index.to(q.device)
            qr, kr, br = q.detach()[index], k.detach()[index], _bias_rows(bias, index, q.shape[0])
            start = ctx.prefix
            if ctx.cls_index is not None:
                c, start = ctx.cls_index, 0
                qr = qr[:, :, c : c + 1]
                br = br[..., c : c + 1, :] if br is not None and br.shape[-2] > 1 else br
            total, rows = None, 0
            for _, _, _, probs in iter_attention_blocks(qr, kr, scale, start, br, self.max_elements):
                part = key_attention(probs, spec.prefix) * probs.shape[-2]
                total, rows = (part if total is None else total + part), rows + probs.shape[-2]
            if total is not None:
                self._per_head(ctx, grid, total / rows)

    def on_probs(
        self, ctx: LayerContext, spec: BlockSpec, probs: torch.Tensor, distributions: torch.Tensor | None = None
    ) -> None:
        """The attention map from the probabilities ``(B, H, T, S)`` the model applies (the softmax maps
        ``distributions`` when talking heads mix them afterwards)."""
        if not self._active(ctx.layer):
            return
        grid = self._key_grid(ctx, spec, probs.shape[-1])
        if isinstance(grid, str):
            self._note("attention", grid)
            return
        with torch.no_grad():
            p = (probs if distributions is None else distributions).detach()[self._index.to(probs.device)]
            c = ctx.cls_index
            rows = p[:, :, c : c + 1] if c is not None else p[:, :, ctx.prefix :]
            self._per_head(ctx, grid, key_attention(rows, spec.prefix))

    def _per_head(self, ctx: LayerContext, grid: tuple[int, int], per_head: torch.Tensor) -> None:
        """Add a ``(samples, H, n)`` per-head map; the map is the mean over every head read."""
        which = "class token" if ctx.cls_index is not None else "mean over patch queries"
        if which not in self.records.attention:
            self.records.attention.append(which)
        self._add(ctx.layer, "attention", grid, per_head.sum(dim=1), per_head.shape[1])

    def result(self) -> PatchMapRecords:
        """Everything mapped so far."""
        return self.records
