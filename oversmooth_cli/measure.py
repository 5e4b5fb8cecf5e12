"""``measure``: stream images through a model and reduce every layer to over-smoothing statistics.

The command line is a thin wrapper over :func:`measure` and :func:`write_run`; both are importable::

    from oversmooth_cli import measure, write_run
    result = measure("examples/digits-vit", "examples/images")
    write_run(result, "runs/digits")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
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
from .metrics import (
    ALL_METRICS,
    ATTENTION_METRICS,
    DEFAULT_METRICS,
    METRIC_PRESETS,
    METRICS_VERSION,
    TOKEN_METRICS,
    OversmoothingAccumulator,
    describe_metric,
)
from .models import LoadedModel, load_model
from .report import (
    HEAD_COLUMNS,
    LAYER_COLUMNS,
    metric_order,
    plot_curves,
    plot_head_heatmap,
    save_figure,
    staged_dir,
    write_json,
)

__all__ = [
    "DEFAULT_METRICS",
    "MeasureResult",
    "measure",
    "measure_batches",
    "parse_metrics",
    "resolve_device",
    "write_run",
]

_log = logging.getLogger(__name__)

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


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """Metric names from ``--metrics``: comma-separated names and presets (``default``, ``cheap``, ``all``).

    Args:
        spec: e.g. ``"default,effective_rank"``, ``"all"`` or ``["token_cosine", "layer_cka"]``.

    Returns:
        The selected metrics once each, in registry order (token metrics first).

    Raises:
        UserError: an empty selection or an unknown name.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    names = [word.strip() for item in items for word in str(item).split(",") if word.strip()]
    if not names:
        raise UserError(f"--metrics selects nothing; give metric names or one of {', '.join(METRIC_PRESETS)}")
    unknown = [n for n in names if n not in ALL_METRICS and n not in METRIC_PRESETS]
    if unknown:
        raise UserError(
            f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(ALL_METRICS)}, or {', '.join(METRIC_PRESETS)}"
        )
    chosen = {m for n in names for m in METRIC_PRESETS.get(n, (n,))}
    return [m for m in ALL_METRICS if m in chosen]


def _split_metrics(metrics: str | Sequence[str]) -> tuple[list[str], list[str]]:
    names = parse_metrics(metrics)
    return [m for m in names if m in TOKEN_METRICS], [m for m in names if m in ATTENTION_METRICS]


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
        first = (str(error).strip().splitlines() or [""])[0][:200]
        _log.warning("torch.compile failed (%s: %s); measuring without compilation", type(error).__name__, first)

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
    batches,
    device: torch.device,
    amp: bool = False,
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    attention_tap: str = "auto",
    on_batch: Callable[[int, list[tuple[int, str]]], None] | None = None,
    include_prefix: bool = False,
    unavailable: dict[str, str] | None = None,
    *,
    channels_last: bool = False,
    compile: bool = False,
    run_info: dict[str, Any] | None = None,
) -> tuple[OversmoothingAccumulator, list[LayerInfo]]:
    """Reduce batches ``(images, indices, failures)`` to a filled accumulator (the core loop, no I/O).

    Args:
        model: eval-mode model already on ``device``.
        batches: iterable of ``(images or None, indices, [(index, error)])`` as the loader yields them.
        device: where the forward runs.
        amp: bf16 autocast on CUDA (metric arithmetic stays float32).
        metrics: names of token and attention metrics, or presets (see :func:`parse_metrics`).
        attention_tap: ``auto``, ``qk``, ``inline`` or ``softmax`` (see :mod:`oversmooth_cli.adapters`).
        on_batch: ``on_batch(n_images_in_batch, failures)`` after each batch.
        include_prefix: token metrics measure prefix tokens too (``--include-prefix``).
        unavailable: filled with ``{metric: reason}`` for selected metrics the model cannot give.
        channels_last: run the model and the images in ``torch.channels_last`` memory format (restored after).
        compile: ``torch.compile`` the forward pass; falls back to eager with one warning line if that fails.
        run_info: filled with ``{"compiled": bool, "attention_tap": str}`` (whether the compiled forward was used to
            the end; the tap ``auto`` resolved to).
    """
    token_metrics, attention_metrics = _split_metrics(metrics)
    acc = OversmoothingAccumulator()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()
    )
    non_blocking = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    capture = OversmoothingCapture(
        model, token_metrics, attention_metrics, attention_tap, include_prefix=include_prefix
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward = _Forward(model, compile)
    try:
        with capture as cap, torch.inference_mode():
            for images, _indices, failures in batches:
                n = 0
                if images is not None:
                    with autocast:
                        forward(images.to(device, non_blocking=non_blocking, memory_format=memory_format))
                    acc.update(*cap.pop_batch())
                    n = images.shape[0]
                if on_batch is not None:
                    on_batch(n, failures)
            if unavailable is not None:
                unavailable.update(cap.unavailable)
            if run_info is not None:
                run_info["compiled"] = forward.compiled is not None
                run_info["attention_tap"] = cap.attention_tap
            return acc, cap.layers
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


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
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    include_prefix: bool = False,
    attention_tap: str = "auto",
    progress: ProgressFn | None = None,
    command: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
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
        metrics: metric names or presets, e.g. ``"all"`` or ``["default", "effective_rank"]`` (default:
            ``token_cosine``, ``attention_std``; see :func:`parse_metrics`).
        include_prefix: token metrics measure the prefix tokens (class, distillation, registers) too.
        attention_tap: ``auto`` (``inline`` on CPU, ``qk`` on GPUs), ``qk`` (fused attention kept, statistics from
            q and k), ``inline`` (attention computed once by the capture) or ``softmax`` (the model's unfused path).
        progress: ``progress(done, total)`` after each batch (on rank 0 only).
        command: the command line to record in the summary.
        channels_last: run in ``torch.channels_last`` memory format (can help convolutional stems on GPUs).
        compile: ``torch.compile`` the forward pass (slow first batch); falls back to eager with a warning.

    Returns:
        A :class:`MeasureResult`; :func:`write_run` writes it to a folder.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    metrics = parse_metrics(metrics)
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

    unavailable: dict[str, str] = {}
    run_info: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        acc, layers = measure_batches(
            net,
            loader,
            dev,
            amp,
            metrics,
            attention_tap,
            on_batch,
            include_prefix,
            unavailable=unavailable,
            channels_last=channels_last,
            compile=compile,
            run_info=run_info,
        )
    except UnsupportedModelError as e:
        raise UserError(str(e)) from e
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    acc.all_reduce()
    skipped = [s for part in D.all_gather_objects(skipped) for s in part]
    seconds = time.perf_counter() - start
    n_images = acc.n_images
    if n_images == 0 and skipped:
        raise UserError(f"none of the {len(paths)} images could be read (first error: {skipped[0]['reason']})")
    if n_images == 0:
        reasons = "; ".join(f"{name}: {why}" for name, why in unavailable.items()) or "no layer gave a value"
        raise UserError(f"no selected metric applies to this model ({reasons}); choose others with --metrics")

    layer_df = pd.DataFrame(list(acc.layer_rows()), columns=LAYER_COLUMNS)
    info = {layer.index: layer for layer in layers}
    layer_df["stage"] = [info[i].stage for i in layer_df["layer"]]
    layer_df["n_tokens"] = pd.array([info[i].n_tokens for i in layer_df["layer"]], dtype="Int64")
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
            "attention_tap": run_info.get("attention_tap", attention_tap),
            "channels_last": channels_last,
            "compile": compile,
            "compiled": run_info.get("compiled", False),
            "include_prefix": include_prefix,
            "world_size": D.world_size(),
            "seconds": round(seconds, 4),
            "images_per_second": round(n_images / seconds, 3) if seconds > 0 else None,
        },
        "metrics": {
            name: {
                **describe_metric(name, include_prefix),
                "measured": name in set(layer_df["metric"]),
                **({"unavailable": unavailable[name]} if name in unavailable else {}),
            }
            for name in metrics
        },
        "layers": {
            m: layer_df[layer_df["metric"] == m].sort_values("layer")["mean"].tolist()
            for m in layer_df["metric"].unique()
        },
        "n_layers": len(layers) - 1,
        "layer_info": [
            {
                "layer": layer.index,
                "name": layer.name,
                "stage": layer.stage,
                "n_tokens": layer.n_tokens,
                "token_metrics": layer.has_tokens,
                "attention_metrics": layer.has_attention,
            }
            for layer in layers
        ],
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    return MeasureResult(layer_df, head_df, summary, acc)


def write_run(result: MeasureResult, out: str | Path, overwrite: bool = False, per_head: bool = False) -> Path:
    """Write ``layers.csv``, ``heads.csv``, ``summary.json`` and ``curves.png`` into ``out`` atomically.

    With ``per_head``, also ``heads_<metric>.png``: a heads x layers heatmap for each attention metric measured.
    """
    out = Path(out)
    with staged_dir(out, overwrite) as stage:
        result.layers.to_csv(stage / "layers.csv", index=False)
        result.heads.to_csv(stage / "heads.csv", index=False)
        write_json(stage / "summary.json", result.summary)
        title = f"{result.summary['model']['name']} · {result.summary['images']['measured']} images"
        save_figure(plot_curves(result.layers, title), stage / "curves.png")
        for metric in metric_order(result.heads["metric"].unique()) if per_head else ():
            save_figure(plot_head_heatmap(result.heads, metric, title), stage / f"heads_{metric}.png")
    return out
