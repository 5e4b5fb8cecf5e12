"""MkDocs hook: pages hold placeholders, the code fills them in at build time.

``<!-- generated: NAME [ARG ...] -->`` is replaced with ``oversmooth_cli.cli.reference.render(NAME, *ARGS)`` (tables
generated from the code: metrics, options, exit codes, output files, families), and ``<!-- include: README.md -->``
(or ``CHANGELOG.md``) with that file of the repository, its ``docs/`` links made relative to the site, and
``<!-- results: NAME -->`` with the table a benchmark prints from its committed CSV (:data:`RESULTS`: the numbers on
the experiments page cannot drift from the results files). An unknown name fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATED = re.compile(r"^<!-- generated: ([\w-]+)((?: [\w.-]+)*) -->$", re.MULTILINE)
INCLUDE = re.compile(r"^<!-- include: (README|CHANGELOG)\.md -->$", re.MULTILINE)
RESULT = re.compile(r"^<!-- results: ([\w-]+) -->$", re.MULTILINE)
RESULTS = {
    "defaults-sweep": ("defaults_sweep", "report", "defaults_sweep.csv"),
    "defaults-sweep-history": ("defaults_sweep", "report", "defaults_sweep.csv"),
    "defaults-sweep-textures": ("defaults_sweep", "report", "defaults_sweep_textures.csv"),
    "finetune-effect": ("finetune_effect", "table", "finetune_effect.csv"),
}
"""Placeholder name -> (script in ``benchmarks/``, its function, the CSV in ``benchmarks/results/``)."""


def benchmark_table(name: str) -> str:
    """The Markdown table of one :data:`RESULTS` entry (``-history``: every commit's rows, else the latest's)."""
    import importlib.util
    import sys

    script, function, csv = RESULTS[name]
    path = REPO / "benchmarks" / f"{script}.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{script}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(path.parent))
    results = REPO / "benchmarks" / "results" / csv
    if not results.is_file():  # a study that has not written its first row yet
        return f"*No results yet: `benchmarks/results/{csv}` is not there; the command above writes it.*"
    if function == "report":
        return module.report(results, latest=not name.endswith("-history"))
    return getattr(module, function)(results)


def readme_for_site(text: str) -> str:
    """The README (or CHANGELOG) as a page of the site: ``docs/X`` links and images become ``X``, the changelog link
    points at its page."""
    text = re.sub(r"\]\(docs/([^)]*)\)", r"](\1)", text)
    return text.replace("](CHANGELOG.md)", "](changelog.md)")


def expand(markdown: str) -> str:
    """``markdown`` with every placeholder replaced (imported here so that ``mkdocs`` loads the package lazily)."""
    from oversmooth_cli.cli.reference import render

    markdown = INCLUDE.sub(lambda m: readme_for_site((REPO / f"{m.group(1)}.md").read_text()), markdown)
    markdown = RESULT.sub(lambda m: benchmark_table(m.group(1)), markdown)
    return GENERATED.sub(lambda m: render(m.group(1), *m.group(2).split()), markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return expand(markdown)
