"""The command line's plumbing: the Typer app, help that reads well at 80 columns, one-line usage errors, progress
bars, and :func:`handle_errors`, the one place exceptions become exit codes (0 success, 1 a failed check, 2 bad
input: one line on stderr saying what is wrong and how to fix it, 3 a bug, 130 interrupted).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import functools
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator
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
    from typer._click.core import ParameterSource as _ParameterSource
    from typer._click.globals import get_current_context as _current_context
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as _click_errors  # type: ignore[no-redef]
    from click.core import ParameterSource as _ParameterSource  # type: ignore[assignment]
    from click.globals import get_current_context as _current_context  # type: ignore[no-redef]

__all__ = ["OptionError", "app"]


class OptionError(UserError):
    """A usage error found after the options were parsed (a value out of range, an unknown metric or device, a
    malformed ``--model-arg``): one line with the "Try 'oversmooth CMD --help'." hint, exit 2."""


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
    where = e.ctx.command_path if e.ctx is not None else _typed_command()
    _error_line(_with_hint(one_line(message), where))
    raise typer.Exit(EXIT_BAD_INPUT)


def _typed_command() -> str:
    """``oversmooth <the command typed>``: where a usage error found outside click's context points for help."""
    return " ".join(["oversmooth", *[a for a in _ARGV if a in app_commands()][:1]])


def _with_hint(message: str, where: str) -> str:
    return f"{message.rstrip('.')}. Try '{where} --help'."


@contextlib.contextmanager
def option_checks() -> Iterator[None]:
    """A :class:`~oversmooth_cli.errors.UserError` raised inside checks the parsed options: it becomes an
    :class:`OptionError` (one line with the "Try ... --help" hint)."""
    try:
        yield
    except OptionError:
        raise
    except UserError as e:
        raise OptionError(str(e)) from None


def given_options() -> set[str]:
    """The parameter names of the running command that the command line (or the environment) set, not defaults."""
    try:
        ctx = _current_context()
    except RuntimeError:  # called outside a command (a test calling the function itself)
        return set()
    given = (_ParameterSource.COMMANDLINE, _ParameterSource.ENVIRONMENT)
    return {p.name for p in ctx.command.params if p.name and ctx.get_parameter_source(p.name) in given}


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
        except OptionError as e:
            _error_line(_with_hint(one_line(str(e)), _typed_command()))
            raise typer.Exit(EXIT_BAD_INPUT) from None
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
    """Rank 0, or the only process: torchrun's ``RANK`` says it before the process group is joined (torch is imported
    only when a process group may exist)."""
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return False
    if "torch.distributed" not in sys.modules:
        return True
    from ..runtime import is_main

    return is_main()


class _LazyProgress(Progress):
    """A progress display that starts with its first task: an error raised before any task leaves nothing on the
    terminal (a started display that is not a terminal writes a blank line when it stops)."""

    _wanted = _live = False

    def start(self) -> None:
        self._wanted = True

    def add_task(self, *args: Any, **kwargs: Any) -> Any:
        if self._wanted and not self._live:
            self._live = True
            super().start()
        return super().add_task(*args, **kwargs)

    def stop(self) -> None:
        self._wanted = False
        if self._live:
            self._live = False
            super().stop()


def make_progress(disable: bool, unit: str = "images") -> Progress:
    """A rich progress bar on stderr with throughput; silent when ``disable`` or on a non-main rank; nothing is drawn
    before the first task."""
    return _LazyProgress(
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
