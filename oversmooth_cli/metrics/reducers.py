"""Reducers: one layer's tokens or attention rows turned into per-image metric values.

The capture (:mod:`oversmooth_cli.reading.capture`) hands over what one hook call reads: a layer's tokens
(:func:`token_values`), or its attention probabilities in blocks of batch rows and query rows (:func:`reduce_rows`:
per-row metrics averaged over the query rows, consecutive-layer metrics summed block by block in :class:`RowSums`).
Attention computed in windows folded into the batch gives one value per window; :func:`per_image` averages them per
image (and rescales position-based metrics measured over part of the rows).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .formulas import (
    attention_row_entropy,
    attention_row_entropy_normalised,
    attention_row_std,
    softmax_row_std,
)
from .registry import MetricDef

__all__ = [
    "PROBABILITY_ROW_FORMS",
    "SOFTMAX_ROW_FORMS",
    "TOKEN_FEEDS",
    "RowExtras",
    "RowSums",
    "ScratchView",
    "TokenFeed",
    "per_image",
    "reduce_rows",
    "row_metric",
    "token_values",
]


TokenFeed = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", int, "int | None"], "tuple | None"]
"""``feed(all_tokens, measured_tokens, previous_measured_tokens, prefix, cls_index)`` -> the metric's arguments, or
``None`` when the layer cannot give them."""


TOKEN_FEEDS: dict[str, TokenFeed] = {
    "tokens": lambda x, measured, prev, prefix, cls_index: (measured,),
    "class_patches": lambda x, measured, prev, prefix, cls_index: (
        None if cls_index is None else (x[:, cls_index], x[:, prefix:])
    ),
    "consecutive": lambda x, measured, prev, prefix, cls_index: (
        None if prev is None or prev.shape[:-1] != measured.shape[:-1] else (prev, measured)
    ),
}
"""What each token metric's ``inputs`` kind receives (see :class:`~oversmooth_cli.metrics.registry.MetricDef`)."""


def token_values(
    metrics: Mapping[str, MetricDef],
    x: torch.Tensor,
    measured: torch.Tensor,
    prev: torch.Tensor | None,
    prefix: int,
    cls_index: int | None,
    max_elements: int,
) -> dict[str, torch.Tensor]:
    """Per-image ``(B,)`` values of the token metrics of one layer.

    Args:
        metrics: the token metrics by name.
        x: ``(B, T, d)`` tokens, prefix tokens first.
        measured: the tokens measured (``x`` past the prefix, or all of it).
        prev: the measured tokens of the previous layer, for ``consecutive`` metrics (``None``: none).
        prefix: leading prefix tokens of ``x``.
        cls_index: where the class token is in ``x`` (``None``: no class token).
        max_elements: chunk budget for ``n x n`` token matrices.
    """
    extras = {"max_elements": max_elements}
    values = {}
    for name, m in metrics.items():
        args = TOKEN_FEEDS[m.inputs](x, measured, prev, prefix, cls_index)
        if args is not None:
            values[name] = m.fn(*args, **{k: extras[k] for k in m.needs})
    return values


SOFTMAX_ROW_FORMS: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
    attention_row_std: softmax_row_std,
}
"""Row formulas with a cheaper form for rows known to be softmax output (the ``qk`` and ``inline`` taps compute
them), equal up to float rounding (``tests/reading/test_attention.py``); the form takes ``out=`` scratch memory."""


PROBABILITY_ROW_FORMS: frozenset[Callable[..., Any]] = frozenset(
    {attention_row_entropy, attention_row_entropy_normalised}
)
"""Row formulas defined only for rows that are probability distributions (non-negative, summing to 1): a layer whose
applied weights are not (talking heads mix the heads' softmax maps after the softmax, with weights of any sign)
gives them from its softmax maps, or not at all; never from the mixed weights (their logarithm is NaN)."""


ScratchView = Callable[[str, tuple[int, ...], torch.device, torch.dtype], torch.Tensor]
"""``view(slot, shape, device, dtype)`` -> a contiguous view of reusable memory (``Scratch.view`` of
:mod:`oversmooth_cli.reading.attention`)."""


RowExtras = Callable[[MetricDef, int, torch.Tensor, tuple[int, int]], dict[str, torch.Tensor]]
"""``extras(metric, start, probs, batch)`` -> keyword inputs of a row metric for the query chunk ``probs`` starting
at query row ``start`` of the batch rows ``batch = (b0, n)``; without one of the metric's ``needs`` it is skipped."""


def row_metric(m: MetricDef, softmax_rows: bool, scratch: ScratchView) -> Callable[..., None]:
    """``m``'s row formula as ``fn(probs, out, **extras)`` writing ``(b, H, c)`` values into ``out``; for softmax
    rows its :data:`SOFTMAX_ROW_FORMS` stand-in, computed in the ``scratch`` memory."""
    form = SOFTMAX_ROW_FORMS.get(m.fn) if softmax_rows else None
    if form is None:
        return lambda probs, out, **extras: out.copy_(m.fn(probs, **extras))

    def with_scratch(probs: torch.Tensor, out: torch.Tensor, **extras: Any) -> None:
        dtype = torch.promote_types(probs.dtype, torch.float32)
        form(probs, centred=scratch("centred", tuple(probs.shape), probs.device, dtype), out=out)

    return with_scratch


@dataclass
class RowSums:
    """Per-metric sums over the query rows of one run of batch rows ``batch = (b0, n)`` (see :func:`reduce_rows`)."""

    batch: tuple[int, int]
    rows: int = 0
    sums: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def add(self, name: str, part: tuple[torch.Tensor, ...]) -> None:
        """Add one block's sums of metric ``name``."""
        self.sums[name] = tuple(map(torch.add, self.sums[name], part)) if name in self.sums else part


Chunk = torch.Tensor | tuple[int, torch.Tensor]
"""Probability rows ``(B, H, c, S)``, or a block ``(b0, probs)`` of batch rows ``b0:b0 + len(probs)``."""


def reduce_rows(
    metrics: Mapping[str, MetricDef],
    chunks: Iterable[Chunk],
    prev_chunks: Iterable[Chunk] | None,
    shape: tuple[int, ...],
    start: int,
    extras: RowExtras,
    scratch: ScratchView,
    softmax_rows: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-row metrics averaged over the query chunks of one layer, per head, and consecutive-layer metrics.

    Args:
        metrics: the attention metrics by name.
        chunks: probability rows of consecutive query chunks: ``(B, H, c, S)`` tensors, or ``(b0, probs)`` blocks
            of batch rows ``b0:b0 + len(probs)`` (:func:`~oversmooth_cli.reading.attention.measured_blocks`), each
            run of batch rows with its query chunks consecutive and in order.
        prev_chunks: the same chunks of the previous layer (for ``consecutive`` metrics), or ``None``.
        shape: ``(batch rows, H, query rows)`` that the chunks cover together.
        start: token index of the first row of the first chunk (the prefix length).
        extras: keyword inputs of the row metrics that need some (:data:`RowExtras`).
        scratch: memory for the :data:`SOFTMAX_ROW_FORMS`.
        softmax_rows: the rows are softmax output (each sums to 1): :data:`SOFTMAX_ROW_FORMS` may stand in for a
            metric's general formula.

    Returns:
        ``{metric: (batch rows, H)}`` for every metric each block could give; empty when there were no chunks.
    """
    row_metrics = [(n, m, row_metric(m, softmax_rows, scratch)) for n, m in metrics.items() if m.inputs == "rows"]
    pair_metrics = {n: m for n, m in metrics.items() if m.inputs == "consecutive"}
    values: dict[str, torch.Tensor] = {}  # per row metric: (batch rows, H, query rows), filled block by block
    skipped: set[str] = set()  # row metrics that some block could not give
    runs: list[RowSums] = []  # one per run of batch rows, in batch order
    pairs: Iterable[Chunk | None] = prev_chunks if prev_chunks is not None else itertools.repeat(None)
    for chunk, prev_chunk in zip(chunks, pairs, strict=False):  # pairs may be an endless repeat(None)
        b0, probs = chunk if isinstance(chunk, tuple) else (0, chunk)
        prev = prev_chunk[1] if isinstance(prev_chunk, tuple) else prev_chunk
        n, rows = probs.shape[0], probs.shape[-2]
        if not runs or runs[-1].batch != (b0, n):
            runs.append(RowSums((b0, n)))
        run = runs[-1]
        for name, m, fn in row_metrics:
            kwargs = extras(m, start + run.rows, probs, run.batch) if m.needs else {}
            if not all(k in kwargs for k in m.needs):
                skipped.add(name)
                continue
            if name not in values:
                dtype = torch.promote_types(probs.dtype, torch.float32)
                values[name] = torch.empty(shape, device=probs.device, dtype=dtype)
            whole = (b0, n, run.rows, rows) == (0, shape[0], 0, shape[-1])
            fn(probs, values[name] if whole else values[name][b0 : b0 + n, :, run.rows : run.rows + rows], **kwargs)
        for name, m in pair_metrics.items() if prev is not None else ():
            run.add(name, m.fn(prev, probs))
        run.rows += rows
    if not runs:
        return {}
    per_head = {n: v.mean(dim=-1) for n, v in values.items() if n not in skipped}  # (batch rows, H)
    names = [n for n in runs[0].sums if all(n in r.sums for r in runs)]
    for name in names:
        finish = metrics[name].finish
        if finish is None:
            raise TypeError(f"consecutive metric {name} has no finish to turn its sums into values")
        per_head[name] = finish(*[torch.cat(parts) for parts in zip(*(r.sums[name] for r in runs), strict=True)])
    return per_head


def per_image(
    per_head: Mapping[str, torch.Tensor], windows: int = 1, row_scales: Mapping[str, float] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per metric ``(per-image value (B,), per-image per-head values (B, H))`` from per-batch-row per-head values
    ``(B * windows, H)``.

    The layer value is the mean over the heads; a metric in ``row_scales`` is multiplied by its scale (measured over
    all query rows, it becomes the mean over the rows with a position); the ``windows`` of every image (batch rows
    image-major, each window with the same number of query rows) are averaged.
    """
    out = {}
    for name, heads in per_head.items():
        layer = heads.mean(dim=-1)
        scale = (row_scales or {}).get(name, 1.0)
        if scale != 1.0:
            layer, heads = layer * scale, heads * scale
        if windows > 1:
            layer, heads = (v.unflatten(0, (-1, windows)).mean(dim=1) for v in (layer, heads))
        out[name] = (layer, heads)
    return out
