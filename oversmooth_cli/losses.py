"""Patch-diversification losses of Gong et al. 2021 ("Vision Transformers with Patch Diversification").

Every loss takes patch tokens ``(B, n, d)`` (prefix tokens already removed) and returns a scalar that
autograd can differentiate. ``h`` is the last token layer's patch tokens, ``e`` the first token layer's (a token layer
is a block whose output has token metrics in ``measure``; both are read by the same extraction):

* :func:`l_cos`: mean pairwise cosine of ``h``. It *is* the ``token_cosine`` metric
  (:func:`oversmooth_cli.metrics.token_cosine`), averaged over images: one implementation for both.
* :func:`l_cons`: patch-wise contrastive loss pulling each deep token ``h_i`` toward the shallow token ``e_i``
  of the same image region and away from the image's mean deep token. When the grids differ (hierarchical models)
  ``e`` is area-pooled onto ``h``'s grid and zero-padded to its width (:class:`TokenPlan`).
* :func:`l_token`: every position of ``h`` goes through the model's own tail (final norm...) and classifier
  (:func:`token_head_logits`, per family: :mod:`oversmooth_cli.token_heads`) and is scored against a soft per-token
  target (:func:`patch_cutmix`, snapped to ``h``'s grid).

:data:`LOSS_TERMS` registers the three terms by the names ``--loss`` accepts. :class:`PatchDiversificationLoss`
adds the chosen terms to any training loop: it reads the tokens from the model's normal forward pass; given the input
size it probes the model once (:func:`plan_tokens`) and refuses a term the family cannot run, in one line.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from .adapters import FamilyAdapter, model_family, resolve_adapter
from .capture import block_tokens
from .errors import UserError
from .finetune_config import FinetuneConfig
from .geometry import area_pool, infer_grid
from .metrics import EPS, to_float, token_cosine
from .taps import UnsupportedModelError
from .token_heads import TokenHead, token_head_for

__all__ = [
    "LOSS_TERMS",
    "SIMILARITIES",
    "CutMixBox",
    "LossTerm",
    "PatchDiversificationLoss",
    "TermInputs",
    "TokenPlan",
    "cosine_similarity",
    "dot_similarity",
    "l_cons",
    "l_cos",
    "l_token",
    "patch_area_fractions",
    "patch_cutmix",
    "plan_tokens",
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
def _module(model: nn.Module, entry: str | Callable[[nn.Module, str], str], block: str) -> nn.Module | None:
    path = entry(model, block) if callable(entry) else entry
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _to_layout(tokens: torch.Tensor, layout: str, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, n, C)`` row-major tokens as a ``nhwc`` / ``nchw`` map (``nlc``: unchanged)."""
    if layout == "nlc":
        return tokens
    x = tokens.unflatten(1, grid)
    return x if layout == "nhwc" else x.permute(0, 3, 1, 2)


def _from_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nlc":
        return x
    return x.flatten(1, 2) if layout == "nhwc" else x.flatten(2).transpose(1, 2)


def token_head_logits(
    model: nn.Module,
    tokens: torch.Tensor,
    head: TokenHead | None = None,
    grid: tuple[int, int] | None = None,
    block: str = "",
) -> torch.Tensor:
    """Classifier logits of every token through the model's own tail (final norm...) and head, without pooling.

    The tail runs on the whole token map; then ``forward_head`` scores each position fed as a map of copies of that
    one token (see :mod:`oversmooth_cli.token_heads`), or the entry's ``classifier`` modules score it.

    Args:
        model: the (unwrapped) timm model.
        tokens: ``(B, n, d)`` last token layer's tokens (before the final norm), row-major over ``grid``.
        head: the family's entry (default: :data:`~oversmooth_cli.token_heads.TOKEN_HEADS` of the model's adapter).
        grid: ``(rows, cols)`` of the tokens (needed by ``nhwc`` / ``nchw`` tails; default: the square-most grid).
        block: name of the last token block (for entries that name a module of its stage).

    Returns:
        ``(B, n, num_classes)``.
    """
    if head is None:
        adapter = resolve_adapter(model)
        last = [s for s in adapter.block_specs(model) if s.group.tokens][-1]
        head, block = token_head_for(adapter, last), last.name
        if head is None:
            raise ValueError(f"no TOKEN_HEADS entry for adapter {adapter.name!r}")
    b, n, _ = tokens.shape
    x = tokens
    tail = [m for m in (_module(model, e, block) for e in head.tail) if m is not None]
    if tail:
        grid = grid or infer_grid(n, (1, 1))
        x = _to_layout(x, head.tail_layout, grid)
        for module in tail:
            x = module(x)
        x = _from_layout(x, head.tail_layout)
        if x.shape[1] != n:
            raise UnsupportedModelError(f"the tail of {type(model).__name__} changes {n} tokens into {x.shape[1]}")
    x = x.reshape(b * n, x.shape[-1])
    if head.classifier:
        for entry in head.classifier:
            module = _module(model, entry, block)
            if module is not None:
                x = module(x)
    elif head.head_input == "map":
        nhwc = str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC"
        x = model.forward_head(x[:, None, None, :] if nhwc else x[:, :, None, None])
    else:  # enough copies that class-token, prefix-skipping average and distillation pools all see the token
        copies = max(2, 1 + int(getattr(model, "num_prefix_tokens", 0) or 0))
        x = model.forward_head(x[:, None, :].expand(-1, copies, -1))
    if isinstance(x, (tuple, list)):  # distillation heads in distilled training: the average, as at inference
        x = sum(x) / len(x)
    return x.reshape(b, n, -1)


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


def _snap(v: int, step: float, limit: int) -> int:
    return min(limit, max(0, round(round(v / step) * step)))


def rand_box(
    height: int,
    width: int,
    lam: float,
    rng: random.Random,
    snap_to: tuple[float, float] | None = None,
) -> CutMixBox:
    """A CutMix box covering about ``1 - lam`` of the image (timm's ``rand_bbox``), optionally snapped to a grid.

    Args:
        height, width: image size in pixels.
        lam: kept fraction; the box side is ``sqrt(1 - lam)`` of the image side, clipped at the borders.
        rng: source of the box centre.
        snap_to: ``(cell_h, cell_w)`` in pixels: round every edge to the nearest cell boundary (then to a whole
            pixel), so each cell is wholly inside or wholly outside the box when the cells are whole pixels.
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


def _grid_of(height: int, width: int, patch: tuple[int, int] | None, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        return int(grid[0]), int(grid[1])
    if patch is None:
        raise ValueError("give the token grid (rows, cols) or the patch size (patch_h, patch_w)")
    ph, pw = patch
    if height % ph or width % pw:
        raise ValueError(f"a {height}x{width} image does not tile into {ph}x{pw} patches")
    return height // ph, width // pw


def patch_area_fractions(
    box: CutMixBox,
    height: int,
    width: int,
    patch: tuple[int, int] | None = None,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Fraction of each token cell's area inside ``box``, ``(rows * cols,)`` row-major.

    Args:
        box: the pasted box.
        height, width: image size in pixels.
        patch: ``(patch_h, patch_w)``: cells of this size, which must tile the image.
        grid: ``(rows, cols)`` of tokens covering the image evenly (cells need not be whole pixels); wins over
            ``patch``.
    """
    grid = _grid_of(height, width, patch, grid)
    mask = torch.zeros(1, height * width, 1, dtype=torch.float64)
    mask.view(height, width)[box.top : box.bottom, box.left : box.right] = 1.0
    return area_pool(mask, (height, width), grid).reshape(-1).float()


def patch_cutmix(
    images: torch.Tensor,
    targets: torch.Tensor,
    patch: tuple[int, int] | None,
    alpha: float,
    rng: random.Random,
    snap: bool = True,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CutMixBox]:
    """Paste a box from the batch's mirror image (``flip(0)``, as timm pairs them) with per-token soft targets.

    Each token's target is ``(1 - a_p) y + a_p y'`` where ``a_p`` is the fraction of its cell's area inside the
    box; the image target is mixed by the pasted area ``A``: ``(1 - A) y + A y'``.

    Args:
        images: ``(B, C, H, W)``.
        targets: ``(B, K)`` soft image targets (label smoothing already applied).
        patch: ``(patch_h, patch_w)`` of the model's patch embedding (the token cells), or ``None`` with ``grid``.
        alpha: ``lam ~ Beta(alpha, alpha)``.
        rng: source of ``lam`` and the box.
        snap: snap the box to the cell grid (every token target is then one of the two labels when the cells are
            whole pixels).
        grid: ``(rows, cols)`` of the tokens the loss reads (the last token layer's grid: the coarsest one of a
            hierarchical model); wins over ``patch``.

    Returns:
        ``(mixed images, image targets (B, K), token targets (B, rows * cols, K), box)``.
    """
    _, _, height, width = images.shape
    rows, cols = _grid_of(height, width, patch, grid)
    lam = rng.betavariate(alpha, alpha)
    box = rand_box(height, width, lam, rng, (height / rows, width / cols) if snap else None)
    sl_rows, sl_cols = slice(box.top, box.bottom), slice(box.left, box.right)
    mixed = images.clone()
    mixed[:, :, sl_rows, sl_cols] = images.flip(0)[:, :, sl_rows, sl_cols]
    other = targets.flip(0)
    a = patch_area_fractions(box, height, width, grid=(rows, cols)).to(targets.device, targets.dtype)  # (n,)
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


# -- what the terms read from a model --------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenPlan:
    """What the loss terms read from one model, found by one probe forward pass at the training input size.

    ``h`` is the last token layer's patch tokens, ``e`` the first token layer's (prefix tokens excluded; a token layer
    is a block whose output has token metrics, as in ``measure``). When their grids differ (hierarchical models),
    ``l_cons`` compares ``h`` with ``e`` area-pooled onto ``h``'s grid (:func:`~oversmooth_cli.geometry.area_pool`),
    so both sides describe the same image region, and ``e`` is zero-padded to ``h``'s width when it is narrower (an
    isometry: the cosines among ``e``'s tokens are unchanged). Patch CutMix snaps to ``h``'s grid.

    Attributes:
        family: timm family of the model (the module of its class).
        adapter: name of its adapter.
        first, last: module names of the first and the last token block.
        e_shape, h_shape: ``(tokens, width)`` per image of ``e`` and ``h``.
        e_grid, h_grid: ``(rows, cols)`` behind those counts, shaped like the image.
        image: ``(height, width)`` of the input in pixels.
        head: the family's :class:`~oversmooth_cli.token_heads.TokenHead` (``None``: not registered).
        head_error: why the per-token head could not score the probe's tokens ("" when it could).
    """

    family: str
    adapter: str
    first: str
    last: str
    e_shape: tuple[int, int]
    h_shape: tuple[int, int]
    e_grid: tuple[int, int]
    h_grid: tuple[int, int]
    image: tuple[int, int]
    head: TokenHead | None = None
    head_error: str = ""

    @property
    def pools_first(self) -> bool:
        """``e`` is area-pooled onto ``h``'s grid."""
        return self.e_grid != self.h_grid

    @property
    def pad_first(self) -> int:
        """Channels of zeros appended to ``e`` (``h`` is wider)."""
        return max(0, self.h_shape[1] - self.e_shape[1])

    def refusal(self, term: str) -> str | None:
        """Why ``term`` cannot fine-tune this model (``None``: it can)."""
        n = self.h_shape[0]
        where = f"at {self.image[0]}x{self.image[1]} px"
        if term in ("cos", "cons") and n < 2:
            return f"its last token layer ({self.last}) has {n} patch token {where}; l_{term} compares two or more"
        if term == "cons":
            if self.e_shape[1] > self.h_shape[1]:
                return (
                    f"the first token layer ({self.first}, width {self.e_shape[1]}) is wider than the last "
                    f"({self.last}, width {self.h_shape[1]}); l_cons would have to drop channels of e"
                )
            if self.pools_first:
                reason = (
                    self.head.not_grid
                    if self.head is not None
                    else (f"no TOKEN_HEADS entry says adapter {self.adapter}'s tokens are a row-major grid")
                )
                if reason:
                    return f"{reason}, so e cannot be pooled onto the {self.h_grid[0]}x{self.h_grid[1]} grid of h"
        if term == "token":
            if self.head is None:
                return f"no per-token classifier is registered for adapter {self.adapter} (TOKEN_HEADS)"
            if "token" in self.head.refuse:
                return self.head.refuse["token"]
            if self.head_error:
                return f"its classifier cannot score single tokens: {self.head_error}"
        return None

    def check(self, terms: Sequence[str], model_name: str = "") -> None:
        """Raise one :class:`UserError` line naming the family, the first term it cannot run, and why."""
        for term in terms:
            reason = self.refusal(term)
            if reason is not None:
                what = f"{self.family} models ({model_name})" if model_name else f"{self.family} models"
                raise UserError(f"--loss {term} cannot fine-tune {what}: {reason}")

    def align_first(self, e: torch.Tensor) -> torch.Tensor:
        """``e`` on ``h``'s grid and width: area-pooled, then zero-padded (both no-ops when they already agree)."""
        if self.pools_first:
            e = area_pool(e, self.e_grid, self.h_grid)
        return F.pad(e, (0, self.pad_first)) if self.pad_first else e

    def describe(self) -> dict[str, Any]:
        """The definitions, for ``config.json``."""
        (ne, de), (nh, dh) = self.e_shape, self.h_shape
        e = f"patch tokens output by {self.first} (first token layer): {ne} = {self.e_grid[0]}x{self.e_grid[1]}, "
        e += f"width {de}"
        if self.pools_first:
            e += f"; area-pooled onto the {self.h_grid[0]}x{self.h_grid[1]} grid of h for l_cons"
        if self.pad_first:
            e += f"; zero-padded from {de} to {dh} channels for l_cons"
        head = self.head
        if head is None:
            token = "not available: no per-token classifier registered"
        else:
            tail = ", ".join(t if isinstance(t, str) else t(nn.Module(), self.last) for t in head.tail) or "none"
            scorer = (
                "modules " + ", ".join(c if isinstance(c, str) else c(nn.Module(), self.last) for c in head.classifier)
                if head.classifier
                else f"forward_head on every position ({'1x1 map' if head.head_input == 'map' else 'copies of it'})"
            )
            token = f"tail {tail} ({head.tail_layout}) on the token map, then {scorer}"
            token += f"; leaves out {head.skipped}" if head.skipped else ""
        cell = (self.image[0] / self.h_grid[0], self.image[1] / self.h_grid[1])
        return {
            "family": self.family,
            "h": f"patch tokens output by {self.last} (last token layer): {nh} = {self.h_grid[0]}x{self.h_grid[1]}, "
            f"width {dh}",
            "e": e,
            "l_token": token,
            "cutmix_grid": list(self.h_grid),
            "cutmix_cell_px": [round(c, 4) for c in cell],
        }


def _grid(n: int, image: tuple[int, int]) -> tuple[int, int]:
    return infer_grid(n, image) if n > 0 else (0, 0)


def plan_tokens(
    model: nn.Module, adapter: FamilyAdapter | None = None, input_size: Sequence[int] = (3, 224, 224)
) -> TokenPlan:
    """Probe the model once (eval mode, no gradient, zeros of ``input_size``) for what the loss terms read.

    The per-token head is tried on the probe's last-layer tokens, so a head that cannot score single tokens is
    found before any training (:attr:`TokenPlan.head_error`).
    """
    adapter = adapter or resolve_adapter(model)
    param = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0))
    channels, height, width = (int(v) for v in input_size)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), block_tokens(model, adapter, (0, -1)) as tokens:
            logits = model(torch.zeros(1, channels, height, width, device=param.device, dtype=param.dtype))
        e, h = tokens[0], tokens[-1]
        plan = _plan(model, adapter, e, h, (height, width))
        if plan.head is not None and "token" not in plan.head.refuse and h.shape[1] > 0:
            try:
                with torch.no_grad():
                    scored = token_head_logits(model, h, plan.head, plan.h_grid, plan.last)
                classes = logits.shape[-1] if isinstance(logits, torch.Tensor) else None
                if scored.shape[:2] != h.shape[:2] or scored.shape[-1] != classes:
                    raise UnsupportedModelError(f"it gives {tuple(scored.shape)} scores, expected {classes} per token")
            except Exception as err:  # any failure of the model's own modules is a refusal, said in one line
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                plan = dataclasses.replace(plan, head_error=message)
    finally:
        model.train(training)
    return plan


def _plan(
    model: nn.Module, adapter: FamilyAdapter, e: torch.Tensor, h: torch.Tensor, image: tuple[int, int]
) -> TokenPlan:
    """The plan of tokens ``e`` and ``h`` read from an ``image``-sized input (``(0, 0)``: size unknown)."""
    specs = [s for s in adapter.block_specs(model) if s.group.tokens]
    shape_of = max(image[0], 1), max(image[1], 1)
    return TokenPlan(
        model_family(model),
        adapter.name,
        specs[0].name,
        specs[-1].name,
        (e.shape[1], e.shape[2]),
        (h.shape[1], h.shape[2]),
        _grid(e.shape[1], shape_of),
        _grid(h.shape[1], shape_of),
        image,
        token_head_for(adapter, specs[-1]),
    )


def _observed_plan(model: nn.Module, adapter: FamilyAdapter, e: torch.Tensor, h: torch.Tensor) -> TokenPlan:
    """A plan from the tokens of a running forward pass (no probe, input size unknown: square-most grids)."""
    return _plan(model, adapter, e, h, (0, 0))


# -- the terms of one forward pass ------------------------------------------------------------------------------
class PatchDiversificationLoss(nn.Module):
    """The weighted patch-diversification terms of a model's own forward pass, ``sum_t w_t * l_t``.

    The first and the last token layer's patch tokens (``e`` and ``h``, see :class:`TokenPlan`) are read while the
    forward pass that is wrapped runs (:func:`~oversmooth_cli.capture.block_tokens`, the token path of ``measure``),
    so no second forward is needed; ``l_token`` runs ``h`` through the model's own tail and head inside that pass
    (and its autocast), and every term is then computed in float32 or wider outside autocast. Example::

        criterion = PatchDiversificationLoss(model, ("cos", "cons"), {"cos": 0.5, "cons": 0.5}, input_size=(3, 32, 32))
        logits, diversity, terms = criterion(lambda: model(images))
        (F.cross_entropy(logits, labels) + diversity).backward()

    Args:
        model: the (unwrapped) timm model whose blocks are read; its forward may run through a wrapper (DDP).
        terms: names from :data:`LOSS_TERMS` (empty: no term, the weighted sum is 0).
        weights: weight per term (default: :class:`~oversmooth_cli.finetune_config.FinetuneConfig`'s).
        cons_sim: similarity of ``l_cons`` (:data:`SIMILARITIES`).
        cons_grad_first: let ``l_cons`` pass gradient into the first block's tokens too.
        adapter: the model's family adapter (default: resolved from the model).
        input_size: ``(channels, height, width)`` of the training images: the model is probed once
            (:func:`plan_tokens`) and a term it cannot run is refused here, before any training; without it the
            plan is made from the first forward pass (square-most grids) and a refusal comes then.

    Raises:
        UserError: a term this model cannot run: one line naming the family, the term and why.
    """

    def __init__(
        self,
        model: nn.Module,
        terms: Sequence[str] = tuple(LOSS_TERMS),
        weights: Mapping[str, float] | None = None,
        cons_sim: str = "cos",
        cons_grad_first: bool = False,
        adapter: FamilyAdapter | None = None,
        input_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        unknown = [t for t in terms if t not in LOSS_TERMS]
        if unknown or cons_sim not in SIMILARITIES:
            raise ValueError(f"unknown terms {unknown} or similarity {cons_sim!r}; see LOSS_TERMS and SIMILARITIES")
        self.adapter = adapter or resolve_adapter(model)
        self.__dict__["model"] = model  # read, not owned: not a submodule, so the loss holds no parameters
        self.terms = tuple(terms)
        self.weights = {t: float((weights or FinetuneConfig().weights)[t]) for t in self.terms}
        self.cons_sim, self.cons_grad_first = cons_sim, cons_grad_first
        self.plan: TokenPlan | None = None
        if input_size is not None:
            self.plan = plan_tokens(model, self.adapter, input_size)
            self.plan.check(self.terms, type(model).__name__)

    def forward(
        self, forward_fn: Callable[[], torch.Tensor], patch_targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Run ``forward_fn`` (e.g. ``lambda: model(x)``) and score the tokens it produced.

        Args:
            forward_fn: the model's normal forward pass, returning its output.
            patch_targets: ``(B, n, C)`` per-token target distributions over ``h``'s grid (needed by ``token``).

        Returns:
            ``(forward_fn's output, weighted sum of the terms, {term: unweighted value})``.
        """
        with block_tokens(self.model, self.adapter, (0, -1) if self.terms else ()) as tokens:
            output = forward_fn()
            if not self.terms:
                return output, torch.zeros((), device=output.device), {}
            h = tokens[-1]
            if self.plan is None:
                self.plan = _observed_plan(self.model, self.adapter, tokens[0], h)
                self.plan.check(self.terms, type(self.model).__name__)
            plan = self.plan
            token_logits = (
                token_head_logits(self.model, h, plan.head, plan.h_grid, plan.last) if "token" in self.terms else None
            )
        e = plan.align_first(tokens[0]) if "cons" in self.terms else tokens[0]
        inputs = TermInputs(h, e, token_logits, patch_targets, self.cons_sim, self.cons_grad_first)
        with torch.autocast(h.device.type, enabled=False):
            values = {name: LOSS_TERMS[name].fn(inputs) for name in self.terms}
        return output, sum(self.weights[n] * values[n] for n in self.terms), values
