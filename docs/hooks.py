"""MkDocs hook: pages hold placeholders, the code fills them in at build time.

``<!-- generated: NAME [ARG ...] -->`` is replaced with ``oversmooth_cli.cli.reference.render(NAME, *ARGS)`` (tables
generated from the code: metrics, options, exit codes, output files, families), and ``<!-- include: README.md -->``
(or ``CHANGELOG.md``) with that file of the repository, its ``docs/`` links made relative to the site. An unknown
name fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATED = re.compile(r"^<!-- generated: ([\w-]+)((?: [\w.-]+)*) -->$", re.MULTILINE)
INCLUDE = re.compile(r"^<!-- include: (README|CHANGELOG)\.md -->$", re.MULTILINE)


def readme_for_site(text: str) -> str:
    """The README (or CHANGELOG) as a page of the site: ``docs/X`` links and images become ``X``, the changelog link
    points at its page."""
    text = re.sub(r"\]\(docs/([^)]*)\)", r"](\1)", text)
    return text.replace("](CHANGELOG.md)", "](changelog.md)")


def expand(markdown: str) -> str:
    """``markdown`` with every placeholder replaced (imported here so that ``mkdocs`` loads the package lazily)."""
    from oversmooth_cli.cli.reference import render

    markdown = INCLUDE.sub(lambda m: readme_for_site((REPO / f"{m.group(1)}.md").read_text()), markdown)
    return GENERATED.sub(lambda m: render(m.group(1), *m.group(2).split()), markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return expand(markdown)
