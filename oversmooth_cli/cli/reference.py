"""Reference tables generated from the code, for the documentation site (``docs/hooks.py`` puts them into the pages).

Every function returns Markdown built from the one place a fact is defined: the metric registry, the Typer app's
options (generated from the config dataclasses), the exit codes in :mod:`oversmooth_cli.errors`, the family registry
with the measured compatibility data, and the names of the files ``finetune`` writes. Nothing here is imported by the
command line itself.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_CODE_MEANINGS",
    "FINETUNE_OUTPUTS",
    "GENERATORS",
    "command_options",
    "compatibility_counts",
    "exit_codes",
    "exit_codes_table",
    "families_table",
    "finetune_outputs_table",
    "metric_presets_table",
    "metric_table",
    "options_table",
    "render",
    "table",
    "tolerance_table",
]


def _cell(value: Any) -> str:
    """One table cell: no line breaks, ``|`` escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A Markdown table; ``align`` holds ``---``, ``--:`` or ``:--`` per column."""
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- metrics ---------------------------------------------------------------------------------------------------------
_RANGES = {
    "token_cosine": "[−1/(n−1), 1]",
    "rank_collapse": "[0, 1]",
    "effective_rank": "[1, min(n, d)]",
    "token_abs_cosine": "[1/n, 1]",
    "cls_patch_cosine": "[−1, 1]",
    "layer_cka": "[0, 1]",
    "attention_std": "[0, √(K−1)/K]",
    "attention_entropy": "[0, log K] nats",
    "attention_entropy_normalised": "[0, 1]",
    "attention_distance": "[0, image diagonal] px",
    "cross_layer_attention_similarity": "[0, 1]",
}
"""Value ranges as shown in the docs, used while :class:`~oversmooth_cli.metrics.registry.MetricDef` has no range text
of its own (a ``range`` or ``range_text`` string field)."""


def _range(metric: Any) -> str:
    shown = getattr(metric, "range_text", None) or getattr(metric, "range", None)
    return shown if isinstance(shown, str) else _RANGES.get(metric.name, "")


def _number(x: float) -> str:
    return f"{x:g}"


def metric_table() -> str:
    """Every registered metric: name, definition, layers, range, direction, cost and default tolerance."""
    from ..metrics.registry import ALL_METRICS, layer_span

    rows = [
        (
            f"`{m.name}`",
            m.definition,
            layer_span(m.name),
            _range(m),
            "rising" if m.higher_is_smoother else "falling",
            m.cost,
            _number(m.atol),
            _number(m.rtol),
        )
        for m in ALL_METRICS.values()
    ]
    header = ("metric", "definition (one image)", "layers", "range", "over-smoothing shows as", "cost", "atol", "rtol")
    return table(header, rows, ["---", "---", "---", "---", "---", "---", "--:", "--:"])


def metric_sources_table() -> str:
    """Every metric with the tokens it reads and the paper its definition follows."""
    from ..metrics.registry import ALL_METRICS

    rows = [
        (f"`{m.name}`", m.kind, m.tokens + (" (`--include-prefix`: all tokens)" if m.prefix_option else ""), m.source)
        for m in ALL_METRICS.values()
    ]
    return table(("metric", "kind", "tokens", "source"), rows)


def tolerance_table() -> str:
    """``check``'s default tolerance per metric (``MetricDef.atol`` / ``.rtol``)."""
    from ..metrics.registry import ALL_METRICS

    rows = [(f"`{m.name}`", _number(m.atol), _number(m.rtol), _range(m)) for m in ALL_METRICS.values()]
    return table(("metric", "atol", "rtol", "range"), rows, ["---", "--:", "--:", "---"])


def metric_presets_table() -> str:
    """The names ``--metrics`` accepts besides metric names, with what each selects."""
    from ..metrics.registry import METRIC_PRESETS

    rows = [(f"`{name}`", ", ".join(f"`{m}`" for m in names)) for name, names in METRIC_PRESETS.items()]
    return table(("preset", "metrics"), rows)


# -- command-line options --------------------------------------------------------------------------------------------
def _click_group() -> Any:
    import typer

    from .app import app  # the cli package, imported first, has registered every command

    return typer.main.get_command(app)


def _default(param: Any) -> str:
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        return shown
    value = param.default
    if callable(value):
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    if getattr(param, "is_flag", False):
        return "on" if value else "off"
    if value is None or value == () or value == []:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def command_options(command: str) -> list[dict[str, str]]:
    """The options and arguments of one ``oversmooth`` command as the Typer app defines them.

    Returns:
        one dict per parameter, in ``--help`` order: ``kind`` (``argument`` / ``option``), ``name`` (the flags,
        ``--x/--no-x`` for switches), ``default`` (as shown by ``--help``; empty when there is none) and ``help``.
    """
    group = _click_group()
    if command not in group.commands:
        raise KeyError(f"no command {command!r}; commands: {', '.join(group.commands)}")
    out = []
    for param in group.commands[command].params:
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        if param.param_type_name == "argument":
            out.append({"kind": "argument", "name": param.name.upper(), "default": "", "help": param.help or ""})
            continue
        name = ", ".join(param.opts) + ("/" + "/".join(param.secondary_opts) if param.secondary_opts else "")
        out.append({"kind": "option", "name": name, "default": _default(param), "help": param.help or ""})
    return out


def options_table(command: str) -> str:
    """``oversmooth COMMAND``'s arguments and options with their defaults and help, as a Markdown table."""
    params = command_options(command)
    rows = [(f"`{p['name']}`", f"`{p['default']}`" if p["default"] else "", p["help"]) for p in params]
    return table(("argument / option", "default", "meaning"), rows)


# -- exit codes ------------------------------------------------------------------------------------------------------
EXIT_CODE_MEANINGS: dict[str, str] = {
    "EXIT_SUCCESS": "success; for `check` and `measure --baseline`: within tolerance",
    "EXIT_FAILED_CHECK": "`check` / `measure --baseline`: a regression beyond the tolerance",
    "EXIT_BAD_INPUT": (
        "bad input or a usage error: one line on stderr saying what is wrong (missing path, no images, unknown model, "
        "damaged checkpoint, runs that cannot be compared, bad option value, ...); nothing is written"
    ),
    "EXIT_INTERNAL": "a bug in oversmooth, never a failed check (one line; `OVERSMOOTH_DEBUG=1` shows the traceback)",
    "EXIT_INTERRUPTED": "interrupted (Ctrl-C); `finetune` saves a resumable checkpoint first",
}
"""What each exit code means; the numbers come from :mod:`oversmooth_cli.errors`."""


def exit_codes() -> list[tuple[int, str, str]]:
    """``(code, constant, meaning)`` for every exit code, the numbers from :mod:`oversmooth_cli.errors`."""
    from .. import errors

    codes = {"EXIT_SUCCESS": 0, "EXIT_INTERRUPTED": getattr(errors, "EXIT_INTERRUPTED", 130)}
    codes.update({name: getattr(errors, name) for name in dir(errors) if name.startswith("EXIT_")})
    missing = set(codes) - set(EXIT_CODE_MEANINGS)
    if missing:
        raise KeyError(f"exit codes without a meaning in EXIT_CODE_MEANINGS: {sorted(missing)}")
    return sorted((code, name, EXIT_CODE_MEANINGS[name]) for name, code in codes.items())


def exit_codes_table() -> str:
    """Every exit code of every command, as a Markdown table."""
    return table(("exit code", "meaning"), [(f"**{code}**", meaning) for code, _, meaning in exit_codes()])


# -- finetune's outputs ----------------------------------------------------------------------------------------------
FINETUNE_OUTPUTS: dict[str, str] = {
    "checkpoint-last.safetensors": "weights after the last epoch (or the last save of an interrupted run)",
    "checkpoint-best.safetensors": "weights at the best validation top-1 (never the untrained epoch 0)",
    "config.json": (
        "`architecture`, `num_classes`, `model_args`, `pretrained_cfg`, `label_names`, the run's options and "
        "`finetune.losses_read` (what h, e and `l_token` are for this model): `oversmooth measure OUT` loads the "
        "best checkpoint"
    ),
    "train_state.pt": "optimizer, scheduler, epoch and step, RNG states of every rank, history: for `--resume OUT`",
    "history.csv": (
        "per epoch: `lr`, the training loss and each term (unweighted), `val_loss`, `val_top1`, `val_top5`, "
        "`val_token_cosine` (last token layer), `cons_sim`, `seconds`; row `epoch 0` is the validation before the "
        "first step"
    ),
    "before": (
        "a full `measure` run folder of the validation images before the first step (with its patch maps and "
        "`report.html`)"
    ),
    "after": "the same after the last step",
    "compare.png": "before vs after curves",
    "training.png": "loss terms, val accuracy and last-layer token cosine per epoch (epoch 0: before training)",
    "monitor.csv": (
        "the monitor's history (`step, layer, stage, metric, mean, std, ci95_low, ci95_high, n_images`), written "
        "every epoch; a resumed run continues it"
    ),
    "monitor.png": "a layer × step heatmap of token cosine and attention std",
    "report.html": (
        "one self-contained page (opens offline): the options, training curves, monitor heatmap, before / after "
        "curves and patch maps; with `--control` the side-by-side verdict and both arms"
    ),
    "control": "with `--control`: the `--loss none` twin's complete run folder",
    "side_by_side.png": "with `--control`: before / control / treated curves and both arms' training curves",
    "side_by_side.csv": "with `--control`: val top-1 (Wilson 95% interval) and last-layer token cosine per arm",
    "side_by_side.json": "with `--control`: the verdict from McNemar's exact test over the paired validation images",
    "tb": "with `--tensorboard`: the monitor's event files (`tensorboard --logdir OUT/tb`)",
}
"""What each file ``finetune`` writes holds; the names come from :mod:`oversmooth_cli.training.finetune`."""


SEEDS_OUTPUTS = {
    "seed-<k>": "one seed's `--control` run folder (the run, its `control/` twin and their side-by-side), equal to a "
    "separate `--control --seed k` run",
    "seeds.json": "the run's model, folders, options (without the seed) and seeds: what `--resume OUT` continues",
    "pooled.csv": "per seed: val top-1 and last-layer token cosine of both arms, their differences, McNemar's p",
    "pooled.json": "those rows, the mean differences over seeds with 95% intervals (Student's t over seeds), the "
    "seeds within noise, the verdict",
    "pooled.png": "every seed's token-cosine curves, and each seed's last-layer cosine and top-1 in both arms",
    "report.html": "one self-contained page: the pooled verdict, the per-seed table and every seed's curves",
}
"""What ``--control --seeds`` writes into ``OUT``; the names come from :mod:`oversmooth_cli.training.seeds`."""


def seeds_outputs_table() -> str:
    """The files of a ``--control --seeds`` run folder, as a Markdown table (a name without a description is an
    error)."""
    from ..training.seeds import SEEDS_OUTPUT_NAMES

    names = ("seed-<k>", *SEEDS_OUTPUT_NAMES)
    missing = [n for n in names if n not in SEEDS_OUTPUTS]
    if missing:
        raise KeyError(f"--seeds outputs without a description in SEEDS_OUTPUTS: {missing}")
    return table(("file", "content"), [(f"`{n}`" if "." in n else f"`{n}/`", SEEDS_OUTPUTS[n]) for n in names])


def finetune_output_names() -> tuple[str, ...]:
    """Every name ``finetune`` may write into its run folder (``OUTPUT_NAMES`` and the optional ones)."""
    from ..training.finetune import CONTROL_OUTPUT_NAMES, OUTPUT_NAMES, TENSORBOARD_OUTPUT_NAMES

    return (*OUTPUT_NAMES, *CONTROL_OUTPUT_NAMES, *TENSORBOARD_OUTPUT_NAMES)


def finetune_outputs_table() -> str:
    """The files of a ``finetune`` run folder, as a Markdown table (a name without a description is an error)."""
    names = finetune_output_names()
    missing = [n for n in names if n not in FINETUNE_OUTPUTS]
    if missing:
        raise KeyError(f"finetune outputs without a description in FINETUNE_OUTPUTS: {missing}")
    rows = [(f"`{n}`" if "." in n else f"`{n}/`", FINETUNE_OUTPUTS[n]) for n in names]
    return table(("file", "content"), rows)


# -- model families --------------------------------------------------------------------------------------------------
def _compatibility(path: Path | str | None) -> dict[str, Any]:
    default = Path(__file__).resolve().parents[2] / "docs" / "compatibility.json"
    return json.loads(Path(path or default).read_text())


def compatibility_counts(path: Path | str | None = None) -> tuple[int, int]:
    """``(measured, attention families)``: the registry's adapters among the families recorded as holding
    attention, and how many those are."""
    from ..reading.registry import ADAPTERS  # importing the package registers the entries

    families = _compatibility(path)["families"]
    return sum(f in ADAPTERS for f in families), len(families)


def families_table(path: Path | str | None = None) -> str:
    """The measured families: the registry's notes and the small model each was last measured with
    (``docs/compatibility.json``, written by ``scripts/compat_table.py``)."""
    from ..reading.registry import (
        ADAPTERS,  # importing the package registers the entries
        family_support,
    )

    data = _compatibility(path)["families"]
    rows = []
    for family in [f for f in ADAPTERS if f in data] + [f for f in ADAPTERS if f not in data]:
        support = family_support(family)
        row = data.get(family, {})
        tunes = ", ".join(row.get("finetunes", ())) or "-"
        counts = [row.get(k, "?") for k in ("layers", "stages", "token_layers", "attention_layers")]
        rows.append((family, row.get("model", "not measured yet"), *counts, tunes, support.note))
    header = ("family", "small model measured", "layers", "stages", "token layers", "attention layers")
    return table((*header, "fine-tunes with", "notes"), rows, ["---", "---", "--:", "--:", "--:", "--:", "---", "---"])


def refusals_table(path: Path | str | None = None) -> str:
    """Every loss term a measured family cannot fine-tune with, and why (from the recorded one-step runs)."""
    data = _compatibility(path)["families"]
    rows = [(f, term, why) for f, row in data.items() for term, why in row.get("refused", {}).items()]
    return table(("family", "term", "reason"), rows) if rows else "Every measured family fine-tunes with every term."


def unsupported_table(path: Path | str | None = None) -> str:
    """The attention families the tool does not measure, with the registry's reason."""
    from ..reading.registry import (
        ADAPTERS,  # importing the package registers the entries
        UNSUPPORTED,
    )

    data = _compatibility(path)["families"]
    rows = [
        (f, data[f].get("model", ""), UNSUPPORTED.get(f, "no adapter and no reason recorded"))
        for f in data
        if f not in ADAPTERS
    ]
    return table(("family", "attention found in", "reason"), rows) if rows else "Every attention family is measured."


def families_summary(path: Path | str | None = None) -> str:
    """One sentence: how many attention families are measured, which are not, and the versions measured with."""
    from ..reading.registry import ADAPTERS  # importing the package registers the entries

    compat = _compatibility(path)
    measured, total = compatibility_counts(path)
    others = [f for f in compat["families"] if f not in ADAPTERS]
    return (
        f"`oversmooth measure` measures **{measured} of the {total} timm families whose models contain attention** "
        f"(not measured: {', '.join(others) or 'none'}); the table below was recorded with timm {compat['timm']} "
        f"and torch {compat['torch']}."
    )


# -- placeholders ----------------------------------------------------------------------------------------------------
GENERATORS: dict[str, Callable[..., str]] = {
    "metrics": metric_table,
    "metric-sources": metric_sources_table,
    "metric-presets": metric_presets_table,
    "tolerances": tolerance_table,
    "exit-codes": exit_codes_table,
    "options": options_table,
    "finetune-outputs": finetune_outputs_table,
    "seeds-outputs": seeds_outputs_table,
    "families-summary": families_summary,
    "families": families_table,
    "finetune-refusals": refusals_table,
    "unsupported-families": unsupported_table,
}
"""Placeholder name -> generating function; ``<!-- generated: NAME [ARG] -->`` in a page becomes its output."""


def render(name: str, *args: str) -> str:
    """The output of the generator registered as ``name`` (``KeyError`` lists the known names)."""
    if name not in GENERATORS:
        raise KeyError(f"unknown generated table {name!r}; known: {', '.join(GENERATORS)}")
    return GENERATORS[name](*args)
