"""The patch-diversification losses against direct float64 formulas (loops over i, j), and patch CutMix."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from oversmooth_cli.metrics.formulas import token_cosine
from oversmooth_cli.training import cutmix, losses, token_plan
from oversmooth_cli.training.config import FinetuneConfig

from .._helpers import TINY_ARCH, TINY_ARGS_DEPTH2

pytestmark = [pytest.mark.finetune, pytest.mark.metrics]


def _tokens(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _cos(a: list[float], b: list[float]) -> float:
    na = max(math.sqrt(sum(x * x for x in a)), 1e-8)
    nb = max(math.sqrt(sum(x * x for x in b)), 1e-8)
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# -- l_cos ---------------------------------------------------------------------------------------------------------
def test_l_cos_matches_pairwise_loop() -> None:
    h = _tokens(3, 5, 4)
    expected = 0.0
    for img in h.tolist():
        n = len(img)
        pairs = sum(_cos(img[i], img[j]) for i in range(n) for j in range(n) if i != j)
        expected += pairs / (n * (n - 1))
    expected /= h.shape[0]
    assert losses.l_cos(h).item() == pytest.approx(expected, abs=1e-12)


def test_l_cos_is_the_token_cosine_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape)
        return token_cosine(tokens)

    monkeypatch.setattr(losses, "token_cosine", spy)
    h = _tokens(2, 6, 3)
    assert losses.l_cos(h).item() == token_cosine(h).mean().item()
    assert calls == [h.shape]


def test_l_cos_gradient_is_correct() -> None:
    h = _tokens(2, 4, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(losses.l_cos, (h,))


# -- l_cons --------------------------------------------------------------------------------------------------------
def _l_cons_reference(e: torch.Tensor, h: torch.Tensor, sim) -> float:
    total = 0.0
    for ei, hi in zip(e.tolist(), h.tolist(), strict=True):
        n, d = len(hi), len(hi[0])
        mean_h = [sum(hi[j][k] for j in range(n)) / n for k in range(d)]
        per_image = 0.0
        for i in range(n):
            pos, neg = sim(ei[i], hi[i]), sim(ei[i], mean_h)
            per_image += -math.log(math.exp(pos) / (math.exp(pos) + math.exp(neg)))
        total += per_image / n
    return total / e.shape[0]


def test_l_cons_cosine_matches_formula() -> None:
    e, h = _tokens(3, 5, 4, seed=1), _tokens(3, 5, 4, seed=2)
    assert losses.l_cons(e, h, "cos").item() == pytest.approx(_l_cons_reference(e, h, _cos), abs=1e-12)


def test_l_cons_dot_is_the_papers_form() -> None:
    e, h = _tokens(2, 6, 3, seed=3, scale=0.7), _tokens(2, 6, 3, seed=4, scale=0.7)
    assert losses.l_cons(e, h, "dot").item() == pytest.approx(_l_cons_reference(e, h, _dot), abs=1e-12)


def test_l_cons_dot_stays_finite_where_exp_overflows() -> None:
    e, h = _tokens(1, 4, 8, seed=5, scale=40.0), _tokens(1, 4, 8, seed=6, scale=40.0)
    value = losses.l_cons(e, h, "dot").item()
    # -log(e^p / (e^p + e^q)) = log(1 + e^(q - p)), written stably per patch
    ref = 0.0
    ei, hi = e[0].tolist(), h[0].tolist()
    mean_h = [sum(col) / 4 for col in zip(*hi, strict=True)]
    for i in range(4):
        z = _dot(ei[i], mean_h) - _dot(ei[i], hi[i])
        ref += (z + math.log1p(math.exp(-z))) if z > 0 else math.log1p(math.exp(z))
    assert math.isfinite(value)
    assert value == pytest.approx(ref / 4, rel=1e-12)


@pytest.mark.parametrize("grad_first", [False, True])
def test_l_cons_gradient_reaches_e_only_with_grad_first(grad_first: bool) -> None:
    e = _tokens(2, 5, 4, seed=7).requires_grad_(True)
    h = _tokens(2, 5, 4, seed=8).requires_grad_(True)
    losses.l_cons(e, h, "cos", grad_first=grad_first).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    if grad_first:
        assert e.grad is not None and e.grad.abs().sum() > 0
    else:
        assert e.grad is None


def test_l_cons_rejects_unknown_similarity() -> None:
    with pytest.raises(ValueError, match="unknown similarity"):
        losses.l_cons(_tokens(1, 3, 2), _tokens(1, 3, 2), "euclid")


# -- l_token and targets -------------------------------------------------------------------------------------------
def test_l_token_matches_per_patch_cross_entropy_loop() -> None:
    logits = _tokens(2, 4, 5, seed=9)
    targets = torch.softmax(_tokens(2, 4, 5, seed=10), dim=-1)
    expected = 0.0
    for zb, yb in zip(logits.tolist(), targets.tolist(), strict=True):
        per_image = 0.0
        for z, y in zip(zb, yb, strict=True):
            log_norm = math.log(sum(math.exp(v) for v in z))
            per_image += -sum(yc * (zc - log_norm) for yc, zc in zip(y, z, strict=True))
        expected += per_image / len(zb)
    expected /= logits.shape[0]
    assert losses.l_token(logits, targets).item() == pytest.approx(expected, abs=1e-12)


def test_smoothed_targets_match_torch_label_smoothing() -> None:
    logits = _tokens(6, 4, seed=11)
    labels = torch.tensor([0, 3, 1, 2, 2, 0])
    ours = SoftTargetCrossEntropy()(logits, cutmix.smooth_one_hot(labels, 4, 0.1, torch.float64))
    assert ours.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), abs=1e-12)


def _vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(TINY_ARCH, **{**TINY_ARGS_DEPTH2, "num_classes": 5, **kwargs}).eval()


def test_token_head_is_the_models_own_head_on_the_class_token() -> None:
    model = _vit()  # global_pool='token': final norm, then head on the class token
    x = _tokens(2, 17, 32, seed=12).float()
    with torch.no_grad():
        ours = token_plan.token_head_logits(model, x)
        theirs = model.forward_head(model.norm(x))
    assert ours.shape == (2, 17, 5)
    torch.testing.assert_close(ours[:, 0], theirs, rtol=0, atol=1e-6)


def test_token_head_uses_fc_norm_for_average_pooled_models() -> None:
    model = _vit(global_pool="avg", class_token=False, fc_norm=True)
    token = _tokens(2, 1, 32, seed=13).float()
    x = token.expand(2, 16, 32)  # identical tokens: average pooling returns the token itself
    with torch.no_grad():
        ours = token_plan.token_head_logits(model, x)
        theirs = model.forward_head(model.norm(x))
    torch.testing.assert_close(ours[:, 3], theirs, rtol=0, atol=1e-6)


# -- patch CutMix --------------------------------------------------------------------------------------------------
def test_snapped_cutmix_gives_pure_patches_and_area_mixed_image_targets() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    targets = cutmix.smooth_one_hot(labels, 4, 0.1)
    rng = random.Random(0)
    seen_partial = False
    for _ in range(50):
        mixed, image_t, patch_t, box = cutmix.patch_cutmix(images, targets, (8, 8), 1.0, rng, snap=True)
        assert patch_t.shape == (4, 16, 4)
        assert all(v % 8 == 0 for v in (box.top, box.bottom, box.left, box.right))
        torch.testing.assert_close(patch_t.sum(-1), torch.ones(4, 16))
        # every patch is wholly one image: its target is exactly the label of that image
        own, other = targets[:, None, :], targets.flip(0)[:, None, :]
        pure = torch.isclose(patch_t, own).all(-1) | torch.isclose(patch_t, other).all(-1)
        assert pure.all()
        area = box.area / (32 * 32)
        seen_partial |= 0 < area < 1
        torch.testing.assert_close(image_t, (1 - area) * targets + area * targets.flip(0))
        torch.testing.assert_close(image_t, patch_t.mean(dim=1))  # snapped: area mix == mean of the patches
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[box.top : box.bottom, box.left : box.right] = True
        assert torch.equal(mixed[..., inside], images.flip(0)[..., inside])
        assert torch.equal(mixed[..., ~inside], images[..., ~inside])
    assert seen_partial


def test_unsnapped_patch_targets_are_the_area_of_each_patch_inside_the_box() -> None:
    box = cutmix.CutMixBox(top=3, bottom=13, left=5, right=22)
    fractions = cutmix.patch_area_fractions(box, 16, 24, (8, 8))
    expected = []
    for r in range(2):
        for c in range(3):
            inside = sum(
                1 for y in range(r * 8, r * 8 + 8) for x in range(c * 8, c * 8 + 8) if 3 <= y < 13 and 5 <= x < 22
            )
            expected.append(inside / 64)
    assert fractions.tolist() == pytest.approx(expected, abs=1e-12)

    images = torch.rand(2, 3, 16, 24)
    targets = torch.eye(2)
    rng = random.Random(3)
    _, image_t, patch_t, box = cutmix.patch_cutmix(images, targets, (8, 8), 1.0, rng, snap=False)
    a = cutmix.patch_area_fractions(box, 16, 24, (8, 8))
    torch.testing.assert_close(patch_t[0, :, 1], a)  # image 0's partner is image 1 (label 1)
    torch.testing.assert_close(patch_t.sum(-1), torch.ones(2, 6))
    torch.testing.assert_close(image_t[0, 1], torch.tensor(box.area / (16 * 24)))


def test_patch_area_fractions_refuse_partial_patches() -> None:
    with pytest.raises(ValueError, match="does not tile"):
        cutmix.patch_area_fractions(cutmix.CutMixBox(0, 1, 0, 1), 30, 32, (8, 8))


# -- the loss module -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cons_sim", "grad_first"), [("cos", False), ("dot", True)])
def test_patch_diversification_loss_equals_the_term_functions_in_float64(cons_sim: str, grad_first: bool) -> None:
    model = _vit().double()
    x = _tokens(2, 3, 32, 32, seed=14)
    patch_targets = torch.softmax(_tokens(2, 16, 5, seed=15), dim=-1)
    weights = {"cos": 0.5, "cons": 0.25, "token": 2.0}
    criterion = losses.PatchDiversificationLoss(model, ("cos", "cons", "token"), weights, cons_sim, grad_first)
    logits, total, terms = criterion(lambda: model(x), patch_targets)

    store = {}
    hooks = [
        model.blocks[i].register_forward_hook(lambda _m, _a, out, i=i: store.__setitem__(i, out[:, 1:]))
        for i in (0, -1)
    ]
    expected_logits = model(x)
    for h in hooks:
        h.remove()
    e, h = store[0], store[-1]
    expected = {
        "cos": losses.l_cos(h),
        "cons": losses.l_cons(e, h, cons_sim, grad_first),
        "token": losses.l_token(token_plan.token_head_logits(model, h), patch_targets),
    }
    assert torch.equal(logits, expected_logits)
    assert terms.keys() == expected.keys() and all(torch.equal(terms[k], v) for k, v in expected.items())
    assert torch.equal(total, sum(weights[k] * v for k, v in expected.items()))
    assert terms["cos"].dtype == torch.float64
    assert not any(b._forward_hooks for b in model.blocks), "the token hooks live only inside the forward pass"
    total.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_patch_diversification_loss_without_terms_is_zero() -> None:
    model = _vit()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(16))
    logits, total, terms = losses.PatchDiversificationLoss(model, ())(lambda: model(x))
    assert logits.shape == (2, 5) and total.item() == 0.0 and terms == {}


def test_finetune_options_offer_every_registered_term_and_similarity() -> None:
    options = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    assert options["cons_sim"].metadata["choices"] == tuple(losses.SIMILARITIES)
    assert tuple(FinetuneConfig().weights) == tuple(losses.LOSS_TERMS)
