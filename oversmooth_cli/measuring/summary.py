"""What a measure run reports: the layer table, ``summary.json`` and the run folder.

The files' schema, and what :func:`~oversmooth_cli.gate.runs.load_run` refuses, is in
:mod:`oversmooth_cli.gate.schema` (and ``docs/run-files.md``); the image set is known by content
(:func:`describe_image_set`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import timm
import torch

from .. import __version__
from ..errors import UserError
from ..io import LAYER_COLUMNS, staged_dir, write_json
from ..metrics.accumulate import OversmoothingAccumulator
from ..metrics.intervals import INTERVAL
from ..metrics.registry import (
    METRICS_VERSION,
    describe_metric,
    metric_order,
)
from ..plots import plot_curves, plot_head_heatmap, save_figure
from ..reading.capture import LayerInfo
from ..reading.loading import LoadedModel
from ..reading.registry import model_family

__all__ = ["BatchesResult", "MeasureResult", "build_summary", "describe_image_set", "run_definitions", "write_run"]


@dataclass
class MeasureResult:
    """Per-layer and per-head tables plus the run summary (what ``summary.json`` holds)."""

    layers: pd.DataFrame
    heads: pd.DataFrame
    summary: dict[str, Any]
    accumulator: OversmoothingAccumulator = field(repr=False)


@dataclass
class BatchesResult:
    """What :func:`measure_batches` returns: the filled accumulator and what the capture found out.

    Attributes:
        accumulator: the statistics of this process's images (not yet summed over processes).
        layers: one :class:`~oversmooth_cli.reading.capture.LayerInfo` per measured layer, layer 0 first.
        unavailable: ``{metric: reason}`` for selected metrics the model cannot give.
        attention_tap: the tap ``auto`` resolved to.
        compiled: the ``torch.compile``'d forward was used to the end.
    """

    accumulator: OversmoothingAccumulator
    layers: list[LayerInfo]
    unavailable: dict[str, str]
    attention_tap: str
    compiled: bool


def _require_values(batches: BatchesResult, skipped: list[dict[str, str]], n_selected: int) -> None:
    """Refuse a run that measured nothing: every image unreadable, or no selected metric applies to the model."""
    if batches.accumulator.n_images > 0:
        return
    if skipped:
        raise UserError(f"none of the {n_selected} images could be read (first error: {skipped[0]['reason']})")
    reasons = "; ".join(f"{name}: {why}" for name, why in batches.unavailable.items()) or "no layer gave a value"
    raise UserError(f"no selected metric applies to this model ({reasons}); choose others with --metrics")


def layer_table(batches: BatchesResult) -> pd.DataFrame:
    """The ``layers.csv`` rows (:data:`~oversmooth_cli.io.LAYER_COLUMNS`), with each layer's stage and tokens."""
    df = pd.DataFrame(list(batches.accumulator.layer_rows()), columns=LAYER_COLUMNS)
    info = {layer.index: layer for layer in batches.layers}
    df["stage"] = [info[i].stage for i in df["layer"]]
    df["n_tokens"] = pd.array([info[i].n_tokens for i in df["layer"]], dtype="Int64")
    return df


def build_summary(
    loaded: LoadedModel,
    batches: BatchesResult,
    layer_df: pd.DataFrame,
    metrics: Sequence[str],
    images: dict[str, Any],
    run: dict[str, Any],
    include_prefix: bool = False,
    command: str | None = None,
    *,
    image_set: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``summary.json`` holds: provenance, model, image counts, run settings, metric definitions, curves, and
    ``interval``: how ``ci95_low`` / ``ci95_high`` were computed (:data:`~oversmooth_cli.metrics.intervals.INTERVAL`).

    Its ``definitions`` block gathers everything that changes what a number means (:func:`run_definitions`);
    ``check``, ``compare`` and ``measure --baseline`` compare it and refuse runs whose definitions differ.

    Args:
        loaded: the measured model.
        batches: what :func:`measure_batches` returned (statistics already summed over processes).
        layer_df: :func:`layer_table` of ``batches``.
        metrics: the selected metrics (measured or not).
        images: the ``images`` section (source, counts, skipped files, sample settings).
        run: the ``run`` section (device, dtypes, batch settings, timing).
        include_prefix: ``--include-prefix`` was given.
        command: the command line (default: ``sys.argv``).
        image_set: :func:`describe_image_set` of the measured images (left out of ``definitions`` when ``None``).
    """
    measured = set(layer_df["metric"])
    return {
        "tool": "oversmooth",
        "version": __version__,
        "metrics_version": METRICS_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        "model": {**loaded.describe(), "family": model_family(loaded.model)},
        "data_config": loaded.data_config,
        "images": images,
        "run": run,
        "metrics": {
            name: {
                **describe_metric(name, include_prefix),
                "measured": name in measured,
                **({"unavailable": batches.unavailable[name]} if name in batches.unavailable else {}),
            }
            for name in metrics
        },
        "layers": {
            m: layer_df[layer_df["metric"] == m].sort_values("layer")["mean"].tolist()
            for m in layer_df["metric"].unique()
        },
        "n_layers": len(batches.layers) - 1,
        "layer_info": [
            {
                "layer": layer.index,
                "name": layer.name,
                "stage": layer.stage,
                "n_tokens": layer.n_tokens,
                "token_metrics": layer.has_tokens,
                "attention_metrics": layer.has_attention,
            }
            for layer in batches.layers
        ],
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "interval": INTERVAL,
        "definitions": run_definitions(loaded, batches, layer_df, include_prefix, image_set),
    }


def run_definitions(
    loaded: LoadedModel,
    batches: BatchesResult,
    layer_df: pd.DataFrame,
    include_prefix: bool = False,
    image_set: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``summary.json``'s ``definitions``: what two runs must share for their numbers to mean the same thing.

    ``metrics_version``, ``include_prefix``, each measured metric's definition (``definition``, ``tokens``,
    ``prefix_included``, ``layers`` of :func:`~oversmooth_cli.metrics.registry.describe_metric`), the model input size
    (``input_size`` of the data config), the patch tokens per layer (``n_tokens``, layer 0 first) and the image set
    (:func:`describe_image_set`). ``attention_tap`` is recorded too but never compared: the taps agree to 1e-5.
    """
    described = {m: describe_metric(m, include_prefix) for m in metric_order(layer_df["metric"].unique())}
    size = loaded.data_config.get("input_size")
    out = {
        "metrics_version": METRICS_VERSION,
        "include_prefix": include_prefix,
        "metrics": {
            m: {k: d[k] for k in ("definition", "tokens", "prefix_included", "layers")} for m, d in described.items()
        },
        "input_size": [int(x) for x in size] if size is not None else None,
        "n_tokens": [layer.n_tokens for layer in batches.layers],
        "attention_tap": batches.attention_tap,
    }
    if image_set is not None:
        out["images"] = image_set
    return out


IMAGE_DIGEST_CHARS = 16
"""Hex digits of each image's SHA-256 kept in ``definitions.images.digests`` (64 bits: enough to count how many images
two sets do not share; the set's identity, ``sha256``, uses the full digests)."""


def describe_image_set(digests: Sequence[str]) -> dict[str, Any]:
    """The measured images, known by content: ``count``, ``sha256`` (what ``check`` compares), ``by`` and ``digests``.

    ``digests`` are the SHA-256 hex digests of the measured images' files, as read while decoding them
    (:func:`~oversmooth_cli.data.read_rgb`; :func:`~oversmooth_cli.data.file_digest` for a file). The set's
    ``sha256`` is the SHA-256 of those digests, sorted and joined by newlines: the same bytes under other names, in
    other folders or through a list file give the same set, in any order; one changed byte in one image gives another.
    An image measured twice (named twice in a list file) counts twice. ``by`` is ``"content"`` (a summary without it
    hashed relative paths: oversmooth 0.1); ``digests`` keeps the first :data:`IMAGE_DIGEST_CHARS` hex digits of each
    image's digest, sorted, so a refusal can say how many images differ.
    """
    ordered = sorted(str(d).lower() for d in digests)
    identity = hashlib.sha256("\n".join(ordered).encode("ascii")).hexdigest()
    return {
        "count": len(ordered),
        "sha256": identity,
        "by": "content",
        "digests": [d[:IMAGE_DIGEST_CHARS] for d in ordered],
    }


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
