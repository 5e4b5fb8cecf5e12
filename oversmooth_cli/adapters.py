"""Model-family adapters: where the blocks, prefix tokens and attention of each timm family are.

A family is supported by one :class:`FamilyAdapter` entry in :data:`ADAPTERS`, keyed by the timm module its model
class lives in (``type(model).__module__``). Nothing else in the package branches on the model type.

Two attention taps exist:

* ``qk`` (default): forward hooks on the attention's ``q_norm`` / ``k_norm`` modules receive ``q`` and ``k``
  exactly as the model uses them. The model keeps its fused (SDPA) kernel; attention statistics are computed
  from ``q`` and ``k`` in chunks of queries and reduced at once.
* ``softmax``: the attention's ``fused_attn`` switch is turned off for the measured model and the softmax
  probabilities are read at the input of ``attn_drop``. Slower; used to check the ``qk`` path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ADAPTERS",
    "ATTENTION_TAPS",
    "FamilyAdapter",
    "UnsupportedModelError",
    "model_family",
    "register_adapter",
    "resolve_adapter",
]

ATTENTION_TAPS = ("qk", "softmax")


class UnsupportedModelError(ValueError):
    """The model's family or blocks cannot be measured; the message says which and what is missing."""


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
