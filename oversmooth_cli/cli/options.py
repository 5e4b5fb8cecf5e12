"""Options shared by several commands, and the generator of options from config dataclasses."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, get_origin, get_type_hints

import typer

from .app import F


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
        from ..reading.loading import parse_model_args

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
        from ..gate.check import CheckGate
        from ..gate.tolerances import tolerance_from_options

        direction = Direction(self.direction).value
        tolerance = tolerance_from_options(self.atol, self.rtol, self.sigma, direction)
        return CheckGate.prepare(baseline, tolerance, metrics, self.layers, self.allow_other_images)
