"""``oversmooth check``, ``oversmooth compare`` and ``oversmooth baseline``: the CI gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import EXIT_FAILED_CHECK
from .app import command, err_console, out_console
from .options import AllowOtherImagesOpt, CheckMetricOpt, GateOptions, QuietOpt, config_options


# -- check, compare, baseline ----------------------------------------------------------------------------------------
def check_table(result: Any) -> Table:
    """The failing (metric, layer) rows with baseline, current, difference, the allowed band and its atol/rtol."""
    from ..gate.reports import band_text, fmt

    table = Table(title=result.headline(), title_justify="left", title_style="bold red")
    for name in ("metric", "layer", "baseline", "current", "difference", "allowed", "atol", "rtol"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    t = result.tolerance
    for _, r in result.failures.iterrows():
        m = r["metric"]
        table.add_row(
            m,
            str(r["layer"]),
            fmt(r["baseline"]),
            fmt(r["current"]),
            fmt(r["diff"], True),
            band_text(r),
            f"{t.atol_for(m):g}",
            f"{t.rtol_for(m):g}",
        )
    return table


def finish_check(result: Any, written: list[Path], quiet: bool) -> None:
    """Print the verdict (failing rows as a table), the per-metric tolerances, and exit 1 on a regression."""
    if not quiet:
        for note in result.notes:
            err_console.print(f"[yellow]Note:[/] {escape(note)}", highlight=False)
        if result.passed:
            out_console.print(f"[bold green]{escape(result.headline())}[/]")
        else:
            out_console.print(check_table(result))
        out_console.print(f"tolerance: {escape(result.describe_tolerance())}", highlight=False)
        if written:
            out_console.print(f"Wrote {', '.join(escape(str(p)) for p in written)}", highlight=False)
    if not result.passed:
        raise typer.Exit(EXIT_FAILED_CHECK)


@command("check")
@config_options(GateOptions, into="check")
def check_cmd(
    baseline: Annotated[
        Path,
        typer.Argument(
            help="Baseline: a run folder (e.g. made by `oversmooth baseline`) or its layers.csv.", show_default=False
        ),
    ],
    current: Annotated[
        Path,
        typer.Argument(
            help="The run to check: a run folder written by `measure`, or its layers.csv.", show_default=False
        ),
    ],
    metric: CheckMetricOpt = None,
    *,
    check: GateOptions,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; the exit code is the verdict.")] = False,
) -> None:
    """Fail (exit 1) when a run's over-smoothing curves moved beyond a tolerance from a baseline.

    Per metric and layer, `current - baseline` must lie within `atol + rtol·|baseline| + sigma·√(se_b² + se_c²)`;
    atol and rtol default to each metric's own (e.g. token_cosine 0.01, attention_std 5% of the baseline).
    Exit codes: **0** within tolerance, **1** regression, **2** unusable input (missing files; metrics, layers or
    definitions that differ: metrics_version, --include-prefix, input size, token grid, image set).

    Example: `oversmooth check ci/baseline runs/new --sigma 2 --atol attention_std=0.001 --report report.md`
    """
    gate = check.gate(baseline, metric)
    result, written = gate.run(current, check.report, check.junit, check.plot, check.html)
    finish_check(result, written, quiet)


@command("compare")
def compare_cmd(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders (or their layers.csv) to overlay.", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure (PNG); compare.csv goes beside it.")] = Path(
        "compare.png"
    ),
    label: Annotated[
        list[str] | None,
        typer.Option("--label", metavar="LABEL", help="Legend label, repeatable: one per run, in order."),
    ] = None,
    relative_depth: Annotated[
        bool, typer.Option("--relative-depth", help="Align runs of different depths by layer / L.")
    ] = False,
    metric: Annotated[
        list[str] | None, typer.Option("--metric", metavar="NAME", help="Metric to show, repeatable (default: all).")
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option("--csv", help="Where to write the wide table.", show_default="compare.csv beside --out"),
    ] = None,
    ci: Annotated[bool, typer.Option("--ci", help="Shade each run's 95% interval over images.")] = False,
    allow_other_images: AllowOtherImagesOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Overlay the per-layer curves of several runs: one panel per metric, one line per run.

    Writes the figure and **compare.csv** (one row per metric and layer, or relative depth, one column per run).
    Runs whose metric definitions (metrics_version, --include-prefix) or image sets differ are refused (exit 2).

    Example: `oversmooth compare runs/before runs/after --label before --label after --out compare.png`
    """
    from ..gate.compare import compare_runs, write_compare

    result = compare_runs(runs, label, relative_depth, metric, allow_other_images=allow_other_images)
    png, table = write_compare(result, out, csv, ci)
    if quiet:
        return
    for note in result.notes:
        err_console.print(f"[yellow]Note:[/] {escape(note)}", highlight=False)
    summary = Table(title=f"{len(result.runs)} runs", title_justify="left")
    for name in ("label", "run", "layers", "images"):
        summary.add_column(name, justify="right" if name in ("layers", "images") else "left")
    for run, lab in zip(result.runs, result.labels, strict=True):
        summary.add_row(escape(lab), escape(str(run.source)), str(run.n_layers), str(run.n_images))
    out_console.print(summary)
    out_console.print(f"Wrote {escape(str(png))} and {escape(str(table))}", highlight=False)


@command("baseline")
def baseline_cmd(
    run: Annotated[
        Path, typer.Argument(help="Run folder written by `measure` (or its layers.csv).", show_default=False)
    ],
    dest: Annotated[Path, typer.Argument(help="Folder to commit, e.g. ci/oversmooth-baseline.", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the baseline files already in DEST.")] = False,
) -> None:
    """Copy the files a baseline needs (layers.csv, summary.json) into a small folder meant to be committed.

    Example: `oversmooth baseline runs/main ci/oversmooth-baseline --overwrite && git add ci/oversmooth-baseline`
    """
    from ..gate.baseline import make_baseline

    written = make_baseline(run, dest, overwrite)
    out_console.print(
        f"Wrote {', '.join(escape(str(p)) for p in written)}; commit {escape(str(dest))}/ to use it with "
        "`oversmooth check` or `oversmooth measure --baseline`",
        highlight=False,
    )
