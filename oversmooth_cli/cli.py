"""The ``oversmooth`` command line: parse, call the library, render. No maths lives here.

Exit codes: 0 success, 1 a failed check, 2 bad input (one line on stderr saying what is wrong and how to fix it),
130 interrupted.
"""

from __future__ import annotations

import datetime as _dt
import functools
import re
import shlex
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import EXIT_BAD_INPUT, UserError

__all__ = ["app", "main"]

app = typer.Typer(
    name="oversmooth",
    help="Measure, fix and gate over-smoothing in timm Vision Transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
)
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Map library exceptions to one-line messages and exit codes (the one place this happens)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted[/]: nothing half-written was left behind.", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def command(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` with the shared error handling."""

    def register(fn: F) -> F:
        app.command(*args, **kwargs)(handle_errors(fn))
        return fn

    return register


def _version(value: bool) -> None:
    if value:
        out_console.print(f"oversmooth {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Measure, fix and gate over-smoothing in timm Vision Transformers.

    Over-smoothing: as depth grows, a ViT maps the patches of one image to nearly the same vector.
    `measure` writes per-layer token cosine similarity and attention std (Gong et al. 2021) for any image set.
    """


# -- shared options (reused by every command that loads a model) --------------------------------------------------
class Tap(str, Enum):
    qk = "qk"
    softmax = "softmax"


ModelArg = Annotated[
    str,
    typer.Argument(
        help="timm model name (random weights unless --pretrained), a checkpoint file "
        "(.pth/.pt/.bin/.safetensors), or a folder with config.json + weights.",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="timm architecture of a checkpoint (default: from config.json or the checkpoint)."),
]
ModelArgOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        metavar="KEY=VALUE",
        help="Extra timm create_model argument, repeatable (e.g. --model-arg img_size=64).",
    ),
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained", help="Load timm's pretrained weights for a model name (needs the hub).")
]
StrictLoadOpt = Annotated[
    bool,
    typer.Option(
        " /--no-strict",
        help="Load a checkpoint whose keys do not fit the architecture; the misfits are listed in summary.json.",
        show_default=False,
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust-checkpoint", help="Allow unpickling a whole saved model (runs code from the file)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu, cuda, cuda:N or mps.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=0, help="DataLoader worker processes.")]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA (metrics stay float32).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no table.")]


def _is_main() -> bool:
    """Rank 0, or the only process (torch is imported only when a process group may exist)."""
    if "torch.distributed" not in sys.modules:
        return True
    from .distributed import is_main

    return is_main()


def make_progress(disable: bool, unit: str = "images") -> Progress:
    """A rich progress bar on stderr with throughput; silent when ``disable`` or on a non-main rank."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=disable or not _is_main(),
    )


def progress_callback(progress: Progress, description: str, unit: str = "images") -> Callable[[int, int], None]:
    """``fn(done, total)`` that drives one progress task and shows ``N unit/s``."""
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "task" not in state:
            state["task"] = progress.add_task(description, total=total, rate="")
        task = state["task"]
        progress.update(task, completed=done, total=total)
        speed = progress.tasks[task].speed
        progress.update(task, rate=f"{speed:.1f} {unit}/s" if speed else "")

    return update


def default_out(model: str, root: str = "oversmooth-runs") -> Path:
    """``oversmooth-runs/<model>-<timestamp>``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name or model).strip("_") or "model"
    return Path(root) / f"{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def command_line() -> str:
    return shlex.join(["oversmooth", *sys.argv[1:]])


def layer_table(layers, title: str) -> Table:
    """Per-layer means with their 95% intervals, one column per metric."""
    table = Table(title=title, title_justify="left")
    table.add_column("layer", justify="right")
    metrics = list(dict.fromkeys(layers["metric"]))
    for m in metrics:
        table.add_column(f"{m}\nmean [95% CI]", justify="right")
    for layer in sorted(layers["layer"].unique()):
        row = [str(layer)]
        for m in metrics:
            d = layers[(layers["layer"] == layer) & (layers["metric"] == m)]
            if d.empty:
                row.append("–")
            else:
                r = d.iloc[0]
                row.append(f"{r['mean']:.4f} [{r['ci95_low']:.4f}, {r['ci95_high']:.4f}]")
        table.add_row(*row)
    return table


@command("measure")
def measure_cmd(
    model: ModelArg,
    images: Annotated[
        Path,
        typer.Argument(help="Image folder (searched recursively), one image, or a text file with one path per line."),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder.", show_default="oversmooth-runs/<model>-<timestamp>"),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")] = False,
    arch: ArchOpt = None,
    model_arg: ModelArgOpt = None,
    pretrained: PretrainedOpt = False,
    strict_load: StrictLoadOpt = True,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 0,
    amp: AmpOpt = False,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Measure a random sample of N images (see --seed).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --limit sample.")] = 0,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on an unreadable image instead of skipping and listing it.")
    ] = False,
    attention_tap: Annotated[
        Tap,
        typer.Option(
            "--attention-tap",
            help="qk: keep fused attention and compute statistics from q and k; softmax: unfused, read probabilities.",
        ),
    ] = Tap.qk,
    json_out: Annotated[bool, typer.Option("--json", help="Print summary.json on stdout and nothing else.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure layer-wise over-smoothing of a timm ViT on images.

    Writes into --out: **layers.csv** (token_cosine for layers 0..L, attention_std for layers 1..L: mean, std and
    95% CI over images), **heads.csv** (attention_std per layer and head), **summary.json** and **curves.png**.

    Rising token cosine similarity and falling attention std with depth are the signature of over-smoothing.

    Example: `oversmooth measure examples/digits-vit examples/images --out runs/digits`
    """
    from .measure import measure, write_run
    from .models import parse_model_args
    from .report import check_out_dir

    out = out or default_out(model)
    check_out_dir(out, overwrite)
    with make_progress(quiet or json_out) as progress:
        result = measure(
            model,
            images,
            arch=arch,
            pretrained=pretrained,
            model_args=parse_model_args(model_arg),
            strict_load=strict_load,
            trust_checkpoint=trust_checkpoint,
            device=device,
            batch_size=batch_size,
            workers=workers,
            amp=amp,
            limit=limit,
            seed=seed,
            strict=strict,
            attention_tap=attention_tap.value,
            progress=progress_callback(progress, "measuring"),
            command=command_line(),
        )
    if not _is_main():
        return
    write_run(result, out, overwrite=overwrite)
    result.summary["out"] = str(out)
    finish_measure(result, out, json_out, quiet)


def finish_measure(result: Any, out: Path, json_out: bool, quiet: bool) -> None:
    """Print a finished run: JSON on stdout, or a table and where the files went."""
    from .report import to_json

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
    out_console.print(layer_table(result.layers, title))
    if s["images"]["skipped"]:
        err_console.print(
            f"[yellow]Skipped {s['images']['skipped']} unreadable file(s)[/]; see summary.json", highlight=False
        )
    out_console.print(f"Wrote {escape(str(out))}/ (layers.csv, heads.csv, summary.json, curves.png)", highlight=False)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    finally:
        if "torch.distributed" in sys.modules:
            from .distributed import shutdown

            shutdown()


if __name__ == "__main__":
    main()
