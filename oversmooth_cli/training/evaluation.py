"""Evaluation of a classifier on labelled images: the one loop that both the trainer's validation and the
``--control`` side-by-side run.

:func:`evaluate_batches` runs the model (eval mode, no gradient) over a loader and scores every batch;
:func:`validation_metrics` sums loss, top-1, top-5 and last-layer token cosine over the batches and the ranks (the
trainer's ``val_*`` columns); :func:`correct_per_image` says which images the model classifies right, in order (the
paired images of McNemar's test).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .. import runtime
from ..metrics.formulas import token_cosine
from ..reading.capture import block_tokens
from ..reading.registry import FamilyAdapter

__all__ = ["BatchScore", "correct_per_image", "evaluate_batches", "validation_metrics"]


BatchScore = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``score(logits, labels, tokens)`` of one batch: float32 ``(B, C)`` logits, ``(B,)`` labels on the model's device,
and the last token layer's ``(B, n, d)`` patch tokens (``None`` when no adapter was given)."""


@torch.inference_mode()
def evaluate_batches(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device,
    score: BatchScore,
    *,
    amp: bool = False,
    adapter: FamilyAdapter | None = None,
) -> list[torch.Tensor]:
    """``score`` of each batch of ``loader``, in order, with ``model`` in eval mode on ``device``.

    Args:
        model: the classifier, already on ``device``.
        loader: ``(images, labels)`` batches.
        device: where the model runs.
        score: what to keep of each batch (:data:`BatchScore`).
        amp: bf16 autocast on CUDA (:func:`~oversmooth_cli.runtime.autocast`).
        adapter: the model's family adapter, to read the last token layer's tokens (``None``: no tokens).
    """
    model.eval()
    reading: contextlib.AbstractContextManager[dict[int, torch.Tensor]] = (
        block_tokens(model, adapter, (-1,)) if adapter is not None else contextlib.nullcontext({})
    )
    scores = []
    with reading as outs:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with runtime.autocast(device, amp):
                logits = model(x).float()
            scores.append(score(logits, y, outs[-1] if adapter is not None else None))
    return scores


@torch.inference_mode()
def validation_metrics(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device,
    adapter: FamilyAdapter,
    *,
    num_classes: int,
    amp: bool = False,
) -> dict[str, float]:
    """Validation loss, top-1/top-5 (percent; top-5 is NaN under 5 classes) and last-layer token cosine, averaged
    over the images of every rank: ``{"val_loss", "val_top1", "val_top5", "val_token_cosine"}``."""
    k = min(5, num_classes)

    def batch_sums(logits: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        assert tokens is not None
        hits = logits.topk(k, dim=-1).indices == y[:, None]
        return torch.tensor(
            [
                y.shape[0],
                nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                hits[:, 0].sum().item(),
                hits.any(dim=-1).sum().item(),
                token_cosine(tokens).sum().item(),
            ],
            dtype=torch.float64,
        )

    sums = torch.zeros(5, dtype=torch.float64)  # images, loss, top1, top5, token cosine
    for batch in evaluate_batches(model, loader, device, batch_sums, amp=amp, adapter=adapter):
        sums += batch
    n, loss, top1, top5, cos = runtime.all_reduce(sums).tolist()
    return {
        "val_loss": loss / n,
        "val_top1": 100.0 * top1 / n,
        "val_top5": 100.0 * top5 / n if num_classes >= 5 else math.nan,
        "val_token_cosine": cos / n,
    }


def correct_per_image(model: nn.Module, loader: Iterable[Any], device: torch.device) -> torch.Tensor:
    """Whether ``model``'s arg-max class is each image's label, in the loader's order (a bool tensor on the CPU)."""
    hits = evaluate_batches(model, loader, device, lambda logits, y, _tokens: (logits.argmax(dim=-1) == y).cpu())
    return torch.cat(hits)
