"""A small configuration of every family: the tiny random-weight models the tests, the compatibility table
(``scripts/compat_table.py``) and its docs (``docs/compatibility.md``) run.

Each :class:`SmallModel` builds one model of one timm family (a key of
:data:`~oversmooth_cli.reading.registry.ADAPTERS`): random weights, a small image size, one to two blocks per stage.
The package never imports this module itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

__all__ = ["SMALL_MODELS", "VIT", "SmallModel"]


@dataclass(frozen=True)
class SmallModel:
    """A small random-weight model of one family.

    Attributes:
        arch: timm architecture name (for ``build``: the architecture it stands for).
        args: ``timm.create_model`` keyword arguments that shrink it.
        img_size: input size (square) the model is run at.
        build: constructor for families whose size cannot be set through ``create_model`` (config objects, or
            keyword arguments the factory already sets); called with ``num_classes=0``.
        build_note: how ``build`` differs from ``arch`` (shown in the table).
    """

    arch: str
    args: dict[str, Any] = field(default_factory=dict)
    img_size: int = 32
    build: Callable[..., nn.Module] | None = None
    build_note: str = ""

    def create(self) -> nn.Module:
        """The model in eval mode, seeded (random weights are the same on every run)."""
        torch.manual_seed(0)
        if self.build is not None:
            return self.build(num_classes=0).eval()
        return timm.create_model(self.arch, pretrained=False, num_classes=0, **self.args).eval()

    def describe(self) -> str:
        """The recipe in one line of Markdown (what the table shows)."""
        if self.build is not None:
            return f"`{self.arch}` ({self.build_note}) at {self.img_size} px"
        args = ", ".join(f"{k}={v}" for k, v in self.args.items())
        return f"`{self.arch}` ({args}) at {self.img_size} px" if args else f"`{self.arch}` at {self.img_size} px"


VIT: dict[str, Any] = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
"""``timm.create_model`` arguments of a two-block ViT on 32 px images, the base of the plain-ViT families."""


def _volo(**kw: Any) -> nn.Module:
    from timm.models.volo import VOLO

    return VOLO(img_size=64, layers=[1, 1, 1, 1], embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], **kw)


def _nest(**kw: Any) -> nn.Module:
    from timm.models.nest import Nest

    return Nest(img_size=32, patch_size=2, embed_dims=(16, 32, 32), num_heads=(1, 2, 2), depths=(1, 1, 1), **kw)


def _gcvit(**kw: Any) -> nn.Module:
    from timm.models.gcvit import GlobalContextVit

    return GlobalContextVit(
        img_size=64, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), embed_dim=16, window_size=(4, 2, 2, 2), **kw
    )


def _mvitv2(**kw: Any) -> nn.Module:
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    return MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1), img_size=(64, 64), **kw)


def _metaformer(**kw: Any) -> nn.Module:
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    return MetaFormer(
        depths=(1, 1, 1, 1),
        dims=(16, 24, 32, 64),
        token_mixers=[SepConv, SepConv, Attention, Attention],
        norm_layers=[LayerNorm2dNoBias, LayerNorm2dNoBias, LayerNormNoBias, LayerNormNoBias],
        **kw,
    )


def _botnet(**kw: Any) -> nn.Module:
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    blocks = (
        ByoBlockCfg("bottle", d=1, c=32, s=1, br=0.25),
        ByoBlockCfg("self_attn", d=1, c=64, s=2, br=0.25),
        ByoBlockCfg("self_attn", d=1, c=64, s=2, br=0.25),
    )
    cfg = ByoModelCfg(
        blocks=blocks,
        stem_chs=16,
        stem_type="tiered",
        stem_pool="maxpool",
        fixed_input_size=True,
        self_attn_layer="bottleneck",
    )
    return ByobNet(cfg, img_size=64, **kw)


def _mobilenetv4_hybrid(**kw: Any) -> nn.Module:
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv3 import MobileNetV3

    arch = [  # mobilenetv4_hybrid_medium's block kinds, 1-5 blocks per stage; a stage ends with a conv block
        ["er_r1_k3_s2_e2_c16"],
        ["uir_r1_a3_k3_s2_e2_c24"],
        [
            "uir_r1_a3_k3_s2_e2_c32",
            "mqa_r1_k3_h2_s1_v2_d8_c32",
            "uir_r1_a3_k0_s1_e2_c32",
            "mqa_r1_k3_h2_s1_d8_c32",
            "uir_r1_a0_k0_s1_e2_c32",
        ],
    ]
    return MobileNetV3(
        block_args=decode_arch_def(arch),
        stem_size=16,
        num_features=64,
        head_norm=True,
        layer_scale_init_value=1e-5,
        **kw,
    )


def _mobilenetv5(**kw: Any) -> nn.Module:
    from timm.layers import RmsNorm2d
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv5 import MobileNetV5

    arch = [  # mobilenetv5_300m's block kinds, 1-3 blocks per stage
        ["er_r1_k3_s2_e2_c16"],
        ["uir_r1_a3_k3_s2_e2_c24"],
        ["uir_r1_a3_k3_s2_e2_c32", "mqa_r1_k3_h2_s2_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],
        ["uir_r1_a3_k3_s2_e2_c48", "mqa_r1_k3_h2_s1_d8_c48", "uir_r1_a0_k0_s1_e2_c48"],
    ]
    return MobileNetV5(
        block_args=decode_arch_def(arch),
        stem_size=16,
        num_features=64,
        msfa_output_resolution=4,
        norm_layer=RmsNorm2d,
        layer_scale_init_value=1e-5,
        **kw,
    )


SMALL_MODELS: dict[str, SmallModel] = {
    "vision_transformer": SmallModel("vit_tiny_patch16_224", VIT),
    "deit": SmallModel("deit_tiny_distilled_patch16_224", VIT),
    "vision_transformer_hybrid": SmallModel("vit_tiny_r_s16_p8_224", {**VIT, "img_size": 64}, 64),
    "beit": SmallModel("beit_base_patch16_224", VIT),
    "eva": SmallModel("eva02_tiny_patch14_224", VIT),
    "naflexvit": SmallModel("naflexvit_base_patch16_gap", VIT),
    "vision_transformer_relpos": SmallModel("vit_relpos_small_patch16_224", VIT),
    "vision_transformer_sam": SmallModel(
        "samvit_base_patch16",
        {**VIT, "img_size": 64, "window_size": 4, "global_attn_indexes": (1,), "neck_chans": 16},
        64,
    ),
    "cait": SmallModel("cait_xxs24_224", {**VIT, "depth_token_only": 2}),
    "xcit": SmallModel("xcit_nano_12_p8_224", {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}),
    "convit": SmallModel("convit_tiny", {**VIT, "depth": 3, "local_up_to_layer": 2}),
    "crossvit": SmallModel(
        "crossvit_tiny_240",
        {
            "img_size": 48,
            "img_scale": (1.0, 1.0),
            "patch_size": (12, 16),
            "embed_dim": (32, 64),
            "depth": ((1, 1, 0), (1, 1, 0)),
            "num_heads": (2, 2),
            "mlp_ratio": (2, 2, 1),
        },
        48,
    ),
    "pit": SmallModel(
        "pit_ti_distilled_224",
        {"img_size": 64, "patch_size": 8, "stride": 4, "depth": (1, 1, 1), "heads": (1, 2, 2), "base_dims": (16,) * 3},
        64,
    ),
    "tnt": SmallModel(
        "tnt_s_patch16_224",
        {"img_size": 32, "patch_size": 8, "embed_dim": 32, "inner_dim": 8, "depth": 2, "num_heads_outer": 2},
    ),
    "volo": SmallModel("volo_d1_224", img_size=64, build=_volo, build_note="VOLO with 1 block per stage, dims 16-32"),
    "swin_transformer": SmallModel(
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "patch_size": 2, "window_size": 4, "depths": (2, 2), "embed_dim": 16, "num_heads": (1, 2)},
    ),
    "swin_transformer_v2": SmallModel(
        "swinv2_tiny_window8_256",
        {"img_size": 32, "patch_size": 2, "window_size": 4, "depths": (2, 2), "embed_dim": 16, "num_heads": (1, 2)},
    ),
    "swin_transformer_v2_cr": SmallModel(
        "swinv2_cr_tiny_224",
        {"img_size": (32, 32), "window_size": 4, "depths": (2, 2), "embed_dim": 16, "num_heads": (1, 2)},
    ),
    "pvt_v2": SmallModel(
        "pvt_v2_b0", {"depths": (1, 1, 1, 1), "embed_dims": (16, 16, 32, 32), "num_heads": (1, 1, 2, 2)}, 64
    ),
    "twins": SmallModel(
        "twins_svt_small",
        {"img_size": 64, "depths": (1, 1, 1, 1), "embed_dims": (16, 16, 32, 32), "num_heads": (1, 1, 2, 2)},
        64,
    ),
    "nest": SmallModel("nest_tiny", img_size=32, build=_nest, build_note="NesT with 1 block per level, dims 16-32"),
    "maxxvit": SmallModel(
        "maxvit_nano_rw_256",
        {
            "img_size": 64,
            "embed_dim": (16, 32),
            "depths": (1, 1),
            "stem_width": 16,
            "transformer_dim_head": 8,
            "block_type": ("M", "M"),
        },
        64,
    ),
    "davit": SmallModel(
        "davit_tiny", {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 32, 32), "num_heads": (1, 2, 2, 2)}, 64
    ),
    "mvitv2": SmallModel("mvitv2_tiny", img_size=64, build=_mvitv2, build_note="1 block per stage, dims 16-128"),
    "hiera": SmallModel("hiera_tiny_224", {"img_size": 64, "embed_dim": 16, "stages": (1, 1, 1, 1)}, 64),
    "gcvit": SmallModel("gcvit_xxtiny", img_size=64, build=_gcvit, build_note="1 block per stage, dims 16-128"),
    "coat": SmallModel(
        "coat_lite_tiny",
        {"img_size": 64, "embed_dims": [32, 32, 32, 32], "serial_depths": [1, 1, 1, 1], "num_heads": 8},
        64,
    ),
    "levit": SmallModel(
        "levit_128s",
        {"img_size": 128, "embed_dim": (32, 48, 64), "key_dim": 8, "num_heads": (2, 2, 2), "depth": (1, 1, 1)},
        128,
    ),
    "efficientformer": SmallModel(
        "efficientformer_l1", {"depths": (1, 1, 1, 2), "embed_dims": (16, 16, 32, 32), "num_vit": 1}, 224
    ),
    "tiny_vit": SmallModel(
        "tiny_vit_5m_224",
        {"embed_dims": [16, 16, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_sizes": [2] * 4},
        64,
    ),
    "mobilevit": SmallModel("mobilevit_xxs", {}, 128),
    "vitamin": SmallModel("vitamin_small_224", {"img_size": 64, "depth": 2}, 64),
    "byoanet": SmallModel("botnet26t_256", img_size=64, build=_botnet, build_note="BoTNet, 3 stages, 16-64 channels"),
    "fastvit": SmallModel("fastvit_sa12", {"layers": (1, 1, 1, 1), "embed_dims": (16, 16, 32, 32)}, 64),
    "metaformer": SmallModel(
        "caformer_s18", img_size=64, build=_metaformer, build_note="CAFormer, 1 block per stage, dims 16-64"
    ),
    "hieradet_sam2": SmallModel(
        "sam2_hiera_tiny",
        {
            "embed_dim": 16,
            "num_heads": 1,
            "stages": (1, 1, 2, 1),
            "global_att_blocks": (3,),
            "window_spec": (4, 4, 2, 2),
        },
        64,
    ),
    "efficientformer_v2": SmallModel(
        "efficientformerv2_s0", {"img_size": 224, "depths": (1, 1, 1, 1), "embed_dims": (16, 16, 32, 32)}, 224
    ),
    "deepseek_vit": SmallModel("deepseek_vit_412m", {**VIT, "img_size": 56}, 56),
    "qwen3_vit": SmallModel("qwen3_vit_88m", {**VIT, "img_size": 64}, 64),
    "gemma4_vit": SmallModel("gemma4_vit_167m", {**VIT, "img_size": 64}, 64),
    "shvit": SmallModel("shvit_s1", {"embed_dim": (32, 48, 64), "partial_dim": (8, 12, 16), "depth": (1, 1, 1)}, 128),
    "iformer": SmallModel(
        "iformer_t", {"dims": (16, 32, 48, 64), "depths": (1, 1, 3, 3), "attn_groups": (0, 0, 1, 1)}, 64
    ),
    "lowformer": SmallModel("lowformer_b0", {"width_list": [8, 16, 32, 48, 64], "depth_list": [0, 1, 1, 1, 1]}, 64),
    "csatv2": SmallModel(
        "csatv2", {"dims": (16, 24, 32, 48), "depths": (1, 1, 2, 2), "transformer_depths": (0, 0, 1, 1)}, 128
    ),
    "edgenext": SmallModel(
        "edgenext_xx_small", {"dims": (16, 24, 32, 48), "depths": (1, 1, 2, 1), "heads": (2, 2, 2, 2)}, 64
    ),
    "nextvit": SmallModel("nextvit_small", {}, 64),
    "visformer": SmallModel(
        "visformer_tiny",
        {"img_size": 64, "init_channels": 8, "embed_dim": 32, "depth": (1, 1, 1), "num_heads": 2, "group": 2},
        64,
    ),
    "mobilenetv3": SmallModel(
        "mobilenetv4_hybrid_medium",
        img_size=128,
        build=_mobilenetv4_hybrid,
        build_note="MobileNetV4 hybrid: 3 stages, 2 multi-query attention blocks, 16-32 channels",
    ),
    "mobilenetv5": SmallModel(
        "mobilenetv5_300m",
        img_size=128,
        build=_mobilenetv5,
        build_note="4 stages, 2 multi-query attention blocks, 16-48 channels",
    ),
    "efficientvit_msra": SmallModel(
        "efficientvit_m0",
        {
            "img_size": 128,
            "embed_dim": (16, 32, 48),
            "key_dim": (8, 8, 8),
            "depth": (1, 1, 1),
            "num_heads": (2, 2, 2),
            "window_size": (4, 4, 4),
        },
        128,
    ),
}
"""timm family -> a small model of it (what the table and ``tests/reading/test_families.py`` run)."""
