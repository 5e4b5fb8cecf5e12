"""Capture per-layer tokens and attention with hooks, reducing every forward pass to metric values on the fly.

Which modules to hook comes from the family's adapter (:mod:`oversmooth_cli.adapters`). Per-layer values are kept on
the model's device while the batch runs and moved to the CPU once per batch (:meth:`OversmoothingCapture.pop_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import ATTENTION_TAPS, FamilyAdapter, UnsupportedModelError, model_family, resolve_adapter
from .metrics import ATTENTION_METRICS, TOKEN_METRICS, iter_attention_probs

__all__ = [
    "LayerInfo",
    "OversmoothingCapture",
    "UnsupportedModelError",
    "model_family",
    "resolve_adapter",
]


@dataclass(frozen=True)
class LayerInfo:
    """One measured layer: ``index`` as written to the tables (0 = input of the first block)."""

    index: int
    name: str
    has_attention: bool


@dataclass
class _Pending:
    layers: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    heads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


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
        attention_tap: ``qk`` (keeps fused attention) or ``softmax`` (unfused, reads probabilities).
        adapter: override the registered adapter.
        max_elements: chunk budget for attention probabilities (elements per chunk).
    """

    def __init__(
        self,
        model: nn.Module,
        token_metrics: Sequence[str] = ("token_cosine",),
        attention_metrics: Sequence[str] = ("attention_std",),
        attention_tap: str = "qk",
        adapter: FamilyAdapter | None = None,
        max_elements: int = 1 << 24,
    ) -> None:
        if attention_tap not in ATTENTION_TAPS:
            raise ValueError(f"attention_tap must be one of {ATTENTION_TAPS}, got {attention_tap!r}")
        self.model = model
        self.adapter = adapter or resolve_adapter(model)
        self.token_metrics = {n: TOKEN_METRICS[n] for n in token_metrics}
        self.attention_metrics = {n: ATTENTION_METRICS[n] for n in attention_metrics}
        self.attention_tap = attention_tap
        self.max_elements = max_elements
        self.prefix = self.adapter.num_prefix_tokens(model)
        self._blocks = self.adapter.blocks(model)
        if not self._blocks:
            raise UnsupportedModelError(f"{type(model).__name__} has no blocks to measure")
        self._attns = [self.adapter.attention(b) for b in self._blocks] if self.attention_metrics else []
        self.layers = [LayerInfo(0, "input", False)] + [
            LayerInfo(i + 1, f"{self.adapter.blocks_attr}.{i}", bool(self.attention_metrics))
            for i in range(len(self._blocks))
        ]
        self._handles: list = []
        self._undo: list[Callable[[], None]] = []
        self._pending = _Pending()

    # -- hooks -----------------------------------------------------------------------------------------------
    def _on_tokens(self, layer: int, tokens: torch.Tensor) -> None:
        patches = tokens[:, self.prefix :].detach()
        for name, m in self.token_metrics.items():
            self._pending.layers[(name, layer)] = m.fn(patches)

    def _reduce_rows(self, layer: int, chunks) -> None:
        sums: dict[str, torch.Tensor] = {}
        rows = 0
        for probs in chunks:
            rows += probs.shape[-2]
            for name, m in self.attention_metrics.items():
                part = m.fn(probs).sum(dim=-1)  # (B, H)
                sums[name] = part if name not in sums else sums[name] + part
        for name, total in sums.items():
            per_head = total / rows
            self._pending.heads[(name, layer)] = per_head
            self._pending.layers[(name, layer)] = per_head.mean(dim=-1)

    def _on_qk(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        with torch.no_grad():
            chunks = iter_attention_probs(
                q.detach(), k.detach(), scale, query_start=self.prefix, max_elements=self.max_elements
            )
            self._reduce_rows(layer, chunks)

    def _on_probs(self, layer: int, probs: torch.Tensor) -> None:
        with torch.no_grad():
            self._reduce_rows(layer, [probs.detach().float()[:, :, self.prefix :]])

    # -- context -----------------------------------------------------------------------------------------------
    def __enter__(self) -> OversmoothingCapture:
        try:
            first = self._blocks[0]
            self._handles.append(first.register_forward_pre_hook(lambda _m, args: self._on_tokens(0, args[0])))
            for i, block in enumerate(self._blocks):
                self._handles.append(
                    block.register_forward_hook(lambda _m, _a, out, layer=i + 1: self._on_tokens(layer, out))
                )
            for i, attn in enumerate(self._attns):
                if self.attention_tap == "qk":
                    cb = lambda q, k, s, layer=i + 1: self._on_qk(layer, q, k, s)  # noqa: E731
                    self._handles.extend(self.adapter.tap_qk(attn, cb))
                else:
                    handles, undo = self.adapter.tap_softmax(attn, lambda p, layer=i + 1: self._on_probs(layer, p))
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

    def pop_batch(self) -> tuple[dict[tuple[str, int], torch.Tensor], dict[tuple[str, int], torch.Tensor]]:
        """Per-image values of the last forward pass, on the CPU (one device-to-host copy), then cleared.

        Returns:
            ``({(metric, layer): (B,)}, {(metric, layer): (B, H)})``.
        """
        pending, self._pending = self._pending, _Pending()
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
