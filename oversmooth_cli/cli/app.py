"""The command line's plumbing: the Typer app, help that reads well at 80 columns, one-line usage errors, progress
bars, and :func:`handle_errors`, the one place exceptions become exit codes (0 success, 1 a failed check, 2 bad
input: one line on stderr saying what is wrong and how to fix it, 3 a bug, 130 interrupted).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import functools
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..errors import EXIT_BAD_INPUT, EXIT_INTERNAL, UserError

try:  # typer >= 0.26 runs on its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as _click_errors  # type: ignore[no-redef]

__all__ = ["app"]


COMMAND_ORDER = ("measure", "check", "compare", "baseline", "finetune", "models")
"""The order of the commands in ``oversmooth --help``."""

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
    return [c.name for c in app.registered_commands if c.name]


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
                name = (param.metavar or (param.name or "").upper()) + ("..." if param.nargs != 1 else "")
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

    def list_commands(self, ctx: Any) -> list[str]:
        """In the order a user meets them (:data:`COMMAND_ORDER`), not in the order their modules were imported."""
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))


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


def _is_main() -> bool:
    """Rank 0, or the only process (torch is imported only when a process group may exist)."""
    if "torch.distributed" not in sys.modules:
        return True
    from ..runtime import is_main

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
