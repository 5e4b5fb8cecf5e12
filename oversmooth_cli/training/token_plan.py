"""Which token layers the losses read, and how ``l_token`` reaches the model's own head."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, first_line
from ..reading.capture import block_tokens
from ..reading.geometry import area_pool, infer_grid
from ..reading.readers import UnsupportedModelError
from ..reading.registry import FamilyAdapter, model_family, resolve_adapter
from ..reading.token_heads import TokenHead, token_head_for

__all__ = ["TokenPlan", "plan_tokens", "token_head_logits"]


# -- per-token classifier -------------------------------------------------------------------------------------
def _module(model: nn.Module, entry: str | Callable[[nn.Module, str], str], block: str) -> nn.Module | None:
    path = entry(model, block) if callable(entry) else entry
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _forward_head(model: nn.Module) -> Callable[..., Any]:
    """The model's ``forward_head`` (pooling and classifier of timm models)."""
    return cast("Callable[..., Any]", model.forward_head)


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
    one token (see :mod:`oversmooth_cli.reading.token_heads`), or the entry's ``classifier`` modules score it.

    Args:
        model: the (unwrapped) timm model.
        tokens: ``(B, n, d)`` last token layer's tokens (before the final norm), row-major over ``grid``.
        head: the family's entry (default: :data:`~oversmooth_cli.reading.token_heads.TOKEN_HEADS` of the model's
            adapter).
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
            layer = _module(model, entry, block)
            if layer is not None:
                x = layer(x)
    elif head.head_input == "map":
        nhwc = str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC"
        x = _forward_head(model)(x[:, None, None, :] if nhwc else x[:, :, None, None])
    else:  # enough copies that class-token, prefix-skipping average and distillation pools all see the token
        copies = max(2, 1 + int(getattr(model, "num_prefix_tokens", 0) or 0))
        x = _forward_head(model)(x[:, None, :].expand(-1, copies, -1))
    if isinstance(x, (tuple, list)):  # distillation heads in distilled training: the average, as at inference
        x = sum(x) / len(x)
    return x.reshape(b, n, -1)


# -- what the terms read from a model --------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenPlan:
    """What the loss terms read from one model, found by one probe forward pass at the training input size.

    ``h`` is the last token layer's patch tokens, ``e`` the first token layer's (prefix tokens excluded; a token layer
    is a block whose output has token metrics, as in ``measure``). When their grids differ (hierarchical models),
    ``l_cons`` compares ``h`` with ``e`` area-pooled onto ``h``'s grid
    (:func:`~oversmooth_cli.reading.geometry.area_pool`), so both sides describe the same image region, and ``e`` is
    zero-padded to ``h``'s width when it is narrower (an isometry: the cosines among ``e``'s tokens are unchanged).
    Patch CutMix snaps to ``h``'s grid.

    Attributes:
        family: timm family of the model (the module of its class).
        adapter: name of its adapter.
        first, last: module names of the first and the last token block.
        e_shape, h_shape: ``(tokens, width)`` per image of ``e`` and ``h``.
        e_grid, h_grid: ``(rows, cols)`` behind those counts, shaped like the image.
        image: ``(height, width)`` of the input in pixels.
        head: the family's :class:`~oversmooth_cli.reading.token_heads.TokenHead` (``None``: not registered).
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
                plan = dataclasses.replace(plan, head_error=first_line(err))
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
