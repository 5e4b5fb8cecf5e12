"""The package's shape, read from its source: no import cycles (lazy imports included), no global state changed on
import, no module over its size limit, every public signature short."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import oversmooth_cli

PACKAGE = Path(oversmooth_cli.__file__).parent
NAME = "oversmooth_cli"


def module_name(path: Path) -> str:
    parts = [NAME, *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports for annotations only: never executed)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str) -> set[str]:
    """Package modules that ``name`` imports anywhere (top level or inside a function), ``TYPE_CHECKING`` aside."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def cycles() -> list[list[str]]:
    graph = {m: sorted(imports_of(m)) for m in MODULES}
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                found.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)
    return found


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / NAME
    (fake / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "sub" / "__init__.py").write_text("")
    (fake / "a.py").write_text("def f():\n    from .sub import b\n")  # a lazy import counts
    (fake / "sub" / "b.py").write_text("from ..a import f\n")
    (fake / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {module_name(p): p for p in sorted(fake.rglob("*.py"))})
    assert cycles() == [[f"{NAME}.a", f"{NAME}.sub.b", f"{NAME}.a"]]


def outside_imports() -> set[str]:
    """Every module outside the package that the package imports, anywhere in its code."""
    found: set[str] = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module)
    return {m for m in found if m.split(".")[0] not in (NAME, "__future__")}


PROBE = """
import importlib, json, sys, warnings
import matplotlib, torch

def state():
    params = {k: str(dict.__getitem__(matplotlib.rcParams, k)) for k in matplotlib.rcParams}  # resolves nothing
    return {
        "matplotlib backend": params.pop("backend"),
        "matplotlib style": params,
        "torch threads": torch.get_num_threads(),
        "torch default dtype": str(torch.get_default_dtype()),
        "warning filters": [str(f) for f in warnings.filters],
        "sys.meta_path": [type(f).__name__ for f in sys.meta_path],
    }

# What the modules import from outside the package comes first: a third-party library's own import-time habits
# (lightning's warning filters, a lazy loader on sys.meta_path) are not the package's doing.
first, names = json.loads(sys.argv[1]), sys.argv[2:]
for outside in first:
    try:
        importlib.import_module(outside)
    except ImportError:
        pass
changed = {}
for name in names:
    before = state()
    importlib.import_module(name)
    after = state()
    diff = sorted(k for k in before if before[k] != after[k])
    if diff:
        changed[name] = diff
print(json.dumps(changed))
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_importing_any_module_changes_no_global_state(order: str) -> None:
    """Importing the package's modules one by one in a fresh interpreter (as a notebook that only wanted the monitor
    would) leaves the matplotlib backend and style, torch's threads and default dtype, the warning filters and the
    import machinery as each import found them. Twice, in opposite orders, so that no module hides behind another
    that imported it first."""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    names = [n for n in MODULES if not n.endswith("__main__")]
    names = names if order == "sorted" else names[::-1]
    run = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(sorted(outside_imports())), *names],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.slow
def test_the_state_probe_sees_a_backend_switch(tmp_path: Path) -> None:
    (tmp_path / "switches.py").write_text("import matplotlib\nmatplotlib.use('Agg')\n")
    env = {**{k: v for k, v in os.environ.items() if k != "MPLBACKEND"}, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", PROBE, "[]", "switches"], capture_output=True, text=True, env=env)
    assert "matplotlib backend" in json.loads(run.stdout.strip().splitlines()[-1])["switches"]


def test_every_public_name_resolves() -> None:
    for name in oversmooth_cli.__all__:
        assert getattr(oversmooth_cli, name) is not None, name
    from oversmooth_cli import measure

    assert callable(measure) and measure.__module__ == "oversmooth_cli.measuring.run"


NAMES_0_1 = {
    "finetune": "CONTROL_OUTPUT_NAMES MONITOR_IMAGES OUTPUT_NAMES TENSORBOARD_OUTPUT_NAMES FinetuneConfig "
    "FinetuneResult finetune parse_losses",
    "losses": "LOSS_TERMS SIMILARITIES CutMixBox LossTerm PatchDiversificationLoss TermInputs TokenPlan "
    "cosine_similarity dot_similarity l_cons l_cos l_token patch_area_fractions patch_cutmix plan_tokens "
    "rand_box smooth_one_hot token_head_logits",
    "models": "CHECKPOINT_SUFFIXES PRETRAINED_CFG_KEYS TRAIN_ONLY_ARGS LoadedModel checkpoint_format load_model "
    "load_state_dict_file model_config one_line_reason parse_model_args parse_value resolve_data_config "
    "save_weights sha256_file unwrap_state_dict weights_meta",
    "monitor": "MONITOR_COLUMNS MonitorWarning OversmoothingMonitor load_probe preserved_state unwrap_model",
    "report": "HEAD_COLUMNS LAYER_COLUMNS Run atomic_write atomic_write_all check_out_dir default_mode load_run "
    "metric_label metric_order metric_panels plot_curves plot_head_heatmap plot_monitor_heatmap "
    "plot_training read_definitions read_layers save_figure stage_boundaries staged_dir to_json "
    "write_json",
}
"""The public names (``__all__``) of the 0.1 modules that moved, as 0.1 shipped them."""


@pytest.mark.slow
@pytest.mark.parametrize("old", sorted(NAMES_0_1))
def test_0_1_import_paths_still_work_and_say_where_things_went(old: str) -> None:
    """The paths the 0.1 README and examples import from still import every name they had, and warn where it went."""
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    alias = importlib.import_module('oversmooth_cli.{old}')\n"
        f"missing = [n for n in {NAMES_0_1[old].split()!r} if not hasattr(alias, n)]\n"
        "print(len(missing), [str(w.message) for w in caught if w.category is DeprecationWarning], missing)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    missing, messages = run.stdout.strip().split(" ", 1)
    assert missing == "0", run.stdout
    assert f"oversmooth_cli.{old} moved to oversmooth_cli." in messages


def _definitions() -> list[tuple[str, ast.AST]]:
    return [(name, node) for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))]


def test_no_module_over_600_lines_and_no_class_over_250() -> None:
    long_modules = {
        n: len(p.read_text().splitlines()) for n, p in MODULES.items() if len(p.read_text().splitlines()) > 600
    }
    long_classes = {
        f"{name}.{node.name}": node.end_lineno - node.lineno + 1
        for name, node in _definitions()
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250
    }
    assert long_modules == {} and long_classes == {}


def test_no_public_function_takes_more_than_10_parameters() -> None:
    """Options travel as config objects (``MeasureConfig``, ``LoadOptions``, ``FinetuneConfig``), not as long lists."""
    too_long = {}
    for name, node in _definitions():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            count = len([a for a in args if a.arg not in ("self", "cls")])
            if count > 10:
                too_long[f"{name}.{node.name}"] = count
    assert too_long == {}


def test_the_architecture_page_names_every_module() -> None:
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    named = set()
    for name, path in MODULES.items():
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.endswith("__init__.py") and relative != "__init__.py":
            relative = relative.removesuffix("__init__.py")  # a package: named as `reading/`, `cli/` ...
        if f"`{relative}" in page or f"{relative}`" in page or f" {relative}" in page:
            named.add(name)
    assert sorted(set(MODULES) - named - {f"{NAME}.__main__"}) == []
