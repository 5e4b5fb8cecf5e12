"""Every supported timm family, measured on a small random-weight model (the recipes of reading/small_models.py).

Per family: the layers, stages and token counts the capture reports against hand-derived expectations, the order the
blocks run in, finite values in range, and the attention recomputed from the model's own q / k (fused kernels kept,
after q/k norm, rotary embedding and relative position bias) against the model's unfused softmax. Then the
prefix-token handling against timm's own split, the window averaging of windowed attention against float64 loops,
the unsupported-model errors, ``oversmooth models`` and ``oversmooth measure`` on a hierarchical model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import NamedTuple

import pandas as pd
import pytest
import timm
import torch

from oversmooth_cli.io import read_layers
from oversmooth_cli.plots import stage_boundaries
from oversmooth_cli.reading.capture import OversmoothingCapture
from oversmooth_cli.reading.readers import UnsupportedModelError
from oversmooth_cli.reading.registry import ADAPTERS, UNSUPPORTED, BlockSpec, architecture_support, resolve_adapter
from oversmooth_cli.reading.small_models import SMALL_MODELS, VIT

from .._helpers import (
    SdpaCalls,
    assert_same_values,
    attention_chunks,
    brute_attention_std,
    brute_token_cosine,
    invoke,
    tiny_cli_args,
)

pytestmark = pytest.mark.capture


class Expect(NamedTuple):
    """Per layer 0..L: patch tokens, stage; then the layers with token metrics and those with attention metrics."""

    n_tokens: list[int]
    stages: list[int]
    token_layers: list[int]
    attention_layers: list[int]


# Hand-derived from each recipe: tokens = (img / total stride)^2, a new stage after each downsampling step.
EXPECTED: dict[str, Expect] = {
    "vision_transformer": Expect([16] * 3, [0] * 3, [0, 1, 2], [1, 2]),  # 32 px / 8 = 4 x 4
    "deit": Expect([16] * 3, [0] * 3, [0, 1, 2], [1, 2]),
    "vision_transformer_hybrid": Expect([4] * 3, [0] * 3, [0, 1, 2], [1, 2]),  # 64 px / (stem 4 x patch 8) = 2 x 2
    "beit": Expect([16] * 3, [0] * 3, [0, 1, 2], [1, 2]),
    "eva": Expect([16] * 3, [0] * 3, [0, 1, 2], [1, 2]),
    "naflexvit": Expect([16] * 3, [0] * 3, [0, 1, 2], [1, 2]),
    "vision_transformer_relpos": Expect([16] * 3, [0] * 3, [0, 1, 2], [1, 2]),
    "vision_transformer_sam": Expect([64] * 3, [0] * 3, [0, 1, 2], [1, 2]),  # 64 / 8; windowed then global block
    # CaiT: 2 self-attention blocks, then 2 class-attention blocks (stage 1, attention only, over 1 + 16 keys)
    "cait": Expect([16] * 5, [0, 0, 0, 1, 1], [0, 1, 2], [1, 2, 3, 4]),
    # XCiT: 2 XCA (channel attention) blocks, then 2 class-attention blocks
    "xcit": Expect([16] * 5, [0, 0, 0, 1, 1], [0, 1, 2, 3, 4], [3, 4]),
    "convit": Expect([16] * 4, [0] * 4, [0, 1, 2, 3], [1, 2, 3]),
    # CrossViT: branch 0 (48 / 12 = 4 x 4) block, fusion, block, fusion; then branch 1 (48 / 16 = 3 x 3)
    "crossvit": Expect([16, 16, 9, 16, 9, 9, 16, 9, 16], [0] * 5 + [1] * 4, [0, 1, 3, 5, 7], list(range(1, 9))),
    "pit": Expect([225, 225, 64, 16], [0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3]),  # (64 - 8) / 4 + 1 = 15
    "tnt": Expect([16] * 3, [0] * 3, [0, 1, 2], [1, 2]),
    # VOLO: outlooker (8 x 8, no token attention), 3 transformer stages at 4 x 4, 2 class-attention blocks
    "volo": Expect([64, 64, 16, 16, 16, 16, 16], [0, 0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4], [2, 3, 4, 5, 6]),
    "swin_transformer": Expect([256, 256, 256, 64, 64], [0, 0, 0, 1, 1], [0, 1, 2, 3, 4], [1, 2, 3, 4]),
    "swin_transformer_v2": Expect([256, 256, 256, 64, 64], [0, 0, 0, 1, 1], [0, 1, 2, 3, 4], [1, 2, 3, 4]),
    "swin_transformer_v2_cr": Expect([64, 64, 64, 16, 16], [0, 0, 0, 1, 1], [0, 1, 2, 3, 4], [1, 2, 3, 4]),
    "pvt_v2": Expect([256, 256, 64, 16, 4], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4]),
    "twins": Expect([256, 256, 64, 16, 4], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4]),
    "nest": Expect([256, 256, 64, 16], [0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3]),
    # MaxViT: block attention then grid attention per block
    "maxxvit": Expect([256, 256, 256, 64, 64], [0, 0, 0, 1, 1], [0, 1, 2, 3, 4], [1, 2, 3, 4]),
    # DaViT: spatial (window) block then channel block per stage
    "davit": Expect([256, 256, 256, 64, 64, 16, 16, 4, 4], [0, 0, 0, 1, 1, 2, 2, 3, 3], list(range(9)), [1, 3, 5, 7]),
    "mvitv2": Expect([256, 256, 64, 16, 4], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4]),
    "hiera": Expect([256, 256, 64, 16, 4], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4]),
    "gcvit": Expect([256, 256, 64, 16, 4], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4]),
    "coat": Expect([256, 256, 64, 16, 4], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], []),  # factorized attention: no map
    # LeViT: 128 / 16 = 8 x 8; the attention-downsample step opens stages 1 and 2
    "levit": Expect([64, 64, 16, 16, 4, 4], [0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),
    # EfficientFormer at 224: 56^2 .. 7^2; only the last (MetaBlock1d) block has attention
    "efficientformer": Expect([3136, 3136, 784, 196, 49, 49], [0, 0, 1, 2, 3, 3], list(range(6)), [5]),
    "tiny_vit": Expect([64, 64, 16, 4], [0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3]),
    # MobileViT-XXS at 128 px: 2 + 4 + 3 transformer blocks at 16 x 16, 8 x 8, 4 x 4
    "mobilevit": Expect(
        [256] * 3 + [64] * 4 + [16] * 3, [0] * 3 + [1] * 4 + [2] * 3, list(range(10)), list(range(1, 10))
    ),
    "visformer": Expect([64, 64, 16, 4], [0, 0, 1, 2], [0, 1, 2, 3], [2, 3]),
    "vitamin": Expect([16] * 3, [0] * 3, [0, 1, 2], [1, 2]),  # 64 / 16 (conv stem) = 4 x 4, no class token
    # BoTNet: the two self-attention blocks (stride 2 inside each): 16 x 16 in, 8 x 8, 4 x 4
    "byoanet": Expect([256, 64, 16], [0, 0, 1], [0, 1, 2], [1, 2]),
    "fastvit": Expect([256, 256, 64, 16, 4], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [4]),  # attention in the last stage
    "metaformer": Expect([256, 256, 64, 16, 4], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [3, 4]),  # CAFormer
    # SAM2 Hiera, stages (1, 1, 2, 1), block 3 global
    "hieradet_sam2": Expect([256, 256, 64, 16, 16, 4], [0, 0, 1, 2, 2, 3], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),
    "efficientformer_v2": Expect([3136, 3136, 784, 196, 49], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [3, 4]),
    "deepseek_vit": Expect([49] * 3, [0] * 3, [0, 1, 2], [1, 2]),  # 56 / 8 = 7 x 7
    "qwen3_vit": Expect([64] * 3, [0] * 3, [0, 1, 2], [1, 2]),  # 64 / 8 = 8 x 8
    "gemma4_vit": Expect([64] * 3, [0] * 3, [0, 1, 2], [1, 2]),
    "shvit": Expect([64, 64, 16, 4], [0, 0, 1, 2], [0, 1, 2, 3], [2, 3]),  # 128 / 16; stage 0 has no attention
    # iFormer: every entry of a stage's blocks (conv block | positional conv, attention block, FFN)
    "iformer": Expect([256, 256, 64, 16, 16, 16, 4, 4, 4], [0, 0, 1, 2, 2, 2, 3, 3, 3], list(range(9)), [4, 7]),
    "lowformer": Expect([16, 16, 4], [0, 0, 1], [0, 1, 2], [1, 2]),  # the two LowFormer blocks (4 x 4, 2 x 2)
    "csatv2": Expect([256, 256, 64, 16, 16, 4, 4], [0, 0, 1, 2, 2, 3, 3], list(range(7)), [4, 6]),  # 128 / 8
    "edgenext": Expect([256, 256, 64, 16, 16, 4], [0, 0, 1, 2, 2, 3], list(range(6)), []),  # channel attention
    # NeXt-ViT small (3, 4, 10, 3 blocks): one transformer block closing each mix group
    "nextvit": Expect(
        [256] * 4 + [64] * 4 + [16] * 10 + [4] * 3,
        [0] * 4 + [1] * 4 + [2] * 10 + [3] * 3,
        list(range(21)),
        [7, 12, 17, 20],
    ),
    # MobileNetV4 hybrid at 128 px: the two multi-query attention blocks of stage 2 (8 x 8); conv blocks are not layers
    "mobilenetv3": Expect([64] * 3, [0] * 3, [0, 1, 2], [1, 2]),
    "mobilenetv5": Expect([64, 64, 16], [0, 0, 1], [0, 1, 2], [1, 2]),  # one attention block in stages 2 and 3
    # EfficientViT-MSRA at 128 px: 8 x 8 (four 4 x 4 windows), 4 x 4, 2 x 2
    "efficientvit_msra": Expect([64, 64, 16, 4], [0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3]),
}

SLOW = {
    "gcvit",
    "mvitv2",
    "crossvit",
    "volo",
    "davit",
    "maxxvit",
    "efficientformer",
    "efficientformer_v2",
    "levit",
    "nextvit",
    "iformer",
    "csatv2",
    "shvit",
    "mobilevit",
}
WEIGHT_READERS = {"attn_drop", "talking_head2"}
"""Taps reading the weights applied to the values, which for talking-heads attention are not softmax rows."""
FAMILIES = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in sorted(ADAPTERS)]


@functools.cache
def small_model(family: str) -> torch.nn.Module:
    return SMALL_MODELS[family].create()


def images(family: str, n: int = 2) -> torch.Tensor:
    size = SMALL_MODELS[family].img_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def set_fused(model: torch.nn.Module, on: bool) -> list[torch.nn.Module]:
    """Set every ``fused_attn`` switch; return the modules that have one (those have a fused SDPA path)."""
    switches = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for m in switches:
        m.fused_attn = on
    return switches


@contextlib.contextmanager
def tapped(specs: list[BlockSpec], mode: str) -> Iterator[tuple[dict, dict]]:
    """While inside, every attention module's full ``(B', H, T, S)`` weights of the last forward pass are read
    through the adapters' readers into ``maps``, and ``sources`` says which path gave them.

    ``qk`` mode: probabilities recomputed with :func:`~oversmooth_cli.reading.attention.iter_attention_blocks` from the
    q, k, scale and bias the reader reports (or the softmax output of a module without a fused path); ``softmax``
    mode: the model's own unfused probabilities.
    """
    maps, sources, handles, undos = {}, {}, [], []

    def on_qk(name, q, k, scale, bias):
        maps[name] = torch.cat(list(attention_chunks(q, k, scale, bias=bias)), dim=-2)
        sources[name] = "qk"

    def on_probs(name, probs, distributions=None):  # the weights applied (talking heads: after their mixing)
        maps[name] = probs.detach().float().clone()
        sources[name] = "probs"

    try:
        for s in specs:
            if s.attention is not None:
                sink = SimpleNamespace(
                    qk=functools.partial(on_qk, s.name),
                    probs=functools.partial(on_probs, s.name),
                    attend=lambda *a: None,
                )
                h, undo = s.reader.install(s.attention, mode, sink, s.group.heads_dim)
                handles += h
                undos.append(undo)
        yield maps, sources
    finally:
        for h in handles:
            h.remove()
        for undo in reversed(undos):
            undo()


INLINE_FALLBACK_CALLS = {"xcit": 2}
"""SDPA calls per forward pass that reach torch under the inline tap: XCiT's two XCA blocks attend over channels,
not tokens, and are not tapped at all."""


def capture(model, x: torch.Tensor, tap: str = "qk", order: list | None = None):
    with torch.no_grad(), OversmoothingCapture(model, attention_tap=tap) as cap:
        handles = [
            s.module.register_forward_pre_hook(lambda _m, _a, name=s.name: order.append(name))
            for s in (cap._specs if order is not None else [])
        ]
        model.forward_features(x)
        for h in handles:
            h.remove()
        layers, heads = cap.pop_batch()
    return layers, heads, cap


def test_every_supported_family_has_a_recipe_and_an_expectation():
    assert set(ADAPTERS) <= set(SMALL_MODELS), (
        "add a small model to oversmooth_cli/reading/small_models.py SMALL_MODELS"
    )
    assert set(EXPECTED) == set(ADAPTERS)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_layers_values_and_recomputed_attention(family):
    model = small_model(family)
    x = images(family)
    switches = set_fused(model, True)
    adapter = resolve_adapter(model)
    specs = adapter.block_specs(model)
    expect = EXPECTED[family]

    order: list[str] = []
    with tapped(specs, "qk") as (qk_maps, sources):  # the probability probe rides along the same forward pass
        layers, heads, cap = capture(model, x, "qk", order)
    infos = cap.layers

    # layers, stages, tokens: one layer per block plus the input, in the order the blocks run
    assert [i.index for i in infos] == list(range(len(specs) + 1))
    assert [i.n_tokens for i in infos] == expect.n_tokens
    assert [i.stage for i in infos] == expect.stages
    assert sorted({layer for m, layer in layers if m == "token_cosine"}) == expect.token_layers
    assert sorted({layer for m, layer in layers if m == "attention_std"}) == expect.attention_layers
    assert [i.index for i in infos if i.has_attention] == expect.attention_layers
    ran = [s.name for s in specs]
    if not adapter.order_by_stage:
        assert order == ran
    else:
        assert sorted(order, key=lambda n: specs[ran.index(n)].stage) == ran

    # values: finite and in range; one per image (and per head)
    for (metric, layer), v in layers.items():
        assert v.shape == (2,) and torch.isfinite(v).all(), (metric, layer)
        if metric == "token_cosine":
            assert ((v >= -1 - 1e-6) & (v <= 1 + 1e-6)).all()
        if metric == "attention_std":
            assert (v >= 0).all()
            if specs[layer - 1].group.reader not in WEIGHT_READERS:  # softmax rows: std <= sqrt(K-1)/K <= 1/2
                assert (v <= 0.5).all()
    for (_, layer), v in heads.items():
        attn = specs[layer - 1].attention
        n_heads = getattr(attn, "num_heads", getattr(attn, "heads", v.shape[1]))
        assert v.shape == (2, n_heads) and torch.isfinite(v).all(), layer

    # the default path (fused kernels kept) equals reading the model's unfused softmax, metric by metric ...
    with tapped(specs, "softmax") as (sm_maps, _):
        sm_layers, sm_heads, _ = capture(model, x, "softmax")
    assert all(m.fused_attn for m in switches), "the softmax tap must restore fused_attn"
    assert_same_values((layers, heads), (sm_layers, sm_heads))

    # ... and so does the inline tap (the CPU default), which answers the SDPA calls itself: same values, same
    # features; an SDPA call that still reaches torch is one the inline tap could not take
    with torch.no_grad():
        fused_features = model.forward_features(x)
        with SdpaCalls() as reached, OversmoothingCapture(model, attention_tap="inline") as cap_inline:
            inline_features = model.forward_features(x)
            inline = cap_inline.pop_batch()
    torch.testing.assert_close(inline_features, fused_features, atol=1e-4, rtol=1e-4)
    assert_same_values(inline, (layers, heads))
    assert reached.calls == INLINE_FALLBACK_CALLS.get(family, 0), "SDPA calls the inline tap did not take"

    # ... and probability by probability: q / k after norm, rope and bias vs the model's own softmax
    attended = [s for s in specs if s.attention is not None]
    assert set(qk_maps) == set(sm_maps) == {s.name for s in attended}
    for s in attended:
        torch.testing.assert_close(qk_maps[s.name], sm_maps[s.name], atol=1e-5, rtol=0)
        if any(m in switches for m in s.attention.modules()) and s.group.reader not in WEIGHT_READERS:
            assert sources[s.name] == "qk", f"{s.name} has a fused path: q and k must be read from it"
        if s.group.reader not in WEIGHT_READERS:  # softmax rows sum to 1 (talking-heads mixes need not)
            rows = sm_maps[s.name].sum(dim=-1)
            torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("arch", "args", "prefix"),
    [
        ("deit_tiny_distilled_patch16_224", {}, 2),  # class + distillation token
        ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),  # class + 4 registers
        ("vit_tiny_patch16_224", {"reg_tokens": 2, "class_token": False, "global_pool": "avg"}, 2),
    ],
)
def test_prefix_tokens_are_excluded_like_timm_splits_them(arch, args, prefix):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **{**VIT, **args}).eval()
    x = torch.randn(2, 3, 32, 32)
    layers, _, cap = capture(model, x)
    assert cap.prefix == prefix
    with torch.no_grad():
        outs = model.forward_intermediates(
            x, norm=False, output_fmt="NLC", intermediates_only=False, return_prefix_tokens=True
        )[1]
    for layer, (patches, prefix_tokens) in enumerate(outs, start=1):
        assert prefix_tokens.shape[1] == prefix and patches.shape[1] == 16
        torch.testing.assert_close(
            layers[("token_cosine", layer)].double(), brute_token_cosine(patches), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    ("family", "windowed_layers"), [("swin_transformer", [1, 2, 3, 4]), ("vision_transformer_sam", [1])]
)
def test_windowed_attention_is_the_mean_over_each_images_windows(family, windowed_layers):
    model = small_model(family)
    x = images(family)
    specs = resolve_adapter(model).block_specs(model)
    with tapped(specs, "softmax") as (maps, _):
        _, heads, _ = capture(model, x, "softmax")
    for layer, spec in enumerate(specs, start=1):
        probs = maps[spec.name]  # (B * windows, H, w, w)
        windows = probs.shape[0] // 2
        assert (windows > 1) == (layer in windowed_layers)
        rows = probs.unflatten(0, (2, windows)).transpose(1, 2).flatten(2, 3)  # (B, H, windows * w, w)
        torch.testing.assert_close(
            heads[("attention_std", layer)].double(), brute_attention_std(rows), atol=1e-6, rtol=0
        )


def test_class_attention_rows_are_the_class_token_over_class_and_patch_keys():
    model = small_model("cait")
    x = images("cait")
    specs = resolve_adapter(model).block_specs(model)
    with tapped(specs, "softmax") as (maps, _):
        layers, heads, _ = capture(model, x)
    for layer in (3, 4):
        probs = maps[specs[layer - 1].name]
        assert probs.shape[-2:] == (1, 17)  # one query (the class token), class + 16 patch keys
        torch.testing.assert_close(
            heads[("attention_std", layer)].double(), brute_attention_std(probs), atol=1e-6, rtol=0
        )
        assert ("token_cosine", layer) not in layers


def test_unsupported_models_get_one_line_naming_the_family():
    with pytest.raises(UnsupportedModelError, match=r"^model family 'resnet' \(ResNet\) has no attention") as e:
        resolve_adapter(timm.create_model("resnet18", pretrained=False, num_classes=0))
    assert "\n" not in str(e.value)
    convnet = timm.create_model("test_byobnet", pretrained=False, num_classes=0)  # same module as MobileViT
    with pytest.raises(UnsupportedModelError, match=r"^test_byobnet \(ByobNet, family byobnet\) is convolution-only"):
        OversmoothingCapture(convnet)  # its own name, not bat_resnext26ts's (the family's recorded reason)
    for family, reason in UNSUPPORTED.items():
        assert reason and "\n" not in reason, family


def test_measure_refuses_an_unsupported_family_in_one_line(tmp_path, few_images):
    result = invoke("measure", "efficientvit_b0", few_images, "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "model family 'efficientvit_mit' (EfficientVit) cannot be measured: ReLU linear attention" in result.output
    assert not (tmp_path / "r").exists()


def test_models_command_lists_architectures_with_their_support():
    result = invoke("models", "xcit_nano_12_p8*", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"xcit_nano_12_p8_224 +│ xcit +│ measured +│ all layers +│ some blocks", result.output)
    assert "XCA blocks attend over channels" in result.output
    result = invoke("models", "resnet18", env={"COLUMNS": "200"})
    assert result.exit_code == 0 and re.search(r"resnet18 +│ resnet +│ no attention", result.output)
    result = invoke("models", "no_such_model*")
    assert result.exit_code == 2 and "no timm architecture matches 'no_such_model*'" in result.output


def test_models_command_gives_the_status_of_each_architecture():
    """Before: the status was the family's, so a convolution-only MobileNetV3 was "measured" and every ByobNet
    refusal named bat_resnext26ts."""
    result = invoke("models", "mobilenetv*", env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert re.search(r"mobilenetv3_large_100 +│ mobilenetv3 +│ no attention +│ - +│ -", result.output)
    assert re.search(r"mobilenetv4_conv_small +│ mobilenetv3 +│ no attention", result.output)
    assert re.search(r"mobilenetv4_hybrid_medium +│ mobilenetv3 +│ measured +│ all layers", result.output)
    for arch, status in (("gernet_s", "no attention"), ("bat_resnext26ts", "unsupported")):
        result = invoke("models", arch, env={"COLUMNS": "250"})
        assert result.exit_code == 0 and re.search(rf"{arch} +│ byobnet +│ {status}", result.output), result.output
        assert f"{arch}: {arch} (ByobNet, family byobnet)" in " ".join(result.output.split())
    support = architecture_support("gernet_s", "byobnet")
    assert support.status == "no attention" and "bat_resnext26ts" not in support.note


def test_measure_refuses_a_convolution_only_model_naming_it(tmp_path, few_images):
    result = invoke("measure", "mobilenetv3_small_050", few_images, "--out", tmp_path / "r", "--device", "cpu")
    assert result.exit_code == 2
    assert "mobilenetv3_small_050 (MobileNetV3, family mobilenetv3) is convolution-only" in result.output


def test_measure_a_hierarchical_model_writes_stages_and_tokens(tmp_path, few_images):
    swin = SMALL_MODELS["swin_transformer"]
    out = tmp_path / "run"
    result = invoke("measure", swin.arch, few_images, "--out", out, "--device", "cpu", "-q", *tiny_cli_args(swin.args))
    assert result.exit_code == 0, result.output
    layers = read_layers(out)
    cosine = layers[layers["metric"] == "token_cosine"].sort_values("layer")
    assert cosine["stage"].tolist() == EXPECTED["swin_transformer"].stages
    assert cosine["n_tokens"].tolist() == EXPECTED["swin_transformer"].n_tokens
    assert (layers["n_images"] == 5).all()
    summary = json.loads((out / "summary.json").read_text())
    assert [i["name"] for i in summary["layer_info"]] == [
        "input",
        "layers.0.blocks.0",
        "layers.0.blocks.1",
        "layers.1.blocks.0",
        "layers.1.blocks.1",
    ]
    assert (out / "curves.png").stat().st_size > 0
    assert stage_boundaries(layers) == [2.5]


def test_old_layers_csv_without_stage_columns_still_reads(tmp_path):
    old = pd.DataFrame(
        {
            "layer": [0, 1],
            "metric": ["token_cosine"] * 2,
            "mean": [0.1, 0.2],
            "std": [0.0, 0.0],
            "ci95_low": [0.1, 0.2],
            "ci95_high": [0.1, 0.2],
            "n_images": [3, 3],
        }
    )
    old.to_csv(tmp_path / "layers.csv", index=False)
    df = read_layers(tmp_path)
    assert df["stage"].tolist() == [0, 0] and df["n_tokens"].isna().all()
    assert stage_boundaries(df) == []


def test_compat_table_passes_a_term_only_when_its_own_gradient_reaches_the_weights(compat_script, monkeypatch):
    """Cross-entropy alone moves the weights, so "one step moved them" showed nothing about the term: a term without
    a gradient of its own (here l_cos times zero) is refused now, and the real terms still pass."""
    from oversmooth_cli.training import losses

    monkeypatch.setitem(losses.LOSS_TERMS, "cos", losses.LossTerm("cos", lambda t: losses.l_cos(t.h) * 0.0, "0"))
    passed, refused = compat_script.finetune_family("vision_transformer", compat_script._photos())
    assert passed == ("cons", "token")
    assert refused == (("cos", "its own gradient (the term alone, without cross-entropy) does not reach the weights "
                                "of the blocks"),)  # fmt: skip
    monkeypatch.setitem(losses.LOSS_TERMS, "cos", losses.LossTerm("cos", lambda t: t.h.detach().sum(), "no graph"))
    passed, refused = compat_script.finetune_family("vision_transformer", compat_script._photos())
    assert "cos" not in passed and "carries no gradient" in dict(refused)["cos"]
