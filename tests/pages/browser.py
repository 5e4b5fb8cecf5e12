"""A headless Chromium that opens a page from disk with the network cut off and says what it saw.

The browser is the system's Chromium (Debian's ``chromium`` package: ``apt-get install chromium``) driven by
Playwright for Python through ``executable_path``; Playwright's own browser download (``playwright install``) is
never used. :func:`find_chromium` says where the browser is (``None``: not installed, the one reason the browser
tests skip); :class:`Browser` opens a page and returns a :class:`PageVisit`, whose :meth:`~PageVisit.problems` lists
everything that breaks the contract of a self-contained report: a console error, an uncaught exception, any request
other than the page's own file and ``data:`` / ``blob:`` URIs (each is aborted before it leaves and recorded), an
``<img>`` that did not decode, a ``<link>`` to an outside resource, and a blank full-page screenshot.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

CHROMIUM_ENV = "OVERSMOOTH_CHROMIUM"
"""Path of a Chromium or Chrome binary to use instead of the one found on ``PATH``."""

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/snap/bin/chromium")

LAUNCH_ARGS = [
    # Headless on a machine with no screen, no GPU and a small /dev/shm, running as root (Playwright adds
    # --no-sandbox itself); no background connections of the browser's own (updates, sync, QUIC probes), which a
    # closed network refuses many at a time.
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]

VIEWPORT = {"width": 1280, "height": 900}

MIN_FIGURE_PX = (100, 50)
"""A figure is an ``<svg>`` (outermost), ``<img>`` or ``<canvas>`` drawn at least this many CSS pixels wide and high
(a chart squeezed smaller than that is unreadable; icons are smaller)."""

MIN_SVG_SCALE = 1 / 3
"""An ``<svg>`` with a width in pixels that is drawn narrower than this fraction of it is squashed (a layout bug,
such as a chart in a ``min-content`` box), on a viewport wide enough to show it whole."""

MIN_COLOURS = 16
"""A screenshot with fewer distinct colours than this is blank (one background, perhaps a line of text)."""

MIN_INK = 0.005
"""... and so is one where fewer than this fraction of pixels differ from the most common colour."""

# Collected in the page after it loaded: the figures, the images and <link> elements pointing outside the file.
_INSPECT = r"""
() => {
  const box = (el) => { const r = el.getBoundingClientRect(); return {width: r.width, height: r.height}; };
  const figures = [];
  for (const el of document.querySelectorAll('svg, img, canvas')) {
    if (el.tagName.toLowerCase() === 'svg' && el.parentElement && el.parentElement.closest('svg')) continue;
    const declared = parseFloat(el.getAttribute('width') || '');  // svg width="480" (NaN for 100% or none)
    const px = /^\s*[\d.]+\s*(px)?\s*$/.test(el.getAttribute('width') || '') ? declared : null;
    figures.push({tag: el.tagName.toLowerCase(), id: el.id || '', label: el.getAttribute('aria-label') || '',
                  declaredWidth: el.tagName.toLowerCase() === 'svg' ? px : null,
                  visible: el.checkVisibility ? el.checkVisibility() : true, ...box(el)});
  }
  const images = [...document.querySelectorAll('img')].map((img) => ({
    src: (img.currentSrc || img.src || '').slice(0, 80), complete: img.complete, naturalWidth: img.naturalWidth,
  }));
  const links = [...document.querySelectorAll('link[href]')]
    .map((l) => l.href)
    .filter((h) => !h.startsWith('data:') && !h.startsWith('blob:'));
  return {figures, images, links, title: document.title};
}
"""

# Let scripts that draw after 'load' (charting libraries, requestAnimationFrame) finish their first frame, and every
# image, lazy ones below the fold included, load and decode (or fail) before the page is read.
_SETTLE = """
async () => {
  const images = [...document.images];
  for (const img of images) img.loading = 'eager';
  await Promise.allSettled(images.map((img) => img.decode()));
  if (document.fonts) await document.fonts.ready;
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
}
"""


def find_chromium() -> str | None:
    """The Chromium to drive: ``$OVERSMOOTH_CHROMIUM`` when set (it must exist), else the first of
    :data:`CHROMIUM_NAMES` on ``PATH``, else the first of :data:`CHROMIUM_PATHS` that exists; ``None`` when there is
    none (the browser tests then skip)."""
    chosen = os.environ.get(CHROMIUM_ENV)
    if chosen:
        if not Path(chosen).is_file():
            raise FileNotFoundError(f"${CHROMIUM_ENV}={chosen} is not a file")
        return chosen
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in CHROMIUM_PATHS if Path(p).is_file()), None)


@dataclass
class Screenshot:
    """What a full-page screenshot holds: its file, size, how many distinct colours and how much ink."""

    path: Path
    width: int
    height: int
    colours: int
    ink: float  # fraction of pixels that differ from the most common colour

    @property
    def blank(self) -> bool:
        return self.colours < MIN_COLOURS or self.ink < MIN_INK


def read_screenshot(path: Path) -> Screenshot:
    """Decode a PNG and measure it (:class:`Screenshot`)."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    counts = rgb.getcolors(maxcolors=rgb.width * rgb.height) or []
    top = max(n for n, _ in counts)
    pixels = rgb.width * rgb.height
    return Screenshot(path, rgb.width, rgb.height, len(counts), 1.0 - top / pixels)


@dataclass
class PageVisit:
    """Everything seen while one page was open (:meth:`Browser.visit`)."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # requests aborted before they left the page
    failed: list[str] = field(default_factory=list)  # requests that failed for any reason (the blocked ones too)
    text: str = ""  # document.body.innerText
    title: str = ""
    figures: list[dict[str, Any]] = field(default_factory=list)  # every svg (outermost) / img / canvas, with its box
    images: list[dict[str, Any]] = field(default_factory=list)  # every <img>: src (cut), complete, naturalWidth
    links: list[str] = field(default_factory=list)  # <link href> that is not a data: or blob: URI
    screenshot: Screenshot | None = None

    @property
    def drawn_figures(self) -> list[dict[str, Any]]:
        """The figures shown (not hidden, as in a closed ``<details>``) at least :data:`MIN_FIGURE_PX` wide and
        high."""
        w, h = MIN_FIGURE_PX
        return [f for f in self.figures if f["visible"] and f["width"] >= w and f["height"] >= h]

    @property
    def squashed_figures(self) -> list[dict[str, Any]]:
        """``<svg>`` elements shown (not hidden, as in a closed ``<details>``) at under :data:`MIN_SVG_SCALE` of their
        own pixel width, where the viewport had room for it."""
        return [
            f
            for f in self.figures
            if f.get("declaredWidth")
            and f["visible"]
            and f["width"] < MIN_SVG_SCALE * min(f["declaredWidth"], VIEWPORT["width"])
        ]

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        """``<img>`` elements that did not load and decode (``naturalWidth`` 0)."""
        return [i for i in self.images if not i["complete"] or i["naturalWidth"] <= 0]

    def problems(self) -> list[str]:
        """Each way the page breaks the contract of a self-contained, offline, rendered page; empty when none."""
        out = [f"console error: {m}" for m in self.console_errors]
        out += [f"uncaught exception: {m}" for m in self.page_errors]
        out += [f"request left the file (blocked): {u}" for u in self.blocked]
        out += [f"request failed: {u}" for u in self.failed if u not in self.blocked]
        out += [f"<img> did not load: {i['src']}" for i in self.broken_images]
        out += [f"<link> to an outside resource: {u}" for u in self.links]
        out += [
            f"figure squashed: <svg> {f['label'] or f['id']!r} {f['width']:.0f} px wide of its {f['declaredWidth']:.0f}"
            for f in self.squashed_figures
        ]
        if self.screenshot is None:
            out.append("no screenshot")
        elif self.screenshot.blank:
            s = self.screenshot
            out.append(f"blank screenshot: {s.colours} colours, {100 * s.ink:.2f}% ink ({s.path})")
        return out

    def describe(self) -> str:
        """A few lines for an assertion message."""
        shot = self.screenshot
        return "\n".join(
            [
                f"page {self.url}",
                *(f"  {p}" for p in self.problems()),
                f"  figures drawn: {len(self.drawn_figures)} of {len(self.figures)}: {self.figures[:12]}",
                f"  screenshot: {shot}",
                f"  text ({len(self.text)} chars): {self.text[:400]!r}",
            ]
        )


class Browser:
    """One headless Chromium (system binary, Playwright) for a test module; :meth:`visit` opens one page."""

    def __init__(self, executable: str) -> None:
        from playwright.sync_api import sync_playwright

        self.executable = executable
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=executable, headless=True, args=LAUNCH_ARGS)
        except Exception:
            self._pw.stop()
            raise
        self.version = self._browser.version

    def close(self) -> None:
        self._browser.close()
        self._pw.stop()

    def visit(self, page_file: Path, screenshot: Path, timeout_ms: int = 30_000) -> PageVisit:
        """Open ``page_file`` (a file:// URL) in a fresh context with every other request aborted, wait for it to
        load and draw, read what it shows and save a full-page screenshot to ``screenshot``."""
        url = page_file.resolve().as_uri()
        visit = PageVisit(url)
        context = self._browser.new_context(
            viewport=VIEWPORT, device_scale_factor=1, service_workers="block", java_script_enabled=True
        )
        try:

            def route(r) -> None:
                request_url = r.request.url
                if request_url.split("#", 1)[0] == url or request_url.startswith(("data:", "blob:")):
                    r.continue_()
                else:
                    visit.blocked.append(request_url)
                    r.abort("blockedbyclient")

            context.route("**/*", route)
            if hasattr(context, "route_web_socket"):  # Playwright >= 1.48: sockets are not requests

                def socket(ws) -> None:
                    visit.blocked.append(ws.url)
                    ws.close()

                context.route_web_socket("**/*", socket)
            page = context.new_page()
            page.on("console", lambda m: visit.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: visit.page_errors.append(str(e)))
            page.on("requestfailed", lambda r: visit.failed.append(r.url))
            page.goto(url, wait_until="load", timeout=timeout_ms)
            page.evaluate(_SETTLE)
            seen = page.evaluate(_INSPECT)
            visit.figures, visit.images, visit.links, visit.title = (
                seen["figures"],
                seen["images"],
                seen["links"],
                seen["title"],
            )
            visit.text = page.inner_text("body") if page.query_selector("body") else ""
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True, timeout=timeout_ms)
            visit.screenshot = read_screenshot(screenshot)
        finally:
            context.close()
        return visit
