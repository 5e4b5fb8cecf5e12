"""Token positions of windowed and hierarchical attention, and the families measured since the coverage pass.

``attention_distance`` needs each query's and key's position in the input image. For windowed attention the capture
places every window's tokens through the family's position rule (:mod:`oversmooth_cli.reading.families`); these tests
check
Swin against a float64 reference that rebuilds the shifted windows by hand from the model config, the window
layouts against timm's own partition functions applied to a map of cell centres, and that every positioned family
gives the same values through all three attention taps. Then the coverage rule behind the "N of M" count of the
documentation's family page (``docs/compatibility.json``).
"""

from __future__ import annotations

import functools
import itertools
import json
import math

import pytest
import torch

from oversmooth_cli.reading.capture import OversmoothingCapture
from oversmooth_cli.reading.geometry import cell_centres, pool_cells, strided_cells, window_cells
from oversmooth_cli.reading.readers import UnsupportedModelError
from oversmooth_cli.reading.registry import ADAPTERS, UNSUPPORTED, resolve_adapter
from oversmooth_cli.reading.small_models import SMALL_MODELS

from .._helpers import REPO, brute_attention_std

pytestmark = pytest.mark.capture

TAPS = ("qk", "inline", "softmax")
DISTANCE = ("attention_std", "attention_distance")


@functools.cache
def small_model(family: str, sharpen: float = 0.0) -> torch.nn.Module:
    """The family's compat-table model; ``sharpen`` adds seeded noise of that scale to every weight matrix of its
    attention modules, so that random-init attention (close to uniform) has distinct rows."""
    model = SMALL_MODELS[family].create()
    if sharpen:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for spec in resolve_adapter(model).block_specs(model):
                for p in spec.attention.parameters() if spec.attention is not None else ():
                    if p.dim() >= 2:
                        p.add_(torch.randn(p.shape, generator=g) * sharpen)
    return model


def images(family: str, n: int = 2) -> torch.Tensor:
    size = SMALL_MODELS[family].img_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def measure(model: torch.nn.Module, x: torch.Tensor, tap: str) -> tuple[dict, dict, dict]:
    with (
        torch.no_grad(),
        OversmoothingCapture(model, token_metrics=(), attention_metrics=DISTANCE, attention_tap=tap) as c,
    ):
        model.forward_features(x)
        layers, heads = c.pop_batch()
    return layers, heads, dict(c.unavailable)


# -- Swin against a float64 reference built by hand --------------------------------------------------------------
def swin_reference(args: dict, probs: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Mean attention distance per image and head of every block, float64, from the model config alone.

    Stage ``s`` works on a ``(img / patch / 2^s)`` square grid; every second block of a stage shifts by half a window
    (timm: no shift, and the window clipped to the grid, when the grid fits in one window). The shifted map's window
    ``(wr, wc)`` holds the cells ``((wr * ws + a + shift) mod G, (wc * ws + c + shift) mod G)``, each at the centre of
    its ``img / G`` pixel cell.
    """
    img, patch = args["img_size"], args["patch_size"]
    out = {}
    blocks = [(s, b) for s, depth in enumerate(args["depths"]) for b in range(depth)]
    for name, (stage, block) in zip(names, blocks, strict=True):
        grid = img // patch // 2**stage
        ws = min(args["window_size"], grid)
        shift = ws // 2 if block % 2 and grid > args["window_size"] else 0
        cell = img / grid
        pos = []
        for wr, wc in itertools.product(range(grid // ws), range(grid // ws)):
            pos.append(
                [
                    (((wr * ws + a + shift) % grid + 0.5) * cell, ((wc * ws + c + shift) % grid + 0.5) * cell)
                    for a, c in itertools.product(range(ws), range(ws))
                ]
            )
        pos = torch.tensor(pos, dtype=torch.float64)  # (windows, ws^2, 2)
        dist = (pos[:, :, None] - pos[:, None, :]).pow(2).sum(-1).sqrt()  # (windows, q, k)
        p = probs[name].double()  # (B * windows, H, q, k), image-major
        windows = pos.shape[0]
        B, H = p.shape[0] // windows, p.shape[1]
        value = torch.zeros(B, H, dtype=torch.float64)
        for b, h, w in itertools.product(range(B), range(H), range(windows)):
            rows = (p[b * windows + w, h] * dist[w]).sum(-1) / p[b * windows + w, h].sum(-1)
            value[b, h] += rows.mean() / windows
        out[name] = value
    return out


@pytest.mark.parametrize("family", ["swin_transformer", "swin_transformer_v2"])
def test_swin_attention_distance_matches_a_float64_reference_with_shifted_windows(family):
    recipe = SMALL_MODELS[family]
    model = small_model(family, sharpen=0.5)
    x = images(family)
    specs = resolve_adapter(model).block_specs(model)
    probs, handles = {}, []
    switches = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for m in switches:
        m.fused_attn = False
    for s in specs:  # the unfused softmax, read where it enters attn_drop (no code under test involved)
        hook = s.attention.attn_drop.register_forward_pre_hook(lambda _m, a, n=s.name: probs.__setitem__(n, a[0]))
        handles.append(hook)
    with torch.no_grad():
        model.forward_features(x)
    for h in handles:
        h.remove()
    for m in switches:
        m.fused_attn = True
    reference = swin_reference(recipe.args, probs, [s.name for s in specs])
    assert any(probs[s.name].shape[0] > 2 for s in specs)  # windowed
    assert specs[1].module.shift_size != (0, 0)  # and shifted: positions must follow the roll
    for tap in TAPS:
        _, heads, unavailable = measure(model, x, tap)
        assert "attention_distance" not in unavailable, unavailable
        for layer, s in enumerate(specs, start=1):
            torch.testing.assert_close(
                heads[("attention_distance", layer)].double(), reference[s.name], atol=1e-5, rtol=0
            )


# -- window layouts against timm's own partition functions --------------------------------------------------------
def _cells_map(grid: tuple[int, int]) -> torch.Tensor:
    return cell_centres(grid).unsqueeze(0)  # (1, H, W, 2): the map timm's functions partition


@pytest.mark.parametrize(("grid", "window", "shift"), [((8, 8), (4, 4), (2, 2)), ((8, 12), (4, 4), (0, 0))])
def test_shifted_windows_are_timms_roll_and_window_partition(grid, window, shift):
    from timm.models.swin_transformer import window_partition

    rolled = torch.roll(_cells_map(grid), shifts=(-shift[0], -shift[1]), dims=(1, 2))
    want = window_partition(rolled, window).reshape(-1, window[0] * window[1], 2)
    torch.testing.assert_close(window_cells(grid, window, shift), want)


def test_padded_windows_match_sams_partition_and_padding_has_no_position():
    from timm.models.vision_transformer_sam import window_partition

    windows, _ = window_partition(_cells_map((5, 6)) + 1.0, 4)  # +1: padding (zeros) is told apart from cells
    want = windows.reshape(-1, 16, 2) - 1.0
    got = window_cells((5, 6), (4, 4))
    padding = (want == -1.0).all(dim=-1)
    assert padding.any() and torch.isnan(got[padding]).all()
    torch.testing.assert_close(got[~padding], want[~padding])


def test_grid_partition_is_maxvits_and_pooled_queries_are_cell_centres():
    from timm.models.maxxvit import grid_partition

    want = grid_partition(_cells_map((8, 8)), [4, 4]).reshape(-1, 16, 2)
    torch.testing.assert_close(strided_cells((8, 8), (4, 4)), want)
    pooled = pool_cells(window_cells((8, 8), (4, 4)), (4, 4), (2, 2))  # a 2 x 2 max pool of the window's queries
    torch.testing.assert_close(pooled, window_cells((4, 4), (2, 2)) * 2)


# -- every positioned family: the same distances through every tap --------------------------------------------------
NO_DISTANCE = {
    "cait": "talking-heads weights",
    "efficientformer_v2": "talking-heads weights",
    "xcit": "are prefix (class) tokens",
    "crossvit": "are prefix (class) tokens",
    "volo": "are prefix (class) tokens",
}
"""Families where some tapped layers have no mean distance, and why (class-token queries, talking-heads weights)."""
SLOW = {"nextvit", "efficientformer_v2", "mobilevit", "mobilenetv5", "mobilenetv3", "fastvit", "lowformer", "crossvit"}
PATCH_GRID = {"vision_transformer", "deit", "vision_transformer_hybrid", "vitamin", "beit", "eva", "convit"}
"""Plain ViTs: every attention over the patch grid of ``patch_embed`` (``tests/test_metrics_extra.py`` checks those)."""
POSITIONED = sorted(set(ADAPTERS) - PATCH_GRID - {"coat", "edgenext"})  # those two have no token attention map


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in POSITIONED])
def test_attention_distance_is_placed_and_the_same_through_every_tap(family):
    model = small_model(family, sharpen=0.1)
    x = images(family)
    size = SMALL_MODELS[family].img_size
    results = [measure(model, x, tap) for tap in TAPS]
    layers, heads, unavailable = results[0]
    std_layers = {layer for m, layer in layers if m == "attention_std"}
    placed = {layer for m, layer in layers if m == "attention_distance"}
    if family in NO_DISTANCE:
        assert NO_DISTANCE[family] in unavailable["attention_distance"]
        assert placed < std_layers
    else:
        assert "attention_distance" not in unavailable, unavailable
        assert placed == std_layers
    for layer in placed:  # a mean distance inside the image: at most its diagonal
        v = layers[("attention_distance", layer)]
        assert torch.isfinite(v).all() and (v >= 0).all() and (v <= size * math.sqrt(2)).all(), (layer, v)
    for other in results[1:]:
        assert other[2] == unavailable
        for got, want in zip(other[:2], (layers, heads), strict=True):
            assert got.keys() == want.keys()
            for key in want:  # float32 pixel distances (tens of pixels): agree to 1e-5 plus float32 rounding
                torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=5e-6)


def test_the_input_size_is_read_from_the_module_taking_the_image():
    for family in ("tnt", "csatv2", "gemma4_vit", "naflexvit", "swin_transformer"):
        model = small_model(family)
        x = images(family, 1)
        with torch.no_grad(), OversmoothingCapture(model, attention_metrics=DISTANCE, attention_tap="qk") as cap:
            model.forward_features(x)
            assert cap._places.image == tuple(x.shape[-2:]), family


# -- the families added by the coverage pass -----------------------------------------------------------------------
def test_mobilenet_hybrids_measure_their_attention_blocks_and_refuse_convolution_only_models():
    import timm

    model = small_model("mobilenetv3")
    specs = resolve_adapter(model).block_specs(model)
    assert [type(s.attention).__name__ for s in specs] == ["MultiQueryAttention2d"] * 2
    match = r"^mobilenetv4_conv_small \(MobileNetV3, family mobilenetv3\) is convolution-only: no attention blocks"
    with pytest.raises(UnsupportedModelError, match=match):
        OversmoothingCapture(timm.create_model("mobilenetv4_conv_small", pretrained=False, num_classes=0))


def cascaded_reference(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each head's softmax of EfficientViT-MSRA's cascaded group attention, recomputed by calling its submodules
    head after head (the next head's input adds the previous head's output), float64 logits: ``(B', H, N, N)``."""
    B, _, H, W = x.shape
    feats_in, out, feat = x.chunk(len(attn.qkvs), dim=1), [], None
    bias = attn.attention_biases[:, attn.attention_bias_idxs]
    for i, (qkv, dws) in enumerate(zip(attn.qkvs, attn.dws, strict=True)):
        feat = feats_in[0] if i == 0 else feat + feats_in[i]
        q, k, v = qkv(feat).view(B, -1, H, W).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=1)
        q, k, v = dws(q).flatten(2), k.flatten(2), v.flatten(2)
        p = ((q.double() * attn.scale).transpose(-2, -1) @ k.double() + bias[i].double()).softmax(-1)
        out.append(p)
        feat = (v @ p.float().transpose(-2, -1)).view(B, attn.val_dim, H, W)
    return torch.stack(out, dim=1)


def test_cascaded_heads_are_read_one_softmax_per_head():
    model = small_model("efficientvit_msra", sharpen=0.3)
    x = images("efficientvit_msra")
    spec = resolve_adapter(model).block_specs(model)[0]
    seen = []
    hook = spec.attention.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        with torch.no_grad(), OversmoothingCapture(model, attention_tap="qk") as cap:
            model.forward_features(x)
            _, heads = cap.pop_batch()
            probs = cascaded_reference(spec.attention, seen[0])
    finally:
        hook.remove()
    assert probs.shape == (2 * 4, 2, 16, 16)  # 128 px / 16: an 8 x 8 map in four 4 x 4 windows; 2 heads
    assert not torch.allclose(probs[:, 0], probs[:, 1], atol=1e-4)  # two heads, two different maps
    got = heads[("attention_std", 1)].double()  # per image: the mean over its windows' rows
    per_image = torch.stack(
        [brute_attention_std(probs[b * 4 : (b + 1) * 4].transpose(0, 1).flatten(1, 2)[None])[0] for b in range(2)]
    )
    torch.testing.assert_close(got, per_image, atol=1e-6, rtol=0)


# -- the coverage rule behind "N of M" ----------------------------------------------------------------------------
def meta_model(name: str) -> torch.nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


@pytest.mark.parametrize(
    ("arch", "classes"),
    [
        ("resnet18", []),
        ("resnest14d", []),  # split attention: a channel gate of timm.layers
        ("skresnet18", []),  # selective kernel: likewise
        ("efficientvim_m1", []),  # a state-space mixer
        ("mobilenetv4_conv_small", []),
        ("mobilenetv4_hybrid_medium", ["MobileAttention", "MultiQueryAttention2d"]),
        ("efficientvit_b0", ["LiteMLA"]),  # ReLU linear attention counts as attention
        ("convit_tiny", ["GPSA", "MHSA"]),
    ],
)
def test_attention_is_told_by_the_module_classes_of_a_model_built_on_meta(arch, classes, compat_script):
    assert compat_script.has_attention(meta_model(arch)) == classes


def test_the_family_count_is_every_timm_module_whose_models_hold_attention(compat_script):
    import timm

    compat = compat_script
    cached = json.loads(compat.ATTENTION_MODULES.read_text())
    assert cached["timm"] == timm.__version__, "run python scripts/compat_table.py --rescan"
    modules = compat.attention_modules()
    assert set(modules) <= set(timm.list_modules())
    assert set(ADAPTERS) <= set(modules) and set(UNSUPPORTED) <= set(modules)
    assert compat.families() == [f for f in ADAPTERS if f in modules] + [f for f in modules if f not in ADAPTERS]
    recorded = json.loads((REPO / "docs" / "compatibility.json").read_text())["families"]
    assert set(recorded) == set(modules), "run python scripts/compat_table.py"


@pytest.mark.slow
def test_every_counted_module_has_the_recorded_attention_model(compat_script):
    import timm

    compat = compat_script
    for module, found in compat.attention_modules().items():
        assert found["model"] in timm.list_models(module=module), module
        assert compat.has_attention(meta_model(found["model"])) == found["classes"], module
