"""Capture per-layer tokens and attention from timm models with hooks, reducing to metrics on the fly.

A model family is supported by one :class:`FamilyAdapter` entry in :data:`ADAPTERS`: it names the blocks in
execution order, the number of prefix tokens, and how to tap each block's attention. Nothing else in the
package branches on the model type.

Two attention taps exist:

* ``qk`` (default): forward hooks on the attention's ``q_norm`` / ``k_norm`` modules receive ``q`` and ``k``
  exactly as the model uses them. The model keeps its fused (SDPA) kernel; attention statistics are computed
  from ``q`` and ``k`` in chunks of queries and reduced at once.
* ``softmax``: the attention's ``fused_attn`` switch is turned off for the measured model and the softmax
  probabilities are read at the input of ``attn_drop``. Slower; used to check the ``qk`` path.

Per-layer values are kept on the model's device while the batch runs and moved to the CPU once per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .metrics import ATTENTION_METRICS, TOKEN_METRICS, iter_attention_probs

__all__ = [
    "ADAPTERS",
    "ATTENTION_TAPS",
    "FamilyAdapter",
    "LayerInfo",
    "OversmoothingCapture",
    "UnsupportedModelError",
    "model_family",
    "register_adapter",
    "resolve_adapter",
]

ATTENTION_TAPS = ("qk", "softmax")


class UnsupportedModelError(ValueError):
    """The model's family or blocks cannot be measured; the message says which and what is missing."""


@dataclass(frozen=True)
class LayerInfo:
    """One measured layer: ``index`` as written to the tables (0 = input of the first block)."""

    index: int
    name: str
    has_attention: bool


QKCallback = Callable[[torch.Tensor, torch.Tensor, float], None]
ProbsCallback = Callable[[torch.Tensor], None]


@dataclass
class FamilyAdapter:
    """How to find blocks, prefix tokens and attention in one timm model family.

    Attributes:
        name: adapter key.
        families: timm module names (``type(model).__module__`` tail) this adapter serves.
        blocks_attr: attribute holding the blocks in execution order.
        attn_attr: attribute of a block holding its self-attention.
    """

    name: str
    families: tuple[str, ...]
    blocks_attr: str = "blocks"
    attn_attr: str = "attn"
    notes: str = ""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = getattr(model, self.blocks_attr, None)
        if blocks is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no '{self.blocks_attr}' to hook")
        return list(blocks)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(getattr(model, "num_prefix_tokens", 0))

    def attention(self, block: nn.Module) -> nn.Module:
        attn = getattr(block, self.attn_attr, None)
        missing = [a for a in ("q_norm", "k_norm", "scale", "num_heads") if not hasattr(attn, a)]
        if attn is None or missing:
            raise UnsupportedModelError(
                f"block {type(block).__name__} has no timm-style self-attention "
                f"({type(attn).__name__ if attn is not None else 'none'} lacks {', '.join(missing) or 'attn'})"
            )
        return attn

    def tap_qk(self, attn: nn.Module, callback: QKCallback) -> list:
        """Hook ``q`` and ``k`` after their norms; ``callback(q, k, scale)`` runs once per forward."""
        store: dict[str, torch.Tensor] = {}

        def on_q(_m, _inp, out):
            store["q"] = out

        def on_k(_m, _inp, out):
            callback(store.pop("q"), out, float(attn.scale))

        return [attn.q_norm.register_forward_hook(on_q), attn.k_norm.register_forward_hook(on_k)]

    def tap_softmax(self, attn: nn.Module, callback: ProbsCallback) -> tuple[list, Callable[[], None]]:
        """Turn fused attention off and read probabilities at ``attn_drop``; returns handles and an undo."""
        if not hasattr(attn, "attn_drop"):
            raise UnsupportedModelError(f"{type(attn).__name__} has no attn_drop to read softmax probabilities at")
        previous = getattr(attn, "fused_attn", False)
        attn.fused_attn = False

        def undo() -> None:
            attn.fused_attn = previous

        handle = attn.attn_drop.register_forward_pre_hook(lambda _m, args: callback(args[0]))
        return [handle], undo


ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Add an adapter for its families (later registrations win)."""
    for family in adapter.families:
        ADAPTERS[family] = adapter
    return adapter


register_adapter(
    FamilyAdapter(
        "vit",
        ("vision_transformer", "deit"),
        notes="ViT, DeiT (distilled: 2 prefix tokens), DeiT3, register-token ViTs",
    )
)


def model_family(model: nn.Module) -> str:
    """timm family of a model: the module name its class is defined in (``vision_transformer``, ``deit``...)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def resolve_adapter(model: nn.Module) -> FamilyAdapter:
    """The adapter for the model's class or its nearest registered base class."""
    for cls in type(model).__mro__:
        family = cls.__module__.rsplit(".", 1)[-1]
        if family in ADAPTERS:
            return ADAPTERS[family]
    raise UnsupportedModelError(
        f"model family '{model_family(model)}' ({type(model).__name__}) has no attention the tool can capture; "
        f"supported families: {', '.join(sorted(ADAPTERS))}"
    )


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
