"""The documentation: the README stays short, every Markdown table is well formed, the tables generated from the code
(``oversmooth_cli.cli.reference``) follow the code, the site builds with ``mkdocs build --strict`` offline, and every
example is documented and run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from oversmooth_cli import errors
from oversmooth_cli.cli import reference
from oversmooth_cli.measuring.config import MeasureConfig
from oversmooth_cli.metrics.registry import ALL_METRICS, METRIC_PRESETS
from oversmooth_cli.reading.registry import ADAPTERS, UNSUPPORTED
from oversmooth_cli.training.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKDOWN = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]
SETUP_COMMANDS = (
    "# 1. install and measure the bundled digits ViT on the bundled example images (CPU, no download)\n"
    "pip install -e . && oversmooth measure examples/digits-vit examples/images --out runs/demo --overwrite\n"
    "\n"
    "# 2. install and run the tests (CPU only; the real images they read ship in tests/data and examples/)\n"
    'pip install -e ".[dev]" && pytest\n'
)


def table_errors(text: str) -> list[str]:
    """Lines of Markdown that start with ``|`` but belong to no table: a table starts with a header line followed by
    a separator line, and continues while lines start with ``|`` (fenced code is skipped)."""
    problems, in_table, fenced = [], False, False
    lines = text.splitlines()
    separator = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced, in_table = not fenced, False
            continue
        if fenced:
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if in_table:
            if line.count("|") - line.count("\\|") < 2:
                problems.append(f"line {i + 1}: not a table row: {line[:60]}")
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if separator.match(following):
            in_table = True
            columns = len(re.split(r"(?<!\\)\|", line.strip().strip("|")))
            if len(re.split(r"(?<!\\)\|", following.strip().strip("|"))) != columns:
                problems.append(f"line {i + 1}: header and separator differ in columns")
        else:
            problems.append(f"line {i + 1}: a table row outside any table: {line[:60]}")
    return problems


def test_the_table_check_finds_a_stranded_row():
    good = "text\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\nmore\n"
    assert table_errors(good) == []
    assert table_errors(good + "| 3 | 4 |\n") == ["line 8: a table row outside any table: | 3 | 4 |"]
    assert table_errors("```\n| not | a table |\n```\n") == []


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_markdown_table_is_well_formed(path):
    assert table_errors(path.read_text()) == []


def test_the_readme_is_short_and_starts_with_the_two_setup_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.DOTALL).group(1)
    assert first_block == SETUP_COMMANDS


# -- generated tables ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(reference.GENERATORS))
def test_every_generated_table_is_well_formed(name):
    args = ("finetune",) if name == "options" else ()
    text = reference.render(name, *args)
    assert text.strip() and table_errors(text) == []


def test_the_metric_tables_follow_the_registry():
    metrics, tolerances = reference.metric_table(), reference.tolerance_table()
    for m in ALL_METRICS.values():
        row = next(ln for ln in metrics.splitlines() if ln.startswith(f"| `{m.name}` |"))
        assert row.endswith(f"| {m.atol:g} | {m.rtol:g} |"), row
        assert ("rising" if m.higher_is_smoother else "falling") in row
        assert f"| `{m.name}` | {m.atol:g} | {m.rtol:g} |" in tolerances
    presets = reference.metric_presets_table()
    assert all(f"| `{name}` |" in presets for name in METRIC_PRESETS)


def test_the_options_tables_come_from_the_config_objects():
    measure, finetune = reference.options_table("measure"), reference.options_table("finetune")
    assert f"| `--batch-size, -b` | `{MeasureConfig().batch_size}` |" in measure
    assert f"| `--lr` | `{FinetuneConfig().lr}` |" in finetune
    for command in ("measure", "check", "compare", "baseline", "finetune", "models"):
        assert reference.command_options(command), command
    with pytest.raises(KeyError, match="commands"):
        reference.command_options("nope")


def test_a_changed_default_shows_up_in_the_options_table(monkeypatch):
    """The table reads the Typer app, which reads the config dataclass: a new default needs no Markdown edit."""
    group = reference._click_group()
    monkeypatch.setattr(reference, "_click_group", lambda: group)
    param = next(p for p in group.commands["measure"].params if p.name == "seed")
    monkeypatch.setattr(param, "default", 12345)
    assert "| `--seed` | `12345` |" in reference.options_table("measure")


def test_the_exit_codes_come_from_errors():
    codes = {name: code for code, name, _ in reference.exit_codes()}
    assert codes["EXIT_BAD_INPUT"] == errors.EXIT_BAD_INPUT
    assert codes["EXIT_FAILED_CHECK"] == errors.EXIT_FAILED_CHECK
    assert codes["EXIT_INTERNAL"] == errors.EXIT_INTERNAL
    assert {name for name in dir(errors) if name.startswith("EXIT_")} <= set(codes)


def test_every_finetune_output_is_described_once():
    names = reference.finetune_output_names()
    assert set(names) == set(reference.FINETUNE_OUTPUTS)
    table = reference.finetune_outputs_table()
    assert all(f"| `{n}" in table for n in names)


def test_the_family_tables_follow_the_registry_and_the_recorded_runs():
    data = json.loads((REPO / "docs" / "compatibility.json").read_text())["families"]
    assert set(ADAPTERS) <= set(data), "run python scripts/compat_table.py"
    assert set(UNSUPPORTED) <= set(data)
    assert all(data[f]["status"] == "measured" for f in ADAPTERS)
    measured, total = reference.compatibility_counts()
    assert (measured, total) == (len(ADAPTERS), len(data))
    families = reference.families_table()
    assert all(f"| {f} |" in families for f in ADAPTERS)
    unsupported = reference.unsupported_table()
    assert all(f"| {f} |" in unsupported and UNSUPPORTED[f].split(";")[0] in unsupported for f in UNSUPPORTED)
    assert f"**{len(ADAPTERS)} of the {len(data)} timm families" in reference.families_summary()


def test_the_hook_replaces_every_placeholder_and_fails_on_an_unknown_one():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    for page in (REPO / "docs").rglob("*.md"):
        assert "<!-- generated:" not in hooks.expand(page.read_text()).replace("`<!-- generated:", ""), page
    assert hooks.expand("<!-- include: README.md -->").startswith("# oversmooth")
    with pytest.raises(KeyError, match="unknown generated table"):
        hooks.expand("<!-- generated: nope -->")


def test_the_readme_defaults_paragraph_is_the_sweep_csv_read_by_its_generator():
    """README "Defaults" is what ``python benchmarks/defaults_sweep.py --readme`` writes from the committed CSV."""
    spec = importlib.util.spec_from_file_location("defaults_sweep", REPO / "benchmarks" / "defaults_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    text = README.read_text()
    block = text[text.index(sweep.README_START) + len(sweep.README_START) : text.index(sweep.README_END)]
    assert block.strip() == sweep.readme_summary().strip(), "run: python benchmarks/defaults_sweep.py --readme"


# -- the site --------------------------------------------------------------------------------------------------------
def test_the_site_builds_strict_and_offline(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote = re.compile(r"<(?:script|link)[^>]*(?:src|href)=\"(?:https?:)?//[^\"]*\"|@import url\(['\"]?(?:https?:)?//")
    offenders = [str(p.relative_to(site)) for p in site.rglob("*") if p.suffix in {".html", ".css"}]
    offenders = [p for p in offenders if remote.search((site / p).read_text(errors="replace"))]
    assert offenders == []
    assert "| `--" not in (site / "measure" / "index.html").read_text()  # the options table rendered as a table


# -- examples --------------------------------------------------------------------------------------------------------
EXAMPLES = sorted(p.name for p in (REPO / "examples").iterdir() if p.suffix == ".py" or p.name in ("ci", "digits-vit"))


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_is_documented_and_run_by_a_test(name):
    docs = (REPO / "docs" / "development.md").read_text()
    line = next((ln for ln in docs.splitlines() if ln.startswith(f"| `examples/{name}")), None)
    assert line, f"examples/{name} has no line in docs/development.md"
    test_file = re.findall(r"`(tests/[\w/]+\.py)`", line)
    assert test_file, line
    stem = name.removesuffix(".py")
    assert stem in (REPO / test_file[-1]).read_text() or name in (REPO / test_file[-1]).read_text(), line


@pytest.mark.slow
def test_the_training_example_trains_saves_and_reloads(tmp_path):
    data = tmp_path / "digits"
    data.mkdir()
    for split in ("train", "val"):  # the 40 digits shipped with the tests, as both splits
        (data / split).symlink_to(REPO / "tests" / "data" / "digits" / "train", target_is_directory=True)
    out = tmp_path / "model"
    args = ["--data-root", str(data), "--out", str(out), "--epochs", "1", "--warmup-epochs", "0", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_digits_vit.py"), *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded (strict) val top-1" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
