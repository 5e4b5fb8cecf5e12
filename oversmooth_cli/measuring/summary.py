"""What a measure run reports: the layer table, ``summary.json``, the per-patch maps and the run folder.

The files' schema, and what :func:`~oversmooth_cli.gate.runs.load_run` refuses, is in
:mod:`oversmooth_cli.gate.schema` (and ``docs/run-files.md``); the image set is known by content
(:func:`describe_image_set`); the per-patch maps of the sample images (:class:`PatchMaps`, made by
:mod:`oversmooth_cli.reading.patch_maps`) go to ``patches.csv``, ``patches.npz`` and ``patches.png``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
from ..pages.document import write_page
from ..pages.measure import measure_page
from ..plots import plot_curves, plot_head_heatmap, plot_patch_maps, save_figure
from ..reading.capture import LayerInfo
from ..reading.loading import LoadedModel
from ..reading.patch_maps import MAP_KINDS, PATCH_COLUMNS, PatchMapRecords, display_image
from ..reading.registry import model_family

__all__ = [
    "PATCH_FILES",
    "BatchesResult",
    "MeasureResult",
    "PatchMaps",
    "build_summary",
    "collect_patch_maps",
    "describe_image_set",
    "run_definitions",
    "write_patch_maps",
    "write_run",
]


PATCH_FILES = ("patches.csv", "patches.npz", "patches.png")
"""The files of the per-patch maps, written when a run has maps."""


@dataclass
class PatchMaps:
    """The per-patch maps of a run's sample images: what ``patches.csv``, ``patches.npz`` and ``patches.png`` hold.

    Attributes:
        inputs: ``(K, H, W, 3)`` uint8: each sample image's model input, de-normalised for display with the data
            config's mean and std, clipped.
        names: the K images' names as the run records them (their paths as given to ``measure``).
        indices: their positions in the run's ordered image list (``image_index`` in ``cells``), in the same order.
        cells: one row per map cell, columns :data:`~oversmooth_cli.reading.patch_maps.PATCH_COLUMNS`.
    """

    inputs: np.ndarray = field(repr=False)
    names: list[str]
    indices: list[int]
    cells: pd.DataFrame = field(repr=False)


@dataclass
class MeasureResult:
    """Per-layer and per-head tables plus the run summary (what ``summary.json`` holds) and the per-patch maps."""

    layers: pd.DataFrame
    heads: pd.DataFrame
    summary: dict[str, Any]
    accumulator: OversmoothingAccumulator = field(repr=False)
    maps: PatchMaps | None = field(default=None, repr=False)


@dataclass
class BatchesResult:
    """What :func:`measure_batches` returns: the filled accumulator and what the capture found out.

    Attributes:
        accumulator: the statistics of this process's images (not yet summed over processes).
        layers: one :class:`~oversmooth_cli.reading.capture.LayerInfo` per measured layer, layer 0 first.
        unavailable: ``{metric: reason}`` for selected metrics the model cannot give.
        attention_tap: the tap ``auto`` resolved to.
        compiled: the ``torch.compile``'d forward was used to the end.
        maps: the per-patch maps of this process's sample images (``None``: none were asked for).
    """

    accumulator: OversmoothingAccumulator
    layers: list[LayerInfo]
    unavailable: dict[str, str]
    attention_tap: str
    compiled: bool
    maps: PatchMapRecords | None = None


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


IMAGE_RULE = "K images evenly spaced over the run's ordered images: index round(i (N - 1) / (K - 1)), half up"
"""How the sample images of the maps are chosen (:func:`~oversmooth_cli.reading.patch_maps.choose_images`)."""


def _image_name(path: Path) -> str:
    """A path as the run records it, with bytes that are not UTF-8 (names from list files in other encodings) shown
    as replacement characters, so that every file can hold it."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def collect_patch_maps(
    records: PatchMapRecords | None,
    paths: Sequence[Path],
    chosen: Sequence[int],
    data_config: dict[str, Any],
    requested: int,
) -> tuple[PatchMaps | None, dict[str, Any]]:
    """The run's :class:`PatchMaps` (``None`` when no map was made) and ``summary.json``'s ``patch_maps`` entry.

    Args:
        records: the maps of every process (:func:`~oversmooth_cli.reading.patch_maps.merge_records`).
        paths: the run's ordered images.
        chosen: the positions of the sample images in ``paths`` (an unreadable one has no maps).
        data_config: the model's data config (``mean`` and ``std`` to de-normalise the inputs).
        requested: ``--maps``.
    """
    settings: dict[str, Any] = {
        "requested": requested,
        "chosen": [int(i) for i in chosen],
        "rule": IMAGE_RULE,
        "layers": [],
        "images": [],
        "kinds": [],
        "attention": [],
        "notes": {},
        "files": [],
    }
    if records is None:
        return None, settings
    indices = sorted(records.inputs)
    names = {i: _image_name(paths[i]) for i in indices}
    frames = [
        pd.DataFrame(
            {"image": names[m.image_index], "image_index": m.image_index, "layer": m.layer, "kind": m.kind, **m.cells()}
        )
        for m in records.maps
    ]
    settings.update(layers=list(records.layers), notes=dict(records.notes), attention=list(records.attention))
    settings["images"] = [{"index": i, "name": names[i]} for i in indices]
    if not frames:
        return None, settings
    cells = pd.concat(frames, ignore_index=True)[list(PATCH_COLUMNS)]
    settings.update(kinds=[k for k in MAP_KINDS if k in set(cells["kind"])], files=list(PATCH_FILES))
    mean, std = data_config.get("mean", (0.0, 0.0, 0.0)), data_config.get("std", (1.0, 1.0, 1.0))
    inputs = np.stack([display_image(records.inputs[i], mean, std) for i in indices])
    return PatchMaps(inputs, [names[i] for i in indices], indices, cells), settings


def write_patch_maps(maps: PatchMaps, folder: Path, title: str | None = None) -> list[Path]:
    """Write ``patches.csv`` (the cells), ``patches.npz`` (``inputs``: ``(K, H, W, 3)`` uint8, ``names``: K strings)
    and ``patches.png`` (:func:`~oversmooth_cli.plots.plot_patch_maps`) into ``folder``."""
    csv, npz, png = (folder / name for name in PATCH_FILES)
    maps.cells.to_csv(csv, index=False)
    with open(npz, "wb") as f:
        np.savez(f, inputs=maps.inputs, names=np.array(maps.names, dtype=str))
    save_figure(plot_patch_maps(maps.inputs, maps.names, maps.indices, maps.cells, title), png)
    return [csv, npz, png]


def write_run(result: MeasureResult, out: str | Path, overwrite: bool = False, per_head: bool = False) -> Path:
    """Write ``layers.csv``, ``heads.csv``, ``summary.json`` and ``curves.png`` into ``out`` atomically, and, when the
    run has per-patch maps, ``patches.csv``, ``patches.npz`` and ``patches.png`` (:func:`write_patch_maps`); last,
    ``report.html``, the self-contained page built from those files (:func:`measure_page`).

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
        if result.maps is not None:
            write_patch_maps(result.maps, stage, result.summary["model"]["name"])
        write_page(measure_page(stage, folder_label=str(out)), stage / "report.html")
    return out
