"""Capture per-layer tokens and attention with hooks, reducing every forward pass to metric values on the fly.

Which modules to hook comes from the family's adapter (:mod:`oversmooth_cli.reading.registry`); each block's attention
is read by its reader (:mod:`oversmooth_cli.reading.readers`), which reports to a per-layer sink. Every hook call
describes what it measures in a :class:`LayerContext` handed to the per-layer handlers; the values come from the
reducers (:mod:`oversmooth_cli.metrics.reducers`), the attention probabilities from the kernel of the attention tap
(:mod:`oversmooth_cli.reading.attention`). Per-layer values are kept on the model's device while the batch runs and
moved to the CPU once per batch (:meth:`OversmoothingCapture.pop_batch`).

Tokens are read by one :class:`TokenReader` for both the metrics and the fine-tuning losses (:func:`block_tokens`), so
a loss sees exactly the tokens ``measure`` measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..metrics.reducers import PROBABILITY_ROW_FORMS, Chunk, RowExtras, per_image, reduce_rows, token_values
from ..metrics.registry import ATTENTION_METRICS, TOKEN_METRICS, MetricDef
from .attention import CPU_BLOCK_ELEMENTS, AttentionOutput, Scratch, measured_blocks, resolve_attention_tap
from .geometry import (
    AttentionPositions,
    PatchGeometry,
    TokenPositions,
    infer_grid,
    patch_geometry,
    patch_positions,
    query_key_distances,
)
from .patch_maps import PatchMapper, choose_layers
from .readers import UnsupportedModelError
from .registry import BlockSpec, FamilyAdapter, resolve_adapter

__all__ = ["LayerContext", "LayerInfo", "OversmoothingCapture", "TokenReader", "block_tokens"]


@dataclass(frozen=True)
class LayerInfo:
    """One measured layer: ``index`` as written to the tables (0 = input of the first block).

    Attributes:
        index: layer number; layer ``l >= 1`` is the output of the ``l``-th block in execution order across stages.
        name: module path of the block (``layers.1.blocks.0``), ``input`` for layer 0.
        has_attention: attention metrics are measured at this layer (the block has token attention).
        stage: stage of the block (0 for single-stage models); a new stage starts after a downsampling step, or
            with a new kind of block (CaiT / XCiT class attention).
        n_tokens: patch tokens at this layer (prefix tokens excluded), known after the first forward pass.
        has_tokens: token metrics are measured at this layer (``False`` for blocks that leave the patch tokens
            unchanged, e.g. CaiT class attention).
    """

    index: int
    name: str
    has_attention: bool
    stage: int = 0
    n_tokens: int | None = None
    has_tokens: bool = True


class TokenReader:
    """Reads a block's tokens as ``(B, N, C)``, one row per image: the one token path of ``measure`` and the losses.

    Sequences folded into the batch (MobileViT's per-pixel-position sequences) are put back together per image,
    which needs the number of images of the running forward pass: :meth:`install` hooks the modules that see one
    row per image (the adapter's ``images_from``, or the first block's input).

    Args:
        model: the model.
        adapter: its family adapter.
        first: the first measured block (default: from the adapter).
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, first: BlockSpec | None = None) -> None:
        self.model, self.adapter = model, adapter
        self.first = first or adapter.block_specs(model)[0]
        self.images = 0

    def install(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that count the images of every forward pass; the caller removes them."""
        modules = self.adapter.image_modules(self.model)
        if modules:
            return [m.register_forward_pre_hook(self._count_images) for m in modules]
        return [self.first.module.register_forward_pre_hook(self._count_first_block_input)]

    def _count_images(self, _module: nn.Module, args: tuple) -> None:
        self.images = len(args[0])

    def _count_first_block_input(self, _module: nn.Module, args: tuple) -> None:
        self.images = self.adapter.tokens(args, self.first).shape[0]

    def read(self, value: Any, spec: BlockSpec) -> torch.Tensor:
        """A block's output (or positional inputs) as ``(B, N, C)`` tokens, prefix tokens first, one row per image.

        Raises:
            UnsupportedModelError: the sequences cannot be put back together per image.
        """
        tokens = self.adapter.tokens(value, spec)
        if self.images and tokens.shape[0] != self.images:
            if spec.prefix or tokens.shape[0] % self.images:
                raise UnsupportedModelError(
                    f"{spec.name} gives {tokens.shape[0]} token sequences for {self.images} images; adapter "
                    f"{self.adapter.name} cannot put them back together per image"
                )
            tokens = tokens.reshape(self.images, -1, tokens.shape[-1])
        return tokens


@contextlib.contextmanager
def block_tokens(model: nn.Module, adapter: FamilyAdapter, which: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Patch tokens ``(B, n, d)`` (prefix removed, with gradient) output by the blocks at positions ``which``.

    Positions index the blocks that output tokens, in execution order (``0``: the first, ``-1``: the last); the
    tokens are read by the :class:`TokenReader` that ``measure`` uses, so a loss sees exactly the measured tokens.
    The hooks live only inside the block.
    """
    every = adapter.block_specs(model)
    specs = [s for s in every if s.group.tokens]
    reader = TokenReader(model, adapter, every[0])
    store: dict[int, torch.Tensor] = {}

    def keep(key: int, spec: BlockSpec) -> Callable:
        return lambda _m, _a, out: store.__setitem__(key, reader.read(out, spec)[:, spec.prefix :])

    handles = reader.install() if which else []
    handles += [specs[i].module.register_forward_hook(keep(i, specs[i])) for i in set(which)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Pending:
    layers: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    heads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerContext:
    """What one hook call measures, handed to the per-layer handlers of :class:`OversmoothingCapture`.

    Attributes:
        layer: layer index (see :class:`LayerInfo`).
        prefix: leading tokens left out of the token metrics (the block's ``prefix``), or leading attention query
            rows skipped (its ``query_prefix``).
        cls_index: where the class token is among the tokens (``None``: no class token in the prefix).
        geometry: the model's patch grid when the tokens (attention keys) are on it, else ``None``.
        windows: attention windows per image folded into the batch rows (their values are averaged per image).
        positions: query and key positions placed for this attention (:class:`AttentionPositions`); ``None``: from
            ``geometry``.
    """

    layer: int
    prefix: int
    cls_index: int | None
    geometry: PatchGeometry | None
    windows: int = 1
    positions: TokenPositions | None = None


def _float32(device: torch.device) -> torch.autocast:
    """Autocast off: attention statistics (and the ``inline`` attention) are computed in float32 under ``--amp``."""
    return torch.autocast(device_type=device.type, enabled=False)


def _to_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as float32 on the CPU, in one device-to-host copy."""
    flat = torch.cat([t.float().reshape(-1) for t in tensors]).cpu()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()
    return out


@dataclass(frozen=True)
class _LayerSink:
    """The :class:`~oversmooth_cli.reading.readers.ReaderSink` of one block's attention: hands what its reader reads
    to the capture's handlers, with the block's :class:`LayerContext`."""

    capture: OversmoothingCapture
    layer: int
    spec: BlockSpec

    def qk(self, q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> None:
        ctx = self.capture._attention_context(self.layer, self.spec, q, k.shape[-2])
        if ctx is not None:
            if (maps := self.capture.patch_maps) is not None:
                maps.on_qk(ctx, self.spec, q, k, scale, bias)
            self.capture._metrics.on_qk(ctx, q, k, scale, bias)

    def probs(self, p: torch.Tensor, distributions: torch.Tensor | None = None) -> None:
        ctx = self.capture._attention_context(self.layer, self.spec, p, p.shape[-1])
        if ctx is not None:
            if (maps := self.capture.patch_maps) is not None:
                maps.on_probs(ctx, self.spec, p, distributions)
            self.capture._metrics.on_probs(ctx, p, distributions)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        ctx = self.capture._attention_context(self.layer, self.spec, q, k.shape[-2])
        if ctx is not None and (maps := self.capture.patch_maps) is not None:
            maps.on_qk(ctx, self.spec, q, k, scale, bias)
        return None if ctx is None else self.capture._metrics.on_qk(ctx, q, k, scale, bias, v)


class _LayerMetrics:
    """The per-layer handlers of :class:`OversmoothingCapture` and the state of the running forward pass: the values
    of every layer (on the model's device until popped), and the previous layer's tokens or attention inputs for the
    consecutive-layer metrics.

    Args:
        token_metrics: token metrics by name.
        attention_metrics: attention metrics by name.
        unavailable: where a metric without values says why (the capture's :attr:`~OversmoothingCapture.unavailable`).
        max_elements: chunk budget for attention probabilities and ``n x n`` token matrices.
        include_prefix: token metrics measure the prefix tokens too.
    """

    def __init__(
        self,
        token_metrics: dict[str, MetricDef],
        attention_metrics: dict[str, MetricDef],
        unavailable: dict[str, str],
        max_elements: int,
        include_prefix: bool,
    ) -> None:
        self.token_metrics, self.attention_metrics, self.unavailable = token_metrics, attention_metrics, unavailable
        self.max_elements, self.include_prefix = max_elements, include_prefix
        self.block_elements: int | None = CPU_BLOCK_ELEMENTS
        self.pending = _Pending()
        self.prev_tokens: tuple[int, torch.Tensor] | None = None
        self.prev_attention: tuple | None = None
        self._keep_tokens = any(m.inputs == "consecutive" for m in token_metrics.values())
        self._keep_attention = any(m.inputs == "consecutive" for m in attention_metrics.values())
        self._positions: dict[tuple, TokenPositions] = {}
        self._scratch = Scratch()

    def pop(self) -> _Pending:
        """The values of the last forward pass; the pass's state is dropped."""
        pending, self.pending = self.pending, _Pending()
        self.prev_tokens = self.prev_attention = None
        return pending

    def clear(self) -> None:
        """Drop the values, the pass's state and the scratch memory."""
        self.pop()
        self._scratch.clear()

    def on_tokens(self, ctx: LayerContext, tokens: torch.Tensor) -> None:
        """Token metrics of one layer's ``(B, T, d)`` tokens, kept for consecutive-layer metrics at the next layer."""
        x = tokens.detach()
        measured = x if self.include_prefix else x[:, ctx.prefix :]
        kept = self.prev_tokens
        prev = kept[1] if kept is not None and kept[0] == ctx.layer - 1 else None
        self.prev_tokens = (ctx.layer, measured) if self._keep_tokens else None
        values = token_values(self.token_metrics, x, measured, prev, ctx.prefix, ctx.cls_index, self.max_elements)
        self.pending.layers.update({(name, ctx.layer): v for name, v in values.items()})

    def on_qk(
        self,
        ctx: LayerContext,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Attention metrics from ``q``, ``k`` ``(B, H, T, dh)`` (logit ``scale``, additive ``bias``) in blocks
        (:func:`~oversmooth_cli.reading.attention.measured_blocks`: the probabilities are never held whole).

        On CPUs the blocks are small enough to stay in cache (:attr:`block_elements`); elsewhere a block holds every
        batch row and as many query rows as ``max_elements`` allows. With ``v`` (the ``inline`` tap) the attention
        output is computed on the way and returned (:class:`~oversmooth_cli.reading.attention.AttentionOutput`).
        """
        with torch.no_grad(), _float32(q.device):
            q, k = q.detach(), k.detach()
            bias = None if bias is None else bias.detach()
            positions = (
                ctx.positions if ctx.positions is not None else self._token_positions(ctx, q.shape[-2], q.device)
            )
            output = None if v is None else AttentionOutput(q, v, self._scratch)
            blocks = functools.partial(
                measured_blocks,
                skip=ctx.prefix,
                first=ctx.prefix if v is None else 0,  # both layers of a pair alike
                max_elements=self.max_elements,
                block_elements=self.block_elements if q.device.type == "cpu" else None,
            )
            prev = self._previous(ctx.layer, "qk", q.shape) if self._keep_attention else None
            prev_chunks = blocks(*prev[2:]) if prev is not None and prev[3].shape == k.shape else None
            self.prev_attention = (ctx.layer, "qk", q, k, scale, bias) if self._keep_attention else None
            current = blocks(q, k, scale, bias, output=output)
            B, H, T = q.shape[:-1]
            self._reduce(ctx, current, prev_chunks, positions, (B, H, T - ctx.prefix), softmax_rows=True)
            for _ in current:  # with values, every block feeds the output, measured or not
                pass
            return None if output is None else output.out

    def on_probs(self, ctx: LayerContext, probs: torch.Tensor, distributions: torch.Tensor | None = None) -> None:
        """Attention metrics from the weights ``(B, H, T, S)`` an unfused model applies; the metrics defined only for
        probability rows (:data:`~oversmooth_cli.metrics.reducers.PROBABILITY_ROW_FORMS`) from ``distributions``
        (the softmax maps that talking heads mix into the weights), or from the weights when they are probability rows
        (else the layer has none of them, and :attr:`unavailable` says why)."""
        with torch.no_grad(), _float32(probs.device):
            rows = probs.detach().float()[:, :, ctx.prefix :]
            positions = ctx.positions
            if positions is None:
                positions = self._token_positions(ctx, probs.shape[-1], probs.device)
            prev = self._previous(ctx.layer, "probs", rows.shape) if self._keep_attention else None
            self.prev_attention = (ctx.layer, "probs", rows) if self._keep_attention else None
            prev_chunks = None if prev is None else [prev[2]]
            needs_p = {n: m for n, m in self.attention_metrics.items() if m.fn in PROBABILITY_ROW_FORMS}
            if not needs_p:
                self._reduce(ctx, [rows], prev_chunks, positions, tuple(rows.shape[:-1]))
                return
            rest = {n: m for n, m in self.attention_metrics.items() if n not in needs_p}
            self._reduce(ctx, [rows], prev_chunks, positions, tuple(rows.shape[:-1]), rest)
            if distributions is not None:
                rows = distributions.detach().float()[:, :, ctx.prefix :]
            elif bool((rows < 0).any()):
                for name in needs_p:
                    self.unavailable.setdefault(name, f"layer {ctx.layer}'s attention weights are not probabilities")
                return
            self._reduce(ctx, [rows], None, positions, tuple(rows.shape[:-1]), needs_p)

    def _reduce(
        self,
        ctx: LayerContext,
        chunks: Iterable[Chunk],
        prev_chunks: Iterable[Chunk] | None,
        positions: TokenPositions | None,
        shape: tuple[int, ...],
        metrics: dict[str, MetricDef] | None = None,
        softmax_rows: bool = False,
    ) -> None:
        """Per-image values of one layer's attention (:func:`~oversmooth_cli.metrics.reducers.reduce_rows`, then
        :func:`~oversmooth_cli.metrics.reducers.per_image`) for ``metrics`` (default: every attention metric), kept
        until :meth:`pop_batch`."""
        metrics = self.attention_metrics if metrics is None else metrics
        extras = self._row_extras(positions)
        per_head = reduce_rows(
            metrics, chunks, prev_chunks, shape, ctx.prefix, extras, self._scratch.view, softmax_rows
        )
        scale = 1.0 if ctx.positions is None else ctx.positions.row_scale  # rows of padding tokens gave 0
        scales = {n: scale for n, m in metrics.items() if "distances" in m.needs}
        for name, (value, heads) in per_image(per_head, ctx.windows, scales).items():
            self.pending.heads[(name, ctx.layer)] = heads
            self.pending.layers[(name, ctx.layer)] = value

    def _row_extras(self, positions: TokenPositions | None) -> RowExtras:
        """Query-key distances for the row metrics that need them; why there are none goes to :attr:`unavailable`."""

        def extras(m: MetricDef, start: int, probs: torch.Tensor, batch: tuple[int, int]) -> dict[str, torch.Tensor]:
            if "distances" not in m.needs:
                return {}
            d = query_key_distances(positions, start, probs.shape[-2], probs.shape[-1], batch)
            if isinstance(d, str):
                self.unavailable.setdefault(m.name, d)
                return {}
            return {"distances": d}

        return extras

    def _token_positions(self, ctx: LayerContext, n_tokens: int, device: torch.device) -> TokenPositions | None:
        """Pixel positions of the tokens (prefix rows ``NaN``) on the context's patch grid, queries and keys alike,
        cached; ``None`` when the tokens are not that whole grid, unless the model takes dynamic image sizes."""
        g = ctx.geometry
        n_patches = n_tokens - ctx.prefix
        if g is None or n_patches < 1 or (n_patches != g.grid[0] * g.grid[1] and not g.dynamic):
            return None
        key = (n_tokens, ctx.prefix, g, str(device))
        if key not in self._positions:
            p = patch_positions(infer_grid(n_patches, g.grid), g.stride, ctx.prefix, device)
            self._positions[key] = TokenPositions(p, p)
        return self._positions[key]

    def _previous(self, layer: int, kind: str, shape: torch.Size) -> tuple | None:
        """The kept attention inputs of ``layer - 1`` when they have the same shape as this layer's, else ``None``."""
        prev = self.prev_attention
        if prev is None or prev[0] != layer - 1 or prev[1] != kind or prev[2].shape != shape:
            return None
        return prev


class OversmoothingCapture:
    """Context manager that hooks a model and reduces every forward pass to per-image metric values.

    Example:
        >>> with OversmoothingCapture(model) as cap:
        ...     model.forward_features(images)
        ...     layer_values, head_values = cap.pop_batch()

    Args:
        model: a timm model in eval mode.
        token_metrics: names from :data:`~oversmooth_cli.metrics.registry.TOKEN_METRICS`.
        attention_metrics: names from :data:`~oversmooth_cli.metrics.registry.ATTENTION_METRICS`.
        attention_tap: ``qk`` (fused attention kept, statistics recomputed from q and k), ``inline`` (the capture
            computes each attention once and measures its probabilities), ``softmax`` (the model's unfused path), or
            ``auto``: ``inline`` on CPU, ``qk`` elsewhere (see :mod:`oversmooth_cli.reading.attention`).
        adapter: override the registered adapter.
        max_elements: chunk budget for attention probabilities and ``n x n`` token matrices (elements per chunk).
        include_prefix: token metrics that allow it measure all tokens, prefix tokens (class, distillation,
            registers) included, instead of the patch tokens only.
        patch_maps: hold a :class:`~oversmooth_cli.reading.patch_maps.PatchMapper` (:attr:`patch_maps`) that maps
            the sample images its ``begin`` names, in the same forward pass; ``False``: no map work at all.

    Metrics that compare consecutive layers keep only the previous layer's tokens (or ``q``/``k``) of the running
    forward pass; :meth:`pop_batch` drops them. A metric the model cannot give (``cls_patch_cosine`` without a class
    token, ``attention_distance`` where the queries have no position) has no values; :attr:`unavailable` says why.
    """

    def __init__(
        self,
        model: nn.Module,
        token_metrics: Sequence[str] = ("token_cosine",),
        attention_metrics: Sequence[str] = ("attention_std",),
        attention_tap: str = "auto",
        adapter: FamilyAdapter | None = None,
        max_elements: int = 1 << 24,
        include_prefix: bool = False,
        patch_maps: bool = False,
    ) -> None:
        self.model = model
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        self.attention_tap = resolve_attention_tap(attention_tap, device)
        self.adapter = adapter or resolve_adapter(model)
        self.token_metrics = {n: TOKEN_METRICS[n] for n in token_metrics}
        self.attention_metrics = {n: ATTENTION_METRICS[n] for n in attention_metrics}
        self.max_elements = max_elements
        self.include_prefix = include_prefix
        self.prefix = self.adapter.num_prefix_tokens(model)
        self.cls_index = self._cls_index(self.prefix)
        self.geometry = patch_geometry(model)
        self.unavailable: dict[str, str] = {}
        if "cls_patch_cosine" in self.token_metrics and self.cls_index is None:
            self.unavailable["cls_patch_cosine"] = f"{type(model).__name__} has no class token"
        self._metrics = _LayerMetrics(
            self.token_metrics, self.attention_metrics, self.unavailable, max_elements, include_prefix
        )
        self._specs = self.adapter.block_specs(model)
        first = self._specs[0]
        attends = bool(self.attention_metrics)
        self._layer_base = [LayerInfo(0, "input", False, first.stage, has_tokens=first.group.tokens)] + [
            LayerInfo(i, s.name, attends and s.attention is not None, s.stage, has_tokens=s.group.tokens)
            for i, s in enumerate(self._specs, start=1)
        ]
        self._n_tokens: dict[int, int] = {}
        self._reader = TokenReader(model, self.adapter, first)
        token_layers = [info.index for info in self._layer_base if info.has_tokens]
        self.patch_maps = (
            PatchMapper(self.adapter, self.geometry, choose_layers(token_layers), attends, max_elements)
            if patch_maps
            else None
        )
        self._places = (
            AttentionPositions(model, self.adapter, lambda value, spec: self._reader.read(value, spec).shape[1])
            if any("distances" in m.needs for m in self.attention_metrics.values())
            else None
        )
        self._handles: list = []
        self._undo: list[Callable[[], None]] = []

    @property
    def block_elements(self) -> int | None:
        """Probability elements per attention block on CPUs (blocks that stay in cache); ``None``: blocks of every
        batch row, as on other devices."""
        return self._metrics.block_elements

    @block_elements.setter
    def block_elements(self, value: int | None) -> None:
        self._metrics.block_elements = value

    @property
    def layers(self) -> list[LayerInfo]:
        """Every measured layer; ``n_tokens`` is filled once a forward pass has run (layers without token metrics
        report the patch tokens they attend over: those of the last layer before them)."""
        out, n = [], None
        for info in self._layer_base:
            n = self._n_tokens.get(info.index, n)
            out.append(dataclasses.replace(info, n_tokens=n))
        return out

    # -- per-layer contexts ------------------------------------------------------------------------------------
    def _cls_index(self, prefix: int) -> int | None:
        return 0 if prefix > 0 and getattr(self.model, "cls_token", None) is not None else None

    def _tokens_hook(self, layer: int, spec: BlockSpec, value: Any) -> None:
        """Token metrics of a block's output (layer 0: the first block's input), as ``(B, N, C)``; sequences folded
        into the batch (MobileViT's per-pixel-position sequences) are put back together, one row per image."""
        tokens = self._reader.read(value, spec)
        n = self._n_tokens[layer] = tokens.shape[1] - spec.prefix
        if n < 2:  # e.g. the last stage of a hierarchical model on a tiny image: no pair of tokens to compare
            for name in self.token_metrics:
                self.unavailable.setdefault(name, f"layer {layer} ({spec.name}) has {n} patch token(s)")
            return
        if self.patch_maps is not None:
            self.patch_maps.on_tokens(layer, spec, value, tokens)
        self._metrics.on_tokens(LayerContext(layer, spec.prefix, self._cls_index(spec.prefix), self.geometry), tokens)

    def _attention_context(self, layer: int, spec: BlockSpec, x: torch.Tensor, keys: int) -> LayerContext | None:
        """The context of a block's ``(B * windows, H, T, .)`` attention input ``x`` over ``keys`` keys, or ``None``
        when there is nothing to measure (every window has the same number of query rows)."""
        if not spec.group.tokens:
            self._n_tokens[layer] = keys - spec.prefix
        if keys < 2:  # e.g. MobileViT's last stage on a tiny image: one patch per sequence, nothing to spread over
            for name in self.attention_metrics:
                self.unavailable.setdefault(name, f"layer {layer} ({spec.name}) attends over {keys} key(s)")
            return None
        images = self._reader.images
        windows, rest = divmod(x.shape[0], images or x.shape[0])
        if rest:
            raise UnsupportedModelError(
                f"{spec.name} attends in {x.shape[0]} batch rows for {images} images; adapter "
                f"{self.adapter.name} cannot tell its windows apart"
            )
        on_grid = self.adapter.patch_grid and windows == 1 and self.geometry is not None
        placed = None
        if self._places is not None and (not on_grid or spec.group.positions is not None):
            placed = self._places(spec, x.shape[0], windows, x.shape[-2], keys, x.device)
        prefix = spec.query_prefix
        return LayerContext(layer, prefix, self._cls_index(prefix), self.geometry if on_grid else None, windows, placed)

    # -- hooks -------------------------------------------------------------------------------------------------
    def __enter__(self) -> OversmoothingCapture:
        try:
            self._handles.extend(self._reader.install())
            if self._places is not None:
                self._handles.extend(self._places.install(self._specs))
            first = self._specs[0]
            self._handles.append(
                first.module.register_forward_pre_hook(lambda _m, args: self._tokens_hook(0, first, args))
            )
            for i, spec in enumerate(self._specs, start=1):
                if spec.group.tokens:
                    self._handles.append(
                        spec.module.register_forward_hook(
                            lambda _m, _a, out, layer=i, spec=spec: self._tokens_hook(layer, spec, out)
                        )
                    )
                if spec.attention is None or not self.attention_metrics:
                    continue
                sink = _LayerSink(self, i, spec)
                handles, undo = spec.reader.install(spec.attention, self.attention_tap, sink, spec.group.heads_dim)
                self._handles.extend(handles)
                self._undo.append(undo)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and restore every switch this capture changed."""
        for h in self._handles:
            h.remove()
        for undo in self._undo:
            undo()
        self._handles.clear()
        self._undo.clear()
        self._metrics.clear()

    def pop_batch(self) -> tuple[dict[tuple[str, int], torch.Tensor], dict[tuple[str, int], torch.Tensor]]:
        """Per-image values of the last forward pass, on the CPU (one device-to-host copy), then cleared.

        Returns:
            ``({(metric, layer): (B,)}, {(metric, layer): (B, H)})``.
        """
        pending = self._metrics.pop()
        if not pending.layers and not pending.heads:
            return {}, {}
        out = _to_cpu([*pending.layers.values(), *pending.heads.values()])
        n_layers = len(pending.layers)
        return dict(zip(pending.layers, out[:n_layers], strict=True)), dict(
            zip(pending.heads, out[n_layers:], strict=True)
        )
