"""Options shared by several commands, and the generator of options from config dataclasses."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, cast, get_origin, get_type_hints

import typer

from ..gate.selection import DIRECTIONS
from ..measuring.config import MeasureConfig
from .app import F, option_checks

__all__ = [
    "AllowOtherImagesOpt",
    "BaselineOpt",
    "CheckMetricOpt",
    "DeviceOpt",
    "GateOptions",
    "ModelArg",
    "QuietOpt",
    "WorkersOpt",
    "config_options",
    "field_option",
]

# -- shared options (reused by every command that loads a model) --------------------------------------------------
ModelArg = Annotated[
    str,
    typer.Argument(
        help="timm model name (random weights unless --pretrained), a checkpoint file "
        "(.pth/.pt/.bin/.safetensors/.ckpt), or a folder with config.json + weights.",
        show_default=False,
    ),
]


QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no table.")]


# -- check options (shared by `check` and `measure --baseline`) -----------------------------------------------------
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


HtmlOpt = Annotated[
    Path | None,
    typer.Option(
        "--html",
        help="Write a self-contained HTML page (verdict table, curves with the tolerance band, failing layers; "
        "no network needed to open it).",
    ),
]


BaselineOpt = Annotated[
    Path | None,
    typer.Option(
        "--baseline",
        help="After measuring, check the run against this baseline (run folder or layers.csv): exit 1 on a "
        "regression. Writes check.md, junit.xml, check.png and check.html into --out unless --report/--junit/"
        "--plot/--html say where.",
    ),
]


def _cli_type(f: dataclasses.Field, kind: Any) -> tuple[Any, Any]:
    """The type and default of a field's option: text for a parsed field (a list of texts when repeatable), an enum
    of its ``choices``, else the field's own type (a union with a default: the default's type)."""
    meta, default = f.metadata, cast(Any, f.default)
    if "parse" in meta:  # given as text on the command line, e.g. --loss cos,cons or --model-arg k=v ...
        return (list[str] | None, None) if meta.get("repeat") else (str, ",".join(default))
    if "choices" in meta:
        choice = Enum(f.name, {c: c for c in meta["choices"]}, type=str)  # type: ignore[misc]
        return choice, choice(default)
    if isinstance(kind, types.UnionType) and default is not None:
        return type(default), default
    return kind, default


def _field_option(f: dataclasses.Field, kind: Any) -> list[inspect.Parameter]:
    """The Typer options of a dataclass field: flags, help, choices, range and default from the field and its
    metadata, and one hidden flag per old spelling (``aliases``)."""
    if get_origin(kind) is Annotated:  # a field declared with its Typer option (GateOptions)
        return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=kind)]
    meta = f.metadata
    kind, default = _cli_type(f, kind)
    flags = meta.get("flags", (f"--{f.name.replace('_', '-')}",))
    extra = {k: meta[k] for k in ("min", "metavar") if k in meta}
    option = typer.Option(*flags, help=meta["help"], show_default=meta.get("show_default", True), **extra)
    params = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])
    ]
    if "aliases" in meta:
        hidden = Annotated[bool, typer.Option(*meta["aliases"], hidden=True)]
        params.append(inspect.Parameter(_alias(f), inspect.Parameter.KEYWORD_ONLY, default=False, annotation=hidden))
    return params


def _alias(f: dataclasses.Field) -> str:
    return f"{f.name}__alias"


def _from_option(f: dataclasses.Field, kwargs: dict[str, Any]) -> Any:
    """A field's value from the command's options (popped from ``kwargs``): parsed, an enum's value, or switched on
    by an old spelling."""
    value = kwargs.pop(f.name)
    if "aliases" in f.metadata:
        value = kwargs.pop(_alias(f)) or value
    if "parse" in f.metadata:
        return f.metadata["parse"](value)
    return value.value if isinstance(value, Enum) else value


def config_options(config_cls: type, into: str) -> Callable[[F], F]:
    """Replace the command's parameter ``into`` by one option per field of the dataclass ``config_cls`` (its defaults,
    help and checks live there, once); the command is called with ``into=config_cls(**the options' values)``."""
    fields = dataclasses.fields(config_cls)
    hints = get_type_hints(config_cls, include_extras=True)
    options = [p for f in fields for p in _field_option(f, hints[f.name])]

    def decorate(fn: F) -> F:
        params = list(inspect.signature(fn, eval_str=True).parameters.values())
        at = [p.name for p in params].index(into)

        @functools.wraps(fn)
        def with_config(**kwargs: Any) -> Any:
            with option_checks():  # a value its parser refuses (--model-arg oops, --loss foo) is a usage error
                values = {f.name: _from_option(f, kwargs) for f in fields}
            return fn(**kwargs, **{into: config_cls(**values)})

        with_config.__signature__ = inspect.Signature([*params[:at], *options, *params[at + 1 :]])  # type: ignore[attr-defined]
        return with_config  # type: ignore[return-value]

    return decorate


def field_option(config_cls: type, name: str) -> Any:
    """The annotated type of one field's option, to declare it in a command or another options class (its default:
    ``getattr(config_cls, name)``)."""
    f = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    return _field_option(f, get_type_hints(config_cls)[name])[0].annotation


DeviceOpt = field_option(MeasureConfig, "device")


WorkersOpt = field_option(MeasureConfig, "workers")


@dataclasses.dataclass(frozen=True)
class GateOptions:
    """The options of a check against a baseline, declared once for `check` and `measure --baseline`."""

    atol: AtolOpt = None
    rtol: RtolOpt = None
    sigma: SigmaOpt = 0.0
    direction: str = dataclasses.field(
        default="both",
        metadata={
            "help": "both: any change beyond the band fails; up: only more over-smoothing (e.g. token_cosine rose, "
            "attention_std fell); down: only less.",
            "choices": tuple(DIRECTIONS),
        },
    )
    layers: LayersOpt = None
    allow_other_images: AllowOtherImagesOpt = False
    report: ReportOpt = None
    junit: JunitOpt = None
    plot: PlotOpt = None
    html: HtmlOpt = None

    def gate(self, baseline: Path, metrics: list[str] | None = None) -> Any:
        """The :class:`~oversmooth_cli.gate.check.CheckGate` these options describe (baseline loaded, layers parsed)."""
        from ..gate.check import CheckGate
        from ..gate.selection import parse_layers
        from ..gate.tolerances import tolerance_from_options

        with option_checks():  # a malformed --atol / --rtol / --layers is a usage error (the runs are read next)
            tolerance = tolerance_from_options(self.atol, self.rtol, self.sigma, self.direction)
            if self.layers is not None:
                parse_layers(self.layers)
        return CheckGate.prepare(baseline, tolerance, metrics, self.layers, self.allow_other_images)
