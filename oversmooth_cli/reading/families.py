"""The adapter registry's data: one :class:`~oversmooth_cli.reading.registry.FamilyAdapter` per supported timm
family, and the reason each attention family the tool cannot measure is left out.

Imported by :mod:`oversmooth_cli.reading` (like timm's ``models/__init__``), which fills :data:`ADAPTERS` and
:data:`UNSUPPORTED` of :mod:`~oversmooth_cli.reading.registry`. A new family is one more entry here; the small rule
functions below say where a family's prefix tokens or stages are when a number or an attribute name cannot; where
its attention windows sit, the position rules, is in :mod:`oversmooth_cli.reading.window_rules`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import UNSUPPORTED, FamilyAdapter, Group, register_adapter
from .window_rules import (
    block_windows,
    gcvit_windows,
    hiera_windows,
    maxvit_windows,
    mixed_heads,
    mobilevit_windows,
    msra_windows,
    nest_windows,
    sam2_windows,
    swin_windows,
    twins_windows,
)

__all__ = ["VIT_BLOCKS"]


VIT_BLOCKS = Group("blocks.*", prefix="num_prefix_tokens")
"""A plain ViT trunk: ``blocks.N``, prefix tokens = the model's ``num_prefix_tokens``."""


_VIT_OTHER_BLOCKS = ("ParallelScalingBlock", "ParallelThingsBlock", "DiffParallelScalingBlock")
"""ViT block classes that do not hold one ``attn`` module with ``q_norm`` / ``k_norm``."""


def _convit_prefix(model: nn.Module, name: str) -> int:
    """ConViT prepends its class token before block ``local_up_to_layer``."""
    convit: Any = model
    return int(int(name.split(".")[1]) >= convit.local_up_to_layer and convit.cls_token is not None)


def _crossvit_branch(model: nn.Module, name: str) -> int:
    """CrossViT ``blocks.i.blocks.b.j`` / ``blocks.i.fusion.b``: the branch ``b``."""
    return int(name.split(".")[3])


def _hiera_stage(model: nn.Module, name: str) -> int:
    """Hiera keeps its blocks flat; ``stage_ends`` holds the last block of each stage."""
    ends: Any = model.stage_ends
    return sum(int(name.split(".")[1]) > end for end in ends)


def _encoder_prefix(model: nn.Module, name: str) -> int:
    """Prefix tokens of a vision tower that may sit under ``encoder`` in a classifier wrapper."""
    return int(getattr(getattr(model, "encoder", model), "num_prefix_tokens", 0) or 0)


def _second(value: Any) -> torch.Tensor:
    """TNT blocks take and return ``(pixel_embed, patch_embed)``: the patch tokens."""
    return value[1]


for _adapter in (
    FamilyAdapter(
        "vit",
        ("vision_transformer", "deit", "vision_transformer_hybrid", "vitamin"),
        (
            Group(
                "blocks.*",
                attn_classes=("Attention",),
                skip_classes=_VIT_OTHER_BLOCKS,
                reader="qk_norm",
                prefix="num_prefix_tokens",
            ),
            Group("blocks.*", attn="", block_classes=("ParallelScalingBlock",), prefix="num_prefix_tokens"),
            Group(
                "blocks.*",
                attn=None,
                block_classes=("ParallelThingsBlock", "DiffParallelScalingBlock"),
                prefix="num_prefix_tokens",
                kind="parallel / differential attention",
            ),
        ),
        notes="ViT, DeiT (distilled: 2 prefix tokens), DeiT3, register-token ViTs, SigLIP / CLIP towers, FlexiViT, "
        "hybrid (CNN stem) ViTs, ViTamin. Differential attention (a difference of two softmax maps) and blocks with "
        "several parallel attention modules get token metrics only.",
        coverage=("all layers", "all blocks (but differential / parallel-attention ones)"),
        patch_grid=True,
    ),
    FamilyAdapter(
        "beit",
        ("beit",),
        (VIT_BLOCKS,),
        notes="Relative position bias (per block or shared) is part of the attention logits.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "eva",
        ("eva",),
        (VIT_BLOCKS,),
        notes="EVA / EVA02 / PE / DINOv3-style: q and k are read after their norm and rotary embedding.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "naflexvit",
        ("naflexvit",),
        (VIT_BLOCKS,),
        notes="Measured on fixed-size images (no NaFlex patch dictionaries); rotary variants after their rope.",
        patch_grid=True,
        image_input=("embeds",),
    ),
    FamilyAdapter(
        "relpos",
        ("vision_transformer_relpos",),
        (VIT_BLOCKS,),
        notes="Relative position bias (per block or shared) is part of the attention logits.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "sam",
        ("vision_transformer_sam",),
        (Group("blocks.*", layout="nhwc", positions=block_windows),),
        notes="Windowed blocks: attention std over each window's keys, averaged over windows; global blocks: over "
        "all tokens. Decomposed relative position bias is part of the logits. Token metrics over all tokens.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "cait",
        ("cait",),
        (
            Group("blocks.*", reader="attn_drop", positions=mixed_heads),
            Group("blocks_token_only.*", tokens=False, prefix=1, query_prefix=0, kind="class attention"),
        ),
        notes="Stage 0: self-attention blocks over the patch tokens (talking-heads attention: the weights applied "
        "to the values, after the post-softmax head mixing). Stage 1: class-attention blocks, reported in their own "
        "rows: attention only (the class token's row over class + patch keys); they do not change patch tokens.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "xcit",
        ("xcit",),
        (
            Group("blocks.*", attn=None, kind="cross-covariance (channel) attention"),
            Group("cls_attn_blocks.*", prefix=1, query_prefix=0, kind="class attention"),
        ),
        notes="XCA blocks attend over channels, not tokens: token metrics only. Stage 1 class-attention blocks: "
        "token metrics and the class token's attention row over class + patch keys.",
        patch_grid=True,
    ),
    FamilyAdapter(
        "swin",
        ("swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr"),
        (
            Group("layers.*.blocks.*", layout="nhwc", positions=swin_windows),
            Group("stages.*.blocks.*", layout="nhwc", positions=swin_windows),
        ),
        notes="Windowed (shifted) attention: std over each window's keys, averaged over windows. Token metrics over "
        "all tokens of the stage. A layer is a block; stages are separated by patch merging.",
    ),
    FamilyAdapter(
        "pvt_v2",
        ("pvt_v2",),
        (Group("stages.*.blocks.*"),),
        notes="Spatial-reduction attention: every token attends over the reduced key set.",
    ),
    FamilyAdapter(
        "twins",
        ("twins",),
        (Group("blocks.*.*", positions=twins_windows),),
        notes="Locally-grouped (windowed) and global sub-sampled attention alternate; windows averaged per image.",
    ),
    FamilyAdapter(
        "convit",
        ("convit",),
        (Group("blocks.*", reader="attn_drop", prefix=_convit_prefix),),
        notes="Gated positional self-attention (GPSA) blocks: the weights applied to the values, a gated mix of the "
        "content softmax and the positional softmax. The class token joins at the first MHSA block (prefix 1 from "
        "there on).",
        patch_grid=True,
    ),
    FamilyAdapter(
        "crossvit",
        ("crossvit",),
        (
            Group("blocks.*.blocks.*.*", prefix=1, stage=_crossvit_branch),
            Group(
                "blocks.*.fusion.*",
                tokens=False,
                prefix=1,
                query_prefix=0,
                stage=_crossvit_branch,
                kind="cross attention",
            ),
        ),
        notes="Two branches, reported one after the other: stage 0 is the small-patch branch, stage 1 the "
        "large-patch branch (layer 0 is branch 0's input). Each branch's self-attention blocks, then its "
        "cross-attention fusion blocks (attention only: the branch's class token over the other branch's patches).",
        order_by_stage=True,
    ),
    FamilyAdapter(
        "pit",
        ("pit",),
        (Group("transformers.*.blocks.*", prefix="num_tokens"),),
        notes="Pooling stages: the class token(s) (2 for distilled models) are the prefix in every stage.",
    ),
    FamilyAdapter(
        "tnt",
        ("tnt",),
        (Group("blocks.*", attn="attn_out", prefix="num_prefix_tokens", pick=_second),),
        notes="Outer (patch-level) tokens and attention; the inner attention among the pixels of each patch is "
        "not measured.",
        patch_grid=True,
        image_input=("pixel_embed",),
    ),
    FamilyAdapter(
        "volo",
        ("volo",),
        (
            Group(
                "network.*.*",
                attn_classes=("Attention",),
                block_classes=("Outlooker", "Transformer"),
                layout="nhwc",
                kind="outlooker / self-attention",
            ),
            Group("post_network.*", tokens=False, prefix=1, query_prefix=0, kind="class attention"),
        ),
        notes="Outlooker blocks (outlook attention: local weights from a linear map, no query-key softmax over "
        "tokens) get token metrics only; transformer blocks both; class-attention blocks (last stage) attention only.",
    ),
    FamilyAdapter(
        "nest",
        ("nest",),
        (Group("levels.*.transformer_encoder.*", layout="nhwc", heads_dim=1, positions=nest_windows),),
        notes="Attention within each image block (window), averaged over blocks; token metrics over all tokens.",
    ),
    FamilyAdapter(
        "maxxvit",
        ("maxxvit",),
        (
            Group(
                "stages.*.blocks.*.*",
                block_classes=("PartitionAttentionCl",),
                layout="nhwc",
                stage_wildcards=1,
                positions=maxvit_windows,
            ),
            Group(
                "stages.*.blocks.*.*",
                block_classes=("PartitionAttention2d",),
                layout="nchw",
                stage_wildcards=1,
                positions=maxvit_windows,
            ),
            Group("stages.*.blocks.*", block_classes=("TransformerBlock2d",), layout="nchw"),
        ),
        notes="MaxViT: a layer is one block-attention or grid-attention transformer step (two per MaxViT block; the "
        "MBConv before them is not a layer), attention averaged over partitions. CoAtNet: the transformer blocks of "
        "the later stages (conv stages are not layers). Parallel-partition MaxxViT-v2 blocks are not measured.",
    ),
    FamilyAdapter(
        "davit",
        ("davit",),
        (
            Group(
                "stages.*.blocks.*.*",
                attn_classes=("WindowAttention",),
                layout="nchw",
                stage_wildcards=1,
                positions=block_windows,
            ),
        ),
        notes="Spatial (window) blocks: token metrics and attention averaged over windows. Channel blocks attend "
        "over channels: token metrics only.",
    ),
    FamilyAdapter(
        "mvitv2",
        ("mvitv2",),
        (Group("stages.*.blocks.*", prefix="num_prefix_tokens"),),
        notes="Pooling attention: queries and keys are pooled, so a block's keys can be fewer than its tokens.",
    ),
    FamilyAdapter(
        "hiera",
        ("hiera",),
        (Group("blocks.*", heads_dim=1, stage=_hiera_stage, positions=hiera_windows),),
        notes="Mask-unit (windowed) attention in the early stages, averaged over units; global attention later. "
        "Stages from the model's stage ends.",
    ),
    FamilyAdapter(
        "gcvit",
        ("gcvit",),
        (Group("stages.*.blocks.*", layout="nhwc", positions=gcvit_windows),),
        notes="Local and global-query window attention alternate, averaged over windows.",
    ),
    FamilyAdapter(
        "coat",
        ("coat",),
        (
            Group("serial_blocks1.*", attn=None, prefix=1, kind="factorized attention"),
            Group("serial_blocks2.*", attn=None, prefix=1, kind="factorized attention"),
            Group("serial_blocks3.*", attn=None, prefix=1, kind="factorized attention"),
            Group("serial_blocks4.*", attn=None, prefix=1, kind="factorized attention"),
        ),
        notes="Serial blocks: token metrics only. Factorized attention (softmax over the keys' tokens, then k^T v) "
        "has no query-key attention map. Parallel blocks (CoaT, not Lite) mix three scales and are not measured.",
    ),
    FamilyAdapter(
        "levit",
        ("levit",),
        (
            Group("stages.*.downsample", attn="attn_downsample", block_classes=("LevitDownsample",)),
            Group("stages.*.blocks.*", layout="nchw"),
        ),
        notes="Attention biases are part of the logits. The attention-downsample step opening a stage is a layer "
        "(its queries are subsampled).",
    ),
    FamilyAdapter(
        "efficientformer",
        ("efficientformer",),
        (
            Group(
                "stages.*.blocks.*",
                attn="token_mixer",
                attn_classes=("Attention",),
                block_classes=("MetaBlock2d", "MetaBlock1d"),
                layout="nchw",
            ),
        ),
        notes="Pooling (MetaBlock2d) blocks: token metrics only; the attention (MetaBlock1d) blocks of the last "
        "stage: both, attention biases in the logits.",
    ),
    FamilyAdapter(
        "tiny_vit",
        ("tiny_vit",),
        (Group("stages.*.blocks.*", block_classes=("TinyVitBlock",), layout="nhwc", positions=block_windows),),
        notes="Windowed attention with attention biases, averaged over windows; the conv stage is not a layer.",
    ),
    FamilyAdapter(
        "byobnet",
        ("mobilevit", "byoanet"),
        (
            Group(
                "stages.*.*.transformer.*", attn_classes=("Attention",), stage_wildcards=1, positions=mobilevit_windows
            ),
            Group(
                "stages.*.*",
                attn="self_attn",
                attn_classes=("BottleneckAttn",),
                block_classes=("SelfAttnBlock",),
                layout="nchw",
            ),
        ),
        notes="MobileViT: the transformer blocks inside each MobileViT block; they attend across patches for each "
        "pixel position (sequences folded back: token metrics over every position of the feature map, attention "
        "averaged over sequences); MobileViT-v2 linear attention has no attention map: token metrics only. "
        "BoTNet / HaloNet / LambdaNet (byoanet): the self-attention blocks (global bottleneck attention: both; "
        "halo and lambda layers: token metrics only). Convolution blocks are not layers.",
        images_from="stages.*.*",
        modules=("byobnet",),
    ),
    FamilyAdapter(
        "fastvit",
        ("fastvit",),
        (
            Group(
                "stages.*.blocks.*",
                attn="token_mixer",
                attn_classes=("Attention",),
                block_classes=("RepMixerBlock", "AttentionBlock"),
                layout="nchw",
            ),
        ),
        notes="RepMixer (convolutional) blocks: token metrics only; attention blocks (last stage of the SA / MCi "
        "models): both.",
    ),
    FamilyAdapter(
        "metaformer",
        ("metaformer",),
        (Group("stages.*.blocks.*", attn="token_mixer", attn_classes=("Attention",), layout="nchw"),),
        notes="CAFormer: attention stages both metrics, convolution stages token metrics only; PoolFormer / "
        "ConvFormer have no attention: token metrics only.",
    ),
    FamilyAdapter(
        "hieradet_sam2",
        ("hieradet_sam2",),
        (Group("blocks.*", layout="nhwc", stage=_hiera_stage, positions=sam2_windows),),
        notes="SAM2 Hiera: windowed attention averaged over windows, global blocks over all tokens; stages from the "
        "model's stage ends.",
    ),
    FamilyAdapter(
        "efficientformer_v2",
        ("efficientformer_v2",),
        (
            Group(
                "stages.*.blocks.*",
                attn="token_mixer",
                attn_classes=("Attention2d",),
                reader="talking_head2",
                layout="nchw",
                positions=mixed_heads,
            ),
        ),
        notes="Talking-heads attention: the weights applied to the values (after the post-softmax head mixing). "
        "Blocks without attention: token metrics only; the attention-downsample steps are not layers.",
    ),
    FamilyAdapter(
        "vlm_towers",
        ("deepseek_vit", "qwen3_vit", "gemma4_vit"),
        (
            Group("encoder.blocks.*", prefix=_encoder_prefix, layout="nhwc"),
            Group("blocks.*", prefix=_encoder_prefix, layout="nhwc"),
        ),
        notes="Vision towers of vision-language models (classifier or bare encoder): q and k after their rotary "
        "embedding. Measured on fixed-size images.",
        image_input=("encoder.patch_embed", "patch_embed"),
    ),
    FamilyAdapter(
        "shvit",
        ("shvit",),
        (Group("stages.*.blocks.*", attn="mixer.m", attn_classes=("SHSA",), layout="nchw"),),
        notes="Single-head attention over a slice of the channels; convolution-only blocks: token metrics only.",
    ),
    FamilyAdapter(
        "iformer",
        ("iformer",),
        (Group("stages.*.blocks.*", attn="mixer.module", attn_classes=("SHMA",), layout="nchw"),),
        notes="Every entry of a stage's blocks is a layer (conv blocks, positional conv, attention, FFN); "
        "single-head modulation attention: its attention map, before the gate.",
    ),
    FamilyAdapter(
        "lowformer",
        ("lowformer",),
        (
            Group(
                "stages.*.*",
                attn="attn.main.1",
                attn_classes=("ConvAttention",),
                block_classes=("LowFormerBlock",),
                layout="nchw",
            ),
        ),
        notes="Attention over a strided, lower-resolution token map; convolution blocks are not layers.",
    ),
    FamilyAdapter(
        "csatv2",
        ("csatv2",),
        (Group("stages.*.*", attn_classes=("Attention",), block_classes=("Block", "TransformerBlock"), layout="nchw"),),
        notes="Transformer blocks of the later stages; convolution blocks (with DCT spatial gating): token metrics "
        "only.",
        image_input=("stem_dct",),
    ),
    FamilyAdapter(
        "edgenext",
        ("edgenext",),
        (Group("stages.*.blocks.*", attn=None, layout="nchw", kind="transposed (channel) attention"),),
        notes="Split depth-wise transposed attention attends over channels, not tokens: token metrics only.",
    ),
    FamilyAdapter(
        "nextvit",
        ("nextvit",),
        (
            Group(
                "stages.*.blocks.*",
                attn="e_mhsa",
                attn_classes=("EfficientAttention",),
                block_classes=("NextConvBlock", "NextTransformerBlock"),
                layout="nchw",
            ),
        ),
        notes="Transformer blocks: spatial-reduction attention (keys pooled); convolution blocks (multi-head "
        "convolutional attention, no softmax map): token metrics only.",
    ),
    FamilyAdapter(
        "visformer",
        ("visformer",),
        tuple(Group(f"stage{i}.*", attn_classes=("Attention",), layout="nchw") for i in (1, 2, 3)),
        notes="Stages without attention (convolution blocks) get token metrics only.",
    ),
    FamilyAdapter(
        "mobilenet_attention",
        ("mobilenetv3", "mobilenetv5"),
        (Group("blocks.*.*", block_classes=("MobileAttention",), layout="nchw"),),
        notes="MobileNetV4 hybrids and MobileNetV5: a layer is a mobile attention block (multi-query attention: one "
        "key / value head shared by all query heads, keys and values strided); the convolution blocks between them "
        "are not layers. Convolution-only MobileNetV3 / V4 models have no attention and are refused.",
        coverage=("all layers (hybrids only)", "all blocks (hybrids only)"),
    ),
    FamilyAdapter(
        "efficientvit_msra",
        ("efficientvit_msra",),
        (
            Group(
                "stages.*.blocks.*",
                attn="mixer.m.attn",
                reader="cascaded",
                layout="nchw",
                positions=msra_windows,
            ),
        ),
        notes="Cascaded group attention: each head attends on its own (its input is its channel split plus the "
        "previous head's output); the heads' softmax maps, read one after the other, are the layer's heads. Local "
        "windows (the map padded to whole windows), averaged over windows; attention biases in the logits. The "
        "downsampling steps between stages are not layers.",
    ),
):
    register_adapter(_adapter)


UNSUPPORTED.update(
    {
        "efficientvit_mit": "ReLU linear attention has no softmax attention map; no adapter yet (token metrics only "
        "would be possible)",
        "swiftformer": "efficient additive attention pools one global query: no query-key softmax map; no adapter yet",
        "byobnet": "bat_resnext26ts's bilinear attentional transform (BatNonLocalAttn, non-local attention over "
        "pixel blocks) has no adapter yet; the CLIP ResNets' attention pooling belongs to the head, not to a "
        "block; the module's other models are convolutional",
        "cpubone": "convolutional attention nested in composed residual modules; no adapter yet",
    }
)
