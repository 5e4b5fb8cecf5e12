"""``measure``: stream images through a model and reduce every layer to over-smoothing statistics.

The command line is a thin wrapper over :func:`measure` and :func:`write_run`; both are importable::

    from oversmooth_cli import measure, write_run
    result = measure("examples/digits-vit", "examples/images")
    write_run(result, "runs/digits")

The path of the data: :func:`measure` finds and shards the images, loads the model and calls
:func:`measure_batches` (forward passes under an :class:`~oversmooth_cli.reading.capture.OversmoothingCapture` that
feeds an :class:`~oversmooth_cli.metrics.accumulate.OversmoothingAccumulator`), sums the statistics over processes,
and turns them into the per-layer and per-head tables plus :func:`build_summary`'s ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import runtime
from ..data import build_loader, find_images, sample_paths, shard_paths
from ..errors import UserError, first_line
from ..io import HEAD_COLUMNS
from ..metrics.accumulate import OversmoothingAccumulator
from ..metrics.registry import parse_metrics, split_metrics
from ..reading.capture import OversmoothingCapture
from ..reading.loading import LoadedModel, load_model
from ..reading.patch_maps import choose_images, merge_records
from ..reading.readers import UnsupportedModelError
from .config import LoadOptions, MeasureConfig, validate_measure_config
from .summary import (
    BatchesResult,
    MeasureResult,
    _require_values,
    build_summary,
    collect_patch_maps,
    describe_image_set,
    layer_table,
)

__all__ = ["measure", "measure_batches"]


_log = logging.getLogger(__name__)


ProgressFn = Callable[[int, int], None]
"""``progress(images_done, images_total)`` called after every batch."""


def _forward(model: torch.nn.Module, images: torch.Tensor) -> Any:
    """Run the trunk only: the metrics need no classifier head."""
    forward = getattr(model, "forward_features", None)
    return forward(images) if callable(forward) else model(images)


class _Forward:
    """The forward pass :func:`measure_batches` runs: eager, or ``torch.compile``'d with an eager fallback.

    Compilation happens at the first call; if it fails (no C++ compiler, an unsupported operator...), one warning
    line is logged and every batch, that one included, runs eagerly. The capture's hooks run either way.
    """

    def __init__(self, model: torch.nn.Module, compile: bool = False) -> None:
        self.model = model
        self.compiled: Callable[[torch.Tensor], Any] | None = None
        if compile:
            try:
                self.compiled = torch.compile(self.eager)
            except Exception as e:  # torch.compile unsupported on this platform / Python
                self._fall_back(e)

    def eager(self, images: torch.Tensor) -> Any:
        return _forward(self.model, images)

    def _fall_back(self, error: BaseException) -> None:
        self.compiled = None
        _log.warning(
            "torch.compile failed (%s: %s); measuring without compilation",
            type(error).__name__,
            first_line(error)[:200],
        )

    def __call__(self, images: torch.Tensor) -> Any:
        if self.compiled is None:
            return self.eager(images)
        try:
            return self.compiled(images)
        except Exception as e:  # a genuine model error raises again from the eager pass
            self._fall_back(e)
            return self.eager(images)


def measure_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]],
    device: torch.device,
    config: MeasureConfig | None = None,
    on_batch: Callable[[int, list[tuple[int, str]]], None] | None = None,
    *,
    inference: bool = True,
    samples: Mapping[int, int] | None = None,
) -> BatchesResult:
    """Reduce batches ``(images, indices, failures)`` to a filled accumulator (the core loop, no I/O).

    Args:
        model: eval-mode model already on ``device``.
        batches: iterable of ``(images or None, indices, [(index, error)])`` as the loader yields them.
        device: where the forward runs.
        config: what to measure and how; used here: ``metrics``, ``attention_tap``, ``include_prefix``, ``amp``
            (bf16 autocast on CUDA, metric arithmetic stays float32), ``channels_last`` (model and images in
            ``torch.channels_last`` memory format, restored after) and ``compile`` (``torch.compile`` the forward
            pass; eager with one warning line if that fails).
        on_batch: ``on_batch(n_images_in_batch, failures)`` after each batch.
        inference: run under ``torch.inference_mode`` (default) or ``torch.no_grad`` (the monitor, between training
            steps: a tensor a module caches during the pass must stay usable by autograd afterwards).
        samples: ``{batch index: image index}``: the images to draw per-patch maps of (``measure``'s
            :func:`~oversmooth_cli.reading.patch_maps.choose_images`), in the batches that hold them, from the same
            forward pass (:class:`~oversmooth_cli.reading.patch_maps.PatchMapper`); none without it or with
            ``config.maps == 0`` (the capture then does no map work at all).
    """
    config = config or MeasureConfig()
    channels_last = config.channels_last
    token_metrics, attention_metrics = split_metrics(config.metrics)
    acc = OversmoothingAccumulator()
    non_blocking = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    wanted = dict(samples or {}) if config.maps else {}
    capture = OversmoothingCapture(
        model,
        token_metrics,
        attention_metrics,
        config.attention_tap,
        include_prefix=config.include_prefix,
        patch_maps=bool(wanted),
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward = _Forward(model, config.compile)
    try:
        with capture as cap, torch.inference_mode() if inference else torch.no_grad():
            mapper = cap.patch_maps
            for images, indices, failures in batches:
                n = 0
                if images is not None:
                    rows = {row: wanted[i] for row, i in enumerate(indices) if i in wanted} if wanted else {}
                    if rows and mapper is not None:
                        mapper.begin(rows, images)
                    with runtime.autocast(device, config.amp):
                        forward(images.to(device, non_blocking=non_blocking, memory_format=memory_format))
                    acc.update(*cap.pop_batch())
                    if rows and mapper is not None:
                        mapper.end()
                    n = images.shape[0]
                if on_batch is not None:
                    on_batch(n, failures)
            return BatchesResult(
                acc,
                cap.layers,
                dict(cap.unavailable),
                cap.attention_tap,
                forward.compiled is not None,
                None if mapper is None else mapper.result(),
            )
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


@dataclass
class _Reader:
    """Per-batch bookkeeping of :func:`measure`: unreadable files (an error under ``fail_on_unreadable``) and
    progress."""

    paths: Sequence[Path]
    """This process's shard of the images."""
    total: int
    fail_on_unreadable: bool
    progress: ProgressFn | None
    skipped: list[dict[str, str]] = field(default_factory=list)
    done: int = 0
    digests: list[str] = field(default_factory=list)
    """SHA-256 of each image measured by this process, read while decoding it."""

    def strip_digests(self, loader: Iterable[tuple]) -> Iterator[tuple]:
        """The loader's batches without their image digests (kept in :attr:`digests`), as ``measure_batches`` takes
        them."""
        for images, indices, failures, digests in loader:
            self.digests.extend(digests)
            yield images, indices, failures

    def __call__(self, n: int, failures: list[tuple[int, str]]) -> None:
        for i, err in failures:
            if self.fail_on_unreadable:
                raise UserError(
                    f"cannot read image {self.paths[i]}: {err} (drop --fail-on-unreadable to skip unreadable files)"
                )
            self.skipped.append({"path": str(self.paths[i]), "reason": err})
        self.done += n + len(failures)
        if self.progress is not None and runtime.is_main():
            self.progress(min(self.done * runtime.world_size(), self.total), self.total)


def measure(
    model: str | LoadedModel,
    images: str | Path | Sequence[Path],
    config: MeasureConfig | None = None,
    *,
    load: LoadOptions | None = None,
    progress: ProgressFn | None = None,
    command: str | None = None,
) -> MeasureResult:
    """Measure layer-wise over-smoothing of a timm model on an image folder, one image, or a list file.

    Runs under ``torchrun`` too: each rank measures a disjoint shard and the statistics are summed.

    Args:
        model: a timm model name, a checkpoint file, a folder with ``config.json``, or a :class:`LoadedModel`.
        images: folder (recursive), single image, text file of paths, or a list of paths.
        config: what to measure and how (:class:`~oversmooth_cli.measuring.config.MeasureConfig`: metrics, device,
            batch size, workers, amp, the ``limit`` sample and its ``seed``, unreadable images, attention tap, and
            ``maps``: the per-patch maps of that many sample images, :attr:`MeasureResult.maps`).
        load: how ``model`` is built when it is not a :class:`LoadedModel`
            (:class:`~oversmooth_cli.measuring.config.LoadOptions`).
        progress: ``progress(done, total)`` after each batch (on rank 0 only).
        command: the command line to record in the summary.

    Returns:
        A :class:`MeasureResult` (its ``maps``: ``None`` with ``maps=0`` or when no map could be drawn; its summary's
        ``patch_maps`` says which); :func:`write_run` writes it to a folder.

    Example:
        >>> measure("examples/digits-vit", "examples/images", MeasureConfig(device="cpu", metrics="all"))
    """
    config = validate_measure_config(config or MeasureConfig())
    load = load or LoadOptions()
    device, batch_size, workers, amp = config.device, config.batch_size, config.workers, config.amp
    limit, seed, include_prefix = config.limit, config.seed, config.include_prefix
    channels_last, compile = config.channels_last, config.compile
    metrics = parse_metrics(config.metrics)
    dev = runtime.setup_device(device)
    all_paths = find_images(images) if isinstance(images, (str, Path)) else [Path(p) for p in images]
    paths = sample_paths(all_paths, limit, seed)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, **load.load_kwargs())
    net = loaded.model.to(dev).eval()
    rank, world = runtime.rank(), runtime.world_size()
    reader = _Reader(shard_paths(paths, rank, world), len(paths), config.fail_on_unreadable, progress)
    chosen = choose_images(len(paths), config.maps)
    samples = {g // world: g for g in chosen if g % world == rank}  # this shard's batch indices of the chosen
    loader = build_loader(
        reader.paths, loaded.data_config, batch_size, workers, pin_memory=dev.type == "cuda", digests=True
    )
    start = time.perf_counter()
    try:
        batches = measure_batches(
            net, reader.strip_digests(loader), dev, replace(config, metrics=metrics), reader, samples=samples
        )
    except UnsupportedModelError as e:
        raise UserError(str(e)) from e
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    batches.accumulator.all_reduce()
    skipped = [s for part in runtime.all_gather_objects(reader.skipped) for s in part]
    records = merge_records(runtime.all_gather_objects(batches.maps)) if config.maps else None
    seconds = time.perf_counter() - start
    _require_values(batches, skipped, len(paths))
    layer_df = layer_table(batches)
    head_df = pd.DataFrame(list(batches.accumulator.head_rows()), columns=HEAD_COLUMNS)
    n_images = batches.accumulator.n_images
    source = f"{len(images)} paths" if isinstance(images, (list, tuple)) else str(images)
    image_set = describe_image_set([d for part in runtime.all_gather_objects(reader.digests) for d in part])
    counts = {"source": source, "found": len(all_paths), "selected": len(paths), "measured": n_images}
    image_info = {**counts, "skipped": len(skipped), "skipped_files": skipped, "limit": limit, "seed": seed}
    run_info = {
        "device": str(dev),
        "dtype": "bfloat16" if amp and dev.type == "cuda" else "float32",
        "metric_dtype": "float32 (accumulated in float64)",
        "amp": bool(amp and dev.type == "cuda"),
        "batch_size": batch_size,
        "workers": workers,
        "attention_tap": batches.attention_tap,
        "channels_last": channels_last,
        "compile": compile,
        "compiled": batches.compiled,
        "include_prefix": include_prefix,
        "world_size": runtime.world_size(),
        "seconds": round(seconds, 4),
        "images_per_second": round(n_images / seconds, 3) if seconds > 0 else None,
    }
    summary = build_summary(
        loaded, batches, layer_df, metrics, image_info, run_info, include_prefix, command, image_set=image_set
    )
    maps, summary["patch_maps"] = collect_patch_maps(records, paths, chosen, loaded.data_config, config.maps)
    return MeasureResult(layer_df, head_df, summary, batches.accumulator, maps)
