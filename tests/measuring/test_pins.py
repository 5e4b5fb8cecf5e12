"""Numbers pinned from outside the code under test: the bundled model's committed baseline, timm's own extractor.

These do not check a formula against a formula we wrote twice: the bundled checkpoint's curve is the one committed in
``examples/ci/baseline`` (its ``summary.json`` names the command that made it), and the attention maps come from
``timm.utils.AttentionExtract`` on timm's non-fused attention path.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from timm.utils import AttentionExtract

from oversmooth_cli.measuring.config import MeasureConfig
from oversmooth_cli.measuring.run import measure_batches
from oversmooth_cli.measuring.summary import layer_table

from .._helpers import REPO, TINY_ARCH, invoke

BUNDLED = REPO / "examples" / "digits-vit"
BUNDLED_IMAGES = REPO / "examples" / "images" / "digits"
BASELINE = REPO / "examples" / "ci" / "baseline"


@pytest.mark.cli
def test_bundled_model_on_its_images_equals_the_committed_baseline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    measured = invoke("measure", BUNDLED, BUNDLED_IMAGES, "--out", out, "--device", "cpu", "--baseline", BASELINE)
    assert measured.exit_code == 0, measured.output
    # The gate at a tolerance far below any real change: every metric and layer within 1e-6 of the baseline.
    gated = invoke("check", BASELINE, out, "--atol", "1e-6", "--rtol", "0")
    assert gated.exit_code == 0, gated.output
    # And read directly, without the gate's own code.
    base = pd.read_csv(BASELINE / "layers.csv").set_index(["metric", "layer"]).sort_index()
    now = pd.read_csv(out / "layers.csv").set_index(["metric", "layer"]).sort_index()
    assert list(now.index) == list(base.index)
    assert (now["n_images"] == base["n_images"]).all()
    assert (now["n_images"] == len(list(BUNDLED_IMAGES.glob("*.png")))).all()
    for column in ("mean", "std"):
        assert (now[column] - base[column]).abs().max() < 1e-6, column


@pytest.mark.capture
def test_attention_std_equals_timm_attention_extract() -> None:
    """timm's own extractor (hooks on ``attn_drop`` of the non-fused path) gives the same per-layer attention std."""
    torch.manual_seed(0)
    depth, prefix = 3, 1
    model = timm.create_model(
        TINY_ARCH, pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=depth, embed_dim=32, num_heads=2
    ).eval()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    for blk in model.blocks:
        blk.attn.fused_attn = False
    extract = AttentionExtract(model, method="hook")
    with torch.no_grad():
        maps = extract(images)
    assert len(maps) == depth
    expected = {}
    for layer, probs in enumerate(maps.values(), start=1):
        p = probs.double()[:, :, prefix:, :]  # patch queries, every key
        expected[layer] = p.std(dim=-1, unbiased=False).mean(dim=(1, 2)).mean().item()
    for blk in model.blocks:
        blk.attn.fused_attn = True

    result = measure_batches(
        model, [(images, list(range(5)), [])], torch.device("cpu"), MeasureConfig(metrics="attention_std")
    )
    table = layer_table(result)
    ours = table[table["metric"] == "attention_std"].set_index("layer")["mean"].to_dict()
    assert sorted(ours) == sorted(expected)
    for layer, value in expected.items():
        assert ours[layer] == pytest.approx(value, abs=1e-6), layer
