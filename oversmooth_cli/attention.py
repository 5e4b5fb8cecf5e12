"""Attention probabilities computed in query chunks, in reusable scratch memory.

:func:`iter_attention_probs` yields ``softmax(q k^T * scale + bias)`` a chunk of query rows at a time, so the full
``(B, H, T, S)`` probability tensor never exists at once. With a :class:`Scratch` (slots of memory reused by every
attention of a forward pass), the scaled queries, the keys and every chunk are computed in place and nothing large is
allocated per layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch

from .metrics import to_float

__all__ = [
    "Scratch",
    "ScratchFn",
    "copy_to_scratch",
    "iter_attention_probs",
]

ScratchFn = Callable[[str, int], torch.Tensor]
"""``scratch(slot, n)`` -> ``n`` elements of reusable memory ``slot`` (float32 or wider)."""


class Scratch:
    """Named slots of reusable memory: a slot is made anew when it is too small, of another device or dtype, or when
    inference mode changed (inference tensors cannot be written outside it), else reused."""

    def __init__(self) -> None:
        self._memory: dict[str, torch.Tensor] = {}

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
            memory = self._memory[slot] = torch.empty(n, device=device, dtype=dtype)
        return memory[:n]

    def bind(self, device: torch.device, dtype: torch.dtype) -> ScratchFn:
        """This memory as :func:`iter_attention_probs` takes it, on ``device`` in ``dtype``."""
        return functools.partial(self.get, device=device, dtype=dtype)

    def clear(self) -> None:
        """Free every slot."""
        self._memory.clear()


def iter_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_start: int = 0,
    bias: torch.Tensor | None = None,
    max_elements: int = 1 << 24,
    scratch: ScratchFn | None = None,
) -> Iterator[torch.Tensor]:
    """Yield softmax attention rows ``softmax(q k^T * scale + bias)`` for chunks of queries, in float32.

    The full ``(B, H, Q, K)`` probability tensor never exists at once: each chunk holds at most about
    ``max_elements`` values. Autocast is switched off so the logits are float32 on every device.
    With ``scratch`` (a :data:`ScratchFn` of float32 or wider memory, e.g. :meth:`Scratch.bind`), the scaled queries,
    the keys and every chunk (softmax in place) live in that memory, so a chunk is valid only until the next one is
    asked for and nothing large is allocated (on CPU, fresh allocations of tens of MB cost page faults that outweigh
    the arithmetic).

    Args:
        q: ``(B, H, T, dh)`` queries, after any q-norm / rotary embedding the model applies.
        k: ``(B, H, S, dh)`` keys, likewise.
        scale: logit scale (``head_dim ** -0.5`` in timm).
        query_start: first query row to yield (e.g. ``num_prefix_tokens`` to skip class tokens).
        bias: optional additive logit bias broadcastable to ``(B, H, T, S)`` (relative position bias).
        max_elements: chunk budget in probability elements.
        scratch: memory to compute the chunks in (see above).

    Yields:
        ``(B, H, c, S)`` probabilities for consecutive query chunks covering rows ``query_start..T-1``.
    """
    B, H, T, _ = q.shape
    S = k.shape[-2]
    chunk = max(1, max_elements // max(1, B * H * S))
    no_autocast = functools.partial(torch.autocast, device_type=q.device.type, enabled=False)
    with no_autocast():
        kt = (to_float(k) if scratch is None else copy_to_scratch(scratch, "k", k)).transpose(-2, -1)
    for start in range(query_start, T, chunk):
        stop = min(T, start + chunk)
        with no_autocast():  # never held across a yield: the caller's autocast state is its own between chunks
            if scratch is None:
                logits = (to_float(q[:, :, start:stop]) * scale) @ kt
            else:
                # scaled in float32, like the plain path
                qc = copy_to_scratch(scratch, "q", q[:, :, start:stop]).mul_(scale)
                logits = torch.matmul(qc, kt, out=_slot(scratch, "probs", (B, H, stop - start, S)))
            if bias is not None:
                logits += to_float(bias[..., start:stop, :])
            probs = logits.softmax(dim=-1) if scratch is None else torch.softmax(logits, dim=-1, out=logits)
        yield probs


def _slot(scratch: ScratchFn, slot: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous ``shape`` view of the scratch memory ``slot``."""
    return scratch(slot, math.prod(shape)).view(shape)


def copy_to_scratch(scratch: ScratchFn, slot: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` copied (contiguous, in the scratch memory's dtype) into the scratch memory ``slot``."""
    return _slot(scratch, slot, tuple(x.shape)).copy_(x)
