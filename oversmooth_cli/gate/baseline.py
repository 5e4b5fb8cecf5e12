"""Baselines: the two files of a run that a repository commits as the reference."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_all
from .runs import load_run

__all__ = ["make_baseline"]


BASELINE_FILES = ("layers.csv", "summary.json")


# -- baselines ----------------------------------------------------------------------------------------------------
def make_baseline(run: str | Path, dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy ``layers.csv`` and ``summary.json`` of ``run`` into ``dest`` (a small folder meant to be committed).

    Both files are staged in ``dest`` first and then renamed into place, so an interrupted copy leaves the
    previous baseline intact. Other files in ``dest`` are kept.

    Raises:
        UserError: ``run`` is not a complete run, ``dest`` is a file, or it holds a baseline and not ``overwrite``.
    """
    src = load_run(run)
    if src.summary is None:
        raise UserError(f"{src.folder} has no summary.json beside layers.csv; a baseline needs both (run `measure`)")
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise UserError(f"baseline destination {dest} is a file; give a folder")
    targets = [dest / name for name in BASELINE_FILES]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise UserError(f"{dest} already holds a baseline ({existing[0].name}); pass --overwrite to update it")
    sources = [src.layers_csv, src.folder / "summary.json"]
    if any(s.resolve() == t.resolve() for s, t in zip(sources, targets, strict=True) if t.exists()):
        raise UserError(f"{run} and {dest} are the same folder; give another destination")
    return atomic_write_all({t: functools.partial(shutil.copyfile, s) for s, t in zip(sources, targets, strict=True)})
