"""The HTML shell of every report: one self-contained file (inline CSS, one small inline script, no reference to
anything outside the file), a header with the run's key numbers, a table of contents, sections, and the building
blocks the pages share (tables, key-value lists, notes), plus :func:`write_page`.

The page reads completely without the script: every section is plain HTML, every hover value an SVG ``<title>``.
The script only makes tooltips instant and adds the overlay slider of the patch maps. A Content-Security-Policy
``<meta>`` forbids every network request, so the file behaves the same on a shared drive, in a CI artifact or on a
machine without network.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..io import atomic_write
from .svg import Html, esc

__all__ = ["KeyNumber", "Section", "details", "document", "grid", "key_values", "note", "table", "write_page"]


CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--bg:#fff;--panel:#f6f7f9;--line:#dfe3ea;--accent:#1f5fbf;--ok:#1a7f37;
--fail:#c62828;--fail-bg:#fdecea;--ok-bg:#e9f6ec;--grid:#e6e9ef;--overlay:.6}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ef;--muted:#a3abba;--bg:#14171c;--panel:#1d2128;--line:#30363f;
--accent:#7fb0ff;--ok:#4cc26a;--fail:#ff6b6b;--fail-bg:#3a1d1d;--ok-bg:#15301d;--grid:#2a2f38}}
*{box-sizing:border-box}
html{font-size:15px}
body{margin:0;color:var(--fg);background:var(--bg);line-height:1.5;
font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
code,pre,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:.88em}
header.top{background:var(--panel);border-bottom:1px solid var(--line);padding:22px 32px 18px}
header.top h1{margin:0 0 2px;font-size:1.55rem;font-weight:650;letter-spacing:-.01em}
header.top .subtitle{color:var(--muted);margin:0 0 14px;word-break:break-all}
.status{display:inline-block;padding:2px 10px;border-radius:4px;font-weight:700;font-size:.85rem;margin-right:8px;
vertical-align:middle}
.status.pass{background:var(--ok-bg);color:var(--ok)}.status.fail{background:var(--fail-bg);color:var(--fail)}
.numbers{display:flex;flex-wrap:wrap;gap:10px}
.number{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:8px 14px;min-width:130px}
.number .label{color:var(--muted);font-size:.78rem;text-transform:uppercase;letter-spacing:.04em}
.number .value{font-size:1.2rem;font-weight:600;font-variant-numeric:tabular-nums}
.number .hint{color:var(--muted);font-size:.8rem}
.layout{display:flex;align-items:flex-start;max-width:1500px;margin:0 auto}
nav.toc{position:sticky;top:0;flex:0 0 210px;padding:20px 10px 20px 24px;font-size:.9rem;max-height:100vh;overflow:auto}
nav.toc h2{font-size:.78rem;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);margin:0 0 6px}
nav.toc ol{list-style:none;padding:0;margin:0}nav.toc li{margin:3px 0}
nav.toc a{color:var(--fg);text-decoration:none}nav.toc a:hover{color:var(--accent);text-decoration:underline}
main{flex:1;min-width:0;padding:8px 32px 40px}
section{border-bottom:1px solid var(--line);padding:10px 0 22px}
section>h2{font-size:1.25rem;margin:14px 0 6px}h3{font-size:1.05rem;margin:18px 0 6px}
.intro{color:var(--muted);margin:0 0 10px;max-width:80em}
table{border-collapse:collapse;margin:8px 0 12px;font-size:.9rem}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
th{background:var(--panel);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.fail td{background:var(--fail-bg)}tr.fail td.result{color:var(--fail);font-weight:700}
td.result.ok{color:var(--ok)}
table.kv th{background:none;color:var(--muted);font-weight:500;white-space:nowrap}
.scroll{overflow-x:auto}
.note{background:var(--panel);border-left:3px solid var(--accent);padding:8px 12px;margin:10px 0;max-width:80em}
.note.fail{border-color:var(--fail);background:var(--fail-bg)}.note.pass{border-color:var(--ok);background:var(--ok-bg)}
.muted{color:var(--muted)}
details{margin:8px 0}summary{cursor:pointer;color:var(--accent)}
.grid{display:flex;flex-wrap:wrap;gap:18px 26px}
figure.chart-box{margin:0;max-width:100%}
figure.chart-box figcaption{font-weight:600;margin:6px 0 2px}
svg.chart,svg.heatmap{max-width:100%;height:auto;display:block;font-size:11px}
svg text{fill:var(--fg)}svg .tick{fill:var(--muted)}svg .axis-label{font-size:11.5px}
svg .frame{fill:none;stroke:var(--line)}svg .grid{stroke:var(--grid)}svg .tickmark{stroke:var(--muted)}
svg .vline{stroke:var(--muted);stroke-dasharray:4 3}
svg .band{fill-opacity:.18;stroke:none}svg .line{fill:none;stroke-width:1.8}
svg .pt{stroke-width:1.4}svg .mark{stroke-width:2.4;fill:none}
svg .hit{fill:var(--accent);fill-opacity:0}svg .hit:hover{fill-opacity:.08}
svg .cell:hover{stroke:var(--fg);stroke-width:1.5}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:.82rem;color:var(--muted);margin-top:2px}
.key{display:inline-block;width:18px;margin-right:5px;vertical-align:middle}
.key-line{height:0}.key-band{height:10px;opacity:.3}.key-mark{color:var(--fail);font-weight:700;width:auto}
.scale{display:flex;align-items:center;gap:6px;font-size:.8rem;color:var(--muted);margin:4px 0 16px;flex-wrap:wrap}
.scale-bar{position:relative;display:inline-block;width:180px;height:10px;border-radius:2px}
.scale-mid{position:absolute;left:50%;top:11px;transform:translateX(-50%);font-size:.72rem}
.scale-label{flex-basis:100%}
.patch-row{margin:6px 0 14px}
.patch-name{font-size:.85rem;font-weight:600;word-break:break-all;margin-bottom:3px}
.patch-name .muted{font-weight:400}
.patch-panels{display:flex;flex-wrap:wrap;gap:8px}
figure.patch-panel{margin:0;text-align:center;font-size:.78rem;color:var(--muted)}
svg.patch{max-width:100%;height:auto;display:block;border:1px solid var(--line)}
svg.patch .cells rect{fill-opacity:var(--overlay);stroke:rgba(255,255,255,.35);stroke-width:.5px;
vector-effect:non-scaling-stroke}
svg.patch .cells rect:hover{stroke:#fff;stroke-width:2px;fill-opacity:calc(var(--overlay) + .25)}
.overlay-control{font-size:.85rem;color:var(--muted)}
.verdict{font-size:1.02rem;font-weight:500}
#tip{position:fixed;z-index:10;pointer-events:none;background:#1d2330;color:#fff;padding:6px 9px;border-radius:5px;
font-size:.8rem;white-space:pre-line;max-width:380px;box-shadow:0 2px 8px rgba(0,0,0,.25)}
footer{color:var(--muted);font-size:.8rem;padding:16px 32px;border-top:1px solid var(--line)}
@media (max-width:900px){nav.toc{display:none}main{padding:8px 16px}header.top{padding:18px 16px}}
@media print{nav.toc,.overlay-control{display:none}section,figure{break-inside:avoid}header.top{background:none}}
"""
"""The page's only style sheet: system fonts, light and dark colours, print rules."""


SCRIPT = """(function(){
var tip=document.createElement('div');tip.id='tip';tip.hidden=true;document.body.appendChild(tip);
document.querySelectorAll('svg title').forEach(function(t){var p=t.parentNode;
p.setAttribute('data-tip',t.textContent);p.setAttribute('aria-label',t.textContent);p.removeChild(t);});
function place(e){var x=e.clientX+14,y=e.clientY+14,r=tip.getBoundingClientRect();
if(x+r.width>innerWidth-4)x=e.clientX-r.width-10;if(y+r.height>innerHeight-4)y=e.clientY-r.height-10;
tip.style.left=x+'px';tip.style.top=y+'px';}
document.addEventListener('mouseover',function(e){var el=e.target.closest?e.target.closest('[data-tip]'):null;
if(!el){tip.hidden=true;return;}tip.textContent=el.getAttribute('data-tip');tip.hidden=false;place(e);});
document.addEventListener('mousemove',function(e){if(!tip.hidden)place(e);});
document.addEventListener('mouseleave',function(){tip.hidden=true;});
document.querySelectorAll('[data-overlay]').forEach(function(box){var input=box.querySelector('input');
box.hidden=false;input.addEventListener('input',function(){
document.getElementById(box.getAttribute('data-overlay')).style.setProperty('--overlay',input.value);});});
})();"""
"""The page's only script: instant tooltips from the SVG ``<title>`` elements, the patch maps' overlay slider."""


@dataclass(frozen=True)
class Section:
    """One section of a page: its anchor ``id``, heading, body (markup) and an optional one-line introduction."""

    id: str
    title: str
    body: str
    intro: str = ""


@dataclass(frozen=True)
class KeyNumber:
    """One of the numbers in the page header: ``label``, ``value`` and an optional ``hint`` under it."""

    label: str
    value: str
    hint: str = ""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def document(
    title: str,
    sections: Sequence[Section],
    *,
    subtitle: str = "",
    numbers: Sequence[KeyNumber] = (),
    status: tuple[str, str] | None = None,
    footer: str = "",
) -> str:
    """The complete HTML page.

    Args:
        title: the ``<h1>`` and the window title.
        sections: the page's sections, in order; the table of contents lists them.
        subtitle: one line under the title (the run folder, when it was written).
        numbers: the key numbers in the header.
        status: ``("pass" | "fail", text)``: a coloured badge before the title (a check's verdict).
        footer: one line at the bottom (what wrote the page).
    """
    badge = f'<span class="status {esc(status[0])}">{esc(status[1])}</span>' if status else ""
    cards = "".join(
        f'<div class="number"><div class="label">{esc(n.label)}</div><div class="value">{esc(n.value)}</div>'
        + (f'<div class="hint">{esc(n.hint)}</div>' if n.hint else "")
        + "</div>"
        for n in numbers
    )
    toc = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(
        f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>'
        + (f'<p class="intro">{esc(s.intro)}</p>' if s.intro else "")
        + f"{s.body}</section>"
        for s in sections
    )
    foot = footer or f"Written by oversmooth {__version__}. This file is self-contained: it loads nothing from outside."
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(_csp())}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f'<meta name="generator" content="oversmooth {esc(__version__)}">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>"
        f'<header class="top"><h1>{badge}{esc(title)}</h1>'
        + (f'<p class="subtitle">{esc(subtitle)}</p>' if subtitle else "")
        + (f'<div class="numbers">{cards}</div>' if cards else "")
        + "</header>\n"
        f'<div class="layout"><nav class="toc" aria-label="Contents"><h2>Contents</h2><ol>{toc}</ol></nav>'
        f"<main>{body}</main></div>\n"
        f"<footer>{esc(foot)}</footer>\n"
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    numeric: Sequence[int] = (),
    row_classes: Sequence[str] | None = None,
    row_attrs: Sequence[Mapping[str, str]] | None = None,
    cell_classes: Mapping[int, str] | None = None,
) -> Html:
    """A table; cells are escaped unless they are :class:`Html`.

    Args:
        headers: the column headings.
        rows: the cells, one sequence per row.
        numeric: indexes of right-aligned, tabular-figure columns.
        row_classes: a class per row (``fail`` highlights it), ``""`` for none.
        row_attrs: extra attributes per row (``data-layer``...), names and values escaped.
        cell_classes: a class per column index added to every cell of that column.
    """
    num = set(numeric)
    cells = cell_classes or {}

    def cls(i: int, extra: str = "") -> str:
        names = " ".join(n for n in ("num" if i in num else "", cells.get(i, ""), extra) if n)
        return f' class="{esc(names)}"' if names else ""

    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        attrs = ""
        if row_classes and row_classes[r]:
            attrs += f' class="{esc(row_classes[r])}"'
        for key, value in (row_attrs[r] if row_attrs else {}).items():
            attrs += f' {esc(key)}="{esc(value)}"'
        body.append(f"<tr{attrs}>" + "".join(f"<td{cls(i)}>{esc(c)}</td>" for i, c in enumerate(row)) + "</tr>")
    return Html(
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def key_values(pairs: Sequence[tuple[str, object]]) -> Html:
    """A two-column table of labelled values (empty values left out; nothing when all are)."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs if v is not None and str(v) != "")
    return Html(f'<div class="scroll"><table class="kv"><tbody>{rows}</tbody></table></div>' if rows else "")


def details(summary: str, body: str) -> Html:
    """A folded block: ``summary`` shown, ``body`` (markup) on click."""
    return Html(f"<details><summary>{esc(summary)}</summary>{body}</details>")


def note(text: object, kind: str = "") -> Html:
    """A highlighted paragraph; ``kind`` ``pass`` or ``fail`` colours it."""
    return Html(f'<p class="note{" " + esc(kind) if kind else ""}">{esc(text)}</p>')


def grid(items: Sequence[str]) -> Html:
    """Figures side by side, wrapping on narrow screens."""
    return Html(f'<div class="grid">{"".join(items)}</div>')


def write_page(html: str, path: str | Path) -> Path:
    """Write a page atomically (a temporary sibling renamed over ``path``: readers never see half a page)."""
    target = Path(path)
    return atomic_write(target, lambda p: p.write_text(html, encoding="utf-8"))
