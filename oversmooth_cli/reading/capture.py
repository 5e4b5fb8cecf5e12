"""Capture per-layer tokens and attention with hooks, reducing every forward pass to metric values on the fly.

Which modules to hook comes from the family's adapter (:mod:`oversmooth_cli.adapters`); each block's attention is read
through its tap (:mod:`oversmooth_cli.taps`), which reports to a per-layer sink. Per-layer values are kept on the
model's device while the batch runs and moved to the CPU once per batch (:meth:`OversmoothingCapture.pop_batch`).

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

from ..metrics.formulas import attention_row_std, softmax_row_std
from ..metrics.registry import ATTENTION_METRICS, TOKEN_METRICS, MetricDef
from .attention import CPU_BLOCK_ELEMENTS, Scratch, copy_to_scratch, iter_attention_blocks, reads_in_place
from .geometry import (
    AttentionPositions,
    PatchGeometry,
    TokenPositions,
    infer_grid,
    pairwise_distances,
    patch_geometry,
    patch_positions,
)
from .registry import BlockSpec, FamilyAdapter, resolve_adapter
from .taps import UnsupportedModelError, resolve_attention_tap

__all__ = ["LayerInfo", "OversmoothingCapture", "TokenReader", "block_tokens"]


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


@dataclass
class _RowSums:
    """Per-metric sums over the query rows of one run of batch rows ``batch = (b0, n)`` (see ``_reduce_rows``)."""

    batch: tuple[int, int]
    rows: int = 0
    sums: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def add(self, name: str, part: tuple[torch.Tensor, ...]) -> None:
        self.sums[name] = tuple(map(torch.add, self.sums[name], part)) if name in self.sums else part


_SOFTMAX_ROW_FORMS: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {
    attention_row_std: softmax_row_std,
}
"""Row formulas with a cheaper form for rows known to be softmax output (the ``qk`` and ``inline`` taps compute
them), equal up to float rounding (``tests/test_attention_blocks.py``); the form takes ``out=`` scratch memory."""


def _float32(device: torch.device) -> torch.autocast:
    """Autocast off: attention statistics (and the ``inline`` attention) are computed in float32 under ``--amp``."""
    return torch.autocast(device_type=device.type, enabled=False)


TokenFeed = Callable[["OversmoothingCapture", torch.Tensor, torch.Tensor, "torch.Tensor | None"], "tuple | None"]
"""``feed(capture, all_tokens, measured_tokens, previous_measured_tokens)`` -> the metric's arguments, or ``None``."""


TOKEN_FEEDS: dict[str, TokenFeed] = {
    "tokens": lambda cap, x, measured, prev: (measured,),
    "class_patches": lambda cap, x, measured, prev: (
        None if cap.cls_index is None else (x[:, cap.cls_index], x[:, cap.prefix :])
    ),
    "consecutive": lambda cap, x, measured, prev: (
        None if prev is None or prev.shape[:-1] != measured.shape[:-1] else (prev, measured)
    ),
}
"""What each token metric's ``inputs`` kind receives (see :class:`~oversmooth_cli.metrics.MetricDef`)."""


@dataclass(frozen=True)
class _LayerSink:
    """The :class:`~oversmooth_cli.taps.TapSink` of one block's attention: hands what its tap reads to the capture."""

    capture: OversmoothingCapture
    layer: int
    spec: BlockSpec

    def qk(self, q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> None:
        on_qk = functools.partial(self.capture._on_qk, bias=bias)
        self.capture._attention_hook(self.layer, self.spec, k.shape[-2], on_qk, q, k, scale)

    def probs(self, p: torch.Tensor) -> None:
        self.capture._attention_hook(self.layer, self.spec, p.shape[-1], self.capture._on_probs, p)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        on_qk = functools.partial(self.capture._on_qk, bias=bias, v=v)
        return self.capture._attention_hook(self.layer, self.spec, k.shape[-2], on_qk, q, k, scale)


class OversmoothingCapture:
    """Context manager that hooks a model and reduces every forward pass to per-image metric values.

    Example:
        >>> with OversmoothingCapture(model) as cap:
        ...     model.forward_features(images)
        ...     layer_values, head_values = cap.pop_batch()

    Args:
        model: a timm model in eval mode.
        token_metrics: names from :data:`~oversmooth_cli.metrics.TOKEN_METRICS`.
        attention_metrics: names from :data:`~oversmooth_cli.metrics.ATTENTION_METRICS`.
        attention_tap: ``qk`` (fused attention kept, statistics recomputed from q and k), ``inline`` (the capture
            computes each attention once and measures its probabilities), ``softmax`` (the model's unfused path), or
            ``auto``: ``inline`` on CPU, ``qk`` elsewhere (see :mod:`oversmooth_cli.adapters`).
        adapter: override the registered adapter.
        max_elements: chunk budget for attention probabilities and ``n x n`` token matrices (elements per chunk).
        include_prefix: token metrics that allow it measure all tokens, prefix tokens (class, distillation,
            registers) included, instead of the patch tokens only.

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
        self.cls_index = 0 if self.prefix > 0 and getattr(model, "cls_token", None) is not None else None
        self.geometry = patch_geometry(model)
        self.unavailable: dict[str, str] = {}
        if "cls_patch_cosine" in self.token_metrics and self.cls_index is None:
            self.unavailable["cls_patch_cosine"] = f"{type(model).__name__} has no class token"
        self._keep_tokens = any(m.inputs == "consecutive" for m in self.token_metrics.values())
        self._keep_attention = any(m.inputs == "consecutive" for m in self.attention_metrics.values())
        self._prev_tokens: tuple[int, torch.Tensor] | None = None
        self._prev_attention: tuple | None = None
        self._positions: dict[tuple, torch.Tensor] = {}
        self._specs = self.adapter.block_specs(model)
        self._blocks = [s.module for s in self._specs]
        first = self._specs[0]
        attends = bool(self.attention_metrics)
        self._layer_base = [LayerInfo(0, "input", False, first.stage, has_tokens=first.group.tokens)] + [
            LayerInfo(i, s.name, attends and s.attention is not None, s.stage, has_tokens=s.group.tokens)
            for i, s in enumerate(self._specs, start=1)
        ]
        self._n_tokens: dict[int, int] = {}
        self._reader = TokenReader(model, self.adapter, first)
        self._places = (
            AttentionPositions(model, self.adapter, lambda value, spec: self._reader.read(value, spec).shape[1])
            if any("distances" in m.needs for m in self.attention_metrics.values())
            else None
        )
        self._handles: list = []
        self._undo: list[Callable[[], None]] = []
        self._pending = _Pending()
        self._scratch = Scratch()
        self.block_elements = CPU_BLOCK_ELEMENTS
        """Probability elements per attention block on CPUs (blocks that stay in cache); ``None``: blocks of every
        batch row, as on other devices."""

    # -- hooks -----------------------------------------------------------------------------------------------
    def _on_tokens(self, layer: int, tokens: torch.Tensor) -> None:
        """Token metrics of one layer's ``(B, T, d)`` tokens, kept for consecutive-layer metrics at ``layer + 1``."""
        x = tokens.detach()
        measured = x if self.include_prefix else x[:, self.prefix :]
        prev = self._prev_tokens[1] if self._prev_tokens is not None and self._prev_tokens[0] == layer - 1 else None
        self._prev_tokens = (layer, measured) if self._keep_tokens else None
        extras = {"max_elements": self.max_elements}
        for name, m in self.token_metrics.items():
            args = TOKEN_FEEDS[m.inputs](self, x, measured, prev)
            if args is not None:
                self._pending.layers[(name, layer)] = m.fn(*args, **{k: extras[k] for k in m.needs})

    def _token_positions(self, n_tokens: int, device: torch.device) -> TokenPositions | None:
        """Pixel positions of the tokens (prefix rows ``NaN``) from the model's patch grid, queries and keys alike,
        cached.

        ``None`` when the tokens are not the model's whole patch grid (e.g. attention windows, later stages), unless
        the model takes dynamic image sizes; such attention gets its ``positions`` from :class:`AttentionPositions`.
        """
        g = self.geometry
        n_patches = n_tokens - self.prefix
        if g is None or n_patches < 1 or (n_patches != g.grid[0] * g.grid[1] and not g.dynamic):
            return None
        key = (n_tokens, self.prefix, g, str(device))
        if key not in self._positions:
            p = patch_positions(infer_grid(n_patches, g.grid), g.stride, self.prefix, device)
            self._positions[key] = TokenPositions(p, p)
        return self._positions[key]

    def _row_extras(
        self,
        m: MetricDef,
        positions: TokenPositions | None,
        start: int,
        probs: torch.Tensor,
        batch: tuple[int, int] | None = None,
    ) -> dict:
        """Keyword inputs of a row metric for the query chunk starting at token ``start`` (of the batch rows
        ``batch = (b0, n)``, when a block holds only some); ``{}`` if unavailable."""
        if "distances" not in m.needs:
            return {}
        if positions is not None and positions.missing:
            self.unavailable.setdefault(m.name, positions.missing)
            return {}
        if positions is None or positions.keys.shape[-2] != probs.shape[-1]:
            self.unavailable.setdefault(m.name, "no patch positions for the attention keys of at least one layer")
            return {}
        queries, keys = positions.queries[..., start : start + probs.shape[-2], :], positions.keys
        if batch is not None:  # per-batch-row positions (B, T, 2): the block's rows
            queries, keys = (
                p[batch[0] : sum(batch)] if p.dim() == 3 and p.shape[0] > 1 else p for p in (queries, keys)
            )
        d = pairwise_distances(queries, keys)
        return {"distances": d.unsqueeze(-3) if d.dim() == 3 else d}

    def _reduce_rows(
        self,
        layer: int,
        chunks: Iterable[torch.Tensor | tuple[int, torch.Tensor]],
        prev_chunks: Iterable[torch.Tensor | tuple[int, torch.Tensor]] | None = None,
        positions: TokenPositions | None = None,
        query_start: int | None = None,
        softmax_rows: bool = False,
        *,
        shape: tuple[int, int, int],
    ) -> None:
        """Average per-row metrics over the query chunks of one layer, per head; add consecutive-layer sums.

        Args:
            layer: layer index.
            chunks: probability rows of consecutive query chunks: ``(B, H, c, S)`` tensors, or ``(b0, probs)`` blocks
                of batch rows ``b0:b0 + len(probs)`` (:func:`~oversmooth_cli.attention.iter_attention_blocks`), each
                run of batch rows with its query chunks consecutive and in order.
            prev_chunks: the same chunks of layer ``layer - 1`` (for ``consecutive`` metrics), or ``None``.
            positions: query ``(T, 2)`` / ``(B, T, 2)`` and key ``(S, 2)`` / ``(B, S, 2)`` positions in input pixels
                (``NaN``: no position).
            query_start: token index of the first row of the first chunk (default: the prefix length).
            softmax_rows: the rows are softmax output (each sums to 1): :data:`_SOFTMAX_ROW_FORMS` may stand in for
                a metric's general formula.
            shape: ``(batch rows, H, query rows)`` that the chunks cover together.
        """
        start = self.prefix if query_start is None else query_start
        row_metrics = [
            (n, m, self._row_metric(m, softmax_rows)) for n, m in self.attention_metrics.items() if m.inputs == "rows"
        ]
        pair_metrics = {n: m for n, m in self.attention_metrics.items() if m.inputs == "consecutive"}
        values: dict[str, torch.Tensor] = {}  # per row metric: (batch rows, H, query rows), filled block by block
        skipped: set[str] = set()  # row metrics that some block could not give
        runs: list[_RowSums] = []  # one per run of batch rows, in batch order
        pairs = prev_chunks if prev_chunks is not None else itertools.repeat(None)
        for chunk, prev in zip(chunks, pairs, strict=False):  # pairs may be an endless repeat(None)
            b0, probs = chunk if isinstance(chunk, tuple) else (0, chunk)
            prev = prev[1] if isinstance(prev, tuple) else prev
            n, rows = probs.shape[0], probs.shape[-2]
            if not runs or runs[-1].batch != (b0, n):
                runs.append(_RowSums((b0, n)))
            run = runs[-1]
            for name, m, fn in row_metrics:
                extras = self._row_extras(m, positions, start + run.rows, probs, run.batch) if m.needs else {}
                if not all(k in extras for k in m.needs):
                    skipped.add(name)
                    continue
                if name not in values:
                    dtype = torch.promote_types(probs.dtype, torch.float32)
                    values[name] = torch.empty(shape, device=probs.device, dtype=dtype)
                whole = (b0, n, run.rows, rows) == (0, shape[0], 0, shape[-1])
                fn(probs, values[name] if whole else values[name][b0 : b0 + n, :, run.rows : run.rows + rows], **extras)
            for name, m in pair_metrics.items() if prev is not None else ():
                run.add(name, m.fn(prev, probs))
            run.rows += rows
        if not runs:
            return
        per_head = {n: v.mean(dim=-1) for n, v in values.items() if n not in skipped}  # (batch rows, H)
        names = [n for n in runs[0].sums if all(n in r.sums for r in runs)]
        totals = {n: [torch.cat(parts) for parts in zip(*(r.sums[n] for r in runs), strict=True)] for n in names}
        per_head.update({n: self.attention_metrics[n].finish(*total) for n, total in totals.items()})
        for name, per in per_head.items():
            self._pending.heads[(name, layer)] = per
            self._pending.layers[(name, layer)] = per.mean(dim=-1)

    def _row_metric(self, m: MetricDef, softmax_rows: bool) -> Callable[..., None]:
        """``m``'s row formula as ``fn(probs, out, **extras)`` writing ``(b, H, c)`` values into ``out``; for softmax
        rows its :data:`_SOFTMAX_ROW_FORMS` stand-in, computed in scratch memory."""
        form = _SOFTMAX_ROW_FORMS.get(m.fn) if softmax_rows else None
        if form is None:
            return lambda probs, out, **extras: out.copy_(m.fn(probs, **extras))

        def with_scratch(probs: torch.Tensor, out: torch.Tensor, **extras: Any) -> None:
            dtype = torch.promote_types(probs.dtype, torch.float32)
            form(probs, centred=self._scratch.view("centred", tuple(probs.shape), probs.device, dtype), out=out)

        return with_scratch

    def _previous(self, layer: int, kind: str, shape: torch.Size) -> tuple | None:
        """The kept attention inputs of ``layer - 1`` when they have the same shape as this layer's, else ``None``."""
        prev = self._prev_attention
        if prev is None or prev[0] != layer - 1 or prev[1] != kind or prev[2].shape != shape:
            return None
        return prev

    def _on_qk(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None = None,
        positions: TokenPositions | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Attention metrics from ``q``, ``k`` ``(B, H, T, dh)`` in blocks (probabilities never held whole).

        On CPUs the blocks are small enough to stay in cache (:data:`~oversmooth_cli.attention.CPU_BLOCK_ELEMENTS`:
        a few images, or a few query rows of one image) while they are normalised, measured and, with ``v``, applied
        to the values; elsewhere a block holds every batch row and as many query rows as ``max_elements`` allows.

        With ``v`` (the ``inline`` tap) the attention output ``softmax(q k^T * scale + bias) v`` is computed on the
        way and returned: every block (prefix rows included) is computed in the scratch memory and applied to
        ``v`` into one output, float32 or wider (the tap casts it to the dtype SDPA would have returned), laid out
        token-major like the output of SDPA's fused CPU kernel (``(B, T, H, dv)`` in memory, so the model's
        ``transpose(1, 2).reshape(B, T, C)`` is free).

        Args:
            layer: layer index.
            q, k: queries and keys as the model uses them.
            scale: logit scale.
            bias: additive logit bias broadcastable to ``(B, H, T, T)`` (relative position bias), if any.
            positions: query and key positions in input pixels, ``NaN`` for tokens without one (prefix tokens);
                default: the model's patch grid.
            v: ``(B, H, S, dv)`` values, to compute the output too.
        """
        with torch.no_grad(), _float32(q.device):
            q, k = q.detach(), k.detach()
            bias = None if bias is None else bias.detach()
            if positions is None:
                positions = self._token_positions(q.shape[-2], q.device)
            first = self.prefix if v is None else 0  # the output needs the prefix rows too
            block_elements = self.block_elements if q.device.type == "cpu" else None
            B, H, T = q.shape[:-1]
            out = scratch = None
            in_place = False  # the values are read where they lie (see reads_in_place), else copied to scratch
            if v is not None:
                dtype = torch.promote_types(q.dtype, torch.float32)
                dv = v.shape[-1]
                out = torch.empty(B, T, H, dv, device=q.device, dtype=dtype).transpose(1, 2)
                scratch = self._scratch.bind(q.device, dtype)
                in_place = reads_in_place(v, scratch=scratch)
                v = v if in_place else copy_to_scratch(scratch, "v", v)

            def measured(q_, k_, s_, b_, values=None, scratch_=None) -> Iterator[tuple[int, torch.Tensor]]:
                """``(b0, probs)`` blocks from query ``first`` (both layers of a pair alike), past the prefix rows;
                each block is first applied to ``values``, into ``out``, when given."""
                held = None  # (b0, b1, copy) of the batch rows whose values are in the scratch memory
                blocks = iter_attention_blocks(q_, k_, s_, first, b_, self.max_elements, scratch_, block_elements)
                for b0, b1, start, probs in blocks:
                    stop = start + probs.shape[-2]
                    if values is not None:
                        o = scratch_("out", (b1 - b0, H, stop - start, dv))
                        if in_place and b1 - b0 == 1:  # straight from the model's (strided) values
                            torch.bmm(probs[0], values[b0], out=scratch_("out", (H, stop - start, dv)))
                        else:  # one batched product for the block, from contiguous values
                            if not in_place:
                                vb = values[b0:b1]
                            elif held is None or held[:2] != (b0, b1):
                                held = (b0, b1, copy_to_scratch(scratch_, "vb", values[b0:b1]))
                            torch.matmul(probs, held[2] if in_place else vb, out=o)
                        (out[b0:b1] if (start, stop) == (0, T) else out[b0:b1, :, start:stop]).copy_(o)
                    if stop > self.prefix:
                        yield b0, probs if start >= self.prefix else probs[:, :, self.prefix - start :]

            prev = self._previous(layer, "qk", q.shape) if self._keep_attention else None
            prev_chunks = None
            if prev is not None and prev[3].shape == k.shape:
                prev_chunks = measured(prev[2], prev[3], prev[4], prev[5])
            self._prev_attention = (layer, "qk", q, k, scale, bias) if self._keep_attention else None
            current = measured(q, k, scale, bias, v, scratch)
            shape = (B, H, T - self.prefix)
            self._reduce_rows(layer, current, prev_chunks, positions, softmax_rows=True, shape=shape)
            for _ in current:  # with values, every block feeds the output, measured or not
                pass
            return out

    def _on_probs(self, layer: int, probs: torch.Tensor, positions: TokenPositions | None = None) -> None:
        """Attention metrics from softmax probabilities ``(B, H, T, S)`` read from an unfused model."""
        with torch.no_grad(), _float32(probs.device):
            rows = probs.detach().float()[:, :, self.prefix :]
            if positions is None:
                positions = self._token_positions(probs.shape[-1], probs.device)
            prev = self._previous(layer, "probs", rows.shape) if self._keep_attention else None
            self._prev_attention = (layer, "probs", rows) if self._keep_attention else None
            self._reduce_rows(
                layer, [rows], None if prev is None else [prev[2]], positions, shape=tuple(rows.shape[:-1])
            )

    # -- context -----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[LayerInfo]:
        """Every measured layer; ``n_tokens`` is filled once a forward pass has run (layers without token metrics
        report the patch tokens they attend over: those of the last layer before them)."""
        out, n = [], None
        for info in self._layer_base:
            n = self._n_tokens.get(info.index, n)
            out.append(dataclasses.replace(info, n_tokens=n))
        return out

    @contextlib.contextmanager
    def _layer_scope(self, prefix: int, geometry: PatchGeometry | None) -> Iterator[None]:
        """Inside one hook call: :attr:`prefix`, :attr:`cls_index` and :attr:`geometry` describe the layer measured
        (a stage of a hierarchical model, a class-attention block); restored to the model's values afterwards."""
        saved = self.prefix, self.cls_index, self.geometry
        self.prefix, self.geometry = prefix, geometry
        self.cls_index = 0 if prefix > 0 and getattr(self.model, "cls_token", None) is not None else None
        try:
            yield
        finally:
            self.prefix, self.cls_index, self.geometry = saved

    def _tokens_hook(self, layer: int, spec: BlockSpec, value: Any) -> None:
        """Token metrics of a block's output (layer 0: the first block's input), as ``(B, N, C)``; sequences folded
        into the batch (MobileViT's per-pixel-position sequences) are put back together, one row per image."""
        tokens = self._reader.read(value, spec)
        n = self._n_tokens[layer] = tokens.shape[1] - spec.prefix
        if n < 2:  # e.g. the last stage of a hierarchical model on a tiny image: no pair of tokens to compare
            for name in self.token_metrics:
                self.unavailable.setdefault(name, f"layer {layer} ({spec.name}) has {n} patch token(s)")
            return
        with self._layer_scope(spec.prefix, self._model_geometry):
            self._on_tokens(layer, tokens)

    def _needs(self, metric: str) -> tuple[str, ...]:
        """What an attention metric needs from the capture (``()`` for token metrics)."""
        m = self.attention_metrics.get(metric)
        return m.needs if m is not None else ()

    def _attention_hook(self, layer: int, spec: BlockSpec, keys: int, on: Callable, x: torch.Tensor, *args: Any) -> Any:
        """Call ``on(layer, x, *args)`` (:meth:`_on_qk` or :meth:`_on_probs`) for
        ``(B * windows, H, T, .)`` input and return what it returns (``None`` when there is nothing to measure);
        per-window values are averaged into one per image (every window has the same number of query rows)."""
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
        on_grid = self.adapter.patch_grid and windows == 1 and self._model_geometry is not None
        placed = {}
        if self._places is not None and (not on_grid or spec.group.positions is not None):
            placed["positions"] = self._places(spec, x.shape[0], windows, x.shape[-2], keys, x.device)
        with self._layer_scope(spec.query_prefix, self._model_geometry if on_grid else None):
            result = on(layer, x, *args, **placed)
        if placed and placed["positions"].row_scale != 1.0:  # rows of padding tokens gave 0: mean over placed rows
            for store in (self._pending.layers, self._pending.heads):
                for key in [k for k in store if k[1] == layer and "distances" in self._needs(k[0])]:
                    store[key] = store[key] * placed["positions"].row_scale
        if windows > 1:
            for store in (self._pending.layers, self._pending.heads):
                for key in [k for k in store if k[1] == layer and k[0] in self.attention_metrics]:
                    store[key] = store[key].unflatten(0, (-1, windows)).mean(dim=1)
        return result

    def __enter__(self) -> OversmoothingCapture:
        self._model_geometry = self.geometry
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
                handles, undo = spec.tap.install(spec.attention, self.attention_tap, sink, spec.group.heads_dim)
                self._handles.extend(handles)
                self._undo.append(undo)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and restore every switch this capture changed."""
        for h in self._handles:
            h.remove()
        for undo in self._undo:
            undo()
        self._handles.clear()
        self._undo.clear()
        self._pending = _Pending()
        self._prev_tokens = self._prev_attention = None
        self._scratch.clear()

    def pop_batch(self) -> tuple[dict[tuple[str, int], torch.Tensor], dict[tuple[str, int], torch.Tensor]]:
        """Per-image values of the last forward pass, on the CPU (one device-to-host copy), then cleared.

        Returns:
            ``({(metric, layer): (B,)}, {(metric, layer): (B, H)})``.
        """
        pending, self._pending = self._pending, _Pending()
        self._prev_tokens = self._prev_attention = None
        keys = list(pending.layers) + list(pending.heads)
        tensors = list(pending.layers.values()) + list(pending.heads.values())
        if not tensors:
            return {}, {}
        flat = torch.cat([t.float().reshape(-1) for t in tensors]).cpu()
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].reshape(t.shape))
            offset += t.numel()
        n_layers = len(pending.layers)
        return dict(zip(keys[:n_layers], out[:n_layers], strict=True)), dict(
            zip(keys[n_layers:], out[n_layers:], strict=True)
        )
