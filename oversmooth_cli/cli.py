"""The ``oversmooth`` command line: parse, call the library, render. No maths lives here.

Exit codes: 0 success, 1 a failed check, 2 bad input (one line on stderr saying what is wrong and how to fix it),
130 interrupted.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import functools
import inspect
import os
import re
import shlex
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, get_origin, get_type_hints

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_FAILED_CHECK, EXIT_INTERNAL, UserError
from .finetune_config import FinetuneConfig

try:  # typer >= 0.26 runs on its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as _click_errors

__all__ = ["app", "main"]

_ARGV: list[str] = []
"""The arguments of the running invocation, after the program name (see :func:`command_line`)."""


def _plain(text: str | None) -> str | None:
    """Help text without Markdown emphasis (``**bold**``, ```code```): plain words at any terminal width."""
    return re.sub(r"\*\*(.+?)\*\*|`([^`]+)`", lambda m: m.group(1) or m.group(2), text) if text else text


_NoArgsIsHelp = getattr(_click_errors, "NoArgsIsHelpError", ())
"""``oversmooth`` alone prints the help (an exit-2 usage error to click 8.2+); left as it is."""


def _usage_error(e: Any) -> NoReturn:
    """A usage error (unknown option, bad value, missing argument, bad choice) as one line, then exit 2.

    Click's suggestions for an unknown option are kept only when they are close (``--bogus`` is not ``--out``).
    """
    if isinstance(e, _click_errors.NoSuchOption):
        name = e.option_name.lstrip("-")
        close = [p for p in e.possibilities or [] if difflib.SequenceMatcher(None, name, p.lstrip("-")).ratio() >= 0.75]
        message = f"No such option: {e.option_name}" + (f" (did you mean {', '.join(close)}?)" if close else "")
    else:
        message = e.format_message().replace("Value error, ", "")
    if e.ctx is not None:
        where = e.ctx.command_path
    else:  # an error found before the command's context exists: name the command typed
        where = " ".join(["oversmooth", *[a for a in _ARGV if a in app_commands()][:1]])
    _error_line(f"{one_line(message).rstrip('.')}. Try '{where} --help'.")
    raise typer.Exit(EXIT_BAD_INPUT)


def app_commands() -> list[str]:
    """The names of the registered commands."""
    return [c.name for c in app.registered_commands]


class _Command(TyperCommand):
    """A command whose help reads well in 80 columns: click's two-column layout, arguments by their upper-case names
    (``MODEL IMAGES``), flags without a value type, Markdown emphasis dropped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _plain(self.help)
        for param in self.params:
            if param.param_type_name == "argument" and param.metavar is None:
                param.metavar = param.name.upper()
            if hasattr(param, "help"):
                param.help = _plain(param.help)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append((param.metavar, record[1]))
            else:  # a flag with only a negative form, e.g. " / --no-strict"
                options.append((record[0].removeprefix(" / "), record[1]))
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class _RecordingGroup(TyperGroup):
    """The command group, remembering the arguments it was invoked with: ``sys.argv[1:]`` from a shell (also under
    ``python -m`` or ``torchrun``), the list given to ``CliRunner.invoke`` in tests. Usage errors of the group and of
    every command are one line and exit 2 (:func:`_usage_error`)."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        _ARGV[:] = sys.argv[1:] if args is None else [str(a) for a in args]
        return super().main(args, *rest, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except _NoArgsIsHelp:
            raise
        except _click_errors.UsageError as e:
            _usage_error(e)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _NoArgsIsHelp:
            raise
        except _click_errors.UsageError as e:
            _usage_error(e)

    def format_help_text(self, ctx: Any, formatter: Any) -> None:
        self.help = _plain(self.help)
        super().format_help_text(ctx, formatter)


app = typer.Typer(
    cls=_RecordingGroup,
    name="oversmooth",
    help="Measure, fix and gate over-smoothing in timm Vision Transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # click's two-column help: readable at 80 columns (rich's option tables are not)
)
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def one_line(message: str) -> str:
    """The message itself, also when a DataLoader worker wrapped it in a traceback (its last line)."""
    if "Traceback (most recent call last)" in message:
        last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
        message = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(message.split())


def _error_line(message: str) -> None:
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False)


def handle_errors(fn: F) -> F:
    """Map library exceptions to one-line messages and exit codes (the one place this happens)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _error_line(one_line(str(e)))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as e:  # unreadable input or unwritable output: the user can fix it
            where = f" {e.filename}" if getattr(e, "filename", None) else ""
            _error_line(f"cannot access{where}: {e.strerror or e}; check the path and its permissions")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted[/]: nothing half-written was left behind.", highlight=False)
            raise typer.Exit(130) from None
        except Exception as e:
            if os.environ.get("OVERSMOOTH_DEBUG") or type(e).__module__.split(".")[0] in ("typer", "click"):
                raise  # typer.Exit / BadParameter carry their own exit codes
            _error_line(
                f"internal error {type(e).__name__}: {one_line(str(e))} "
                "(a bug: rerun with OVERSMOOTH_DEBUG=1 for the traceback and report it)"
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def command(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` with the shared error handling."""

    def register(fn: F) -> F:
        app.command(*args, cls=_Command, **kwargs)(handle_errors(fn))
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
    auto = "auto"
    qk = "qk"
    inline = "inline"
    softmax = "softmax"


ModelArg = Annotated[
    str,
    typer.Argument(
        help="timm model name (random weights unless --pretrained), a checkpoint file "
        "(.pth/.pt/.bin/.safetensors/.ckpt), or a folder with config.json + weights.",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        metavar="ARCH",
        help="timm architecture of a checkpoint (default: from config.json or the checkpoint).",
    ),
]
ModelArgOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        metavar="KEY=VALUE",
        help="Extra timm create_model argument, repeatable. VALUE is a Python literal (number, tuple, list, "
        "True/False, None, quoted string), JSON, or else text: --model-arg img_size=64 --model-arg 'depths=(2,2)' "
        "--model-arg act_layer=gelu.",
    ),
]
PretrainedOpt = Annotated[
    bool,
    typer.Option(
        "--pretrained",
        help="Load timm's pretrained weights for a model name: from the Hugging Face cache, else downloaded; "
        "without a reachable hub and nothing cached, it fails at once (exit 2).",
    ),
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


# -- check options (shared by `check` and `measure --baseline`) -----------------------------------------------------
class Direction(str, Enum):
    """Which change fails a check (the names of ``check.DIRECTIONS``)."""

    both = "both"
    up = "up"
    down = "down"


AtolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--atol",
        metavar="[METRIC=]VALUE",
        help="Absolute tolerance on current - baseline, repeatable: VALUE for every metric, METRIC=VALUE for one "
        "(wins over VALUE).",
        show_default="each metric's own",
    ),
]
RtolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--rtol",
        metavar="[METRIC=]VALUE",
        help="Relative tolerance, times |baseline|, repeatable like --atol.",
        show_default="each metric's own",
    ),
]
AllowOtherImagesOpt = Annotated[
    bool,
    typer.Option(
        "--allow-other-images",
        help="Compare runs measured on different image sets (refused otherwise: the curves depend on the images).",
    ),
]
SigmaOpt = Annotated[
    float,
    typer.Option(
        "--sigma",
        min=0.0,
        metavar="K",
        help="Also allow K times the combined standard error sqrt(se_b^2 + se_c^2) of the two means (se = std/√n).",
    ),
]
DirectionOpt = Annotated[
    Direction,
    typer.Option(
        "--direction",
        help="both: any change beyond the band fails; up: only more over-smoothing (e.g. token_cosine rose, "
        "attention_std fell); down: only less.",
    ),
]
CheckMetricOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--metric", metavar="NAME", help="Metric to check, repeatable (default: every metric of the baseline)."
    ),
]
LayersOpt = Annotated[
    str | None, typer.Option("--layers", metavar="SPEC", help="Check only these layers, e.g. 0-5,12 (default: all).")
]
ReportOpt = Annotated[
    Path | None, typer.Option("--report", help="Write a Markdown summary of the check (for a pull-request comment).")
]
JunitOpt = Annotated[
    Path | None, typer.Option("--junit", help="Write JUnit XML, one testcase per metric and layer (for CI).")
]
PlotOpt = Annotated[
    Path | None,
    typer.Option("--plot", help="Write a PNG of baseline and current curves, tolerance band and failing layers."),
]
BaselineOpt = Annotated[
    Path | None,
    typer.Option(
        "--baseline",
        help="After measuring, check the run against this baseline (run folder or layers.csv): exit 1 on a "
        "regression. Writes check.md, junit.xml and check.png into --out unless --report/--junit/--plot say where.",
    ),
]


def _field_option(f: dataclasses.Field, kind: Any) -> inspect.Parameter:
    """One Typer option for a dataclass field: flags, help, choices and default from the field and its metadata."""
    if get_origin(kind) is Annotated:  # a field declared with its Typer option (GateOptions)
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=kind)
    meta = f.metadata
    default = f.default
    if "parse" in meta:  # given as text on the command line, e.g. --loss cos,cons
        kind, default = str, ",".join(default)
    if "choices" in meta:
        kind = Enum(f.name, {c: c for c in meta["choices"]}, type=str)
        default = kind(default)
    flags = meta.get("flags", (f"--{f.name.replace('_', '-')}",))
    option = typer.Option(*flags, help=meta["help"], show_default=meta.get("show_default", True))
    annotation = Annotated[kind, option]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _from_option(f: dataclasses.Field, value: Any) -> Any:
    if "parse" in f.metadata:
        return f.metadata["parse"](value)
    return value.value if isinstance(value, Enum) else value


def config_options(config_cls: type, into: str) -> Callable[[F], F]:
    """Replace the command's parameter ``into`` by one option per field of the dataclass ``config_cls`` (its defaults,
    help and checks live there, once); the command is called with ``into=config_cls(**the options' values)``."""
    fields = dataclasses.fields(config_cls)
    hints = get_type_hints(config_cls, include_extras=True)
    options = [_field_option(f, hints[f.name]) for f in fields]

    def decorate(fn: F) -> F:
        params = list(inspect.signature(fn, eval_str=True).parameters.values())
        at = [p.name for p in params].index(into)

        @functools.wraps(fn)
        def with_config(**kwargs: Any) -> Any:
            values = {f.name: _from_option(f, kwargs.pop(f.name)) for f in fields}
            return fn(**kwargs, **{into: config_cls(**values)})

        with_config.__signature__ = inspect.Signature([*params[:at], *options, *params[at + 1 :]])  # type: ignore[attr-defined]
        return with_config  # type: ignore[return-value]

    return decorate


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a MODEL argument is built, declared once for every command that loads a model."""

    arch: ArchOpt = None
    model_arg: ModelArgOpt = None
    pretrained: PretrainedOpt = False
    strict_load: StrictLoadOpt = True
    trust_checkpoint: TrustOpt = False

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~oversmooth_cli.measure.measure` and ``finetune`` these options give."""
        from .models import parse_model_args

        return {
            "arch": self.arch,
            "pretrained": self.pretrained,
            "model_args": parse_model_args(self.model_arg),
            "strict_load": self.strict_load,
            "trust_checkpoint": self.trust_checkpoint,
        }


@dataclasses.dataclass(frozen=True)
class GateOptions:
    """The options of a check against a baseline, declared once for `check` and `measure --baseline`."""

    atol: AtolOpt = None
    rtol: RtolOpt = None
    sigma: SigmaOpt = 0.0
    direction: DirectionOpt = Direction.both
    layers: LayersOpt = None
    allow_other_images: AllowOtherImagesOpt = False
    report: ReportOpt = None
    junit: JunitOpt = None
    plot: PlotOpt = None

    def gate(self, baseline: Path, metrics: list[str] | None = None) -> Any:
        """The :class:`~oversmooth_cli.check.CheckGate` these options describe (baseline loaded, layers parsed)."""
        from .check import CheckGate, tolerance_from_options

        direction = Direction(self.direction).value
        tolerance = tolerance_from_options(self.atol, self.rtol, self.sigma, direction)
        return CheckGate.prepare(baseline, tolerance, metrics, self.layers, self.allow_other_images)


def _is_main() -> bool:
    """Rank 0, or the only process (torch is imported only when a process group may exist)."""
    if "torch.distributed" not in sys.modules:
        return True
    from .runtime import is_main

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
    """The running command as typed, without the launcher: ``oversmooth <command> <arguments>``."""
    return shlex.join(["oversmooth", *_ARGV])


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
    from .report import metric_order

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


@command("measure")
@config_options(ModelOptions, into="loading")
@config_options(GateOptions, into="check")
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
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 0,
    amp: AmpOpt = False,
    channels_last: Annotated[
        bool,
        typer.Option("--channels-last/--no-channels-last", help="channels_last memory format (can help on GPUs)."),
    ] = False,
    compile_model: Annotated[
        bool,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the forward pass (slow first batch); runs uncompiled, with a warning, if that fails.",
        ),
    ] = False,
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
            help="How attention is read. auto: inline on CPU, qk on GPUs. qk: the model keeps its fused kernel and the "
            "statistics are recomputed from q and k. inline: oversmooth computes each attention once, unfused, and "
            "measures it (fastest on CPU). softmax: the model's own unfused path (a reference). All give the same "
            "values up to float rounding.",
        ),
    ] = Tap.auto,
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics",
            metavar="LIST",
            help="Comma-separated metric names or presets: default (token_cosine, attention_std), cheap, all. "
            "See the README's metrics section.",
        ),
    ] = "default",
    include_prefix: Annotated[
        bool,
        typer.Option(
            "--include-prefix", help="Token metrics also use the prefix tokens (class, distillation, registers)."
        ),
    ] = False,
    per_head: Annotated[
        bool,
        typer.Option("--per-head", help="Also write heads_METRIC.png, a heads x layers heatmap per attention metric."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print summary.json on stdout and nothing else.")] = False,
    quiet: QuietOpt = False,
    baseline: BaselineOpt = None,
    *,
    loading: ModelOptions,
    check: GateOptions,
) -> None:
    """Measure layer-wise over-smoothing of a timm ViT on images.

    Writes into --out: **layers.csv** (token_cosine for layers 0..L, attention_std for layers 1..L: mean, std and
    95% CI over images), **heads.csv** (attention_std per layer and head), **summary.json** and **curves.png**.
    `--metrics all` adds rank collapse, effective rank, |cosine|, class-patch cosine, layer CKA, attention
    entropy, distance and cross-layer similarity; `--per-head` adds **heads_METRIC.png** heatmaps.

    Rising token cosine similarity and falling attention std with depth are the signature of over-smoothing.

    Example: `oversmooth measure examples/digits-vit examples/images --out runs/digits`
    """
    from .measure import measure, write_run
    from .report import check_out_dir

    out = out or default_out(model)
    check_out_dir(out, overwrite)
    gate = check.gate(baseline) if baseline else None
    with make_progress(quiet or json_out) as progress:
        result = measure(
            model,
            images,
            **loading.load_kwargs(),
            device=device,
            batch_size=batch_size,
            workers=workers,
            amp=amp,
            limit=limit,
            seed=seed,
            strict=strict,
            attention_tap=attention_tap.value,
            metrics=metrics,
            include_prefix=include_prefix,
            progress=progress_callback(progress, "measuring"),
            command=command_line(),
            channels_last=channels_last,
            compile=compile_model,
        )
    if not _is_main():
        return
    write_run(result, out, overwrite=overwrite, per_head=per_head)
    result.summary["out"] = str(out)
    if gate is None:
        finish_measure(result, out, json_out, quiet)
        return
    report, junit, plot = (
        check.report or out / "check.md",
        check.junit or out / "junit.xml",
        check.plot or out / "check.png",
    )
    verdict, written = gate.run(out, report, junit, plot)
    result.summary["check"] = verdict.to_dict()
    finish_measure(result, out, json_out, quiet)
    finish_check(verdict, written, quiet or json_out)


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
    for table in layer_tables(result.layers, title):
        out_console.print(table)
    if s["images"]["skipped"]:
        first = s["images"]["skipped_files"][0]
        err_console.print(
            f"[yellow]Skipped {s['images']['skipped']} unreadable file(s)[/] (first: {escape(first['path'])}: "
            f"{escape(one_line(first['reason']))}); all are listed in summary.json",
            highlight=False,
        )
    out_console.print(f"Wrote {escape(str(out))}/ (layers.csv, heads.csv, summary.json, curves.png)", highlight=False)


# -- check, compare, baseline ----------------------------------------------------------------------------------------
def check_table(result: Any) -> Table:
    """The failing (metric, layer) rows with baseline, current, difference, the allowed band and its atol/rtol."""
    from .check import band_text, fmt

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
    finish_check(*gate.run(current, check.report, check.junit, check.plot), quiet)


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
    from .compare import compare_runs, write_compare

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
    from .check import make_baseline

    written = make_baseline(run, dest, overwrite)
    out_console.print(
        f"Wrote {', '.join(escape(str(p)) for p in written)}; commit {escape(str(dest))}/ to use it with "
        "`oversmooth check` or `oversmooth measure --baseline`",
        highlight=False,
    )


@command("finetune")
@config_options(ModelOptions, into="loading")
@config_options(FinetuneConfig, into="config")
def finetune_cmd(
    model: ModelArg,
    train_dir: Annotated[
        Path, typer.Argument(help="Training images, one sub-folder per class (ImageFolder layout).", show_default=False)
    ],
    val_dir: Annotated[
        Path | None, typer.Option("--val-dir", help="Validation images with the same class sub-folders.")
    ] = None,
    *,
    config: FinetuneConfig,
    loading: ModelOptions,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run folder.", show_default="oversmooth-runs/finetune-<model>-<timestamp>"),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the outputs of a run in --out.")] = False,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this folder (same options) from its last save.")
    ] = None,
    control: Annotated[
        bool,
        typer.Option(
            "--control",
            help="Also train the --loss none twin (same seed, samples, augmentations, CutMix draws) into OUT/control "
            "and write side_by_side.png/.csv/.json with a verdict on the accuracy difference.",
        ),
    ] = False,
    monitor_every: Annotated[
        int | None,
        typer.Option(
            "--monitor-every",
            min=0,
            help="Measure over-smoothing on up to 64 validation images every N optimizer steps (and before the first) "
            "into monitor.csv and monitor.png, a layer x step heatmap; 0: off.",
            show_default="once per epoch",
        ),
    ] = None,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard",
            help="Also write the monitor's per-layer curves and heatmap as TensorBoard event files into OUT/tb "
            "(needs the tensorboard extra).",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a timm ViT with cross-entropy plus the patch-diversification losses (cos, cons, token).

    Total loss = CE + w_cos * l_cos + w_cons * l_cons + w_token * l_token (Gong et al. 2021). Writes into --out:
    **checkpoint-last/best.safetensors** + **config.json** (`oversmooth measure OUT` loads the best),
    **train_state.pt** (for --resume), **history.csv**, **before/** and **after/** (measure runs on the validation
    images), **compare.png** and **training.png**, **monitor.csv** and **monitor.png** (over-smoothing on the
    validation images while training, --monitor-every). Ctrl-C saves a resumable checkpoint.

    Several GPUs: `torchrun --nproc_per_node=N -m oversmooth_cli finetune ...`.

    Example: `oversmooth finetune examples/digits-vit data/train --val-dir data/val --loss cos,cons,token`
    """
    from .finetune import finetune

    if resume is not None and out is not None and out.resolve() != resume.resolve():
        raise UserError(f"--resume {resume} continues the run in that folder; drop --out {out} or make them equal")
    if resume is None:
        base = default_out(model)
        out = out or base.parent / f"finetune-{base.name}"
    say = (lambda msg: err_console.print(f"[cyan]Note:[/] {escape(msg)}", highlight=False)) if not quiet else None
    with make_progress(quiet, unit="steps") as progress:
        on_step, on_epoch = _training_callbacks(progress, config.epochs, quiet)
        result = finetune(
            model,
            train_dir,
            resume or out,
            config,
            val_dir=val_dir,
            **loading.load_kwargs(),
            device=device,
            workers=workers,
            resume=resume is not None,
            overwrite=overwrite,
            on_step=on_step,
            on_epoch=on_epoch,
            log=say if _is_main() else None,
            command=command_line(),
            control=control,
            monitor_every=monitor_every,
            tensorboard=tensorboard,
        )
    _finish_finetune(result, control, quiet)


def _training_callbacks(progress: Progress, epochs: int, quiet: bool) -> tuple[Callable, Callable]:
    """``on_step`` (one progress task per epoch, running loss terms) and ``on_epoch`` (one line per epoch)."""
    tasks: dict[int, Any] = {}

    def on_step(info: Any) -> None:
        if info.epoch not in tasks:
            tasks[info.epoch] = progress.add_task(f"epoch {info.epoch}/{info.epochs}", total=info.steps, rate="")
        terms = "  ".join(f"{k} {v:.4f}" for k, v in info.running.items())
        progress.update(tasks[info.epoch], completed=info.step, rate=terms)

    def on_epoch(row: dict[str, Any]) -> None:
        if tasks.get(row["epoch"]) is not None:
            progress.remove_task(tasks.pop(row["epoch"]))
        if quiet or not _is_main():
            return
        if row["epoch"] == 0:
            line = f"before training  val loss {row['val_loss']:.4f}"
        else:
            line = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}"
        line += f"  val top-1 {row['val_top1']:.2f}%  last-layer token cosine {row['val_token_cosine']:.4f}"
        progress.console.print(line + (f"  {row['seconds']:.1f}s" if row["epoch"] else ""), highlight=False)

    return on_step, on_epoch


def _finish_finetune(result: Any, control: bool, quiet: bool) -> None:
    """Print a finished (or interrupted: exit 130) fine-tuning run: before/after lines, the side-by-side table."""
    if not _is_main():
        if result.interrupted:
            raise typer.Exit(130)
        return
    target = escape(str(result.out))
    if result.interrupted:
        epoch, step = result.stopped_at
        arm = " (control arm)" if result.control is not None and result.control.interrupted else ""
        again = " --control" if control else ""
        err_console.print(
            f"[yellow]Interrupted[/] at epoch {epoch}, step {step}{arm}: saved a resumable checkpoint; "
            f"continue with --resume {target}{again}",
            highlight=False,
        )
        raise typer.Exit(130)
    if quiet:
        return
    out_console.print(_before_after(result), highlight=False)
    if result.control is not None:
        out_console.print(f"control (--loss none): {_before_after(result.control)}", highlight=False)
    if result.comparison is not None:
        table = Table(title="side by side (final weights, validation images)", title_justify="left")
        for name in ("arm", "val top-1 (95% CI)", "last-layer token cosine (95% CI)", "images"):
            table.add_column(name, justify="left" if name == "arm" else "right")
        for row in result.comparison.table.itertuples():
            table.add_row(
                row.arm,
                f"{row.val_top1:.1f}% ({row.val_top1_ci95_low:.1f}-{row.val_top1_ci95_high:.1f})",
                f"{row.token_cosine:.3f} ({row.token_cosine_ci95_low:.3f}-{row.token_cosine_ci95_high:.3f})",
                str(row.n_images),
            )
        out_console.print(table)
        out_console.print(result.comparison.verdict, highlight=False)
    extra = ", control/, side_by_side.png/.csv/.json" if result.comparison is not None else ""
    out_console.print(
        f"Wrote {target}/ (checkpoint-last/best.safetensors, config.json, train_state.pt, history.csv, before/, "
        f"after/, compare.png, training.png{extra})",
        highlight=False,
    )


def _before_after(result: Any) -> str:
    """``val top-1 96.9% -> 96.4%, last-layer token cosine 0.507 -> 0.213 (best ...)``: epoch 0 vs the last epoch."""
    history = result.history
    first, last = history.iloc[0], history.iloc[-1]
    line = (
        f"val top-1 {first['val_top1']:.1f}% -> {last['val_top1']:.1f}%, "
        f"last-layer token cosine {first['val_token_cosine']:.3f} -> {last['val_token_cosine']:.3f}"
    )
    if int(first["epoch"]) != 0:
        line += f" (from epoch {int(first['epoch'])}: this run has no epoch-0 row)"
    if result.best_epoch is not None:
        line += f"; best val top-1 {result.best_top1:.2f}% (epoch {result.best_epoch})"
    return line


@command("models")
def models_cmd(
    pattern: Annotated[
        str, typer.Argument(help="Architecture name or wildcard pattern (e.g. 'swin*', '*distilled*').")
    ] = "*",
) -> None:
    """List the timm architectures matching PATTERN and, for each family, which metrics are measured.

    Token metrics (token_cosine...) and attention metrics (attention_std...) apply at every layer, at some layers
    (e.g. only the class-attention blocks of XCiT), or not at all; docs/compatibility.md has the full table.
    Example: `oversmooth models 'swin*'`
    """
    from .adapters import architecture_families, family_support

    rows = architecture_families(pattern)
    if not rows:
        raise UserError(f"no timm architecture matches {pattern!r}; try a wildcard such as 'vit_*' or '*swin*'")
    support = {family: family_support(family) for family in dict.fromkeys(f for _, f in rows)}
    table = Table(title=f"{len(rows)} timm architecture(s) matching {pattern!r}", title_justify="left")
    for column in ("architecture", "family", "status", "token metrics", "attention metrics"):
        table.add_column(column)
    for name, family in rows:
        s = support[family]
        table.add_row(name, family, s.status, s.tokens, s.attention)
    out_console.print(table)
    for s in support.values():
        out_console.print(f"[bold]{escape(s.family)}[/] ({s.status}): {escape(s.note)}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="oversmooth")  # also under `python -m oversmooth_cli` and torchrun
    finally:
        if "torch.distributed" in sys.modules:
            from .runtime import shutdown

            shutdown()


if __name__ == "__main__":
    main()
