"""The run-file schema: what ``layers.csv``, ``heads.csv`` and ``summary.json`` must hold to be read back.

Run files are loaded the way checkpoints are: every value is checked before any of it is used, and the first
violation is refused in one line naming the file, the entry and what was expected (a
:class:`~oversmooth_cli.errors.UserError`, exit 2), for ``check``, ``compare``, ``baseline`` and
``measure --baseline`` alike. Nothing is silently dropped or read as a regression.

``layers.csv`` (one row per metric and layer) and ``heads.csv`` (one row per metric, layer and attention head):

=================  ==========================================================================================
column             expected
=================  ==========================================================================================
``layer``          a whole number >= 0 (``2.5`` is refused, not read as layer 2)
``stage``          a whole number >= 0 (``layers.csv``; absent in files written before it existed: 0)
``n_tokens``       a whole number >= 1, or empty (``layers.csv``; absent in older files: empty)
``head``           a whole number >= 0 (``heads.csv`` only)
``metric``         a metric this version knows (:data:`~oversmooth_cli.metrics.registry.ALL_METRICS`)
``mean``           a finite number inside the metric's range (:attr:`MetricDef.range
                   <oversmooth_cli.metrics.registry.MetricDef>`)
``std``            a finite number >= 0
``ci95_low/high``  both empty (one image: no interval), or finite numbers with ``ci95_low <= ci95_high``
``n_images``       a whole number >= 1
=================  ==========================================================================================

and one row per ``(metric, layer)`` (``(metric, layer, head)`` in ``heads.csv``). Other columns are ignored.

``summary.json`` must be a JSON object; every entry below is optional (older versions did not write them all), but an
entry that is present must have its type: ``metrics_version`` a string, ``n_layers`` a whole number >= 0, ``model`` an
object whose ``name`` is a string, ``interval`` a string, ``run.include_prefix`` a boolean, ``metrics`` an object of
objects, ``data_config.input_size`` a list of whole numbers, ``layer_info`` a list of objects whose ``n_tokens`` is a
whole number or null, and ``definitions`` an object holding (each optional):

* ``metrics_version``: a string; ``include_prefix``: a boolean; ``attention_tap``: a string;
* ``metrics``: an object of objects, each with ``definition``, ``tokens`` and ``layers`` strings and a boolean
  ``prefix_included``;
* ``input_size``: a list of three whole numbers >= 1 (channels, height, width), or null (not known);
* ``n_tokens``: a list, one entry per layer (layer 0 first), of whole numbers >= 1 or null;
* ``images``: an object with ``count`` (a whole number >= 1), ``sha256`` (64 hex digits), ``by`` (``"content"``;
  absent in summaries that hashed relative paths), ``digests`` (a list of ``count`` hex strings) and ``relative_to``
  (a string, older summaries).

* ``patch_maps`` (the per-patch maps' settings; optional, never compared): an object whose ``requested`` is a whole
  number >= 0, ``chosen`` and ``layers`` lists of whole numbers >= 0, ``images`` a list of objects with a whole
  ``index`` >= 0 and a string ``name``, ``kinds`` a list of map kinds (``similarity``, ``attention``), ``attention``
  and ``files`` lists of strings, ``rule`` a string and ``notes`` an object of strings.

A ``summary.json`` without ``definitions`` (written before the block existed) still loads: what it recorded elsewhere
is compared and what it did not record is named in the check's notes.

``patches.csv`` (the per-patch maps, :func:`read_patches`; the gate itself never reads it) has the columns
:data:`~oversmooth_cli.reading.patch_maps.PATCH_COLUMNS`: ``image`` a non-empty string, ``image_index``, ``layer``,
``row`` and ``col`` whole numbers >= 0, ``kind`` a map kind, ``x0 < x1`` and ``y0 < y1`` finite pixel coordinates
>= 0, ``value`` a finite number; one row per ``(image_index, layer, kind, row, col)``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import UserError, first_line
from ..io import HEAD_COLUMNS, LAYER_COLUMNS, LAYER_DEFAULTS
from ..metrics import registry
from ..metrics.registry import metric_range
from ..reading.patch_maps import MAP_KINDS, PATCH_COLUMNS

__all__ = [
    "FIX",
    "read_patches",
    "read_summary",
    "read_table",
    "validate_patches",
    "validate_summary",
    "validate_table",
]


FIX = "write the run again with `oversmooth measure` (for a baseline, then `oversmooth baseline`), or restore the file"
"""How every schema refusal ends: run files are written by ``measure``, not edited."""


SLACK = 1e-6
"""How far outside a metric's range (relative to the bound, at least absolute) a float32 value may land."""


_HEX = re.compile(r"[0-9a-f]+")


# -- tables: layers.csv and heads.csv --------------------------------------------------------------------------------
def _refuse(path: Path, where: str, got: str, expected: str, fix: str = FIX) -> UserError:
    return UserError(f"{path}: {where} is {got}; expected {expected}; {fix}")


def _cell(raw: str) -> str:
    return "empty" if raw == "" else repr(raw)


def _numbers(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(df[column].str.strip(), errors="coerce")


def _row_name(df: pd.DataFrame, i: int) -> str:
    """``row 3 (token_cosine layer 2)``: a data row (1 = the first after the header) and what it holds (``patches.csv``:
    its kind of map)."""
    metric, layer = df["metric" if "metric" in df.columns else "kind"].iloc[i], df["layer"].iloc[i]
    what = f"{metric} layer {layer}".strip() if metric or layer else ""
    return f"row {i + 1}" + (f" ({what})" if what else "")


def _check_column(
    path: Path, df: pd.DataFrame, column: str, ok: Callable[[pd.Series, pd.Series], pd.Series], expected: str
) -> pd.Series:
    """Parse ``column`` as numbers; refuse the first cell where ``ok(values, raw text)`` is false."""
    raw = df[column].str.strip()
    values = pd.to_numeric(raw, errors="coerce")
    bad = ~ok(values, raw).fillna(False).astype(bool)
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        truncated = " (is the file cut short?)" if raw.iloc[i] == "" and df.iloc[i, -1].strip() == "" else ""
        raise _refuse(path, f"{column} in {_row_name(df, i)}", _cell(raw.iloc[i]) + truncated, expected)
    return values


def _whole(minimum: int, empty_ok: bool = False) -> Callable[[pd.Series, pd.Series], pd.Series]:
    def ok(v: pd.Series, raw: pd.Series) -> pd.Series:
        good = v.notna() & v.abs().lt(math.inf) & (v == v.round()) & (v >= minimum)
        return (good | (raw == "")) if empty_ok else good

    return ok


def _finite(v: pd.Series, _raw: pd.Series) -> pd.Series:
    return v.notna() & v.abs().lt(math.inf)


def _read_cells(path: Path) -> pd.DataFrame:
    """Every cell as text (empty cells as ``""``), so that the schema sees what the file holds."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"cannot read {path} as a CSV table: {first_line(e)}; {FIX}") from e


def read_table(path: Path, kind: str = "layers") -> pd.DataFrame:
    """Read and validate ``layers.csv`` (``kind="layers"``) or ``heads.csv`` (``kind="heads"``): typed columns.

    Raises:
        UserError: the file is unreadable, lacks a column, has no rows, or a cell breaks the schema (see the module
            docstring); one line naming the file, the row, the column and what was expected.
    """
    return validate_table(_read_cells(path), path, kind)


def validate_table(cells: pd.DataFrame, path: Path, kind: str = "layers") -> pd.DataFrame:
    """Check a table read as text (``dtype=str, keep_default_na=False``) against the schema; return it typed."""
    columns = LAYER_COLUMNS if kind == "layers" else HEAD_COLUMNS
    df = cells.copy()
    df.columns = [str(c).strip() for c in df.columns]
    if kind == "layers":
        for column, value in LAYER_DEFAULTS.items():
            if column not in df.columns:
                df.insert(0, column, "" if isinstance(value, float) else str(value))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}; is it a {kind}.csv from oversmooth? {FIX}")
    if df.empty:
        raise UserError(f"{path} has no rows; {FIX}")
    df = df.fillna("").astype(str)  # a row cut short has no cells at its end
    out = pd.DataFrame(index=df.index)
    out["layer"] = _check_column(path, df, "layer", _whole(0), "a whole number >= 0 (the layer index)")
    known = [*registry.TOKEN_METRICS, *registry.ATTENTION_METRICS]  # read now: a metric registered later counts
    metric = df["metric"].str.strip()
    unknown = ~metric.isin(known)
    if unknown.any():
        i = int(unknown.to_numpy().nonzero()[0][0])
        raise _refuse(
            path,
            f"metric in {_row_name(df, i)}",
            _cell(metric.iloc[i]),
            f"a metric this oversmooth knows ({', '.join(known)})",
            "read it with the oversmooth version that wrote it, or measure the run again with this one",
        )
    out["metric"] = metric
    if kind == "layers":
        out["stage"] = _check_column(path, df, "stage", _whole(0), "a whole number >= 0 (the model stage)")
        tokens = _check_column(path, df, "n_tokens", _whole(1, empty_ok=True), "a whole number >= 1, or empty")
        out["n_tokens"] = pd.array(tokens, dtype="Int64")
    else:
        out["head"] = _check_column(path, df, "head", _whole(0), "a whole number >= 0 (the head index)")
    _check_values(path, df, out)
    _check_unique(path, df, out, ["metric", "layer"] + (["head"] if kind == "heads" else []))
    for column in ("layer", "n_images", *(["stage"] if kind == "layers" else ["head"])):
        out[column] = out[column].astype(int)
    return out[columns].reset_index(drop=True)


def _check_values(path: Path, df: pd.DataFrame, out: pd.DataFrame) -> None:
    """``mean`` finite and in the metric's range, ``std`` >= 0, an ordered interval or none, ``n_images`` >= 1.

    The interval is not compared by ``check`` (means are), so it is not required to hold the mean."""
    mean = _check_column(path, df, "mean", _finite, "a finite number (the mean over images)")
    lo = out["metric"].map(lambda m: metric_range(m)[0]).astype(float)
    hi = out["metric"].map(lambda m: metric_range(m)[1]).astype(float)
    slack_lo = SLACK * lo.abs().clip(lower=1.0).where(lo.abs() < math.inf, 0.0)
    slack_hi = SLACK * hi.abs().clip(lower=1.0).where(hi.abs() < math.inf, 0.0)
    outside = (mean < lo - slack_lo) | (mean > hi + slack_hi)
    if outside.any():
        i = int(outside.to_numpy().nonzero()[0][0])
        m = out["metric"].iloc[i]
        raise _refuse(path, f"mean in {_row_name(df, i)}", repr(df["mean"].iloc[i].strip()), f"a value in {m}'s range "
                      f"[{lo.iloc[i]:g}, {hi.iloc[i]:g}]")  # fmt: skip
    out["mean"] = mean
    out["std"] = _check_column(
        path, df, "std", lambda v, r: _finite(v, r) & (v >= 0), "a finite number >= 0 (the std over images)"
    )
    for column in ("ci95_low", "ci95_high"):
        out[column] = _check_column(
            path, df, column, lambda v, r: _finite(v, r) | (r == ""), "a finite number, or empty (no interval)"
        )
    bad = (out["ci95_low"].isna() != out["ci95_high"].isna()) | (out["ci95_low"] > out["ci95_high"])
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        got = f"[{_cell(df['ci95_low'].iloc[i].strip())}, {_cell(df['ci95_high'].iloc[i].strip())}]"
        raise _refuse(path, f"the interval in {_row_name(df, i)}", got, "ci95_low <= ci95_high, or both empty")
    out["n_images"] = _check_column(path, df, "n_images", _whole(1), "a whole number >= 1 (images measured)")


def read_patches(path: Path) -> pd.DataFrame:
    """Read and validate a ``patches.csv`` (the per-patch maps of ``measure --maps``): typed columns.

    Raises:
        UserError: the file is unreadable, lacks a column, has no rows, or a cell breaks the schema (see the module
            docstring); one line naming the file, the row, the column and what was expected.
    """
    return validate_patches(_read_cells(path), path)


def validate_patches(cells: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Check a ``patches.csv`` read as text against the schema; return it typed."""
    df = cells.copy()
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in PATCH_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}; is it a patches.csv from oversmooth? {FIX}")
    if df.empty:
        raise UserError(f"{path} has no rows; {FIX}")
    df = df.fillna("").astype(str)
    out = pd.DataFrame(index=df.index)
    out["image"], out["kind"] = df["image"], df["kind"].str.strip()
    for column in ("image_index", "layer", "row", "col"):
        out[column] = _check_column(path, df, column, _whole(0), "a whole number >= 0").astype(int)
    for column, bad, expected in (
        ("image", out["image"].str.strip() == "", "the image's name"),
        ("kind", ~out["kind"].isin(MAP_KINDS), f"a kind of map ({', '.join(MAP_KINDS)})"),
    ):
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise _refuse(path, f"{column} in {_row_name(df, i)}", _cell(df[column].iloc[i]), expected)
    for column in ("x0", "y0", "x1", "y1"):
        out[column] = _check_column(path, df, column, lambda v, r: _finite(v, r) & (v >= 0), "a pixel coordinate >= 0")
    for lo, hi in (("x0", "x1"), ("y0", "y1")):
        empty = out[lo] >= out[hi]
        if empty.any():
            i = int(empty.to_numpy().nonzero()[0][0])
            raise _refuse(path, f"the cell in {_row_name(df, i)}", f"{lo} {out[lo].iloc[i]:g}, {hi} "
                          f"{out[hi].iloc[i]:g}", f"{lo} < {hi}")  # fmt: skip
    out["value"] = _check_column(path, df, "value", _finite, "a finite number (the map's value)")
    dup = out.duplicated(["image_index", "layer", "kind", "row", "col"], keep="first")
    if dup.any():
        raise UserError(f"{path}: {_row_name(df, int(dup.to_numpy().nonzero()[0][0]))} repeats a cell; expected one "
                        f"row per (image_index, layer, kind, row, col); {FIX}")  # fmt: skip
    return out[list(PATCH_COLUMNS)].reset_index(drop=True)


def _check_unique(path: Path, df: pd.DataFrame, out: pd.DataFrame, key: list[str]) -> None:
    dup = out.duplicated(key, keep="first")
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        same = (out[key] == out[key].iloc[i]).all(axis=1).to_numpy().nonzero()[0]
        what = " ".join(f"{k} {int(out[k].iloc[i])}" for k in key[1:])
        raise UserError(
            f"{path} has several rows for {out['metric'].iloc[i]} {what} (rows {int(same[0]) + 1} and {i + 1}); "
            f"expected one row per ({', '.join(key)}); {FIX}"
        )


# -- summary.json ------------------------------------------------------------------------------------------------------
def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    text = json.dumps(value, default=str)
    text = text if len(text) <= 40 else text[:37] + "..."
    return "null" if value is None else f"{text} ({kind.get(type(value), type(value).__name__)})"


def _is_whole(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


class _Summary:
    """Checks of one ``summary.json``; each raises on the first entry of the wrong type."""

    def __init__(self, data: Mapping[str, Any], path: Path) -> None:
        self.data, self.path = data, path

    def fail(self, where: str, value: Any, expected: str) -> UserError:
        return _refuse(self.path, where, _describe(value), expected)

    def entry(self, block: Mapping[str, Any], key: str, where: str, ok: Callable[[Any], bool], expected: str) -> None:
        if key in block and not ok(block[key]):
            raise self.fail(f"{where}{key}", block[key], expected)

    def block(self, parent: Mapping[str, Any], key: str, where: str = "") -> Mapping[str, Any]:
        """``parent[key]`` when it is an object, ``{}`` when absent; refused otherwise."""
        self.entry(parent, key, where, lambda v: isinstance(v, Mapping), "an object")
        value = parent.get(key, {})
        return value if isinstance(value, Mapping) else {}

    def check(self) -> None:
        d = self.data
        text, version = "a string", (lambda v: isinstance(v, str) or _is_whole(v, 0))
        self.entry(d, "metrics_version", "", version, 'a string (e.g. "1")')
        self.entry(d, "n_layers", "", lambda v: _is_whole(v, 0), "a whole number >= 0 (the model's depth)")
        self.entry(d, "interval", "", lambda v: isinstance(v, str), text)
        self.entry(self.block(d, "model"), "name", "model.", lambda v: isinstance(v, str), text)
        self.entry(self.block(d, "run"), "include_prefix", "run.", lambda v: isinstance(v, bool), "true or false")
        self.entry(self.block(d, "data_config"), "input_size", "data_config.", self.size_ok, "a list of whole numbers")
        self.metrics(d, "")
        self.layer_info()
        if "definitions" in d:
            self.definitions(self.block(d, "definitions"))
        if "patch_maps" in d:
            self.patch_maps(self.block(d, "patch_maps"))

    @staticmethod
    def size_ok(v: Any) -> bool:
        return isinstance(v, list) and len(v) == 3 and all(_is_whole(x, 1) for x in v)

    def metrics(self, parent: Mapping[str, Any], where: str) -> None:
        for name, entry in self.block(parent, "metrics", where).items():
            at = f"{where}metrics.{name}"
            if not isinstance(entry, Mapping):
                raise self.fail(at, entry, "an object (the metric's definition)")
            for key in ("definition", "tokens", "layers"):
                self.entry(entry, key, f"{at}.", lambda v: isinstance(v, str), "a string")
            self.entry(entry, "prefix_included", f"{at}.", lambda v: isinstance(v, bool), "true or false")

    def layer_info(self) -> None:
        info = self.data.get("layer_info")
        if info is None and "layer_info" not in self.data:
            return
        if not isinstance(info, list):
            raise self.fail("layer_info", info, "a list of objects, one per layer")
        for i, entry in enumerate(info):
            if not isinstance(entry, Mapping):
                raise self.fail(f"layer_info[{i}]", entry, "an object")
            self.entry(entry, "n_tokens", f"layer_info[{i}].", lambda v: v is None or _is_whole(v, 1),
                       "a whole number >= 1 or null")  # fmt: skip

    def definitions(self, d: Mapping[str, Any]) -> None:
        at = "definitions."
        self.entry(d, "metrics_version", at, lambda v: isinstance(v, str) or _is_whole(v, 0), "a string")
        self.entry(d, "include_prefix", at, lambda v: isinstance(v, bool), "true or false")
        self.entry(d, "attention_tap", at, lambda v: isinstance(v, str), "a string")
        self.metrics(d, at)
        self.entry(d, "input_size", at, lambda v: v is None or self.size_ok(v),
                   "a list of three whole numbers >= 1 (channels, height, width), or null")  # fmt: skip
        self.entry(d, "n_tokens", at, lambda v: isinstance(v, list) and all(x is None or _is_whole(x, 1) for x in v),
                   "a list with one whole number >= 1 (or null) per layer")  # fmt: skip
        self.images(self.block(d, "images", at))

    def patch_maps(self, maps: Mapping[str, Any]) -> None:
        """``patch_maps``: the per-patch maps' settings (see the module docstring)."""

        def listed(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
            return lambda v: isinstance(v, list) and all(ok(x) for x in v)

        wholes = (listed(lambda x: _is_whole(x, 0)), "a list of whole numbers >= 0")
        texts = (listed(lambda x: isinstance(x, str)), "a list of strings")
        checks: dict[str, tuple[Callable[[Any], bool], str]] = {
            "requested": (lambda v: _is_whole(v, 0), "a whole number >= 0"),
            "rule": (lambda v: isinstance(v, str), "a string"),
            "chosen": wholes,
            "layers": wholes,
            "attention": texts,
            "files": texts,
            "kinds": (listed(lambda x: x in MAP_KINDS), f"a list of map kinds ({', '.join(MAP_KINDS)})"),
            "notes": (
                lambda v: isinstance(v, Mapping) and all(isinstance(x, str) for x in v.values()),
                "an object of strings",
            ),
            "images": (
                listed(
                    lambda x: isinstance(x, Mapping) and _is_whole(x.get("index"), 0) and isinstance(x.get("name"), str)
                ),
                "a list of objects, each with a whole index >= 0 and a string name",
            ),
        }
        for key, (ok, expected) in checks.items():
            self.entry(maps, key, "patch_maps.", ok, expected)

    def images(self, images: Mapping[str, Any]) -> None:
        at = "definitions.images."
        if not images:
            return
        for key in ("count", "sha256"):
            if key not in images:
                raise self.fail(f"{at}{key}", None, "present: the image set is known by its count and hash")
        self.entry(images, "count", at, lambda v: _is_whole(v, 1), "a whole number >= 1 (images measured)")
        self.entry(images, "sha256", at, lambda v: isinstance(v, str) and len(v) == 64 and bool(_HEX.fullmatch(v)),
                   "64 lowercase hex digits")  # fmt: skip
        self.entry(images, "by", at, lambda v: v == "content", '"content" (the image set is hashed by content)')
        self.entry(images, "relative_to", at, lambda v: v is None or isinstance(v, str), "a string")
        self.entry(images, "digests", at,
                   lambda v: isinstance(v, list) and all(isinstance(x, str) and bool(_HEX.fullmatch(x)) for x in v),
                   "a list of hex digests, one per image")  # fmt: skip
        if "digests" in images and len(images["digests"]) != images["count"]:
            raise self.fail(f"{at}count", images["count"], f"{len(images['digests'])}, the number of digests")


def validate_summary(data: Any, path: Path) -> dict[str, Any]:
    """Check a parsed ``summary.json`` against the schema (see the module docstring); return it.

    Raises:
        UserError: not an object, or the first entry of the wrong type, in one line naming the entry.
    """
    if not isinstance(data, dict):
        raise UserError(f"{path} is {_describe(data)}, not a JSON object; is it a summary.json from oversmooth? {FIX}")
    _Summary(data, path).check()
    return data


def read_summary(path: Path) -> dict[str, Any] | None:
    """Read and validate a ``summary.json``; ``None`` when there is none."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {first_line(e)}; {FIX}") from e
    return validate_summary(data, path)
