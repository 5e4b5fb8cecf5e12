"""Build ``docs/compatibility.md`` by measuring one small random-weight model of every timm attention family.

The families are timm's own model modules (``timm.list_modules()``: one file of ``timm/models`` per family) whose
models contain attention (:func:`attention_modules`, the rule is :func:`has_attention`): every registered model of a
module is built on the ``meta`` device (no memory, no weights) until one holds an attention module. That list is the
"M" of "N of M"; it takes minutes to derive, so it is kept in ``docs/attention_modules.json`` for the installed timm
version and derived again when the version changes (or with ``--rescan``).

Every family with an adapter in :mod:`oversmooth_cli.adapters` is built from the recipe below (random weights, a small
image size, one to two blocks per stage) and run through :func:`oversmooth_cli.measure.measure` on the CPU with two
real photos. The table reports what was actually measured: layers, stages, and at how many layers each kind of metric
has values; every other attention family is listed with the reason it is not measured (``UNSUPPORTED``).

Usage::

    python scripts/compat_table.py                 # writes docs/compatibility.md
    python scripts/compat_table.py --check         # exit 1 when docs/compatibility.md is out of date
    python scripts/compat_table.py --rescan        # derive the attention families again, then write
    python scripts/compat_table.py --family swin_transformer --family eva   # print those rows only

The recipes (:data:`SMALL_MODELS`) are also what ``tests/test_families.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "compatibility.md"
ATTENTION_MODULES = REPO / "docs" / "attention_modules.json"
PHOTOS = REPO / "examples" / "photos"


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
        if self.build is not None:
            return f"`{self.arch}` ({self.build_note}) at {self.img_size} px"
        args = ", ".join(f"{k}={v}" for k, v in self.args.items())
        return f"`{self.arch}` ({args}) at {self.img_size} px" if args else f"`{self.arch}` at {self.img_size} px"


VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _volo(**kw: Any) -> nn.Module:
    from timm.models.volo import VOLO

    return VOLO(img_size=64, layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2), **kw)


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

    return MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1), img_size=64, **kw)


def _metaformer(**kw: Any) -> nn.Module:
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    return MetaFormer(
        depths=(1, 1, 1, 1),
        dims=(16, 24, 32, 64),
        token_mixers=(SepConv, SepConv, Attention, Attention),
        norm_layers=(LayerNorm2dNoBias, LayerNorm2dNoBias, LayerNormNoBias, LayerNormNoBias),
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
"""timm family -> a small model of it (what the table and ``tests/test_families.py`` run)."""


@dataclass
class FamilyResult:
    """What measuring one family's small model gave."""

    family: str
    status: str  # "measured" or "not measured"
    model: str = ""
    layers: int = 0
    stages: int = 0
    token_layers: int = 0
    attention_layers: int = 0
    note: str = ""
    finetunes: tuple[str, ...] = ()  # the --loss terms one real optimizer step ran with
    refused: tuple[tuple[str, str], ...] = ()  # (term, why) for the others


def _photos(n: int = 2) -> list[Path]:
    from oversmooth_cli.data import find_images

    return sorted(find_images(PHOTOS))[:n]


def measure_family(family: str, images: list[Path]) -> FamilyResult:
    """Build the family's small model and run it through :func:`~oversmooth_cli.measure.measure` on the CPU."""
    from oversmooth_cli.errors import UserError
    from oversmooth_cli.measuring.run import measure
    from oversmooth_cli.metrics.registry import TOKEN_METRICS
    from oversmooth_cli.reading.loading import LoadedModel, resolve_data_config
    from oversmooth_cli.reading.registry import ADAPTERS, UNSUPPORTED

    recipe = SMALL_MODELS.get(family)
    if recipe is None:
        reason = UNSUPPORTED.get(family, "no adapter and no reason recorded in oversmooth_cli/families.py UNSUPPORTED")
        found = attention_modules().get(family)
        model = f"`{found['model']}` ({', '.join(found['classes'])})" if found else ""
        return FamilyResult(family, "not measured", model, note=reason)
    model = recipe.create()
    config = {**resolve_data_config(model), "input_size": (3, recipe.img_size, recipe.img_size), "crop_pct": 1.0}
    loaded = LoadedModel(model, recipe.arch, recipe.arch, config)
    try:
        result = measure(loaded, images, device="cpu", batch_size=len(images), command="scripts/compat_table.py")
    except UserError as e:
        return FamilyResult(family, "not measured", recipe.describe(), note=str(e))
    layers = result.layers
    kinds = {m: "token" if m in TOKEN_METRICS else "attention" for m in layers["metric"].unique()}
    token = layers[layers["metric"].map(kinds) == "token"]["layer"].nunique()
    attention = layers[layers["metric"].map(kinds) == "attention"]["layer"].nunique()
    adapter = ADAPTERS.get(family)
    return FamilyResult(
        family,
        "measured",
        recipe.describe(),
        layers=int(result.summary["n_layers"]),
        stages=int(layers["stage"].nunique()),
        token_layers=int(token),
        attention_layers=int(attention),
        note=adapter.notes if adapter is not None else "",
    )


def finetune_family(family: str, images: list[Path]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """One real optimizer step of ``finetune``'s training code per loss term on the family's small model.

    The model gets a 2-class head (``reset_classifier``, as ``finetune`` does); the two photos are labelled 0 and 1;
    the step is :meth:`~oversmooth_cli.training.Trainer.train_window` with that term alone (patch CutMix on for
    ``token``, on the grid of the tokens the loss reads). A term passes when the step runs, every value is finite and
    the weights move; a term the family cannot run is refused by the loss with its reason.

    Returns:
        ``(terms that fine-tune it, ((term, why), ...) for the others)``.
    """
    import tempfile

    from oversmooth_cli.data import build_transform, load_rgb
    from oversmooth_cli.errors import UserError
    from oversmooth_cli.reading.loading import resolve_data_config
    from oversmooth_cli.training.config import FinetuneConfig
    from oversmooth_cli.training.losses import LOSS_TERMS, PatchDiversificationLoss
    from oversmooth_cli.training.trainer import StopRequest, Trainer

    recipe = SMALL_MODELS[family]
    passed, refused = [], []
    for term in LOSS_TERMS:
        model = recipe.create()
        model.reset_classifier(2)
        size = (3, recipe.img_size, recipe.img_size)
        config = {**resolve_data_config(model), "input_size": size, "crop_pct": 1.0}
        x = torch.stack([build_transform(config)(load_rgb(p)) for p in images])
        try:
            criterion = PatchDiversificationLoss(model, (term,), input_size=size)
        except UserError as e:
            refused.append((term, str(e).split("): ", 1)[-1]))
            continue
        plan = criterion.plan
        cfg = FinetuneConfig(losses=(term,), epochs=1, batch_size=len(images), cutmix_prob=1.0, drop_path=0.0)
        before = [p.detach().clone() for p in model.parameters()]
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(
                cfg,
                model.train(),
                criterion,
                device=torch.device("cpu"),
                num_classes=2,
                steps_per_epoch=1,
                patch=(plan.h_grid, plan.h_shape[0]),
                out=Path(tmp),
                run_record={},
                model_config={},
            )
            try:
                with StopRequest() as stop:
                    trainer.train_window([(x, torch.tensor([0, 1]))], stop)
            except UserError as e:
                refused.append((term, f"one step failed: {e}"))
                continue
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        if moved:
            passed.append(term)
        else:
            refused.append((term, "one step left every weight unchanged"))
    return tuple(passed), tuple(refused)


def render(results: Iterable[FamilyResult]) -> str:
    """The Markdown page: a summary line, the measured families, then every family not measured with the reason."""
    results = list(results)
    measured = [r for r in results if r.status == "measured"]
    missing = [r for r in results if r.status != "measured"]
    lines = [
        "# Compatibility: timm attention families",
        "",
        "<!-- Generated by scripts/compat_table.py; do not edit by hand. -->",
        "",
        f"**{len(measured)} of {len(results)} families measured** (timm {timm.__version__}, torch "
        f"{torch.__version__.split('+')[0]}). Each row is a real run: one small random-weight model of the family "
        "through `oversmooth measure`'s code on the CPU, two photos from `examples/photos`.",
        "",
        "*Families* are timm's model modules (`timm.list_modules()`, one file of `timm/models` each) whose models "
        "contain attention: every registered model of a module is built on the `meta` device until one holds a module "
        "whose class is named like attention (`*Attention*`, `*Attn*`, or MHSA, GPSA, SHSA, SHMA, XCA, LiteMLA, "
        "LambdaLayer), channel and spatial gates of `timm.layers` (squeeze-excite, ECA, CBAM, gather-excite, global "
        "context, selective kernel, split attention) excepted (`has_attention` in `scripts/compat_table.py`; the "
        "result is kept in `docs/attention_modules.json`). Modules without such a model (convolutional networks, MLP "
        "mixers, state-space models...) are outside the tool's scope: `oversmooth measure` refuses their models with "
        "a one-line error naming the family.",
        "",
        "A *layer* is one block in execution order across stages (layer 0 is the input of the first block). "
        "*Token layers*: layers with token metrics (`token_cosine`...); *attention layers*: layers with attention "
        "metrics (`attention_std`...). `layers.csv` gives each layer's `stage` and `n_tokens` (patch tokens).",
        "",
        "*Fine-tunes with*: the `oversmooth finetune --loss` terms that ran one real optimizer step of `finetune`'s "
        "training code (`Trainer.train_window`, that term alone, patch CutMix on for `token`) on the same small model "
        "with a 2-class head and the two photos labelled 0 and 1: finite values, weights moved. The terms a family "
        "cannot run are refused with a one-line reason, listed under *Fine-tuning refusals*.",
        "",
        "| family | small model measured | layers | stages | token layers | attention layers | fine-tunes with "
        "| notes |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in measured:
        tunes = ", ".join(r.finetunes) or "-"
        lines.append(
            f"| {r.family} | {r.model} | {r.layers} | {r.stages} | {r.token_layers} | {r.attention_layers} | "
            f"{tunes} | {r.note} |"
        )
    refusals = [(r.family, term, why) for r in measured for term, why in r.refused]
    lines += ["", "## Fine-tuning refusals", ""]
    if refusals:
        lines += ["| family | term | reason |", "|---|---|---|"]
        lines += [f"| {family} | {term} | {why} |" for family, term, why in refusals]
    else:
        lines.append("Every measured family fine-tunes with every term.")
    lines += ["", "## Not measured", ""]
    if missing:
        lines += ["| family | attention found in | reason |", "|---|---|---|"]
        lines += [f"| {r.family} | {r.model} | {r.note} |" for r in missing]
    else:
        lines.append("Every attention family above is measured.")
    lines.append("")
    return "\n".join(lines)


ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)
"""Class names of attention modules: timm names them ``*Attention*`` / ``*Attn*`` ..."""
ATTENTION_ACRONYMS = frozenset({"MHSA", "GPSA", "SHSA", "SHMA", "XCA", "LiteMLA", "LambdaLayer"})
"""... or by an acronym: multi-head / gated positional / single-head self-attention (ConViT, SHViT), single-head
modulation attention (iFormer), cross-covariance attention (XCiT), lite multi-scale linear attention (EfficientViT-MiT),
lambda layers."""
CHANNEL_GATES = frozenset(
    f"timm.layers.{m}"
    for m in ("squeeze_excite", "eca", "cbam", "gather_excite", "global_context", "selective_kernel", "split_attn")
)
"""``timm.layers`` modules of channel and spatial gates named like attention (CBAM's ``ChannelAttn``, ResNeSt's
``SplitAttn``, SKNet's ``SelectiveKernelAttn``...): they weight channels or pixels, they do not attend between
tokens."""


def has_attention(model: nn.Module) -> list[str]:
    """The attention module classes in ``model`` (empty: none): classes named like attention
    (:data:`ATTENTION_NAME`, :data:`ATTENTION_ACRONYMS`), channel / spatial gates (:data:`CHANNEL_GATES`) excepted."""
    classes = {type(m) for m in model.modules()}
    return sorted(
        c.__name__
        for c in classes
        if (ATTENTION_NAME.search(c.__name__) or c.__name__ in ATTENTION_ACRONYMS) and c.__module__ not in CHANNEL_GATES
    )


def first_attention_model(module: str) -> tuple[str, list[str]] | None:
    """The first model registered in ``timm.models.<module>`` (timm's order) that holds attention, with its attention
    classes; ``None`` when none does. Models are built on the ``meta`` device; one that cannot be built is skipped."""
    for name in timm.list_models(module=module):
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception:  # a model that does not build on meta says nothing about the others
            continue
        found = has_attention(model)
        if found:
            return name, found
    return None


def attention_modules(rescan: bool = False) -> dict[str, dict[str, Any]]:
    """``{module: {"model": first model with attention, "classes": its attention classes}}`` for every timm model
    module whose models hold attention, in timm's order: read from ``docs/attention_modules.json`` when it was derived
    for the installed timm version (and not ``rescan``), else derived (minutes) and written there."""
    if not rescan and ATTENTION_MODULES.exists():
        cached = json.loads(ATTENTION_MODULES.read_text())
        if cached.get("timm") == timm.__version__:
            return cached["modules"]
    found = {}
    for module in timm.list_modules():
        hit = first_attention_model(module)
        print(f"{module:28s} {hit[0] if hit else '-'}", file=sys.stderr)
        if hit:
            found[module] = {"model": hit[0], "classes": hit[1]}
    from oversmooth_cli.io import atomic_write

    text = json.dumps(
        {"timm": timm.__version__, "rule": "scripts/compat_table.py has_attention", "modules": found}, indent=1
    )
    atomic_write(ATTENTION_MODULES, lambda p: p.write_text(text + "\n"))
    return found


def families(rescan: bool = False) -> list[str]:
    """Every attention family (:func:`attention_modules`): those with an adapter first, in registry order, then the
    rest in timm's order."""
    from oversmooth_cli.reading.registry import ADAPTERS

    modules = attention_modules(rescan)
    return [f for f in ADAPTERS if f in modules] + [f for f in modules if f not in ADAPTERS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/compatibility.md is out of date")
    parser.add_argument("--family", action="append", help="only these families (prints the table, writes nothing)")
    parser.add_argument("--rescan", action="store_true", help="derive the attention families from timm again")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = _photos()
    chosen = args.family or families(args.rescan)
    results = []
    for family in chosen:
        r = measure_family(family, images)
        if r.status == "measured":
            r.finetunes, r.refused = finetune_family(family, images)
        reason = r.note if r.status != "measured" else ""
        tunes = f"finetune={','.join(r.finetunes) or '-'}" if r.status == "measured" else ""
        print(f"{family:28s} {r.status:13s} layers={r.layers} stages={r.stages} {tunes} {reason}", file=sys.stderr)
        results.append(r)
    text = render(results)
    if args.family:
        print(text)
        return 0
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date: run python scripts/compat_table.py", file=sys.stderr)
            return 1
        return 0
    from oversmooth_cli.io import atomic_write

    atomic_write(DOC, lambda p: p.write_text(text))
    print(f"wrote {DOC}: {sum(r.status == 'measured' for r in results)} of {len(results)} families measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
