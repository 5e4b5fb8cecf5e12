"""Reading a run folder back: :class:`Run` and :func:`load_run` (``layers.csv`` + ``summary.json``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import UserError, first_line
from ..io import read_layers
from ..metrics.registry import metric_order

__all__ = ["Run", "load_run", "read_definitions"]


# -- reading a run back ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One run's per-layer table and (when present) its ``summary.json``."""

    source: Path
    layers_csv: Path
    layers: pd.DataFrame = field(repr=False)
    summary: dict[str, Any] | None = field(default=None, repr=False)

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
    gives ``{}``. Entries of the wrong type are left out, so they read as not recorded.
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
        out["images"] = {"count": images["count"], "sha256": images["sha256"], "relative_to": images.get("relative_to")}
    if "attention_tap" in raw:
        out["attention_tap"] = raw["attention_tap"]
    return out


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; write the run again with `oversmooth measure`") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; is it a summary.json from oversmooth?")
    return data


def load_run(source: str | Path) -> Run:
    """Load a run folder (``layers.csv`` + ``summary.json``) or a ``layers.csv`` (``summary.json`` read beside it).

    Raises:
        UserError: missing path, unreadable or malformed ``layers.csv``, duplicate ``(metric, layer)`` rows.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source} does not exist; give a run folder written by `oversmooth measure` or its layers.csv")
    csv = path / "layers.csv" if path.is_dir() else path
    try:
        df = read_layers(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {csv} as a layers.csv: {first_line(e)}") from e
    if df.empty:
        raise UserError(f"{csv} has no rows; measure the run again with `oversmooth measure`")
    df = df.copy()
    for col in ("layer", "mean", "std", "n_images"):
        converted = pd.to_numeric(df[col], errors="coerce")
        junk = converted.isna() & (df[col].notna() if col in ("mean", "std") else True)  # an undefined mean is NaN
        if junk.any():
            bad = df[col][junk].iloc[0]
            raise UserError(f"{csv}: column {col} holds non-numbers ({bad!r}); is it a layers.csv from oversmooth?")
        df[col] = converted
    df["layer"] = df["layer"].astype(int)
    df["metric"] = df["metric"].astype(str)
    dup = df[df.duplicated(["metric", "layer"], keep=False)]
    if len(dup):
        first = dup.iloc[0]
        raise UserError(f"{csv} has several rows for {first['metric']} layer {first['layer']}; one row each expected")
    return Run(path, csv, df, _read_summary(csv.parent / "summary.json"))
