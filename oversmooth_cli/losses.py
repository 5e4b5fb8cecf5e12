"""Patch-diversification losses of Gong et al. 2021 ("Vision Transformers with Patch Diversification").

Every loss takes patch tokens ``(B, n, d)`` (prefix tokens already removed) and returns a scalar that
autograd can differentiate:

* :func:`l_cos`: mean pairwise cosine of the last block's patch tokens. It *is* the ``token_cosine`` metric
  (:func:`oversmooth_cli.metrics.token_cosine`), averaged over images: one implementation for both.
* :func:`l_cons`: patch-wise contrastive loss pulling each deep token ``h_i`` toward the shallow token ``e_i``
  of the same patch and away from the image's mean deep token.
* :func:`l_token`: every patch token goes through the model's own final norm and classifier head
  (:func:`token_head_logits`) and is scored against a soft per-patch target (:func:`patch_cutmix`).

:data:`LOSS_TERMS` registers the three terms by the names ``--loss`` accepts. :class:`PatchDiversificationLoss`
adds the chosen terms to any training loop: it reads the tokens from the model's normal forward pass.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from .adapters import FamilyAdapter, resolve_adapter
from .capture import block_tokens
from .errors import UserError
from .finetune_config import FinetuneConfig
from .metrics import EPS, to_float, token_cosine

__all__ = [
    "LOSS_TERMS",
    "SIMILARITIES",
    "TOKEN_HEAD_PATHS",
    "CutMixBox",
    "LossTerm",
    "PatchDiversificationLoss",
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


_soft_cross_entropy = SoftTargetCrossEntropy()  # -sum_c y_c log softmax(z)_c over the last dim, mean over the rest


def l_token(token_logits: torch.Tensor, patch_targets: torch.Tensor) -> torch.Tensor:
    """Mean over images of ``1/n sum_i CE(logits_i, y_i)`` with soft per-patch targets.

    Args:
        token_logits: ``(B, n, C)`` classifier logits of every patch token (see :func:`token_head_logits`).
        patch_targets: ``(B, n, C)`` per-patch target distributions.
    """
    return _soft_cross_entropy(to_float(token_logits), patch_targets)


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
    """One ``--loss`` term: its function of :class:`TermInputs` and its formula (for the reader)."""

    name: str
    fn: Callable[[TermInputs], torch.Tensor]
    definition: str


LOSS_TERMS: dict[str, LossTerm] = {
    "cos": LossTerm(
        "cos",
        lambda t: l_cos(t.h),
        "1/(n(n-1)) sum_{i!=j} cos(h_i, h_j), mean over images (the token_cosine metric)",
    ),
    "cons": LossTerm(
        "cons",
        lambda t: l_cons(t.e, t.h, t.cons_sim, t.cons_grad_first),
        "-1/n sum_i log(exp(s(e_i,h_i)) / (exp(s(e_i,h_i)) + exp(s(e_i, mean_j h_j)))), mean over images",
    ),
    "token": LossTerm(
        "token",
        lambda t: l_token(t.token_logits, t.patch_targets),
        "1/n sum_i CE(head(norm(h_i)), y_i) with soft per-patch targets, mean over images",
    ),
}


# -- the terms of one forward pass ------------------------------------------------------------------------------
class PatchDiversificationLoss(nn.Module):
    """The weighted patch-diversification terms of a model's own forward pass, ``sum_t w_t * l_t``.

    The first and the last block's patch tokens are read while the forward pass that is wrapped runs
    (:func:`~oversmooth_cli.capture.block_tokens`, the token path of ``measure``), so no second forward is needed;
    ``l_token`` runs the last block's tokens through the model's own final norm and head inside that pass (and its
    autocast), and every term is then computed in float32 or wider outside autocast. Example::

        criterion = PatchDiversificationLoss(model, ("cos", "cons"), {"cos": 0.5, "cons": 0.5})
        logits, diversity, terms = criterion(lambda: model(images))
        (F.cross_entropy(logits, labels) + diversity).backward()

    Args:
        model: the (unwrapped) timm model whose blocks are read; its forward may run through a wrapper (DDP).
        terms: names from :data:`LOSS_TERMS` (empty: no term, the weighted sum is 0).
        weights: weight per term (default: :class:`~oversmooth_cli.finetune_config.FinetuneConfig`'s).
        cons_sim: similarity of ``l_cons`` (:data:`SIMILARITIES`).
        cons_grad_first: let ``l_cons`` pass gradient into the first block's tokens too.
        adapter: the model's family adapter (default: resolved from the model).
    """

    def __init__(
        self,
        model: nn.Module,
        terms: Sequence[str] = tuple(LOSS_TERMS),
        weights: Mapping[str, float] | None = None,
        cons_sim: str = "cos",
        cons_grad_first: bool = False,
        adapter: FamilyAdapter | None = None,
    ) -> None:
        super().__init__()
        unknown = [t for t in terms if t not in LOSS_TERMS]
        if unknown or cons_sim not in SIMILARITIES:
            raise ValueError(f"unknown terms {unknown} or similarity {cons_sim!r}; see LOSS_TERMS and SIMILARITIES")
        self.adapter = adapter or resolve_adapter(model)
        if "token" in terms and self.adapter.name not in TOKEN_HEAD_PATHS:
            raise UserError(
                f"--loss token has no per-token head for {self.adapter.name} models (supported: "
                f"{', '.join(TOKEN_HEAD_PATHS)}); use --loss cos,cons"
            )
        self.__dict__["model"] = model  # read, not owned: not a submodule, so the loss holds no parameters
        self.terms = tuple(terms)
        self.weights = {t: float((weights or FinetuneConfig().weights)[t]) for t in self.terms}
        self.cons_sim, self.cons_grad_first = cons_sim, cons_grad_first

    def forward(
        self, forward_fn: Callable[[], torch.Tensor], patch_targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Run ``forward_fn`` (e.g. ``lambda: model(x)``) and score the tokens it produced.

        Args:
            forward_fn: the model's normal forward pass, returning its output.
            patch_targets: ``(B, n, C)`` per-patch target distributions (needed by ``token``).

        Returns:
            ``(forward_fn's output, weighted sum of the terms, {term: unweighted value})``.
        """
        with block_tokens(self.model, self.adapter, (0, -1) if self.terms else ()) as tokens:
            output = forward_fn()
            h = tokens.get(-1)
            token_logits = token_head_logits(self.model, h, self.adapter.name) if "token" in self.terms else None
        if not self.terms:
            return output, torch.zeros((), device=output.device), {}
        if "cons" in self.terms and tokens[0].shape != h.shape:
            raise UserError(
                f"--loss cons needs first- and last-block tokens of one shape; this model gives "
                f"{tuple(tokens[0].shape)} and {tuple(h.shape)}; use --loss cos,token"
            )
        inputs = TermInputs(h, tokens[0], token_logits, patch_targets, self.cons_sim, self.cons_grad_first)
        with torch.autocast(h.device.type, enabled=False):
            values = {name: LOSS_TERMS[name].fn(inputs) for name in self.terms}
        return output, sum(self.weights[n] * values[n] for n in self.terms), values
