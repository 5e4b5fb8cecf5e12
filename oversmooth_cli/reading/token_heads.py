"""Per family: how the patch-diversification losses read a model beyond its tokens (data only, like :mod:`.families`).

``l_token`` scores every position of the *last token layer* (the last block whose output has token metrics) with the
model's own classifier. A :class:`TokenHead` says how: the *tail*, the modules the model runs between that layer and
its pooling (a final norm; for a few families a convolution or neck that keeps the grid), is run on the whole token
map; then the model's own ``forward_head`` scores every position, each fed as a map in which every position holds that
one token. Whatever the head pools with (the class token, an average, a maximum, attention pooling), pooling a map of
copies of one token returns that token, so this is the model's classifier applied per position, without pooling, in
the layout the family's head takes (NLC copies, or a 1x1 ``NHWC`` / ``NCHW`` map as the model's ``output_fmt`` says).
Heads that ``forward_head`` cannot reach this way (CrossViT's two branch heads) name their modules instead.

A family without an entry here is refused ``--loss token`` with a one-line reason; an entry may also refuse a term
(``refuse``) or say that its tokens are not a row-major grid over the image (``not_grid``), which ``l_cons`` needs when
it pools the first token layer onto the last one's grid.

:data:`TOKEN_HEADS` is keyed by adapter name (:attr:`~oversmooth_cli.reading.registry.FamilyAdapter.name`); a key
``"<adapter>:<group path>"`` overrides it for the blocks of one group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from .registry import BlockSpec, FamilyAdapter

__all__ = ["TOKEN_HEADS", "TokenHead", "token_head_for"]


PathRule = Callable[[nn.Module, str], str]
"""``f(model, last_block_name)`` -> a module path (e.g. the norm of the last block's stage)."""


@dataclass(frozen=True)
class TokenHead:
    """How ``l_token`` reaches a family's own classifier from its last token layer.

    Attributes:
        tail: modules the model applies to the last token layer's output before pooling, in order (module paths or
            :data:`PathRule`); run here on the whole ``(rows, cols)`` token map. Missing modules are skipped.
        tail_layout: how the tail takes the map: ``nlc`` ``(B, n, C)``, ``nhwc`` or ``nchw``.
        head_input: how ``forward_head`` takes one position: ``tokens`` (a sequence of copies of the token, as many
            as the model's prefix tokens plus one) or ``map`` (a 1x1 map in the model's ``output_fmt``, ``NCHW`` by
            default).
        classifier: instead of ``forward_head``, these modules applied in order to every ``(N, C)`` token.
        skipped: what of the model's own path after the last token layer the per-token head leaves out (for the
            reader: compatibility table, ``config.json``).
        refuse: loss term -> why the family cannot be fine-tuned with it.
        not_grid: why the tokens are not in row-major order over the image ("" when they are).
    """

    tail: tuple[str | PathRule, ...] = ()
    tail_layout: str = "nlc"
    head_input: str = "tokens"
    classifier: tuple[str | PathRule, ...] = ()
    skipped: str = ""
    refuse: Mapping[str, str] = field(default_factory=dict)
    not_grid: str = ""


def _stage_norm(model: nn.Module, block: str) -> str:
    """``stages.3.blocks.1`` -> ``stages.3.norm``: the norm a stage applies after its blocks (PVT-v2, GCViT)."""
    return block.rsplit(".", 2)[0] + ".norm"


def _coat_norm(model: nn.Module, block: str) -> str:
    """``serial_blocks4.0`` -> ``norm4``: CoaT-Lite's norm of the last serial stage."""
    return "norm" + block.split(".")[0].removeprefix("serial_blocks")


def _crossvit_norm(model: nn.Module, block: str) -> str:
    """``blocks.1.blocks.1.0`` -> ``norm.1``: the norm of the branch the last token layer belongs to."""
    return f"norm.{block.split('.')[3]}"


def _crossvit_head(model: nn.Module, block: str) -> str:
    return f"head.{block.split('.')[3]}"


_NORM = TokenHead(tail=("norm",))
"""ViT-like: the final norm of ``forward_features``, then ``forward_head`` on a sequence of copies of each token."""


_CLASS_ATTENTION = "the class-attention blocks after it (they update only the class token)"


TOKEN_HEADS: dict[str, TokenHead] = {
    "vit": _NORM,
    "beit": _NORM,
    "eva": _NORM,
    "naflexvit": _NORM,
    "relpos": _NORM,
    "sam": TokenHead(tail=("neck",), tail_layout="nchw", head_input="map"),
    "cait": TokenHead(tail=("norm",), skipped=_CLASS_ATTENTION),
    "xcit": _NORM,
    "swin": TokenHead(tail=("norm",), tail_layout="nhwc", head_input="map"),
    "pvt_v2": TokenHead(tail=(_stage_norm,), head_input="map"),
    "twins": _NORM,
    "convit": _NORM,
    "crossvit": TokenHead(
        tail=(_crossvit_norm,),
        classifier=("head_drop", _crossvit_head),
        skipped="the other branch's head (the model averages the heads of both branches)",
    ),
    "pit": _NORM,
    "tnt": _NORM,
    "volo": TokenHead(tail=("norm",), skipped=_CLASS_ATTENTION),
    "nest": TokenHead(
        tail=("norm",),
        tail_layout="nhwc",
        head_input="map",
        not_grid="NesT blocks hold their tokens image block by image block (block-major order), not row-major",
    ),
    "maxxvit": TokenHead(tail=("norm",), tail_layout="nchw", head_input="map"),
    "davit": TokenHead(tail=("norm_pre",), tail_layout="nchw", head_input="map"),
    "mvitv2": _NORM,
    "hiera": TokenHead(
        not_grid="Hiera blocks hold their tokens in mask-unit (unrolled) order, not row-major over the image",
    ),
    "gcvit": TokenHead(tail=(_stage_norm,), tail_layout="nhwc", head_input="map"),
    "coat": TokenHead(tail=(_coat_norm,)),
    "levit": TokenHead(),
    "efficientformer": _NORM,
    "tiny_vit": TokenHead(head_input="map"),
    "byobnet": TokenHead(tail=("final_conv",), tail_layout="nchw", head_input="map"),
    "byobnet:stages.*.*.transformer.*": TokenHead(
        refuse={
            "token": "its last token layer sits inside a MobileViT block, whose convolutions then fuse it with the "
            "block's input, so no classifier reads those tokens directly"
        },
        not_grid="MobileViT transformers hold one sequence per pixel offset inside a patch, not a row-major grid",
    ),
    "fastvit": TokenHead(tail=("final_conv",), tail_layout="nchw", head_input="map"),
    "metaformer": TokenHead(head_input="map"),
    "hieradet_sam2": TokenHead(head_input="map"),
    "efficientformer_v2": TokenHead(tail=("norm",), tail_layout="nchw", head_input="map"),
    "vlm_towers": TokenHead(tail=("encoder.norm",)),
    "shvit": TokenHead(head_input="map"),
    "iformer": TokenHead(head_input="map"),
    "lowformer": TokenHead(head_input="map"),
    "csatv2": TokenHead(head_input="map"),
    "edgenext": TokenHead(tail=("norm_pre",), tail_layout="nchw", head_input="map"),
    "nextvit": TokenHead(tail=("norm",), tail_layout="nchw", head_input="map"),
    "visformer": TokenHead(tail=("norm",), tail_layout="nchw", head_input="map"),
    "efficientvit_msra": TokenHead(head_input="map"),
    "mobilenet_attention": TokenHead(
        refuse={
            "token": "convolution blocks (and MobileNetV5's multi-scale fusion) follow its last attention block, so "
            "no classifier reads that block's tokens position by position"
        },
    ),
}
"""Adapter name (or ``adapter:group path``) -> how ``l_token`` and ``l_cons`` read that family."""


def token_head_for(adapter: FamilyAdapter, spec: BlockSpec) -> TokenHead | None:
    """The entry for the blocks of ``spec``'s group, else the adapter's, else ``None`` (not registered)."""
    return TOKEN_HEADS.get(f"{adapter.name}:{spec.group.path}", TOKEN_HEADS.get(adapter.name))
