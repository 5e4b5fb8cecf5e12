"""Patch-diversification losses of Gong et al. 2021 ("Vision Transformers with Patch Diversification").

Every loss takes patch tokens ``(B, n, d)`` (prefix tokens already removed) and returns a scalar that
autograd can differentiate. ``h`` is the last token layer's patch tokens, ``e`` the first token layer's (a token layer
is a block whose output has token metrics in ``measure``; both are read by the same extraction):

* :func:`l_cos`: mean pairwise cosine of ``h``. It *is* the ``token_cosine`` metric
  (:func:`oversmooth_cli.metrics.formulas.token_cosine`), averaged over images: one implementation for both.
* :func:`l_cons`: patch-wise contrastive loss pulling each deep token ``h_i`` toward the shallow token ``e_i``
  of the same image region and away from the image's mean deep token. When the grids differ (hierarchical models)
  ``e`` is area-pooled onto ``h``'s grid and zero-padded to its width (:class:`TokenPlan`).
* :func:`l_token`: every position of ``h`` goes through the model's own tail (final norm...) and classifier
  (:func:`token_head_logits`, per family: :mod:`oversmooth_cli.reading.token_heads`) and is scored against a soft
  per-token target (:func:`patch_cutmix`, snapped to ``h``'s grid).

:data:`LOSS_TERMS` registers the three terms by the names ``--loss`` accepts. :class:`PatchDiversificationLoss`
adds the chosen terms to any training loop: it reads the tokens from the model's normal forward pass; given the input
size it probes the model once (:func:`plan_tokens`) and refuses a term the family cannot run, in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from ..metrics.formulas import EPS, to_float, token_cosine
from ..reading.capture import block_tokens
from ..reading.registry import FamilyAdapter, resolve_adapter
from .config import FinetuneConfig
from .token_plan import TokenPlan, _observed_plan, plan_tokens, token_head_logits

__all__ = [
    "LOSS_TERMS",
    "SIMILARITIES",
    "LossTerm",
    "PatchDiversificationLoss",
    "TermInputs",
    "cosine_similarity",
    "dot_similarity",
    "l_cons",
    "l_cos",
    "l_token",
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


def _needed(value: torch.Tensor | None, name: str) -> torch.Tensor:
    """``value``, which the ``token`` term cannot do without."""
    if value is None:
        raise ValueError(f"the token term needs {name} (per-token logits and per-patch targets of every image)")
    return value


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
        lambda t: l_token(_needed(t.token_logits, "token_logits"), _needed(t.patch_targets, "patch_targets")),
        "1/n sum_i CE(head(norm(h_i)), y_i) with soft per-patch targets, mean over images",
    ),
}


# -- the terms of one forward pass ------------------------------------------------------------------------------
class PatchDiversificationLoss(nn.Module):
    """The weighted patch-diversification terms of a model's own forward pass, ``sum_t w_t * l_t``.

    The first and the last token layer's patch tokens (``e`` and ``h``, see :class:`TokenPlan`) are read while the
    forward pass that is wrapped runs (:func:`~oversmooth_cli.reading.capture.block_tokens`, the token path of
    ``measure``), so no second forward is needed; ``l_token`` runs ``h`` through the model's own tail and head inside
    that pass (and its autocast), and every term is then computed in float32 or wider outside autocast. Example::

        criterion = PatchDiversificationLoss(model, ("cos", "cons"), {"cos": 0.5, "cons": 0.5}, input_size=(3, 32, 32))
        logits, diversity, terms = criterion(lambda: model(images))
        (F.cross_entropy(logits, labels) + diversity).backward()

    Args:
        model: the (unwrapped) timm model whose blocks are read; its forward may run through a wrapper (DDP).
        terms: names from :data:`LOSS_TERMS` (empty: no term, the weighted sum is 0).
        weights: weight per term (default: :class:`~oversmooth_cli.training.config.FinetuneConfig`'s).
        cons_sim: similarity of ``l_cons`` (:data:`SIMILARITIES`).
        cons_grad_first: let ``l_cons`` pass gradient into the first block's tokens too.
        adapter: the model's family adapter (default: resolved from the model).
        input_size: ``(channels, height, width)`` of the training images: the model is probed once
            (:func:`plan_tokens`) and a term it cannot run is refused here, before any training; without it the
            plan is made from the first forward pass (square-most grids) and a refusal comes then.

    Raises:
        UserError: a term this model cannot run: one line naming the family, the term and why.
    """

    model: nn.Module  # read, not owned (set in __init__ outside the submodules)

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
        total = sum(self.weights[n] * values[n] for n in self.terms)  # a tensor: there is at least one term
        return output, cast(torch.Tensor, total), values
