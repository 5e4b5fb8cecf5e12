"""A page read back with the standard library's ``html.parser``: a small element tree, and the checks every report
must pass (it parses with every element closed, and it refers to nothing outside itself).

Plain helpers for the page tests (``test_*_page.py``); nothing here imports the code under test.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

import numpy as np
from PIL import Image

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
"""HTML elements without an end tag."""

URL_ATTRIBUTES = {"src", "href", "xlink:href", "action", "formaction", "data", "poster", "srcset", "background"}
"""Attributes that make a browser fetch something."""

GEOMETRY = {"x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "r", "width", "height", "points", "d", "viewbox"}
"""SVG attributes that hold coordinates."""


@dataclass
class Node:
    """One element: its tag, attributes, children and the text directly inside it."""

    tag: str
    attrs: dict[str, str]
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def iter(self) -> Iterator[Node]:
        """This element and every element inside it, in document order."""
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        """Elements inside (this one included) with ``tag``, the class ``cls`` and the given attribute values
        (``data_metric="x"`` matches ``data-metric="x"``)."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.attrs.get("class", "").split())
            and all(n.attrs.get(k) == v for k, v in wanted.items())
        ]

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> Node:
        """The one element :meth:`find_all` finds (an AssertionError when there is not exactly one)."""
        found = self.find_all(tag, cls, **attrs)
        assert len(found) == 1, f"{len(found)} elements <{tag} class={cls} {attrs}>"
        return found[0]

    @property
    def text(self) -> str:
        """All the text inside, in order."""
        return "".join(self._text_parts())

    def _text_parts(self) -> Iterator[str]:
        yield from self.texts
        for child in self.children:
            yield from child._text_parts()

    @property
    def title(self) -> str | None:
        """The text of the ``<title>`` child (an SVG element's hover text), ``None`` without one."""
        titles = [c for c in self.children if c.tag == "title"]
        return titles[0].text if titles else None


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.errors: list[str] = []
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def _add(self, tag: str, attrs: list[tuple[str, str | None]]) -> Node:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.stack[-1])
        self.stack[-1].children.append(node)
        return node

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = self._add(tag, attrs)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if self.stack[-1].tag != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1].tag}> at {self.getpos()}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].texts.append(data)


def parse(html: str) -> Node:
    """The page's element tree; fails when an element is closed out of order or left open, an id is used twice, or
    there is no doctype."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    assert builder.errors == [], builder.errors[:5]
    assert [n.tag for n in builder.stack] == ["#document"], f"left open: {[n.tag for n in builder.stack]}"
    assert builder.doctype.lower() == "doctype html", builder.doctype
    ids = [n.attrs["id"] for n in builder.root.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    return builder.root


def offline_problems(root: Node) -> list[str]:
    """Every way the page refers to something outside the file: a URL attribute that is not ``#id`` or ``data:``,
    a ``<link>`` other than a ``data:`` icon, a ``<script src>``, a frame or object, a CSS ``url()`` or ``@import``
    that is not ``data:``; and a page without a Content-Security-Policy that forbids requests."""
    out = []
    for node in root.iter():
        for name, value in node.attrs.items():
            if name in URL_ATTRIBUTES and not value.startswith(("#", "data:")):
                out.append(f"<{node.tag} {name}={value[:60]!r}>")
        if node.tag == "link" and not (
            node.attrs.get("rel") == "icon" and node.attrs.get("href", "").startswith("data:")
        ):
            out.append(f"<link {node.attrs}>")
        if node.tag == "script" and "src" in node.attrs:
            out.append(f"<script src={node.attrs['src']!r}>")
        if node.tag in ("iframe", "frame", "object", "embed", "base"):
            out.append(f"<{node.tag}>")
        css = node.text if node.tag == "style" else node.attrs.get("style", "")
        for target in re.findall(r"url\(\s*['\"]?([^'\")]*)", css):
            if not target.startswith(("data:", "#")):
                out.append(f"CSS url({target[:60]})")
        if "@import" in css:
            out.append("CSS @import")
    policies = [
        n.attrs.get("content", "")
        for n in root.find_all("meta")
        if n.attrs.get("http-equiv") == "Content-Security-Policy"
    ]
    if not any("default-src 'none'" in p for p in policies):
        out.append(f"no Content-Security-Policy with default-src 'none': {policies}")
    return out


def bad_geometry(root: Node) -> list[str]:
    """SVG coordinates that are not finite numbers (``nan``, ``inf``)."""
    return [
        f"<{node.tag} {name}={value[:60]!r}>"
        for node in root.iter()
        for name, value in node.attrs.items()
        if name in GEOMETRY and re.search(r"(?i)(nan|inf)", value)
    ]


def decode_png(uri: str) -> np.ndarray:
    """A ``data:image/png;base64,...`` URI as an RGB array (fails when it is not a PNG)."""
    head, _, data = uri.partition(",")
    assert head == "data:image/png;base64", head
    raw = base64.b64decode(data, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def image_defs(root: Node) -> dict[str, Node]:
    """The ``<image>`` elements with an id (the patch maps' embedded inputs), by id."""
    return {n.attrs["id"]: n for n in root.find_all("image") if "id" in n.attrs}
