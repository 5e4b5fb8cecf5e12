"""Patch maps: a run's sample images with each patch cell coloured by its value, one panel per chosen layer.

A run folder may hold them in two files:

* ``patches.csv``: one row per image, layer, kind and cell (:data:`PATCH_COLUMNS`): ``image`` (its name),
  ``image_index`` (its position in the run's images), ``layer``, ``kind`` (``similarity`` or ``attention``), the cell's
  ``row`` and ``col``, its box ``x0, y0, x1, y1`` in model-input pixels, and its ``value``;
* ``patches.npz``: ``inputs``, a ``uint8`` array ``(K, H, W, 3)`` of the model inputs, and ``names`` ``(K,)``, the
  same names as the ``image`` column (an image is found by its name; :func:`image_of`).

Each image is embedded once, as a PNG data URI inside an SVG ``<defs>``, and every panel shows it through ``<use>``;
the cells are SVG rectangles over it, one colour scale per kind shared by every image, layer and run shown (so a
finetune run's before and after maps read on the same scale). A file that does not follow this layout is not an
error of the run: the section says what is wrong and leaves the maps out.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .document import note
from .svg import ColorScale, Html, esc, number

__all__ = [
    "KIND_ORDER",
    "MAX_EMBED_PX",
    "PATCH_COLUMNS",
    "PATCH_DIGITS",
    "PatchMaps",
    "image_of",
    "patch_maps_html",
    "png_data_uri",
    "read_patch_maps",
]


PATCH_COLUMNS = ("image", "image_index", "layer", "kind", "row", "col", "x0", "y0", "x1", "y1", "value")
"""The columns of ``patches.csv`` the maps read (others are ignored)."""

KIND_ORDER = ("similarity", "attention")
"""The kinds in page order; other kinds follow alphabetically."""

PANEL_PX = 128
"""The width of one patch-map panel on the page, in CSS pixels."""

PATCH_DIGITS = 4
"""Significant digits of a cell's value in its hover text (a map has many cells: the page stays small)."""

MAX_EMBED_PX = 384
"""Inputs larger than this on their long side are embedded shrunk to it (a panel is :data:`PANEL_PX` wide)."""

NUMERIC = ("image_index", "layer", "row", "col", "x0", "y0", "x1", "y1", "value")


@dataclass(frozen=True)
class PatchMaps:
    """One run folder's patch maps: the ``patches.csv`` rows, the model inputs (``None`` without a usable
    ``patches.npz``) and their names; ``problems`` says what could not be used."""

    table: pd.DataFrame
    inputs: np.ndarray | None = None
    names: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _read_inputs(path: Path) -> tuple[np.ndarray | None, list[str], list[str]]:
    if not path.is_file():
        return None, [], [f"{path.name} is missing: the cells are drawn without the images"]
    try:
        with np.load(path, allow_pickle=False) as data:
            inputs, names = np.asarray(data["inputs"]), [str(n) for n in np.asarray(data["names"]).tolist()]
    except (OSError, ValueError, KeyError) as e:
        return None, [], [f"cannot read {path.name} ({e}): the cells are drawn without the images"]
    if inputs.ndim != 4 or inputs.shape[-1] != 3 or inputs.dtype != np.uint8:
        shape = f"{inputs.dtype} {tuple(inputs.shape)}"
        return None, [], [f"{path.name}: inputs is {shape}, expected uint8 (K, H, W, 3): images left out"]
    return inputs, names, []


def read_patch_maps(folder: str | Path) -> PatchMaps | None:
    """``patches.csv`` and ``patches.npz`` of a run folder; ``None`` when it has no ``patches.csv``."""
    folder = Path(folder)
    csv = folder / "patches.csv"
    if not csv.is_file():
        return None
    try:
        table = pd.read_csv(csv)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        return PatchMaps(pd.DataFrame(columns=list(PATCH_COLUMNS)), problems=[f"cannot read patches.csv ({e})"])
    missing = [c for c in PATCH_COLUMNS if c not in table.columns]
    if missing:
        problem = f"patches.csv lacks the columns {', '.join(missing)}: the patch maps are left out"
        return PatchMaps(pd.DataFrame(columns=list(PATCH_COLUMNS)), problems=[problem])
    table = table[list(PATCH_COLUMNS)].copy()
    for column in NUMERIC:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    bad = table[[c for c in NUMERIC if c != "value"]].isna().any(axis=1)
    problems = [f"patches.csv: {int(bad.sum())} rows without a whole cell position left out"] if bad.any() else []
    table = table[~bad].astype({c: int for c in ("image_index", "layer", "row", "col")})
    table["kind"] = table["kind"].astype(str)
    table["image"] = table["image"].astype(str)
    inputs, names, more = _read_inputs(folder / "patches.npz")
    return PatchMaps(table, inputs, names, problems + more)


def png_data_uri(image: np.ndarray, max_px: int = MAX_EMBED_PX) -> str:
    """An ``(H, W, 3)`` ``uint8`` image as a ``data:image/png;base64,...`` URI (encoded with PIL), shrunk to
    ``max_px`` on its long side when larger (box filter; the page shows it in the model-input pixel box anyway)."""
    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    if max(picture.size) > max_px:
        scale = max_px / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.BOX)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _kinds(tables: Sequence[pd.DataFrame]) -> list[str]:
    present = {k for t in tables for k in t["kind"].unique()}
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


class _Images:
    """The ``<defs>`` of the page's patch maps: each distinct image once, by content."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ids: dict[str, str] = {}
        self.defs: list[str] = []

    def use(self, image: np.ndarray) -> str:
        """A ``<use>`` of ``image`` (added to the defs the first time it is seen)."""
        uri = png_data_uri(image)
        key = hashlib.sha256(uri.encode("ascii")).hexdigest()
        if key not in self.ids:
            ident = f"{self.prefix}-img-{len(self.ids)}"
            self.ids[key] = ident
            h, w = image.shape[:2]
            pixelated = ' style="image-rendering:pixelated"' if max(h, w) < 150 else ""
            self.defs.append(f'<image id="{ident}" href="{uri}" x="0" y="0" width="{w}" height="{h}"{pixelated}/>')
        return f'<use href="#{self.ids[key]}"/>'

    def html(self) -> str:
        if not self.defs:
            return ""
        return (
            '<svg width="0" height="0" style="position:absolute" aria-hidden="true" focusable="false">'
            f"<defs>{''.join(self.defs)}</defs></svg>"
        )


def _panel(rows: pd.DataFrame, size: tuple[int, int], image: str, name: str, scale: ColorScale) -> str:
    """One layer of one image: the image and its cells, hover text per cell."""
    h, w = size
    first = rows.iloc[0]
    layer, kind = int(first["layer"]), str(first["kind"])
    cells = []
    for r in rows.itertuples(index=False):
        tip = f"layer {layer}, row {r.row}, col {r.col}: {kind} {number(r.value, PATCH_DIGITS)}"
        cells.append(
            f'<rect x="{number(r.x0)}" y="{number(r.y0)}" width="{number(r.x1 - r.x0)}" height="{number(r.y1 - r.y0)}" '
            f'fill="{scale.color(r.value)}"><title>{esc(tip)}</title></rect>'
        )
    background = image or f'<rect width="{w}" height="{h}" fill="#bbb"/>'
    return (
        f'<figure class="patch-panel"><svg class="patch" viewBox="0 0 {w} {h}" width="{PANEL_PX}" '
        f'height="{round(PANEL_PX * h / max(w, 1))}" '
        f'data-image="{esc(name)}" data-layer="{layer}" data-kind="{esc(kind)}" role="img" '
        f'aria-label="{esc(f"{name}, {kind}, layer {layer}")}">{background}<g class="cells">{"".join(cells)}</g>'
        f"</svg><figcaption>layer {layer}</figcaption></figure>"
    )


def image_of(maps: PatchMaps, name: str, index: int) -> np.ndarray | None:
    """The model input of one image: the ``patches.npz`` entry whose name is ``name``; else (names that do not
    match) the entry at the position of ``index`` among the table's image indexes, in order; ``None`` without one."""
    if maps.inputs is None:
        return None
    if name in maps.names:
        return maps.inputs[maps.names.index(name)]
    order = sorted(int(i) for i in maps.table["image_index"].unique())
    if len(order) == len(maps.inputs) and index in order:
        return maps.inputs[order.index(index)]
    return None


def _input_panel(use: str, size: tuple[int, int], name: str) -> str:
    """The model input alone, before the layer panels."""
    h, w = size
    return (
        f'<figure class="patch-panel"><svg class="patch" viewBox="0 0 {w} {h}" width="{PANEL_PX}" '
        f'height="{round(PANEL_PX * h / max(w, 1))}" role="img" aria-label="{esc(name)}: model input">{use}</svg>'
        "<figcaption>model input</figcaption></figure>"
    )


def _size(image: np.ndarray | None, rows: pd.DataFrame) -> tuple[int, int]:
    """``(H, W)``: the input's shape, else the cells' extent."""
    if image is not None:
        return int(image.shape[0]), int(image.shape[1])
    return int(np.ceil(rows["y1"].max())), int(np.ceil(rows["x1"].max()))


def _kind_block(kind: str, sources: Sequence[tuple[str, PatchMaps]], images: _Images) -> str:
    tables = [(label, m, m.table[m.table["kind"] == kind]) for label, m in sources]
    scale = ColorScale.of(v for _, _, t in tables for v in t["value"])
    pairs = (zip(t["image_index"], t["image"], strict=True) for _, _, t in tables)
    keys = list(dict.fromkeys((int(i), str(n)) for pair in pairs for i, n in pair))
    out = [f"<h3>{esc(kind)}</h3>", scale.legend(f"{kind} (one scale for every image and layer below)")]
    for index, name in keys:
        for label, maps, t in tables:
            rows = t[(t["image_index"] == index) & (t["image"] == name)]
            if rows.empty:
                continue
            image = image_of(maps, name, index)
            size = _size(image, rows)
            use = images.use(image) if image is not None else ""
            panels = []
            for _, layer_rows in rows.sort_values(["layer", "row", "col"]).groupby("layer", sort=True):
                panels.append(_panel(layer_rows, size, use, name, scale))
            if use:
                panels.insert(0, _input_panel(use, size, name))
            short = name.replace("\\", "/").rsplit("/", 1)[-1]
            caption = f'<span title="{esc(name)}">{esc(short)}</span>'
            caption += f' <span class="muted">{esc(label)}</span>' if label else ""
            out.append(
                f'<div class="patch-row"><div class="patch-name">{caption}</div>'
                f'<div class="patch-panels">{"".join(panels)}</div></div>'
            )
    return "".join(out)


def patch_maps_html(sources: Sequence[tuple[str, PatchMaps]], prefix: str) -> Html:
    """The patch maps of one or more runs (``(label, maps)``: ``("", maps)`` for a measure run, ``("before", ...)``
    and ``("after", ...)`` for a finetune run): per kind a shared colour scale, then per image one row of layer
    panels per run; the problems of the files as notes. ``prefix`` keeps the element ids unique in the page."""
    images = _Images(prefix)
    problems = [f"{label + ': ' if label else ''}{p}" for label, m in sources for p in m.problems]
    usable = [(label, m) for label, m in sources if not m.table.empty]
    blocks = [_kind_block(kind, usable, images) for kind in _kinds([m.table for _, m in usable])]
    wrapper = f"{prefix}-patch-maps"
    control = (
        f'<label class="overlay-control" data-overlay="{esc(wrapper)}" hidden>cell colour opacity '
        '<input type="range" min="0" max="1" step="0.05" value="0.6"></label>'
        if blocks
        else ""
    )
    notes = "".join(note(p) for p in problems)
    return Html(f'{notes}{control}{images.html()}<div id="{esc(wrapper)}" class="patch-maps">{"".join(blocks)}</div>')
