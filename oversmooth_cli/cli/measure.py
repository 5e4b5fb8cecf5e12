"""``oversmooth measure``."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..measuring.config import LoadOptions, MeasureConfig
from .app import (
    _is_main,
    command,
    command_line,
    default_out,
    err_console,
    make_progress,
    one_line,
    option_checks,
    out_console,
    progress_callback,
)
from .gate import finish_check
from .options import BaselineOpt, GateOptions, ModelArg, QuietOpt, config_options


def _fit_groups(names: list[str], width: int) -> list[list[str]]:
    """Split column names into consecutive groups whose columns fit ``width`` characters side by side."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        need = max(len(name), 8) + 3
        if groups[-1] and used + need > width:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return groups


def layer_tables(layers, title: str, max_ci_columns: int = 2, width: int | None = None) -> list[Table]:
    """Per-layer means, one column per metric, split into tables that fit the terminal.

    Up to ``max_ci_columns`` metrics are shown in one table with their 95% intervals; more metrics are shown as
    means only, as many per table as fit ``width`` (default: the console's width).
    """
    from ..metrics.registry import metric_order

    metrics = metric_order(layers["metric"])
    with_ci = len(metrics) <= max_ci_columns
    groups = [metrics] if with_ci else _fit_groups(metrics, (width or out_console.width) - 10)
    cells = layers.set_index(["layer", "metric"])
    tables = []
    for k, group in enumerate(groups):
        table = Table(title=title if k == 0 else None, title_justify="left")
        table.add_column("layer", justify="right")
        for m in group:
            table.add_column(f"{m}\nmean [95% CI]" if with_ci else m, justify="right", no_wrap=True)
        for layer in sorted(layers["layer"].unique()):
            row = [str(layer)]
            for m in group:
                if (layer, m) not in cells.index:
                    row.append("–")
                    continue
                r = cells.loc[(layer, m)]
                ci = f" [{r['ci95_low']:.4f}, {r['ci95_high']:.4f}]" if with_ci else ""
                row.append(f"{r['mean']:.4f}{ci}")
            table.add_row(*row)
        tables.append(table)
    return tables


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """Where ``measure`` writes its run."""

    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder.", show_default="oversmooth-runs/<model>-<timestamp>"),
    ] = None
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")] = False


@command("measure")
@config_options(RunFolder, into="folder")
@config_options(MeasureConfig, into="config")
@config_options(LoadOptions, into="loading")
@config_options(GateOptions, into="check")
def measure_cmd(
    model: ModelArg,
    images: Annotated[
        Path,
        typer.Argument(help="Image folder (searched recursively), one image, or a text file with one path per line."),
    ],
    *,
    folder: RunFolder,
    config: MeasureConfig,
    per_head: Annotated[
        bool,
        typer.Option("--per-head", help="Also write heads_METRIC.png, a heads x layers heatmap per attention metric."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print summary.json on stdout and nothing else.")] = False,
    quiet: QuietOpt = False,
    baseline: BaselineOpt = None,
    loading: LoadOptions,
    check: GateOptions,
) -> None:
    """Measure layer-wise over-smoothing of a timm ViT on images.

    Writes into --out: **layers.csv** (token_cosine for layers 0..L, attention_std for layers 1..L: mean, std and
    95% CI over images), **heads.csv** (attention_std per layer and head), **summary.json**, **curves.png**, the
    per-patch maps of `--maps` sample images (**patches.csv**, **patches.npz**, **patches.png**) and **report.html**,
    one self-contained page with all of it (opens offline).
    `--metrics all` adds rank collapse, effective rank, |cosine|, class-patch cosine, layer CKA, attention
    entropy, distance and cross-layer similarity; `--per-head` adds **heads_METRIC.png** heatmaps.

    Rising token cosine similarity and falling attention std with depth are the signature of over-smoothing.

    Example: `oversmooth measure examples/digits-vit examples/images --out runs/digits`
    """
    from ..io import check_out_dir
    from ..measuring.config import validate_measure_config
    from ..measuring.run import measure
    from ..measuring.summary import write_run
    from ..metrics.registry import parse_metrics
    from ..runtime import resolve_device

    with option_checks():  # what the library would refuse later, refused now with the usage hint
        validate_measure_config(config)
        parse_metrics(config.metrics)
        resolve_device(config.device)
    out, overwrite = folder.out or default_out(model), folder.overwrite
    check_out_dir(out, overwrite)
    gate = check.gate(baseline) if baseline else None
    with make_progress(quiet or json_out) as progress:
        callback = progress_callback(progress, "measuring")
        result = measure(model, images, config, load=loading, progress=callback, command=command_line())
    if not _is_main():
        return
    write_run(result, out, overwrite=overwrite, per_head=per_head)
    result.summary["out"] = str(out)
    if gate is None:
        finish_measure(result, out, json_out, quiet)
        return
    report, junit, plot, html = (
        check.report or out / "check.md",
        check.junit or out / "junit.xml",
        check.plot or out / "check.png",
        check.html or out / "check.html",
    )
    verdict, written = gate.run(out, report, junit, plot, html)
    result.summary["check"] = verdict.to_dict()
    finish_measure(result, out, json_out, quiet)
    finish_check(verdict, written, quiet or json_out)


def finish_measure(result: Any, out: Path, json_out: bool, quiet: bool) -> None:
    """Print a finished run: JSON on stdout, or a table and where the files went."""
    from ..io import to_json

    s = result.summary
    if json_out:
        sys.stdout.write(to_json(s) + "\n")
        return
    if quiet:
        return
    title = (
        f"{s['model']['name']} ({s['model']['architecture']}): {s['images']['measured']} images, "
        f"{s['run']['images_per_second']} images/s on {s['run']['device']}"
    )
    for table in layer_tables(result.layers, title):
        out_console.print(table)
    if s["images"]["skipped"]:
        first = s["images"]["skipped_files"][0]
        err_console.print(
            f"[yellow]Skipped {s['images']['skipped']} unreadable file(s)[/] (first: {escape(first['path'])}: "
            f"{escape(one_line(first['reason']))}); all are listed in summary.json",
            highlight=False,
        )
    files = ["layers.csv", "heads.csv", "summary.json", "curves.png"]
    files += ["patches.csv", "patches.npz", "patches.png"] if (out / "patches.csv").is_file() else []
    out_console.print(f"Wrote {escape(str(out))}/ ({', '.join(files)}) and report.html", highlight=False)
