"""Every kind of ``report.html`` opened from disk in a real headless Chromium with the network cut off.

Each report is made through the CLI (``measure`` on the bundled model and digits, a 1-epoch ``finetune --control`` of
a tiny ViT, ``check --html`` on a hand-shifted copy of the measure run), then opened as a file:// URL by
:class:`~tests.pages.browser.Browser`: no console error or uncaught exception, no request leaving the file (each is
aborted and recorded), the figures drawn with a size and every ``<img>`` decoded, the key numbers of the run in the
page text, and a full-page screenshot (kept under the test's ``tmp_path``) that is not blank. The harness itself is
tested first on hand-written pages, one per fault, so it cannot pass a broken page.

Skipped, with the reason, only where the driver (Playwright for Python, ``pip install -e ".[dev]"``) or a Chromium
(``apt-get install chromium``, or ``$OVERSMOOTH_CHROMIUM``) is missing; any other trouble, a browser that does not
start included, fails.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageDraw

from oversmooth_cli.errors import EXIT_FAILED_CHECK

from .._helpers import (
    DIGITS_VAL,
    REPO,
    TINY_ARCH,
    invoke,
    torch_threads,
)
from .browser import Browser, PageVisit, find_chromium, read_screenshot

if importlib.util.find_spec("playwright") is None:
    pytest.skip(
        "browser tests: Playwright for Python is not installed (pip install -e '.[dev]'; the browser is the "
        "system Chromium, never 'playwright install')",
        allow_module_level=True,
    )
CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip(
        "browser tests: no Chromium installed (apt-get install chromium, or set OVERSMOOTH_CHROMIUM to a Chromium "
        "or Chrome binary)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser(CHROMIUM)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


NUMBER = re.compile(r"(?<![\w.])-?\d+\.(\d+)(?!\w|\.\d)")  # a decimal, not inside a word or a version


def shown(text: str, value: float) -> bool:
    """``value`` is in ``text`` as a decimal with at least 3 decimals that it rounds to (0.4992 for 0.49923; not
    0.50, which too many values round to)."""
    return any(
        len(m.group(1)) >= 3 and abs(float(m.group(0)) - value) <= 0.5 * 10 ** -len(m.group(1)) * (1 + 1e-9)
        for m in NUMBER.finditer(text.replace("\u2212", "-"))
    )


def assert_clean(visit: PageVisit, min_figures: int) -> None:
    """No contract broken (:meth:`PageVisit.problems`) and at least ``min_figures`` figures drawn."""
    assert not visit.problems(), visit.describe()
    assert len(visit.drawn_figures) >= min_figures, visit.describe()


# -- the harness on hand-written pages ------------------------------------------------------------------------------
def png_data_uri() -> str:
    """A 32 x 32 colour gradient with a diagonal line, as a data: URI."""
    im = Image.new("RGB", (32, 32))
    im.putdata([(8 * x, 8 * y, 128) for y in range(32) for x in range(32)])
    ImageDraw.Draw(im).line((0, 0, 31, 31), fill=(255, 255, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


GOOD_BODY = """
<h1>Harness check</h1>
<p>token_cosine at layer 8: <b>0.4992</b> over 40 images</p>
<svg width="320" height="160" viewBox="0 0 320 160" xmlns="http://www.w3.org/2000/svg">
  <rect x="0" y="0" width="320" height="160" fill="#f4f4f8"/>
  <polyline points="10,150 80,90 150,70 220,40 310,20" fill="none" stroke="#1f77b4" stroke-width="3"/>
  <circle cx="150" cy="70" r="6" fill="#d62728"/><text x="12" y="20">curve</text>
</svg>
<img alt="patch map" width="128" height="128" src="{png}">
<details><summary>more</summary><svg width="480" height="280"><rect width="480" height="280"/></svg></details>
"""

CSP = """<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:">"""

FAULTS = {
    # name: (what is added to the good page, as write_page's keyword arguments ("page" replaces it whole); what
    # problems() must then report, a regular expression)
    "console_error": (
        {"body": '<script>console.error("injected console error")</script>'},
        r"console error: injected console error$",
    ),
    "uncaught_exception": (
        {"body": '<script>throw new Error("injected exception")</script>'},
        r"uncaught exception: .*injected exception",
    ),
    "remote_img": (
        {"body": '<img alt="remote" width="16" height="16" src="https://example.com/pixel.png">'},
        r"request left the file \(blocked\): https://example\.com/pixel\.png$",
    ),
    "sibling_file": (
        {"body": '<img alt="sibling" src="curves.png">'},
        r"request left the file \(blocked\): file://.*/sibling_file/curves\.png$",
    ),
    "fetch": (
        {"body": '<script>fetch("http://127.0.0.1:9/x.json").catch(() => {});</script>'},
        r"request left the file \(blocked\): http://127\.0\.0\.1:9/x\.json$",
    ),
    "stylesheet": (
        {"head": '<link rel="stylesheet" href="https://cdn.example.com/x.css">'},
        r"request left the file \(blocked\): https://cdn\.example\.com/x\.css$",
    ),
    # The page's own Content-Security-Policy stops the request before it is made: the browser's refusal is a console
    # error, so a forbidden reference still fails although no request reaches the route.
    "refused_by_csp": (
        {"head": CSP, "body": '<img alt="remote" width="16" height="16" src="https://example.com/pixel.png">'},
        r"console error: .*https://example\.com/pixel\.png.*Content Security Policy",  # wording varies by version
    ),
    "squashed_svg": (
        {
            "body": '<div style="width:min-content">a caption<svg width="480" height="280" viewBox="0 0 480 280" '
            'aria-label="squashed" style="max-width:100%;height:auto"><rect width="480" height="280"/></svg></div>'
        },
        r"figure squashed: <svg> 'squashed' \d+ px wide of its 480$",
    ),
    "broken_img": (
        {"body": '<img alt="broken" src="data:image/png;base64,AAAA">'},
        r"<img> did not load: data:image/png",
    ),
    "blank": ({"page": "<!doctype html><html><body></body></html>"}, r"blank screenshot: 1 colours"),
}


def write_page(folder: Path, body: str = "", head: str = "", page: str | None = None) -> Path:
    """``folder/report.html``: the good page (an SVG curve, a data: PNG, a key number, a figure in a closed
    ``<details>``) with ``head`` and ``body`` added, or ``page`` instead; beside it a real PNG that the page must
    not read."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / "curves.png")
    head = f'<meta charset="utf-8"><title>harness check</title>{head}'
    body = GOOD_BODY.format(png=png_data_uri()) + body
    html = page or f"<!doctype html><html><head>{head}</head><body>{body}</body></html>"
    (folder / "report.html").write_text(html, encoding="utf-8")
    return folder / "report.html"


def test_harness_passes_a_clean_self_contained_page(browser, tmp_path):
    for name, head in (("good", ""), ("good-csp", CSP)):  # a page's own CSP that allows data: images is fine
        visit = browser.visit(write_page(tmp_path / name, head=head), tmp_path / f"{name}.png")
        assert visit.problems() == [], visit.describe()
        assert [f["tag"] for f in visit.drawn_figures] == ["svg", "img"], visit.describe()  # not the hidden one
        assert visit.images[0]["naturalWidth"] == 32 and "0.4992" in visit.text and shown(visit.text, 0.49923)
        shot = read_screenshot(tmp_path / f"{name}.png")
        assert not shot.blank and shot.width == 1280, shot


@pytest.mark.parametrize("fault", list(FAULTS))
def test_harness_reports_each_fault(browser, tmp_path, fault):
    added, expected = FAULTS[fault]
    visit = browser.visit(write_page(tmp_path / fault, **added), tmp_path / f"{fault}.png")
    assert any(re.match(expected, p) for p in visit.problems()), visit.describe()
    if "page" not in added:  # the rest is the good page, still drawn: the fault alone is reported
        assert len(visit.drawn_figures) >= 2 and not visit.screenshot.blank, visit.describe()
    if "blocked" in expected:
        assert all(u.startswith(("http", "file")) and u != visit.url for u in visit.blocked), visit.blocked


# -- measure ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measure_run(tmp_path_factory) -> Path:
    """The bundled 8-block ViT measured on the 40 bundled digits, through the CLI."""
    out = tmp_path_factory.mktemp("measure") / "run"
    with torch_threads(1):
        res = invoke("measure", REPO / "examples" / "digits-vit", DIGITS_VAL, "--out", out, "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
@pytest.mark.cli
def test_measure_report_opens_offline_with_its_figures_and_numbers(browser, measure_run, tmp_path):
    out = measure_run
    assert (out / "report.html").is_file(), f"measure wrote no report.html: {sorted(p.name for p in out.iterdir())}"
    visit = browser.visit(out / "report.html", tmp_path / "measure-report.png")
    assert_clean(visit, min_figures=3)  # curves, per-head heatmaps, patch maps
    summary = json.loads((out / "summary.json").read_text())
    layers = pd.read_csv(out / "layers.csv")
    last = layers[(layers.metric == "token_cosine") & (layers.layer == layers.layer.max())].iloc[0]
    assert summary["model"]["name"] == "digits-vit" and "digits-vit" in visit.text, visit.describe()
    assert re.search(rf"\b{summary['images']['measured']}\b", visit.text), visit.describe()  # 40 images
    assert shown(visit.text, last["mean"]), f"last-layer token_cosine {last['mean']} not shown\n{visit.describe()}"


@pytest.mark.slow
@pytest.mark.cli
def test_measure_writes_a_patch_map_figure_that_is_not_blank(measure_run):
    patches = measure_run / "patches.png"
    assert patches.is_file(), f"measure wrote no patches.png: {sorted(p.name for p in measure_run.iterdir())}"
    assert not read_screenshot(patches).blank, read_screenshot(patches)


# -- check --html ---------------------------------------------------------------------------------------------------
SHIFTED_LAYER, SHIFT = 4, 0.2


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.check
@pytest.mark.parametrize("verdict", ["failed", "passed"])
def test_check_html_report_shows_the_verdict_offline(browser, measure_run, tmp_path, verdict):
    current = tmp_path / "current"
    shutil.copytree(measure_run, current)
    layers = pd.read_csv(current / "layers.csv")
    moved = (layers.metric == "token_cosine") & (layers.layer == SHIFTED_LAYER)
    if verdict == "failed":
        layers.loc[moved, "mean"] += SHIFT
        layers.to_csv(current / "layers.csv", index=False)
    html = tmp_path / "check.html"
    res = invoke("check", measure_run, current, "--html", html)
    assert res.exit_code == (EXIT_FAILED_CHECK if verdict == "failed" else 0), res.output
    assert html.is_file(), "check --html wrote no page"
    visit = browser.visit(html, tmp_path / f"check-{verdict}.png")
    assert_clean(visit, min_figures=1)  # baseline and current curves with the tolerance band
    assert "token_cosine" in visit.text, visit.describe()
    word = "fail" if verdict == "failed" else "pass"
    assert re.search(word, visit.text, re.IGNORECASE), visit.describe()
    if verdict == "failed":  # the failing layer's current value is in the verdict table
        assert shown(visit.text, layers.loc[moved, "mean"].item()), visit.describe()


# -- finetune --control -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.finetune
def test_finetune_report_opens_offline_with_the_side_by_side(browser, seeds_run, tmp_path):
    """The pages ``finetune --control --seeds 0,1`` wrote (conftest's run, through the CLI): seed 0's ``--control``
    folder (a separate ``--control`` run bit for bit), its twin's, and the pooled page over the seeds."""
    out = seeds_run / "seed-0"
    assert (out / "report.html").is_file(), f"finetune wrote no report.html: {sorted(p.name for p in out.iterdir())}"
    visit = browser.visit(out / "report.html", tmp_path / "finetune-report.png")
    assert_clean(visit, min_figures=3)  # training curves, monitor heatmap, side-by-side
    assert TINY_ARCH in visit.text, visit.describe()
    side = json.loads((out / "side_by_side.json").read_text())
    arms = {row["arm"]: row for row in side["rows"]}
    assert re.search("control", visit.text, re.IGNORECASE) and "McNemar" in visit.text, visit.describe()
    for arm in ("treated", "control"):
        assert shown(visit.text, arms[arm]["token_cosine"]), f"{arm} token cosine not shown\n{visit.describe()}"
    twin = out / "control" / "report.html"  # the control arm is a run folder too, with its own page
    assert_clean(browser.visit(twin, tmp_path / "finetune-control-report.png"), min_figures=1)
    pooled = browser.visit(seeds_run / "report.html", tmp_path / "finetune-seeds-report.png")
    assert_clean(pooled, min_figures=1)
    verdict = json.loads((seeds_run / "pooled.json").read_text())["verdict"]
    assert "seed" in pooled.text and TINY_ARCH in pooled.text, pooled.describe()
    assert verdict.split(":")[0] in pooled.text, f"the pooled verdict is not on the page\n{pooled.describe()}"
