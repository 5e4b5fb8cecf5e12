"""Run files are loaded like checkpoints: ``layers.csv``, ``heads.csv`` and ``summary.json`` checked against one schema.

The bad files are generated here from one real run of a tiny random-init ViT on real photos: every column of both
tables given values of the wrong kind (empty, NaN, infinite, text, fractions where whole numbers belong, out of range),
tables cut short at many byte offsets, repeated rows, and every ``summary.json`` entry the gate reads given values of
every wrong JSON type. Each must be refused by ``check`` (either side), ``compare``, ``baseline`` and
``measure --baseline`` alike: exit 2, one line naming the file and the entry, never a verdict (exit 1) or a bug
(exit 3).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from oversmooth_cli.errors import EXIT_BAD_INPUT, UserError
from oversmooth_cli.gate.check import check_runs
from oversmooth_cli.gate.runs import load_run
from oversmooth_cli.measuring.run import MeasureConfig, measure
from oversmooth_cli.measuring.summary import write_run
from oversmooth_cli.reading.loading import load_model

from .._helpers import PHOTOS, TINY_ARCH, TINY_ARGS, invoke, save_checkpoint_folder

pytestmark = pytest.mark.check

PHOTO_NAMES = ("astronaut.png", "camera.png", "chelsea.png", "coins.png")
COMMANDS = ("check-baseline", "check-current", "compare", "baseline", "measure-baseline")


@dataclass
class Good:
    root: Path
    ckpt: Path
    images: Path
    run: Path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Good:
    root = tmp_path_factory.mktemp("runfiles")
    images = root / "images.txt"
    images.write_text("\n".join(str(PHOTOS[n]) for n in PHOTO_NAMES) + "\n")
    ckpt = save_checkpoint_folder(load_model(TINY_ARCH, model_args=TINY_ARGS).model, root / "ckpt")
    run = write_run(
        measure(str(ckpt), images, MeasureConfig(device="cpu", metrics="default,effective_rank")), root / "run"
    )
    return Good(root, ckpt, images, run)


def bad_copy(good: Good, dest: Path, name: str, content: bytes | str) -> Path:
    """The good run with one file replaced."""
    shutil.copytree(good.run, dest)
    data = content.encode() if isinstance(content, str) else content
    (dest / name).write_bytes(data)
    return dest


def refused(good: Good, bad: Path, command: str, tmp_path: Path) -> str:
    """Run one command on the bad run; assert exit 2 with one ``Error:`` line; return that line."""
    measure_args = ("measure", good.ckpt, good.images, "--out", tmp_path / "m", "--device", "cpu", "--baseline", bad)
    args = {
        "check-baseline": ("check", bad, good.run),
        "check-current": ("check", good.run, bad),
        "compare": ("compare", good.run, bad, "--out", tmp_path / "c.png"),
        "baseline": ("baseline", bad, tmp_path / "committed"),
        "measure-baseline": measure_args,
    }[command]
    r = invoke(*args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == EXIT_BAD_INPUT, (command, r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "internal error" not in r.output and "Traceback" not in r.output and "np.float64" not in r.output
    assert not (tmp_path / "committed").exists() and not (tmp_path / "m").exists()
    return lines[0].removeprefix("Error: ")


# -- the issue's cases ---------------------------------------------------------------------------------------------
def edit_definitions(good: Good, dest: Path, edit) -> Path:
    summary = json.loads((good.run / "summary.json").read_text())
    edit(summary)
    return bad_copy(good, dest, "summary.json", json.dumps(summary))


ISSUE_SUMMARIES = {
    "definitions-a-string": (lambda s: s.update(definitions="oops"), 'definitions is "oops" (a string)'),
    "count-forty": (
        lambda s: s["definitions"]["images"].update(count="forty"),
        'definitions.images.count is "forty" (a string); expected a whole number >= 1',
    ),
    "input-size-text": (
        lambda s: s["definitions"].update(input_size="32"),
        'definitions.input_size is "32" (a string); expected a list of three whole numbers',
    ),
    "n-tokens-null": (
        lambda s: s["definitions"].update(n_tokens=None),
        "definitions.n_tokens is null; expected a list",
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(ISSUE_SUMMARIES))
def test_summary_entries_of_the_wrong_type_are_refused_not_dropped(good, tmp_path, case, command):
    """They were left out: check passed (noting, falsely, an older oversmooth) and baseline committed the file."""
    edit, message = ISSUE_SUMMARIES[case]
    bad = edit_definitions(good, tmp_path / "bad", edit)
    line = refused(good, bad, command, tmp_path)
    assert line.startswith(f"{bad / 'summary.json'}: {message}"), line
    assert "older oversmooth" not in line


TABLE_EDITS = {
    "nan-mean": (lambda lines: _cell(lines, 3, "mean", "nan"), "mean in row 3 (attention_std layer 3) is 'nan'"),
    "layer-2.5": (lambda lines: _cell(lines, 2, "layer", "2.5"), "layer in row 2 (attention_std layer 2.5) is '2.5'"),
    "truncated": (lambda lines: [*lines[:-1], lines[-1][: len(lines[-1]) // 2]], "(is the file cut short?)"),
}


def _cell(lines: list[str], row: int, column: str, value: str) -> list[str]:
    header = lines[0].split(",")
    cells = lines[row].split(",")
    cells[header.index(column)] = value
    return [*lines[:row], ",".join(cells), *lines[row + 1 :]]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(TABLE_EDITS))
def test_nan_fraction_and_truncated_layers_csv_are_unusable_input(good, tmp_path, case, command):
    """A NaN was a failing verdict, a truncated file printed ``np.float64(nan)``, layer 2.5 read as layer 2."""
    edit, message = TABLE_EDITS[case]
    lines = (good.run / "layers.csv").read_text().splitlines()
    bad = bad_copy(good, tmp_path / "bad", "layers.csv", "\n".join(edit(lines)) + "\n")
    line = refused(good, bad, command, tmp_path)
    assert line.startswith(f"{bad / 'layers.csv'}: "), line
    assert message in line and "expected" in line, line
    assert "several rows" not in line


# -- generated fuzz --------------------------------------------------------------------------------------------------
WHOLE = ["", "nan", "inf", "abc", "2.5", "-1", "1e400", "0x1"]
NUMBER = ["", "nan", "inf", "-inf", "abc", "1e400", "--1"]
TABLE_CELLS: dict[str, dict[str, list[str]]] = {
    "layers.csv": {
        "layer": WHOLE,
        "stage": WHOLE,
        "n_tokens": ["nan", "inf", "abc", "2.5", "0", "-3"],
        "metric": ["", "nope", "token cosine"],
        "mean": [*NUMBER, "0.9", "-7"],  # rows 1-5 are attention_std (at most 0.5) and effective_rank (at least 1)
        "std": [*NUMBER, "-0.1"],
        "ci95_low": ["nan", "inf", "abc"],
        "ci95_high": ["nan", "-inf", "abc"],
        "n_images": [*WHOLE, "0"],
    },
    "heads.csv": {
        "layer": WHOLE,
        "metric": ["", "nope"],
        "head": WHOLE,
        "mean": [*NUMBER, "0.7"],  # attention_std is at most 0.5
        "std": [*NUMBER, "-1"],
        "ci95_low": ["nan", "abc"],
        "ci95_high": ["inf", "abc"],
        "n_images": [*WHOLE, "0"],
    },
}


def table_cases() -> list[tuple[str, str, int, str, str]]:
    """``(file, column, row, value, command)``: each case through one of the commands, in turn."""
    cases = []
    for name, columns in TABLE_CELLS.items():
        for column, values in columns.items():
            for k, value in enumerate(values):
                cases.append((name, column, 1 + k % 5, value, COMMANDS[len(cases) % len(COMMANDS)]))
    return cases


@pytest.mark.parametrize(("name", "column", "row", "value", "command"), table_cases())
def test_fuzzed_table_cells_are_refused_naming_the_cell(good, tmp_path, name, column, row, value, command):
    lines = (good.run / name).read_text().splitlines()
    bad = bad_copy(good, tmp_path / "bad", name, "\n".join(_cell(lines, row, column, value)) + "\n")
    with pytest.raises(UserError) as info:
        load_run(bad)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{bad / name}: "), message
    assert f"{column} in row {row} " in message and "expected" in message, message
    assert refused(good, bad, command, tmp_path) == message


@pytest.mark.parametrize("name", ["layers.csv", "heads.csv"])
def test_tables_cut_short_anywhere_are_refused(good, tmp_path, name):
    """Cut at many byte offsets (inside a number, at a comma, mid header): never a verdict, never a traceback."""
    data = (good.run / name).read_bytes()
    for i, cut in enumerate(range(1, len(data) - 1, max(1, len(data) // 40))):
        if b"\n" in (data[cut - 1 : cut], data[cut : cut + 1]):  # whole lines: a complete (shorter) table
            continue
        bad = bad_copy(good, tmp_path / f"cut{i}", name, data[:cut])
        with pytest.raises(UserError) as info:
            load_run(bad)
        assert "\n" not in str(info.value) and str(bad / name) in str(info.value)
        assert "np.float64" not in str(info.value)


@pytest.mark.parametrize("name", ["layers.csv", "heads.csv"])
def test_repeated_rows_empty_tables_and_binary_files_are_refused(good, tmp_path, name):
    lines = (good.run / name).read_text().splitlines()
    cases = {
        "repeated": "\n".join([*lines, lines[2]]) + "\n",
        "header-only": lines[0] + "\n",
        "empty": "",
        "binary": bytes(range(256)) * 4,
        "missing-column": "\n".join(",".join(ln.split(",")[:-1]) for ln in lines) + "\n",
    }
    for case, content in cases.items():
        bad = bad_copy(good, tmp_path / case, name, content)
        with pytest.raises(UserError) as info:
            load_run(bad)
        assert "\n" not in str(info.value) and str(bad / name) in str(info.value), case
    with pytest.raises(UserError, match=r"has several rows for .* \(rows 2 and"):
        load_run(tmp_path / "repeated")


VALUES = {"a string": "oops", "a number": 32, "a fraction": 2.5, "a boolean": True, "null": None, "a list": ["x"],
          "an object": {"a": 1}, "zero": 0, "a negative number": -4}  # fmt: skip


def _whole(minimum: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _text(v):
    return isinstance(v, str)


SUMMARY_ENTRIES = {
    "metrics_version": lambda v: isinstance(v, str) or _whole(0)(v),
    "n_layers": _whole(0),
    "interval": _text,
    "model": lambda v: isinstance(v, dict),
    "model.name": _text,
    "run.include_prefix": lambda v: isinstance(v, bool),
    "data_config.input_size": lambda v: False,  # no scalar is a list of three
    "layer_info": lambda v: False,
    "layer_info.0.n_tokens": lambda v: v is None or _whole(1)(v),
    "metrics.token_cosine": lambda v: isinstance(v, dict),
    "metrics.token_cosine.definition": _text,
    "definitions": lambda v: isinstance(v, dict),
    "definitions.metrics_version": lambda v: isinstance(v, str) or _whole(0)(v),
    "definitions.include_prefix": lambda v: isinstance(v, bool),
    "definitions.attention_tap": _text,
    "definitions.metrics": lambda v: isinstance(v, dict),
    "definitions.metrics.attention_std.tokens": _text,
    "definitions.metrics.attention_std.prefix_included": lambda v: isinstance(v, bool),
    "definitions.input_size": lambda v: v is None,
    "definitions.n_tokens": lambda v: False,
    "definitions.images": lambda v: False,  # an object without count and sha256 is refused too
    "definitions.images.count": lambda v: False,  # any other count than the digests' is refused
    "definitions.images.sha256": lambda v: False,
    "definitions.images.by": lambda v: False,
    "definitions.images.digests": lambda v: False,
    "patch_maps": lambda v: isinstance(v, dict),
    "patch_maps.requested": _whole(0),
    "patch_maps.images": lambda v: False,  # no scalar, and no list of anything but {index, name} objects
}


def _set(summary: dict, path: str, value) -> dict:
    out = copy.deepcopy(summary)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def summary_cases() -> list[tuple[str, str, str]]:
    """``(entry, kind of wrong value, command)``: every entry with every value its type does not allow."""
    cases = [(entry, kind) for entry, ok in SUMMARY_ENTRIES.items() for kind, v in VALUES.items() if not ok(v)]
    return [(entry, kind, COMMANDS[i % len(COMMANDS)]) for i, (entry, kind) in enumerate(cases)]


@pytest.mark.parametrize(("entry", "kind", "command"), summary_cases())
def test_fuzzed_summary_entries_are_refused_naming_the_entry(good, tmp_path, entry, kind, command):
    summary = json.loads((good.run / "summary.json").read_text())
    bad = bad_copy(good, tmp_path / "bad", "summary.json", json.dumps(_set(summary, entry, VALUES[kind])))
    with pytest.raises(UserError) as info:
        load_run(bad)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{bad / 'summary.json'}: "), message
    shown = entry.replace(".0.", "[0].")
    assert shown in message and "expected" in message, message
    assert refused(good, bad, command, tmp_path) == message


def test_summary_that_is_not_an_object_or_not_json_is_refused(good, tmp_path):
    for i, content in enumerate(["[1, 2]", "42", "{not json", '"text"', "\x00\x01"]):
        bad = bad_copy(good, tmp_path / f"s{i}", "summary.json", content)
        with pytest.raises(UserError, match=r"summary\.json"):
            load_run(bad)


def test_the_good_run_and_a_summary_without_definitions_still_load(good, tmp_path):
    assert check_runs(good.run, good.run).passed
    summary = json.loads((good.run / "summary.json").read_text())
    del summary["definitions"]
    old = bad_copy(good, tmp_path / "old", "summary.json", json.dumps(summary))
    assert check_runs(old, good.run).passed
    assert invoke("baseline", old, tmp_path / "committed").exit_code == 0
