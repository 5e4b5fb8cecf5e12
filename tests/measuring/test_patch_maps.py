"""Per-patch maps (``measure --maps K``): similarity and attention per patch of a few sample images.

The similarity maps are checked against an explicit float64 double loop over the patch pairs and, through their mean,
against the independent ``brute_token_cosine`` and the ``layers.csv`` of a one-image run; the attention maps against
the class-token row of a float64 unfused attention computed from the block's own modules. Then the files, the command
line, a windowed hierarchical family (Swin) whose cells must tile the input, and ``--maps 0``, which must do no map
work at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from oversmooth_cli.data import build_transform, find_images, load_rgb
from oversmooth_cli.errors import UserError
from oversmooth_cli.gate.schema import read_patches, read_summary
from oversmooth_cli.measuring.config import LoadOptions, MeasureConfig
from oversmooth_cli.measuring.run import measure, measure_batches
from oversmooth_cli.measuring.summary import PATCH_FILES, collect_patch_maps, layer_table, write_run
from oversmooth_cli.reading import capture as capture_module
from oversmooth_cli.reading.patch_maps import (
    PATCH_COLUMNS,
    choose_images,
    choose_layers,
    display_image,
    patch_similarity,
)
from oversmooth_cli.reading.small_models import SMALL_MODELS

from .._helpers import (
    MODELS,
    PHOTOS,
    REPO,
    TINY_ARCH,
    brute_token_cosine,
    invoke,
    make,
    reference_attention,
    reference_states,
)

pytestmark = pytest.mark.capture

BUNDLED = REPO / "examples" / "digits-vit"
BUNDLED_IMAGES = REPO / "examples" / "images"
NAMES = ("chelsea.png", "coffee.png", "astronaut.png")
TAPS = ("qk", "inline", "softmax")
CPU = torch.device("cpu")


def photos(names: tuple[str, ...], size: int = 32) -> torch.Tensor:
    """Real photos resized to ``size`` px, normalised with mean = std = 0.5: ``(B, 3, size, size)``."""
    pixels = [np.asarray(load_rgb(PHOTOS[n]).resize((size, size)), dtype=np.float32) / 255.0 for n in names]
    return (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) - 0.5) / 0.5


def brute_patch_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, n, d)`` -> ``(B, n)``: each token's mean cosine to the other tokens, float64, an explicit double loop."""
    h = tokens.double()
    B, n, _ = h.shape
    out = torch.zeros(B, n, dtype=torch.float64)
    for b in range(B):
        for i in range(n):
            total = 0.0
            for j in range(n):
                if i != j:
                    denom = max(h[b, i].norm().item(), 1e-8) * max(h[b, j].norm().item(), 1e-8)
                    total += (h[b, i] @ h[b, j]).item() / denom
            out[b, i] = total / (n - 1)
    return out


def maps_of(model: torch.nn.Module, x: torch.Tensor, tap: str = "qk", metrics: str = "default", maps: int = 4):
    """Map every image of ``x`` (image index = batch row) in one batch; ``{(image, layer, kind): PatchMap}`` and the
    batches result."""
    rows = list(range(len(x)))
    config = MeasureConfig(metrics=metrics, attention_tap=tap, maps=maps)
    result = measure_batches(model, [(x, rows, [])], CPU, config, samples={i: i for i in rows})
    assert result.maps is not None
    return {(m.image_index, m.layer, m.kind): m for m in result.maps.maps}, result


# -- choosing images and layers ------------------------------------------------------------------------------------
def test_images_and_layers_are_evenly_spaced_first_and_last_included():
    assert choose_images(40, 4) == [0, 13, 26, 39]
    assert choose_images(10, 4) == [0, 3, 6, 9]
    assert choose_images(3, 4) == [0, 1, 2]
    assert choose_images(7, 1) == [0]
    assert choose_images(5, 0) == [] and choose_images(0, 4) == []
    assert choose_layers(range(9)) == [0, 2, 4, 6, 8]
    assert choose_layers(range(13)) == [0, 3, 6, 9, 12]
    assert choose_layers([0, 1, 2]) == [0, 1, 2]
    assert choose_layers([0, 1, 2, 4, 5, 6, 7]) == [0, 2, 4, 6, 7]  # over the layers with token metrics


# -- the similarity map --------------------------------------------------------------------------------------------
def test_patch_similarity_is_the_per_patch_mean_cosine_and_averages_to_token_cosine():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 9, 5, generator=g)
    tokens[1, 3] = 0.0  # a zero token: cosine 0 with everything, as token_cosine counts it
    s = patch_similarity(tokens)
    torch.testing.assert_close(s.double(), brute_patch_similarity(tokens), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.double().mean(dim=-1), brute_token_cosine(tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tap", TAPS)
def test_similarity_maps_match_a_float64_brute_force_at_every_mapped_layer(tap):
    model = make(TINY_ARCH, patch_size=8, depth=3, embed_dim=32, num_heads=2)
    x = photos(NAMES)
    maps, result = maps_of(model, x, tap)
    with torch.no_grad():
        states = reference_states(model, x)
    layers = choose_layers([info.index for info in result.layers if info.has_tokens])
    assert layers == [0, 1, 2, 3]
    for layer in layers:
        tokens = states[layer][:, 1:]  # the class token excluded
        want = brute_patch_similarity(tokens)
        cosine = brute_token_cosine(tokens)
        for i in range(len(x)):
            m = maps[(i, layer, "similarity")]
            assert m.grid == (4, 4) and m.image == (32, 32)
            np.testing.assert_allclose(m.values, want[i].numpy(), atol=1e-5, rtol=0)
            assert m.values.mean() == pytest.approx(cosine[i].item(), abs=1e-5)


# -- the attention map ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tap", TAPS)
@pytest.mark.parametrize("key", ["vit", "deit_distilled", "registers_no_cls"])
def test_attention_maps_equal_the_class_token_row_of_a_float64_reference(key, tap):
    """With a class token: its softmax row over the patch keys, averaged over heads; without one (registers only):
    the mean of the patch queries' rows."""
    name, kw, prefix = MODELS[key]
    model = make(name, **kw)
    with torch.no_grad():  # random-init attention is nearly uniform: make its rows distinct
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6.0)
    x = photos(NAMES[:2])
    maps, result = maps_of(model, x, tap)
    with torch.no_grad():
        states = reference_states(model, x)
    has_cls = getattr(model, "cls_token", None) is not None
    assert result.maps.attention == ["class token" if has_cls else "mean over patch queries"]
    mapped = sorted({layer for (_, layer, kind) in maps if kind == "attention"})
    assert mapped == list(range(1, len(model.blocks) + 1))  # every block but layer 0 (the block input)
    for layer in mapped:
        with torch.no_grad():
            probs = reference_attention(model.blocks[layer - 1], states[layer - 1], 0)  # (B, H, T, T): every row
        rows = probs[:, :, :1] if has_cls else probs[:, :, prefix:]
        want = rows[..., prefix:].mean(dim=2).mean(dim=1)  # patch keys, mean over the rows, then over heads
        for i in range(len(x)):
            m = maps[(i, layer, "attention")]
            assert m.grid == (4, 4)
            np.testing.assert_allclose(m.values, want[i].numpy(), atol=1e-6, rtol=0)
            assert m.values.std() > 1e-3  # not a uniform row: the comparison tells rows apart


def test_only_the_batches_holding_the_sample_images_are_mapped():
    model = make(TINY_ARCH, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    x = photos(NAMES)
    batches = [(x[:2], [0, 1], []), (x[2:], [2], [])]
    result = measure_batches(model, batches, CPU, MeasureConfig(), samples={2: 7})
    assert {m.image_index for m in result.maps.maps} == {7}
    alone, _ = maps_of(model, x[2:])
    for m in result.maps.maps:
        np.testing.assert_allclose(m.values, alone[(0, m.layer, m.kind)].values, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(result.maps.inputs[7], x[2].numpy())


# -- runs, files and the command line ------------------------------------------------------------------------------
def test_a_one_image_run_maps_average_to_its_layers_csv(tmp_path):
    image = tmp_path / "coffee.png"
    shutil.copy(PHOTOS["coffee.png"], image)
    result = measure(BUNDLED, [image], MeasureConfig(device="cpu", maps=1))
    out = write_run(result, tmp_path / "run")
    layers = pd.read_csv(out / "layers.csv")
    cosine = layers[layers["metric"] == "token_cosine"].set_index("layer")["mean"]
    cells = read_patches(out / "patches.csv")
    similarity = cells[cells["kind"] == "similarity"].groupby("layer")["value"].mean()
    assert list(similarity.index) == [0, 2, 4, 6, 8]
    for layer, value in similarity.items():
        assert value == pytest.approx(cosine[layer], abs=1e-5), layer
    assert set(cells["image"]) == {str(image)} and set(cells["image_index"]) == {0}
    attention = cells[cells["kind"] == "attention"]
    assert sorted(attention["layer"].unique()) == [2, 4, 6, 8]
    sums = attention.groupby("layer")["value"].sum()  # the class token's row, patch keys only: at most 1
    assert ((sums > 0) & (sums <= 1 + 1e-6)).all()


def test_files_columns_inputs_and_summary_as_documented(tmp_path):
    paths = find_images(BUNDLED_IMAGES)
    result = measure(BUNDLED, BUNDLED_IMAGES, MeasureConfig(device="cpu"))
    out = write_run(result, tmp_path / "run")
    assert all((out / name).is_file() for name in PATCH_FILES)
    cells = pd.read_csv(out / "patches.csv")
    assert tuple(cells.columns) == PATCH_COLUMNS
    chosen = choose_images(len(paths), 4)
    assert chosen == [0, 13, 26, 39]
    names = [str(paths[i]) for i in chosen]
    assert sorted(set(cells["image_index"])) == chosen
    assert dict(zip(cells["image_index"], cells["image"], strict=True)) == dict(zip(chosen, names, strict=True))
    assert set(cells["kind"]) == {"similarity", "attention"}
    with np.load(out / "patches.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"inputs", "names"}
        inputs, stored = npz["inputs"], list(npz["names"])
    assert inputs.shape == (4, 32, 32, 3) and inputs.dtype == np.uint8 and stored == names
    transform = build_transform(result.summary["data_config"])
    for got, path in zip(inputs, names, strict=True):
        want = display_image(transform(load_rgb(path)).numpy(), (0.5,) * 3, (0.5,) * 3)
        np.testing.assert_array_equal(got, want)
    summary = read_summary(out / "summary.json")
    maps = summary["patch_maps"]
    assert maps["requested"] == 4 and maps["chosen"] == chosen and maps["layers"] == [0, 2, 4, 6, 8]
    assert maps["images"] == [{"index": i, "name": n} for i, n in zip(chosen, names, strict=True)]
    assert maps["kinds"] == ["similarity", "attention"] and maps["attention"] == ["class token"]
    assert maps["files"] == list(PATCH_FILES)


@pytest.mark.cli
def test_the_command_line_writes_the_maps_and_maps_2_writes_two_images(tmp_path):
    out = tmp_path / "default"
    r = invoke("measure", BUNDLED, BUNDLED_IMAGES, "--out", out, "--device", "cpu", "-q")
    assert r.exit_code == 0, r.output
    assert all((out / name).stat().st_size > 0 for name in PATCH_FILES)
    assert pd.read_csv(out / "patches.csv")["image"].nunique() == 4
    two = tmp_path / "two"
    r = invoke("measure", BUNDLED, BUNDLED_IMAGES, "--out", two, "--device", "cpu", "--maps", 2, "-q")
    assert r.exit_code == 0, r.output
    cells = read_patches(two / "patches.csv")
    assert cells["image"].nunique() == 2 and sorted(cells["image_index"].unique()) == [0, 39]
    with np.load(two / "patches.npz", allow_pickle=False) as npz:
        assert npz["inputs"].shape[0] == 2 and len(npz["names"]) == 2
    assert json.loads((two / "summary.json").read_text())["patch_maps"]["requested"] == 2
    assert "--maps" in invoke("measure", "--help").output


def test_maps_0_writes_no_patch_files_and_the_capture_does_no_map_work(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("map work with --maps 0")

    monkeypatch.setattr(capture_module, "PatchMapper", refuse)
    result = measure(BUNDLED, BUNDLED_IMAGES, MeasureConfig(device="cpu", maps=0, limit=3))
    out = write_run(result, tmp_path / "run")
    assert result.maps is None
    assert not any((out / name).exists() for name in PATCH_FILES)
    assert result.summary["patch_maps"]["requested"] == 0 and result.summary["patch_maps"]["images"] == []
    # measure_batches without sample images (the monitor's call) builds no mapper either, whatever --maps says
    model = make(TINY_ARCH, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    assert measure_batches(model, [(photos(NAMES[:1]), [0], [])], CPU, MeasureConfig(maps=4)).maps is None


def test_a_broken_patches_csv_is_refused_in_one_line(tmp_path):
    result = measure(BUNDLED, BUNDLED_IMAGES, MeasureConfig(device="cpu", maps=1, limit=2))
    out = write_run(result, tmp_path / "run")
    text = (out / "patches.csv").read_text().splitlines()
    head, first = text[0], text[1].split(",")
    for column, value, expected in (("value", "nan", "a finite number"), ("kind", "heat", "a kind of map"),
                                    ("row", "1.5", "a whole number"), ("x1", "0", "x0 < x1")):  # fmt: skip
        cells = list(first)
        cells[PATCH_COLUMNS.index(column)] = value
        bad = tmp_path / f"{column}.csv"
        bad.write_text("\n".join([head, ",".join(cells), *text[2:]]) + "\n")
        with pytest.raises(UserError, match=expected) as info:
            read_patches(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)


# -- hierarchical and windowed families ----------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "grids"), [("swin_transformer", [16, 16, 16, 8, 8]), ("pvt_v2", None)])
def test_hierarchical_maps_live_on_their_stage_grids_and_tile_the_input(tmp_path, family, grids):
    small = SMALL_MODELS[family]
    x = photos(NAMES[:1], small.img_size)
    model = small.create().eval()
    maps, result = maps_of(model, x, "qk")
    table = layer_table(result)
    cosine = table[table["metric"] == "token_cosine"].set_index("layer")["mean"]
    similarity = sorted((layer, m) for (_, layer, kind), m in maps.items() if kind == "similarity")
    assert [layer for layer, _ in similarity] == result.maps.layers
    if grids is not None:
        assert [m.grid for _, m in similarity] == [(g, g) for g in grids]
    for layer, m in similarity:
        assert m.values.mean() == pytest.approx(cosine[layer], abs=1e-5), layer  # one image: its token_cosine
    for m in maps.values():
        cells = m.cells()
        cover = np.zeros((small.img_size, small.img_size), dtype=int)
        for x0, y0, x1, y1 in zip(cells["x0"], cells["y0"], cells["x1"], cells["y1"], strict=True):
            assert float(x0).is_integer() and float(y1).is_integer()  # cells of whole pixels here
            cover[int(y0) : int(y1), int(x0) : int(x1)] += 1
        assert (cover == 1).all(), (m.layer, m.kind)  # every input pixel in exactly one cell
    attention = {layer for (_, layer, kind) in maps if kind == "attention"}
    if family == "swin_transformer":  # windowed: no class-token / average-query row spans the image
        assert attention == set() and "windows per image" in result.maps.notes["attention"]
        settings = collect_patch_maps(result.maps, [Path("x.png")], [0], {"mean": (0.5,) * 3, "std": (0.5,) * 3}, 1)[1]
        assert settings["kinds"] == ["similarity"] and "windows" in settings["notes"]["attention"]
    else:  # spatial-reduction attention: a map over the pooled keys, which cover the image too
        assert attention == set(result.maps.layers) - {0}


def test_a_windowed_family_run_writes_its_figure_without_attention(tmp_path):
    swin = SMALL_MODELS["swin_transformer"]
    image = tmp_path / "chelsea.png"
    shutil.copy(PHOTOS["chelsea.png"], image)
    config = MeasureConfig(device="cpu", maps=1)
    result = measure(swin.arch, [image], config, load=LoadOptions(model_args=dict(swin.args)))
    out = write_run(result, tmp_path / "run")
    cells = read_patches(out / "patches.csv")
    assert set(cells["kind"]) == {"similarity"} and (out / "patches.png").stat().st_size > 0
    assert "windows per image" in read_summary(out / "summary.json")["patch_maps"]["notes"]["attention"]
