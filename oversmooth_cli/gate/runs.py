"""Reading a run folder back: :class:`Run` and :func:`load_run` (``layers.csv``, ``heads.csv`` when present, and
``summary.json``), every file checked against the run-file schema first (:mod:`.schema`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import UserError
from ..metrics.registry import metric_order
from .schema import read_summary, read_table

__all__ = ["Run", "load_run", "read_definitions"]


# -- reading a run back ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One run's per-layer table and (when present) its ``summary.json`` and per-head table."""

    source: Path
    layers_csv: Path
    layers: pd.DataFrame = field(repr=False)
    summary: dict[str, Any] | None = field(default=None, repr=False)
    heads: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def folder(self) -> Path:
        return self.layers_csv.parent

    @property
    def metrics_version(self) -> str | None:
        v = (self.summary or {}).get("metrics_version", self.definitions.get("metrics_version"))
        return None if v is None else str(v)

    @property
    def definitions(self) -> dict[str, Any]:
        """What the numbers mean (``summary.json``'s ``definitions``; see :func:`read_definitions`)."""
        return read_definitions(self.summary)

    @property
    def name(self) -> str:
        """The model name recorded in ``summary.json``, else the run folder's name."""
        model = (self.summary or {}).get("model")
        name = model.get("name") if isinstance(model, dict) else None
        return str(name) if name else (self.folder.resolve().name or str(self.source))

    @property
    def metrics(self) -> list[str]:
        return metric_order(self.layers["metric"].unique())

    def layers_of(self, metric: str) -> list[int]:
        return sorted(int(x) for x in self.layers.loc[self.layers["metric"] == metric, "layer"])

    @property
    def n_layers(self) -> int:
        """Depth ``L`` (``summary.json``'s ``n_layers``, else the deepest layer in ``layers.csv``)."""
        n = (self.summary or {}).get("n_layers")
        return int(n) if isinstance(n, int) and n > 0 else int(self.layers["layer"].max())

    @property
    def n_images(self) -> int:
        return int(self.layers["n_images"].max()) if len(self.layers) else 0


METRIC_DEFINITION_KEYS = ("definition", "tokens", "prefix_included", "layers")
"""The compared entries of one metric's definition."""


def read_definitions(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``definitions`` block of a ``summary.json``: what two runs must share for their numbers to compare.

    A summary written before the block existed gives what it recorded elsewhere (``metrics_version``,
    ``run.include_prefix``, ``metrics``, ``data_config.input_size``, ``layer_info``), without ``images``; no summary
    gives ``{}``. :func:`load_run` refuses a summary whose entries have the wrong type (:mod:`.schema`), so what this
    reads is either recorded with its type or not recorded at all (entries of the wrong type in a summary that did
    not go through :func:`~.schema.validate_summary` are left out).
    """
    if not isinstance(summary, Mapping):
        return {}
    block = summary.get("definitions")
    if isinstance(block, Mapping):
        raw = dict(block)
    else:
        run: Mapping[str, Any] = summary["run"] if isinstance(summary.get("run"), Mapping) else {}
        data_config: Mapping[str, Any] = (
            summary["data_config"] if isinstance(summary.get("data_config"), Mapping) else {}
        )
        info = summary.get("layer_info")
        raw = {
            "metrics_version": summary.get("metrics_version"),
            "include_prefix": run.get("include_prefix"),
            "metrics": summary.get("metrics"),
            "input_size": data_config.get("input_size"),
            "n_tokens": [x.get("n_tokens") for x in info if isinstance(x, Mapping)] if isinstance(info, list) else None,
        }
    out: dict[str, Any] = {}
    if raw.get("metrics_version") is not None:
        out["metrics_version"] = str(raw["metrics_version"])
    if isinstance(raw.get("include_prefix"), bool):
        out["include_prefix"] = raw["include_prefix"]
    if isinstance(raw.get("metrics"), Mapping):
        out["metrics"] = {
            str(name): {k: d[k] for k in METRIC_DEFINITION_KEYS if k in d}
            for name, d in raw["metrics"].items()
            if isinstance(d, Mapping) and d.get("measured", True) is not False
        }
    if isinstance(raw.get("input_size"), list):
        out["input_size"] = list(raw["input_size"])
    if isinstance(raw.get("n_tokens"), list):
        out["n_tokens"] = list(raw["n_tokens"])
    images = raw.get("images")
    if isinstance(images, Mapping) and isinstance(images.get("sha256"), str) and isinstance(images.get("count"), int):
        out["images"] = {
            "count": images["count"],
            "sha256": images["sha256"],
            "by": images.get("by", "path"),  # before oversmooth hashed contents, it hashed relative paths
            "digests": list(images["digests"]) if isinstance(images.get("digests"), list) else None,
        }
    if "attention_tap" in raw:
        out["attention_tap"] = raw["attention_tap"]
    return out


def load_run(source: str | Path) -> Run:
    """Load a run folder (``layers.csv`` + ``summary.json``, and ``heads.csv`` when present) or a ``layers.csv``
    (the other files read beside it), each checked against the run-file schema (:mod:`.schema`).

    Raises:
        UserError: missing path, unreadable files, or the first entry that breaks the schema (a non-number, a NaN,
            a layer that is not a whole number, an unknown metric, a value outside its metric's range, repeated
            rows, a ``summary.json`` entry of the wrong type), in one line naming the file and the entry.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source} does not exist; give a run folder written by `oversmooth measure` or its layers.csv")
    csv = path / "layers.csv" if path.is_dir() else path
    if not csv.is_file():
        raise UserError(f"{source} has no layers.csv (give a run folder written by `oversmooth measure`)")
    layers = read_table(csv, "layers")
    heads_csv = csv.parent / "heads.csv"
    heads = read_table(heads_csv, "heads") if heads_csv.is_file() else None
    return Run(path, csv, layers, read_summary(csv.parent / "summary.json"), heads)
