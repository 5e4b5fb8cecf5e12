"""Patch-diversification losses of Gong et al. 2021 ("Vision Transformers with Patch Diversification").

Every loss takes patch tokens ``(B, n, d)`` (prefix tokens already removed) and returns a scalar that
autograd can differentiate:

* :func:`l_cos`: mean pairwise cosine of the last block's patch tokens. It *is* the ``token_cosine`` metric
  (:func:`oversmooth_cli.metrics.token_cosine`), averaged over images: one implementation for both.
* :func:`l_cons`: patch-wise contrastive loss pulling each deep token ``h_i`` toward the shallow token ``e_i``
  of the same patch and away from the image's mean deep token.
* :func:`l_token`: every patch token goes through the model's own final norm and classifier head
  (:func:`token_head_logits`) and is scored against a soft per-patch target (:func:`patch_cutmix`).

:data:`LOSS_TERMS` registers the three terms by the names ``--loss`` accepts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import EPS, to_float, token_cosine

__all__ = [
    "LOSS_TERMS",
    "SIMILARITIES",
    "TOKEN_HEAD_PATHS",
    "CutMixBox",
    "LossTerm",
    "TermInputs",
    "cosine_similarity",
    "dot_similarity",
    "l_cons",
    "l_cos",
    "l_token",
    "patch_area_fractions",
    "patch_cutmix",
    "rand_box",
    "smooth_one_hot",
    "soft_cross_entropy",
    "token_head_logits",
]


# -- similarities used by l_cons -------------------------------------------------------------------------------
def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``cos(a, b)`` over the last dimension with L2-normalised vectors (norm floor ``eps``)."""
    return (F.normalize(a, dim=-1, eps=eps) * F.normalize(b, dim=-1, eps=eps)).sum(dim=-1)


def dot_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Raw dot product ``a . b`` over the last dimension (the paper's form as written)."""
    return (a * b).sum(dim=-1)


SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cos": cosine_similarity,
    "dot": dot_similarity,
}
"""``--cons-sim`` choices: ``cos`` (default; bounded, does not saturate) or ``dot`` (the paper's raw form)."""


# -- the three losses -----------------------------------------------------------------------------------------
def l_cos(h: torch.Tensor) -> torch.Tensor:
    """Mean over images of ``1/(n(n-1)) sum_{i != j} cos(h_i, h_j)``: the ``token_cosine`` metric, differentiable.

    Args:
        h: ``(B, n, d)`` last-block patch tokens.
    """
    return token_cosine(h).mean()


def l_cons(e: torch.Tensor, h: torch.Tensor, sim: str = "cos", grad_first: bool = False) -> torch.Tensor:
    """Patch-wise contrastive loss, mean over patches and images.

    ``-1/n sum_i log( exp(s(e_i, h_i)) / (exp(s(e_i, h_i)) + exp(s(e_i, mean_j h_j))) )``.

    Args:
        e: ``(B, n, d)`` first-block patch tokens (the anchor). Detached unless ``grad_first``.
        h: ``(B, n, d)`` last-block patch tokens.
        sim: ``cos`` or ``dot`` (see :data:`SIMILARITIES`).
        grad_first: let gradient flow into ``e`` as well (the shallow layer is then also pulled).
    """
    if sim not in SIMILARITIES:
        raise ValueError(f"unknown similarity {sim!r}; choose from {', '.join(SIMILARITIES)}")
    fn = SIMILARITIES[sim]
    anchor = to_float(e if grad_first else e.detach())
    deep = to_float(h)
    positive = fn(anchor, deep)  # (B, n)
    negative = fn(anchor, deep.mean(dim=-2, keepdim=True).expand_as(deep))  # (B, n)
    return (torch.logaddexp(positive, negative) - positive).mean()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-sum_c y_c log softmax(z)_c`` over the last dimension, one value per row (no reduction)."""
    return -(targets * F.log_softmax(to_float(logits), dim=-1)).sum(dim=-1)


def l_token(token_logits: torch.Tensor, patch_targets: torch.Tensor) -> torch.Tensor:
    """Mean over images of ``1/n sum_i CE(logits_i, y_i)`` with soft per-patch targets.

    Args:
        token_logits: ``(B, n, C)`` classifier logits of every patch token (see :func:`token_head_logits`).
        patch_targets: ``(B, n, C)`` per-patch target distributions.
    """
    return soft_cross_entropy(token_logits, patch_targets).mean()


# -- per-token classifier -------------------------------------------------------------------------------------
TOKEN_HEAD_PATHS: dict[str, tuple[str, ...]] = {
    # timm VisionTransformer: forward_features ends with `norm`; forward_head pools, then `fc_norm`,
    # `head_drop`, `head`. All four act on the last dimension, so applying them per token (in this order)
    # is the model's own head without the pooling. One of norm / fc_norm is an Identity, depending on the pool.
    "vit": ("norm", "fc_norm", "head_drop", "head"),
}
"""Per adapter (:mod:`oversmooth_cli.capture`): attributes applied in order to every patch token; missing ones skip."""


def token_head_logits(model: nn.Module, tokens: torch.Tensor, adapter: str = "vit") -> torch.Tensor:
    """Classifier logits of every token through the model's own final norm and head.

    Args:
        model: the (unwrapped) timm model.
        tokens: ``(B, n, d)`` last-block outputs (before the final norm).
        adapter: key of :data:`TOKEN_HEAD_PATHS`.

    Returns:
        ``(B, n, num_classes)``.
    """
    path = TOKEN_HEAD_PATHS.get(adapter)
    if path is None:
        raise ValueError(f"no per-token head path for adapter {adapter!r}; add one to TOKEN_HEAD_PATHS")
    if not isinstance(getattr(model, path[-1], None), nn.Module):
        raise ValueError(f"{type(model).__name__} has no '{path[-1]}' classifier to score patch tokens with")
    x = tokens
    for name in path:
        module = getattr(model, name, None)
        if module is not None:
            x = module(x)
    return x


# -- targets and patch CutMix -----------------------------------------------------------------------------------
def smooth_one_hot(
    labels: torch.Tensor, num_classes: int, smoothing: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(B,)`` labels -> ``(B, C)`` targets ``(1 - s) * onehot + s / C`` (what ``F.cross_entropy`` smooths to)."""
    onehot = F.one_hot(labels, num_classes).to(dtype)
    return onehot * (1.0 - smoothing) + smoothing / num_classes


@dataclass(frozen=True)
class CutMixBox:
    """Pasted box in pixels, half-open: rows ``top:bottom``, columns ``left:right``."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def area(self) -> int:
        return max(0, self.bottom - self.top) * max(0, self.right - self.left)


def _snap(v: int, step: int, limit: int) -> int:
    return min(limit, max(0, round(v / step) * step))


def rand_box(
    height: int,
    width: int,
    lam: float,
    rng: random.Random,
    snap_to: tuple[int, int] | None = None,
) -> CutMixBox:
    """A CutMix box covering about ``1 - lam`` of the image (timm's ``rand_bbox``), optionally snapped to a grid.

    Args:
        height, width: image size in pixels.
        lam: kept fraction; the box side is ``sqrt(1 - lam)`` of the image side, clipped at the borders.
        rng: source of the box centre.
        snap_to: ``(patch_h, patch_w)``: round every edge to the patch grid, so each patch is wholly inside
            or wholly outside the box.
    """
    ratio = math.sqrt(max(0.0, 1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = max(0, cy - cut_h // 2), min(height, cy + cut_h // 2)
    left, right = max(0, cx - cut_w // 2), min(width, cx + cut_w // 2)
    if snap_to is not None:
        ph, pw = snap_to
        top, bottom = _snap(top, ph, height), _snap(bottom, ph, height)
        left, right = _snap(left, pw, width), _snap(right, pw, width)
    return CutMixBox(top, bottom, left, right)


def patch_area_fractions(box: CutMixBox, height: int, width: int, patch: tuple[int, int]) -> torch.Tensor:
    """Fraction of each patch's pixels inside ``box``, ``(n,)`` in timm's row-major patch order."""
    ph, pw = patch
    if height % ph or width % pw:
        raise ValueError(f"a {height}x{width} image does not tile into {ph}x{pw} patches")
    mask = torch.zeros(height, width)
    mask[box.top : box.bottom, box.left : box.right] = 1.0
    return mask.reshape(height // ph, ph, width // pw, pw).mean(dim=(1, 3)).reshape(-1)


def patch_cutmix(
    images: torch.Tensor,
    targets: torch.Tensor,
    patch: tuple[int, int],
    alpha: float,
    rng: random.Random,
    snap: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CutMixBox]:
    """Paste a box from the batch's mirror image (``flip(0)``, as timm pairs them) with per-patch soft targets.

    Each patch's target is ``(1 - a_p) y + a_p y'`` where ``a_p`` is the fraction of the patch's pixels inside
    the box; the image target is mixed by the pasted area ``A``: ``(1 - A) y + A y'``.

    Args:
        images: ``(B, C, H, W)``.
        targets: ``(B, K)`` soft image targets (label smoothing already applied).
        patch: ``(patch_h, patch_w)`` of the model's patch embedding.
        alpha: ``lam ~ Beta(alpha, alpha)``.
        rng: source of ``lam`` and the box.
        snap: snap the box to the patch grid (every patch target is then one of the two labels).

    Returns:
        ``(mixed images, image targets (B, K), patch targets (B, n, K), box)``.
    """
    _, _, height, width = images.shape
    lam = rng.betavariate(alpha, alpha)
    box = rand_box(height, width, lam, rng, patch if snap else None)
    rows, cols = slice(box.top, box.bottom), slice(box.left, box.right)
    mixed = images.clone()
    mixed[:, :, rows, cols] = images.flip(0)[:, :, rows, cols]
    other = targets.flip(0)
    a = patch_area_fractions(box, height, width, patch).to(targets.device, targets.dtype)  # (n,)
    patch_targets = (1.0 - a)[None, :, None] * targets[:, None, :] + a[None, :, None] * other[:, None, :]
    area = box.area / (height * width)
    return mixed, (1.0 - area) * targets + area * other, patch_targets, box


# -- registry -------------------------------------------------------------------------------------------------
@dataclass
class TermInputs:
    """What the loss terms read from one training forward pass."""

    h: torch.Tensor  # (B, n, d) last block patch tokens
    e: torch.Tensor  # (B, n, d) first block patch tokens
    token_logits: torch.Tensor | None = None  # (B, n, C)
    patch_targets: torch.Tensor | None = None  # (B, n, C)
    cons_sim: str = "cos"
    cons_grad_first: bool = False


@dataclass(frozen=True)
class LossTerm:
    """One ``--loss`` term: its function of :class:`TermInputs`, default weight and whether it needs token logits."""

    name: str
    fn: Callable[[TermInputs], torch.Tensor]
    default_weight: float
    needs_token_logits: bool
    definition: str


LOSS_TERMS: dict[str, LossTerm] = {
    "cos": LossTerm(
        "cos",
        lambda t: l_cos(t.h),
        0.5,
        False,
        "1/(n(n-1)) sum_{i!=j} cos(h_i, h_j), mean over images (the token_cosine metric)",
    ),
    "cons": LossTerm(
        "cons",
        lambda t: l_cons(t.e, t.h, t.cons_sim, t.cons_grad_first),
        0.5,
        False,
        "-1/n sum_i log(exp(s(e_i,h_i)) / (exp(s(e_i,h_i)) + exp(s(e_i, mean_j h_j)))), mean over images",
    ),
    "token": LossTerm(
        "token",
        lambda t: l_token(t.token_logits, t.patch_targets),
        1.0,
        True,
        "1/n sum_i CE(head(norm(h_i)), y_i) with soft per-patch targets, mean over images",
    ),
}
