"""Files: the row schemas of ``layers.csv`` / ``heads.csv`` and :func:`read_layers`, JSON, and atomic writes of files
and whole run folders (a failure or Ctrl-C leaves nothing half-written). A run folder is read back by
:func:`~oversmooth_cli.gate.runs.load_run`; figures are drawn by :mod:`oversmooth_cli.plots`."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import UserError

__all__ = [
    "HEAD_COLUMNS",
    "LAYER_COLUMNS",
    "atomic_write",
    "atomic_write_all",
    "check_out_dir",
    "default_mode",
    "read_layers",
    "staged_dir",
    "to_json",
    "write_json",
]


LAYER_COLUMNS = ["layer", "stage", "n_tokens", "metric", "mean", "std", "ci95_low", "ci95_high", "n_images"]


LAYER_DEFAULTS = {"stage": 0, "n_tokens": float("nan")}
"""Columns a ``layers.csv`` written before hierarchical models were supported lacks, and what they read as."""


HEAD_COLUMNS = ["layer", "metric", "head", "mean", "std", "ci95_low", "ci95_high", "n_images"]


def check_out_dir(out: Path, overwrite: bool, hint: str | None = None) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless ``overwrite``; call before the work.

    ``hint`` replaces the advice after "exists and is not empty; " (default: pass --overwrite or another --out).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file; give a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {out} exists and is not empty; {hint or 'pass --overwrite or choose another --out'}"
        )


def default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open``/``mkdir`` would give under the current umask (temp files default to 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename, on failure it is removed.

    Readers never see a half-written run: ``out`` holds either the previous complete run or the new one.
    """
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield stage
        stage.chmod(default_mode(directory=True))
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "run")
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (same folder, same filesystem)."""
    return atomic_write_all({path: write})[0]


def atomic_write_all(writes: Mapping[Path, Callable[[Path], Any]]) -> list[Path]:
    """Write every file to a temporary sibling first, then rename them all into place.

    A failure or an interruption before the renames leaves every target as it was. Returns the target paths.
    """
    staged: list[Path] = []
    try:
        for path, write in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            staged.append(Path(name))
            write(Path(name))
            os.chmod(name, default_mode())
        for tmp, path in zip(staged, writes, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in staged:
            if tmp.exists():
                tmp.unlink()
    return list(writes)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj: Any) -> str:
    """JSON text with NaN written as null (strict JSON for other tools)."""

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, Mapping):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(json.loads(json.dumps(obj, default=_json_default))), indent=2, allow_nan=False)


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(to_json(obj) + "\n"))


def read_layers(source: str | Path) -> pd.DataFrame:
    """``layers.csv`` of a run folder (or the CSV itself), with the columns of :data:`LAYER_COLUMNS` (only the columns
    are checked here: :func:`~oversmooth_cli.gate.runs.load_run` checks every value against the run-file schema,
    :mod:`oversmooth_cli.gate.schema`)."""
    path = Path(source)
    if path.is_dir():
        path = path / "layers.csv"
    if not path.is_file():
        raise UserError(f"{source} has no layers.csv (give a run folder written by `oversmooth measure`)")
    df = pd.read_csv(path)
    for column, value in LAYER_DEFAULTS.items():
        if column not in df.columns:
            df.insert(LAYER_COLUMNS.index(column), column, value)
    missing = [c for c in LAYER_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}; is it a layers.csv from oversmooth?")
    return df
