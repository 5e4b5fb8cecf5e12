"""How attention probabilities are computed: the attention tap, and the kernel that computes them in blocks.

The attention *tap* (``--attention-tap``: :data:`ATTENTION_TAPS`, :func:`resolve_attention_tap`) says how the
probabilities a reader (:mod:`oversmooth_cli.reading.readers`) hands over are computed: recomputed from ``q`` and
``k`` beside the model's fused kernel (``qk``), computed once together with the attention output (``inline``:
:func:`measured_blocks` with an :class:`AttentionOutput`), or read from the model's own unfused softmax (``softmax``).

Probabilities are computed in blocks of images and query rows, in reusable scratch memory.

:func:`iter_attention_blocks` yields ``softmax(q k^T * scale + bias)`` one block at a time, so the full ``(B, H, T, S)``
probability tensor never exists at once: a block is a run of batch rows (images, or windows) and of query rows. By
default a block holds every batch row and as many query rows as ``max_elements`` allows; with ``block_elements`` the
batch rows are split too, into blocks small enough to stay in a CPU's cache while the caller reads them several times
(softmax, statistics, values). With a :class:`Scratch` (slots of memory reused by every attention of a forward pass),
every block is computed in place and nothing large is allocated per layer.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch

from ..measuring.config import ATTENTION_TAPS
from ..metrics.formulas import scalar_like, to_float

__all__ = [
    "ATTENTION_TAPS",
    "AUTO_TAP",
    "CPU_BLOCK_ELEMENTS",
    "AttentionOutput",
    "Scratch",
    "ScratchFn",
    "block_plan",
    "copy_to_scratch",
    "iter_attention_blocks",
    "measured_blocks",
    "reads_in_place",
    "resolve_attention_tap",
]


AUTO_TAP = {"cpu": "inline"}
"""``auto`` per device type (default ``qk``): on CPU computing the attention once beats the fused kernel plus a second
``q k^T`` (``benchmarks/bench_measure.py``); on GPUs the fused kernel is kept for the forward pass."""


def resolve_attention_tap(tap: str, device: torch.device | str) -> str:
    """The tap ``tap`` means on ``device``: ``auto`` becomes :data:`AUTO_TAP`'s entry, others stay as they are."""
    if tap not in ATTENTION_TAPS:
        raise ValueError(f"attention_tap must be one of {ATTENTION_TAPS}, got {tap!r}")
    return AUTO_TAP.get(torch.device(device).type, "qk") if tap == "auto" else tap


ScratchFn = Callable[[str, tuple[int, ...]], torch.Tensor]
"""``scratch(slot, shape)`` -> a contiguous ``shape`` view of reusable memory ``slot`` (float32 or wider)."""


CPU_BLOCK_ELEMENTS = 1 << 19
"""Probability elements per block on CPUs (2 MiB of float32): a block is computed, normalised, measured and applied
to the values while it is still in cache, in few enough operations that their fixed cost stays small
(``benchmarks/bench_measure.py``)."""


class Scratch:
    """Named slots of reusable memory: a slot is made anew when it is too small, of another device or dtype, or when
    inference mode changed (inference tensors cannot be written outside it), else reused. Views of a slot are kept
    per shape, so asking again for a block of the same shape costs a dictionary lookup, not a tensor operation."""

    def __init__(self) -> None:
        self._memory: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, slot: str, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``n`` elements of memory ``slot`` on ``device`` in ``dtype``."""
        memory = self._memory.get(slot)
        inference = torch.is_inference_mode_enabled()
        if (
            memory is None
            or memory.numel() < n
            or (memory.device, memory.dtype) != (device, dtype)
            or memory.is_inference() != inference
        ):
            self._views = {key: view for key, view in self._views.items() if key[0] != slot}
            memory = self._memory[slot] = torch.empty(n, device=device, dtype=dtype)
        return memory[:n]

    def view(self, slot: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``shape`` view of memory ``slot`` on ``device`` in ``dtype`` (the same view object while the
        slot's memory stays)."""
        key = (slot, shape, device, dtype)
        kept = self._views.get(key)
        if (
            kept is not None
            and kept[0] is self._memory.get(slot)
            and kept[0].is_inference() == (torch.is_inference_mode_enabled())
        ):
            return kept[1]
        view = self.get(slot, math.prod(shape), device, dtype).view(shape)
        self._views[key] = (self._memory[slot], view)
        return view

    def bind(self, device: torch.device, dtype: torch.dtype) -> ScratchFn:
        """This memory as :func:`iter_attention_blocks` takes it, on ``device`` in ``dtype``."""
        return functools.partial(self.view, device=device, dtype=dtype)

    def clear(self) -> None:
        """Free every slot."""
        self._memory.clear()
        self._views.clear()


Block = tuple[int, int, list[tuple[int, int]]]
"""``(first batch row, end batch row, [(first query row, end query row), ...])``."""


def block_plan(
    batch: int,
    per_row: int,
    queries: int,
    query_start: int = 0,
    max_elements: int = 1 << 24,
    block_elements: int | None = None,
) -> list[Block]:
    """How :func:`iter_attention_blocks` splits ``batch`` x ``queries`` rows of ``per_row`` elements (heads x keys).

    Without ``block_elements``: one block of every batch row, its query rows (from ``query_start``) in chunks of at
    most about ``max_elements`` elements. With it: blocks of about ``min(block_elements, max_elements)`` elements,
    whole images (every query row) while one fits, else one batch row at a time in chunks of query rows; the batch
    rows are shared out evenly among the blocks. The plan depends only on the shapes, so two layers of the same
    shapes are split alike (consecutive-layer metrics zip their blocks).
    """
    rows = max(0, queries - query_start)
    per_row = max(1, per_row)
    if block_elements is None:
        step = max(1, max_elements // max(1, batch * per_row))
        return [(0, batch, [(s, min(queries, s + step)) for s in range(query_start, queries, step)])] if rows else []
    budget = max(1, min(block_elements, max_elements))
    if not rows or not batch:
        return []
    if rows * per_row <= budget:
        images = budget // (rows * per_row)
        n_blocks = math.ceil(batch / images)
        size = math.ceil(batch / n_blocks)
        return [(b, min(batch, b + size), [(query_start, queries)]) for b in range(0, batch, size)]
    step = max(1, budget // per_row)
    chunks = [(s, min(queries, s + step)) for s in range(query_start, queries, step)]
    return [(b, b + 1, chunks) for b in range(batch)]


def _batch_rows(x: torch.Tensor, ndim: int, start: int, stop: int, batch: int) -> torch.Tensor:
    """Batch rows ``start:stop`` of ``x`` broadcastable to a ``ndim``-D tensor of ``batch`` rows (no copy)."""
    if x.dim() < ndim or x.shape[0] == 1 or (start, stop) == (0, batch):
        return x
    return x[start:stop]


def iter_attention_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_start: int = 0,
    bias: torch.Tensor | None = None,
    max_elements: int = 1 << 24,
    scratch: ScratchFn | None = None,
    block_elements: int | None = None,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Yield softmax attention ``softmax(q k^T * scale + bias)`` block by block, in float32.

    Blocks follow :func:`block_plan` (``block_elements`` splits the batch rows too, for blocks that stay in cache).
    Autocast is switched off so the logits are float32 on every device. With ``scratch`` (a :data:`ScratchFn` of
    float32 or wider memory, e.g. :meth:`Scratch.bind`), every block (softmax in place) lives in that memory, so a
    block is valid only until the next one is asked for and nothing large is allocated (on CPU, fresh allocations of
    tens of MB cost page faults that outweigh the arithmetic). A block of several batch rows copies its scaled queries
    and its keys there first (one batched product for the block); a block of one batch row reads them where they lie
    when :func:`reads_in_place` allows (``q k^T * scale`` in one ``baddbmm``, as SDPA's fused kernel reads them).

    Args:
        q: ``(B, H, T, dh)`` queries, after any q-norm / rotary embedding the model applies.
        k: ``(B, H, S, dh)`` keys, likewise.
        scale: logit scale (``head_dim ** -0.5`` in timm).
        query_start: first query row to yield (e.g. ``num_prefix_tokens`` to skip class tokens).
        bias: optional additive logit bias broadcastable to ``(B, H, T, S)`` (relative position bias).
        max_elements: block budget in probability elements.
        scratch: memory to compute the blocks in (see above).
        block_elements: a smaller budget that also splits the batch rows (see :func:`block_plan`).

    Yields:
        ``(b0, b1, start, probs)``: probabilities ``(b1 - b0, H, c, S)`` of batch rows ``b0:b1`` and query rows
        ``start:start + c``; together the blocks cover batch rows ``0..B-1`` and query rows ``query_start..T-1``.
    """
    B, H, T, dh = q.shape
    S = k.shape[-2]
    # autocast off while computing, never held across a yield (the caller's state is its own between blocks)
    float32 = _no_autocast if torch.is_autocast_enabled(q.device.type) else _as_is
    in_place = scratch is not None and reads_in_place(q, k, scratch=scratch)
    for b0, b1, chunks in block_plan(B, H * S, T, query_start, max_elements, block_elements):
        n = b1 - b0
        qb, kb = _batch_rows(q, 4, b0, b1, B), _batch_rows(k, 4, b0, b1, B)
        bb = None if bias is None else _batch_rows(bias, 4, b0, b1, B)
        direct = in_place and n == 1  # one batch row: its q and k are read where they lie
        with float32(q.device):
            if scratch is None:
                kt = to_float(kb).transpose(-2, -1)
            elif direct:
                kt = kb[0].transpose(-2, -1)
            else:
                kt = scratch("k", (n, H, S, k.shape[-1])).copy_(kb).transpose(-2, -1)
        for start, stop in chunks:
            with float32(q.device):
                qc = qb if (start, stop) == (0, T) else qb[:, :, start:stop]
                if scratch is None:
                    logits = (to_float(qc) * scale) @ kt
                elif direct:  # q k^T * scale in one product, straight from the model's (strided) q and k
                    logits = scratch("probs", (1, H, stop - start, S))
                    rows = scratch("probs", (H, stop - start, S))
                    torch.baddbmm(rows, qc[0], kt, beta=0, alpha=scale, out=rows)
                else:  # scaled in float32, like the plain path; one batched product for the block
                    qs = scratch("q", (n, H, stop - start, dh)).copy_(qc)
                    qs.mul_(scalar_like(scale, qs))
                    logits = torch.matmul(qs, kt, out=scratch("probs", (n, H, stop - start, S)))
                if bb is not None:
                    logits += to_float(bb[..., start:stop, :])
                probs = logits.softmax(dim=-1) if scratch is None else torch.softmax(logits, dim=-1, out=logits)
            yield b0, b1, start, probs


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def _as_is(_device: torch.device) -> contextlib.nullcontext:
    return contextlib.nullcontext()


def reads_in_place(q: torch.Tensor, *others: torch.Tensor | None, scratch: ScratchFn | None = None) -> bool:
    """Batched matrix products read ``q`` (and ``others``) where they lie, one batch row at a time, instead of copies
    in the scratch memory: on a CPU (where BLAS takes the model's strided ``(H, T, dh)`` views as they are and a copy
    costs a pass over memory), when they already have the scratch memory's dtype."""
    dtype = scratch("probs", (0,)).dtype if scratch is not None else torch.float32
    return q.device.type == "cpu" and all(t is None or t.dtype == dtype for t in (q, *others))


def copy_to_scratch(scratch: ScratchFn, slot: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` copied (contiguous, in the scratch memory's dtype) into the scratch memory ``slot``."""
    return scratch(slot, tuple(x.shape)).copy_(x)


class AttentionOutput:
    """The attention output ``softmax(q k^T * scale + bias) v`` of the ``inline`` tap, written block by block.

    Every block of probabilities (prefix rows included) is applied to the values in the scratch memory, into one
    output of float32 or wider (the reader casts it to the dtype SDPA would have returned), laid out token-major like
    the output of SDPA's fused CPU kernel (``(B, T, H, dv)`` in memory, so the model's ``transpose(1, 2).reshape(B, T,
    C)`` is free). The values are read where they lie when :func:`reads_in_place` allows, else copied to the scratch.

    Args:
        q: ``(B, H, T, dh)`` queries (for the output's shape, device and dtype).
        v: ``(B, H, S, dv)`` values.
        memory: the scratch memory.
    """

    def __init__(self, q: torch.Tensor, v: torch.Tensor, memory: Scratch) -> None:
        B, H, T = q.shape[:-1]
        dtype = torch.promote_types(q.dtype, torch.float32)
        self.out = torch.empty(B, T, H, v.shape[-1], device=q.device, dtype=dtype).transpose(1, 2)
        self.scratch = memory.bind(q.device, dtype)
        self.in_place = reads_in_place(v, scratch=self.scratch)
        self.values = v if self.in_place else copy_to_scratch(self.scratch, "v", v)
        self._held: tuple[int, int, torch.Tensor] | None = None  # batch rows whose values are in the scratch memory

    def _rows(self, b0: int, b1: int) -> torch.Tensor:
        """Values of batch rows ``b0:b1``: contiguous, copied to the scratch memory once per run of blocks."""
        if not self.in_place:
            return self.values[b0:b1]
        if self._held is None or self._held[:2] != (b0, b1):
            self._held = (b0, b1, copy_to_scratch(self.scratch, "vb", self.values[b0:b1]))
        return self._held[2]

    def add(self, probs: torch.Tensor, b0: int, b1: int, start: int) -> None:
        """Apply the probabilities ``(b1 - b0, H, c, S)`` of batch rows ``b0:b1``, query rows ``start:start + c``."""
        _, H, T, dv = self.out.shape
        stop = start + probs.shape[-2]
        o = self.scratch("out", (b1 - b0, H, stop - start, dv))
        if self.in_place and b1 - b0 == 1:  # straight from the model's (strided) values
            torch.bmm(probs[0], self.values[b0], out=self.scratch("out", (H, stop - start, dv)))
        else:  # one batched product for the block, from contiguous values
            torch.matmul(probs, self._rows(b0, b1), out=o)
        (self.out[b0:b1] if (start, stop) == (0, T) else self.out[b0:b1, :, start:stop]).copy_(o)


def measured_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    skip: int,
    first: int | None = None,
    max_elements: int = 1 << 24,
    block_elements: int | None = None,
    output: AttentionOutput | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(b0, probs)`` blocks of :func:`iter_attention_blocks` past the first ``skip`` query rows (prefix rows).

    The blocks start at query row ``first`` (default: ``skip``; 0 with ``output``, which needs the prefix rows too):
    two layers of the same shapes and the same ``first`` are split alike, so consecutive-layer metrics can zip them.
    With ``output`` (the ``inline`` tap) the blocks live in its scratch memory and each is first applied to the values
    (:meth:`AttentionOutput.add`), so the caller runs the generator to its end even when it measures nothing.
    """
    if first is None:
        first = skip if output is None else 0
    scratch = None if output is None else output.scratch
    for b0, b1, start, probs in iter_attention_blocks(q, k, scale, first, bias, max_elements, scratch, block_elements):
        if output is not None:
            output.add(probs, b0, b1, start)
        if start + probs.shape[-2] > skip:
            yield b0, probs if start >= skip else probs[:, :, skip - start :]
