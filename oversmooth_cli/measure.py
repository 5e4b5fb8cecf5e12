"""``measure``: stream images through a model and reduce every layer to over-smoothing statistics.

The command line is a thin wrapper over :func:`measure` and :func:`write_run`; both are importable::

    from oversmooth_cli import measure, write_run
    result = measure("examples/digits-vit", "examples/images")
    write_run(result, "runs/digits")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import timm
import torch

from . import __version__
from . import distributed as D
from .capture import LayerInfo, OversmoothingCapture, UnsupportedModelError, model_family
from .data import build_loader, find_images, sample_paths, shard_paths
from .errors import UserError
from .metrics import ATTENTION_METRICS, METRICS_VERSION, TOKEN_METRICS, OversmoothingAccumulator
from .models import LoadedModel, load_model
from .report import HEAD_COLUMNS, LAYER_COLUMNS, plot_curves, save_figure, staged_dir, write_json

__all__ = ["DEFAULT_METRICS", "MeasureResult", "measure", "measure_batches", "resolve_device", "write_run"]

DEFAULT_METRICS = ("token_cosine", "attention_std")

ProgressFn = Callable[[int, int], None]
"""``progress(images_done, images_total)`` called after every batch."""


@dataclass
class MeasureResult:
    """Per-layer and per-head tables plus the run summary (what ``summary.json`` holds)."""

    layers: pd.DataFrame
    heads: pd.DataFrame
    summary: dict[str, Any]
    accumulator: OversmoothingAccumulator = field(repr=False)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; refuses what is absent."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for Apple MPS, which is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def _split_metrics(metrics: Sequence[str]) -> tuple[list[str], list[str]]:
    unknown = [m for m in metrics if m not in TOKEN_METRICS and m not in ATTENTION_METRICS]
    if unknown:
        known = ", ".join([*TOKEN_METRICS, *ATTENTION_METRICS])
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; known: {known}")
    return [m for m in metrics if m in TOKEN_METRICS], [m for m in metrics if m in ATTENTION_METRICS]


def _forward(model: torch.nn.Module, images: torch.Tensor) -> Any:
    """Run the trunk only: the metrics need no classifier head."""
    forward = getattr(model, "forward_features", None)
    return forward(images) if callable(forward) else model(images)


def measure_batches(
    model: torch.nn.Module,
    batches,
    device: torch.device,
    amp: bool = False,
    metrics: Sequence[str] = DEFAULT_METRICS,
    attention_tap: str = "qk",
    on_batch: Callable[[int, list[tuple[int, str]]], None] | None = None,
) -> tuple[OversmoothingAccumulator, list[LayerInfo]]:
    """Reduce batches ``(images, indices, failures)`` to a filled accumulator (the core loop, no I/O).

    Args:
        model: eval-mode model already on ``device``.
        batches: iterable of ``(images or None, indices, [(index, error)])`` as the loader yields them.
        device: where the forward runs.
        amp: bf16 autocast on CUDA (metric arithmetic stays float32).
        metrics: names of token and attention metrics.
        attention_tap: ``qk`` or ``softmax`` (see :mod:`oversmooth_cli.capture`).
        on_batch: ``on_batch(n_images_in_batch, failures)`` after each batch.
    """
    token_metrics, attention_metrics = _split_metrics(metrics)
    acc = OversmoothingAccumulator()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()
    )
    non_blocking = device.type == "cuda"
    with OversmoothingCapture(model, token_metrics, attention_metrics, attention_tap) as cap, torch.inference_mode():
        for images, _indices, failures in batches:
            n = 0
            if images is not None:
                with autocast:
                    _forward(model, images.to(device, non_blocking=non_blocking))
                acc.update(*cap.pop_batch())
                n = images.shape[0]
            if on_batch is not None:
                on_batch(n, failures)
        return acc, cap.layers


def measure(
    model: str | LoadedModel,
    images: str | Path | Sequence[Path],
    *,
    arch: str | None = None,
    pretrained: bool = False,
    model_args: dict[str, Any] | None = None,
    strict_load: bool = True,
    trust_checkpoint: bool = False,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    amp: bool = False,
    limit: int | None = None,
    seed: int = 0,
    strict: bool = False,
    metrics: Sequence[str] = DEFAULT_METRICS,
    attention_tap: str = "qk",
    progress: ProgressFn | None = None,
    command: str | None = None,
) -> MeasureResult:
    """Measure layer-wise over-smoothing of a timm model on an image folder, one image, or a list file.

    Runs under ``torchrun`` too: each rank measures a disjoint shard and the statistics are summed.

    Args:
        model: a timm model name, a checkpoint file, a folder with ``config.json``, or a :class:`LoadedModel`.
        images: folder (recursive), single image, text file of paths, or a list of paths.
        arch, pretrained, model_args, strict_load, trust_checkpoint: see :func:`~oversmooth_cli.models.load_model`.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        batch_size: images per forward pass.
        workers: DataLoader worker processes.
        amp: bf16 autocast on CUDA.
        limit: measure a random sample of this many images (reproducible with ``seed``).
        seed: seed of the sample.
        strict: an unreadable image is an error instead of being skipped and listed.
        metrics: metric names (default: ``token_cosine``, ``attention_std``).
        attention_tap: ``qk`` (fused attention kept) or ``softmax`` (unfused, probabilities read directly).
        progress: ``progress(done, total)`` after each batch (on rank 0 only).
        command: the command line to record in the summary.

    Returns:
        A :class:`MeasureResult`; :func:`write_run` writes it to a folder.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    distributed = D.init_from_env(dev)
    if distributed and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    all_paths = list(images) if isinstance(images, (list, tuple)) else find_images(images)
    paths = sample_paths(all_paths, limit, seed)
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, arch, pretrained, model_args, strict=strict_load, trust_checkpoint=trust_checkpoint)
    )
    net = loaded.model.to(dev).eval()
    my_paths = shard_paths(paths, D.rank(), D.world_size())
    loader = build_loader(my_paths, loaded.data_config, batch_size, workers, pin_memory=dev.type == "cuda")

    skipped: list[dict[str, str]] = []
    done = [0]

    def on_batch(n: int, failures: list[tuple[int, str]]) -> None:
        for i, err in failures:
            if strict:
                raise UserError(f"cannot read image {my_paths[i]}: {err} (drop --strict to skip unreadable files)")
            skipped.append({"path": str(my_paths[i]), "reason": err})
        done[0] += n + len(failures)
        if progress is not None and D.is_main():
            progress(min(done[0] * D.world_size(), len(paths)), len(paths))

    start = time.perf_counter()
    try:
        acc, layers = measure_batches(net, loader, dev, amp, metrics, attention_tap, on_batch)
    except UnsupportedModelError as e:
        raise UserError(str(e)) from e
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    acc.all_reduce()
    skipped = [s for part in D.all_gather_objects(skipped) for s in part]
    seconds = time.perf_counter() - start
    n_images = acc.n_images
    if n_images == 0:
        raise UserError(f"none of the {len(paths)} images could be read (first error: {skipped[0]['reason']})")

    layer_df = pd.DataFrame(list(acc.layer_rows()), columns=LAYER_COLUMNS)
    head_df = pd.DataFrame(list(acc.head_rows()), columns=HEAD_COLUMNS)
    summary = {
        "tool": "oversmooth",
        "version": __version__,
        "metrics_version": METRICS_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        "model": {**loaded.describe(), "family": model_family(net)},
        "data_config": loaded.data_config,
        "images": {
            "source": str(images) if not isinstance(images, (list, tuple)) else f"{len(images)} paths",
            "found": len(all_paths),
            "selected": len(paths),
            "measured": n_images,
            "skipped": len(skipped),
            "skipped_files": skipped,
            "limit": limit,
            "seed": seed,
        },
        "run": {
            "device": str(dev),
            "dtype": "bfloat16" if amp and dev.type == "cuda" else "float32",
            "metric_dtype": "float32 (accumulated in float64)",
            "amp": bool(amp and dev.type == "cuda"),
            "batch_size": batch_size,
            "workers": workers,
            "attention_tap": attention_tap,
            "world_size": D.world_size(),
            "seconds": round(seconds, 4),
            "images_per_second": round(n_images / seconds, 3) if seconds > 0 else None,
        },
        "metrics": {
            name: {
                "definition": (TOKEN_METRICS.get(name) or ATTENTION_METRICS[name]).definition,
                "tokens": "patch tokens (prefix tokens excluded)",
                "layers": "0..L" if name in TOKEN_METRICS else "1..L",
            }
            for name in metrics
        },
        "layers": {
            m: layer_df[layer_df["metric"] == m].sort_values("layer")["mean"].tolist()
            for m in layer_df["metric"].unique()
        },
        "n_layers": len(layers) - 1,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    return MeasureResult(layer_df, head_df, summary, acc)


def write_run(result: MeasureResult, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``layers.csv``, ``heads.csv``, ``summary.json`` and ``curves.png`` into ``out`` atomically."""
    out = Path(out)
    with staged_dir(out, overwrite) as stage:
        result.layers.to_csv(stage / "layers.csv", index=False)
        result.heads.to_csv(stage / "heads.csv", index=False)
        write_json(stage / "summary.json", result.summary)
        title = f"{result.summary['model']['name']} · {result.summary['images']['measured']} images"
        save_figure(plot_curves(result.layers, title), stage / "curves.png")
    return out
