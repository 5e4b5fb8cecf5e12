"""Fine-tuning beyond plain ViTs: one-step runs of every loss on ViT, EVA, BEiT, Swin and PVT-v2, refusals, the
area-pooled first layer of hierarchical models against a brute-force average, the per-token head against the model's
own head, and patch CutMix on the grid of the tokens the loss reads."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

from oversmooth_cli.errors import UserError
from oversmooth_cli.reading import token_heads
from oversmooth_cli.reading.geometry import area_pool, area_weights
from oversmooth_cli.training import cutmix, losses, token_plan

from .._helpers import (
    TINY_ARCH,
    TINY_ARGS_DEPTH2,
    digit_folders,
    invoke,
    save_checkpoint_folder,
    torch_threads,
)

pytestmark = [pytest.mark.finetune]

CLASSES = ("0", "1", "2", "3")
VIT_LIKE = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
SWIN = {"img_size": 32, "patch_size": 2, "window_size": 4, "depths": [2, 2], "embed_dim": 16, "num_heads": [1, 2]}
PVT = {"depths": [1, 1, 1, 1], "embed_dims": [16, 16, 32, 32], "num_heads": [1, 1, 2, 2]}
FAMILIES = {  # family: (architecture, model args, input size); PVT-v2 has no img_size: its size is in config.json
    "vision_transformer": (TINY_ARCH, TINY_ARGS_DEPTH2, 32),
    "eva": ("eva02_tiny_patch14_224", VIT_LIKE, 32),
    "beit": ("beit_base_patch16_224", VIT_LIKE, 32),
    "swin_transformer": ("swin_tiny_patch4_window7_224", SWIN, 32),
    "pvt_v2": ("pvt_v2_b0", PVT, 64),
}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 real training digits (4 classes x 10) and 12 validation digits (4 x 3) in ImageFolder layout."""
    return digit_folders(tmp_path_factory.mktemp("digits"), CLASSES)


def _model(family: str, num_classes: int = 4, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    arch, args, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **args).to(dtype).eval()


def _checkpoint(family: str, folder: Path, size: int | None = None) -> Path:
    """The family's small model with a 4-class head, saved as a checkpoint folder at ``size`` px."""
    arch, args, default = FAMILIES[family]
    save_checkpoint_folder(_model(family), folder, arch, args)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, size or default, size or default]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:"), res.output
    return lines[0]


# -- one-step fine-tunes -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_step_finetune_with_every_loss(family, digits, tmp_path):
    """One optimizer step (40 images, batch 40) with cos, cons and token: finite terms, the weights move, and
    config.json says what h, e and the per-token head are."""
    train, val = digits
    model_dir = _checkpoint(family, tmp_path / "model")
    out = tmp_path / "run"
    res = invoke(
        "finetune", model_dir, train, "--val-dir", val, "--out", out, "--loss", "cos,cons,token", "--epochs", "1",
        "-b", "40", "--device", "cpu", "--cutmix-prob", "1", "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [0, 1]
    trained = history.iloc[1]
    for term in ("ce", "cos", "cons", "token"):
        assert math.isfinite(trained[f"train_{term}"]), term
    before = load_weights(model_dir / "model.safetensors")
    after = load_weights(out / "checkpoint-last.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    read = json.loads((out / "config.json").read_text())["finetune"]["losses_read"]
    assert read["family"] == family
    hierarchical = family in ("swin_transformer", "pvt_v2")
    assert ("area-pooled" in read["e"]) == hierarchical and ("zero-padded" in read["e"]) == hierarchical
    assert read["cutmix_grid"] == {"swin_transformer": [8, 8], "pvt_v2": [2, 2]}.get(family, [4, 4])


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# -- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.cli
def test_a_term_the_family_cannot_run_is_one_line_exit_2_and_nothing_written(digits, tmp_path):
    """PVT-v2 at 32 px ends with one 1x1 token: l_cos has no pair to compare; refused before anything is written."""
    train, val = digits
    model_dir = _checkpoint("pvt_v2", tmp_path / "model", size=32)
    out = tmp_path / "run"
    res = invoke("finetune", model_dir, train, "--val-dir", val, "--out", out, "--loss", "cos", "--device", "cpu")
    line = _one_line(res)
    assert "--loss cos cannot fine-tune pvt_v2 models (PyramidVisionTransformerV2)" in line
    assert "has 1 patch token at 32x32 px" in line
    assert not out.exists()


def _nest() -> torch.nn.Module:
    from timm.models.nest import Nest

    torch.manual_seed(0)
    return Nest(
        img_size=32, patch_size=2, embed_dims=(16, 32, 32), num_heads=(1, 2, 2), depths=(1, 1, 1), num_classes=4
    )


def test_cons_is_refused_where_the_first_layer_is_not_a_row_major_grid():
    model = _nest().eval()
    plan = token_plan.plan_tokens(model, input_size=(3, 32, 32))
    assert plan.e_grid == (16, 16) and plan.h_grid == (4, 4)
    assert plan.refusal("cos") is None and plan.refusal("token") is None
    with pytest.raises(UserError, match=r"--loss cons cannot fine-tune nest models \(Nest\): NesT blocks hold"):
        losses.PatchDiversificationLoss(model, ("cos", "cons"), input_size=(3, 32, 32))


def test_token_is_refused_for_an_adapter_without_a_token_head(monkeypatch):
    monkeypatch.delitem(token_heads.TOKEN_HEADS, "vit")
    model = _model("vision_transformer")
    with pytest.raises(UserError, match=r"--loss token cannot fine-tune vision_transformer models.*no per-token"):
        losses.PatchDiversificationLoss(model, ("token",), input_size=(3, 32, 32))
    losses.PatchDiversificationLoss(model, ("cos", "cons"), input_size=(3, 32, 32))  # the other terms still run


# -- e pooled onto h's grid ----------------------------------------------------------------------------------------
def _brute_area_pool(tokens: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """Each source cell repeated onto the least common multiple grid, then every target cell's fine cells averaged,
    one cell at a time in float64."""
    (r, c), (tr, tc) = grid, to
    fr, fc = math.lcm(r, tr), math.lcm(c, tc)
    x = tokens.double().reshape(tokens.shape[0], r, c, -1)
    fine = x.repeat_interleave(fr // r, dim=1).repeat_interleave(fc // c, dim=2)
    out = torch.zeros(tokens.shape[0], tr * tc, tokens.shape[-1], dtype=torch.float64)
    for i, j in itertools.product(range(tr), range(tc)):
        rows = slice(i * fr // tr, (i + 1) * fr // tr)
        cols = slice(j * fc // tc, (j + 1) * fc // tc)
        out[:, i * tc + j] = fine[:, rows, cols].mean(dim=(1, 2))
    return out


@pytest.mark.parametrize(("grid", "to"), [((16, 16), (8, 8)), ((15, 15), (4, 4)), ((4, 6), (3, 4)), ((5, 5), (5, 5))])
def test_area_pool_equals_a_brute_force_area_average(grid, to):
    tokens = torch.randn(2, grid[0] * grid[1], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(area_pool(tokens, grid, to), _brute_area_pool(tokens, grid, to), rtol=0, atol=1e-12)
    torch.testing.assert_close(area_weights(grid[0], to[0]).sum(dim=1), torch.ones(to[0], dtype=torch.float64))


def test_swin_cons_reads_e_pooled_and_zero_padded_onto_h(monkeypatch):
    """In float64: l_cons of the loss module == l_cons of (block-0 output, brute-force pooled, zero-padded) and the
    last block's output, both read with plain hooks."""
    model = _model("swin_transformer", dtype=torch.float64)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    criterion = losses.PatchDiversificationLoss(model, ("cons",), {"cons": 1.0}, input_size=(3, 32, 32))
    assert (criterion.plan.e_grid, criterion.plan.h_grid, criterion.plan.pad_first) == ((16, 16), (8, 8), 16)
    _, _, terms = criterion(lambda: model(x))
    store = {}
    blocks = [model.layers[0].blocks[0], model.layers[-1].blocks[-1]]
    hooks = [b.register_forward_hook(lambda _m, _a, out, i=i: store.__setitem__(i, out)) for i, b in enumerate(blocks)]
    model(x)
    for h in hooks:
        h.remove()
    e = _brute_area_pool(store[0].flatten(1, 2), (16, 16), (8, 8))
    e = torch.cat([e, torch.zeros(*e.shape[:2], 16, dtype=torch.float64)], dim=-1)
    expected = losses.l_cons(e, store[1].flatten(1, 2), "cos")
    torch.testing.assert_close(terms["cons"], expected, rtol=0, atol=1e-12)


# -- the per-token head ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_head_on_identical_tokens_is_the_models_own_head(family):
    """When every position of the last token layer holds the same token, the model's logits (its tail, pooling and
    head) equal the per-token head's logits at any position: the head is the model's own, without the pooling."""
    model = _model(family, dtype=torch.float64)
    for m in model.modules():  # norms with non-trivial parameters, so a skipped or doubled norm would show
        if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
                m.bias.normal_(generator=torch.Generator().manual_seed(4))
    size = FAMILIES[family][2]
    plan = token_plan.plan_tokens(model, input_size=(3, size, size))
    last = model.get_submodule(plan.last)
    t = torch.randn(plan.h_shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hook = last.register_forward_hook(lambda _m, _a, out: torch.ones_like(out) * t)
    with torch.no_grad():
        want = model(torch.rand(2, 3, size, size, dtype=torch.float64))
    hook.remove()
    with torch.no_grad():
        got = token_plan.token_head_logits(model, t.expand(2, plan.h_shape[0], -1), plan.head, plan.h_grid, plan.last)
    assert got.shape == (2, plan.h_shape[0], 4)
    torch.testing.assert_close(got, want[:, None].expand_as(got), rtol=0, atol=1e-10)


# -- patch CutMix on the loss's grid -----------------------------------------------------------------------------
def test_cutmix_snaps_to_the_coarsest_grid_so_every_scored_token_is_pure():
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    targets = cutmix.smooth_one_hot(torch.tensor([0, 1, 2, 3]), 4, 0.1)
    rng = random.Random(0)
    for _ in range(30):
        _, image_t, patch_t, box = cutmix.patch_cutmix(images, targets, None, 1.0, rng, grid=(2, 2))
        assert patch_t.shape == (4, 4, 4)
        assert all(v % 32 == 0 for v in (box.top, box.bottom, box.left, box.right))
        own, other = targets[:, None], targets.flip(0)[:, None]
        assert (torch.isclose(patch_t, own).all(-1) | torch.isclose(patch_t, other).all(-1)).all()
        torch.testing.assert_close(image_t, patch_t.mean(dim=1))


def test_cutmix_fractions_on_a_grid_that_does_not_tile_the_image_are_exact_areas():
    box = cutmix.CutMixBox(top=5, bottom=20, left=0, right=17)
    got = cutmix.patch_area_fractions(box, 32, 32, grid=(3, 3)).double()
    edges = [i * 32 / 3 for i in range(4)]
    want = []
    for i, j in itertools.product(range(3), range(3)):
        dy = max(0.0, min(edges[i + 1], 20) - max(edges[i], 5))
        dx = max(0.0, min(edges[j + 1], 17) - max(edges[j], 0))
        want.append(dy * dx / (32 / 3) ** 2)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)


def test_tiny_vit_plan_keeps_the_patch_grid():
    plan = token_plan.plan_tokens(_model("vision_transformer"), input_size=(3, 32, 32))
    assert (plan.e_grid, plan.h_grid, plan.pools_first, plan.pad_first) == ((4, 4), (4, 4), False, 0)
