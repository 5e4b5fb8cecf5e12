"""``oversmooth finetune``."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ..errors import UserError
from ..measuring.config import LoadOptions, MeasureConfig
from ..training.config import FinetuneConfig
from .app import (
    OptionError,
    _is_main,
    command,
    command_line,
    default_out,
    err_console,
    given_options,
    make_progress,
    option_checks,
    out_console,
)
from .options import DeviceOpt, ModelArg, QuietOpt, WorkersOpt, config_options


@dataclasses.dataclass(frozen=True)
class FinetuneRun:
    """The ``finetune`` options that are neither the training's (:class:`FinetuneConfig`) nor the model's: where the
    run goes and what it writes besides the model (:class:`~oversmooth_cli.training.finetune.RunOptions`)."""

    workers: WorkersOpt = MeasureConfig.workers
    device: DeviceOpt = MeasureConfig.device
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run folder.", show_default="oversmooth-runs/finetune-<model>-<timestamp>"),
    ] = None
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the outputs of a run in --out.")] = False
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this folder (same options) from its last save.")
    ] = None
    control: Annotated[
        bool,
        typer.Option(
            "--control",
            help="Also train the --loss none twin (same seed, samples, augmentations, CutMix draws) into OUT/control "
            "and write side_by_side.png/.csv/.json with a verdict on the accuracy difference.",
        ),
    ] = False
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="With --control: train the pair once per seed (e.g. 0,1,2 or 0-4) into OUT/seed-<k>/, each equal to "
            "a separate --control --seed k run, and pool them into pooled.csv/.json/.png: per-seed and mean "
            "differences with 95% intervals over seeds. Replaces --seed.",
            show_default=False,
        ),
    ] = None
    monitor_every: Annotated[
        int | None,
        typer.Option(
            "--monitor-every",
            min=0,
            help="Measure over-smoothing on up to 64 validation images every N optimizer steps (and before the first) "
            "into monitor.csv and monitor.png, a layer x step heatmap; 0: off.",
            show_default="once per epoch",
        ),
    ] = None
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard",
            help="Also write the monitor's per-layer curves and heatmap as TensorBoard event files into OUT/tb "
            "(needs the tensorboard extra).",
        ),
    ] = False

    def options(self) -> Any:
        """The library's :class:`~oversmooth_cli.training.finetune.RunOptions` of these options."""
        from ..training.finetune import RunOptions

        return RunOptions(
            device=self.device,
            workers=self.workers,
            resume=self.resume is not None,
            overwrite=self.overwrite,
            control=self.control,
            monitor_every=self.monitor_every,
            tensorboard=self.tensorboard,
        )


_MODEL_HELP = cast(Any, ModelArg).__metadata__[0].help


@command("finetune")
@config_options(FinetuneConfig, into="config")
@config_options(LoadOptions, into="loading")
@config_options(FinetuneRun, into="run")
def finetune_cmd(
    model: Annotated[
        str | None,
        typer.Argument(help=f"{_MODEL_HELP} With --resume: the run's (may be left out).", show_default=False),
    ] = None,
    train_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Training images, one sub-folder per class (ImageFolder layout). With --resume: the run's (may be "
            "left out).",
            show_default=False,
        ),
    ] = None,
    val_dir: Annotated[
        Path | None, typer.Option("--val-dir", help="Validation images with the same class sub-folders.")
    ] = None,
    *,
    config: FinetuneConfig,
    loading: LoadOptions,
    run: FinetuneRun,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a timm ViT with cross-entropy plus the patch-diversification losses (cos, cons, token).

    Total loss = CE + w_cos * l_cos + w_cons * l_cons + w_token * l_token (Gong et al. 2021). Writes into --out:
    **checkpoint-last/best.safetensors** + **config.json** (`oversmooth measure OUT` loads the best),
    **train_state.pt** (for --resume), **history.csv**, **before/** and **after/** (measure runs on the validation
    images), **compare.png** and **training.png**, **monitor.csv** and **monitor.png** (over-smoothing on the
    validation images while training, --monitor-every). Ctrl-C saves a resumable checkpoint;
    `oversmooth finetune --resume OUT` continues it with the model, folders and options saved there.

    Several GPUs: `torchrun --nproc_per_node=N -m oversmooth_cli finetune ...`.

    Example: `oversmooth finetune examples/digits-vit data/train --val-dir data/val --loss cos,cons,token`
    """
    from ..runtime import resolve_device
    from ..training.config import validate_config
    from ..training.finetune import RunHooks, finetune
    from ..training.seeds import finetune_seeds, parse_seeds, read_seeds_run

    out, resume = run.out, run.resume
    seeds_run = read_seeds_run(resume) if resume is not None else None
    if seeds_run is not None:  # --resume OUT of a --seeds run: the pair over the saved seeds
        run = dataclasses.replace(run, control=True, seeds=run.seeds or ",".join(map(str, seeds_run["seeds"])))
    seeds = parse_seeds(run.seeds) if run.seeds is not None else None
    if seeds is not None and not run.control:
        raise UserError("--seeds trains the --control pair once per seed; add --control")
    if seeds is not None and "seed" in given_options():
        raise UserError("--seed and --seeds both choose the seed; give one of them")
    with option_checks():  # what the library would refuse later, refused now with the usage hint
        if resume is None:
            missing = [name for name, value in (("MODEL", model), ("TRAIN_DIR", train_dir)) if value is None]
            if missing:
                raise OptionError(f"Missing argument '{missing[0]}' (--resume OUT alone continues a saved run)")
            validate_config(config, needs_val_split=val_dir is None)
        resolve_device(run.device)
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        raise UserError(f"--resume {resume} continues the run in that folder; drop --out {out} or make them equal")
    if resume is not None:
        record = seeds_run["run"] if seeds_run is not None else None
        saved = _saved_run(resume, given_options(), model, train_dir, val_dir, config, loading, record)
        model, train_dir, val_dir, config, loading = saved
    model, train_dir = cast(str, model), cast(Path, train_dir)
    if resume is None:
        base = default_out(model)
        out = out or base.parent / f"finetune-{base.name}"
    notes = _Notes(quiet)
    with make_progress(quiet, unit="steps") as progress:
        on_step, on_epoch = _training_callbacks(progress, config.epochs, quiet, notes)
        hooks = RunHooks(on_step, on_epoch, notes.add, command_line())
        if seeds is not None:
            target = cast(Path, resume or out)
            options = dataclasses.replace(run.options(), control=True)
            kwargs = {"val_dir": val_dir, "load": loading, "run": options, "hooks": hooks}
            pooled = finetune_seeds(model, train_dir, target, config, seeds, **kwargs)
            notes.flush()
            _finish_seeds(pooled, run, quiet)
            return
        result = finetune(
            model,
            train_dir,
            cast(Path, resume or out),
            config,
            val_dir=val_dir,
            load=loading,
            run=run.options(),
            hooks=hooks,
        )
        notes.flush()
    _finish_finetune(result, run, quiet)


class _Notes:
    """The run's notes for the user, printed on rank 0 once training is under way (the first progress report, or the
    end of the run): a run refused while it is set up shows its one error line and nothing before it."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.held = quiet, cast(list[str], [])

    def add(self, message: str) -> None:
        self.held.append(message)

    def flush(self) -> None:
        held, self.held = self.held, []
        if self.quiet or not _is_main():
            return
        for message in held:
            err_console.print(f"[cyan]Note:[/] {escape(message)}", highlight=False)


def _saved_run(
    out: Path,
    given: set[str],
    model: str | None,
    train_dir: Path | None,
    val_dir: Path | None,
    config: FinetuneConfig,
    loading: LoadOptions,
    record: dict[str, Any] | None = None,
) -> tuple[str, Path, Path | None, FinetuneConfig, LoadOptions]:
    """The model, folders, training options and model options saved in the run ``out`` (``--resume OUT`` alone;
    ``record``: a ``--seeds`` run's, from its seeds.json); the ones given on the command line must equal them.

    Raises:
        UserError: one line naming the first given option that differs from the saved run.
    """
    from ..training.state import first_difference, load_train_state

    saved = record if record is not None else load_train_state(out)["run"]
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    if record is not None:
        known.discard("seed")  # each seed's own
    saved_config = {k: v for k, v in saved["config"].items() if k in known}
    typed = dataclasses.asdict(config)
    current = {
        **saved,
        "config": {**saved_config, **{k: typed[k] for k in known & given}},
        **{k: getattr(loading, k) for k in ("arch", "pretrained") if k in given},
    }
    if "model_args" in given:
        current["model_args"] = dict(loading.model_args or {})
    if model is not None and not _same_path(model, saved["model"]):
        current["model"] = model
    for key, folder in (("train_dir", train_dir), ("val_dir", val_dir)):
        if folder is not None:
            current[key] = str(folder.expanduser().resolve())
    diff = first_difference(saved, current)
    if diff is not None:
        raise UserError(
            f"--resume {out}: {diff}; drop it (--resume {out} alone continues with the run's model, folders and "
            "options) or start a new run with another --out"
        )
    saved_config["losses"] = tuple(saved_config.get("losses", ()))
    load = dataclasses.replace(
        loading, arch=saved["arch"], pretrained=saved["pretrained"], model_args=dict(saved["model_args"] or {})
    )
    val = Path(saved["val_dir"]) if saved["val_dir"] is not None else None
    return saved["model"], Path(saved["train_dir"]), val, FinetuneConfig(**saved_config), load


def _same_path(a: str, b: str) -> bool:
    """The same model spec: equal text, or two spellings of one existing path."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _training_callbacks(progress: Progress, epochs: int, quiet: bool, notes: _Notes) -> tuple[Callable, Callable]:
    """``on_step`` (one progress task per epoch, running loss terms) and ``on_epoch`` (one line per epoch); the first
    of them prints the notes held so far."""
    tasks: dict[int, Any] = {}

    def on_step(info: Any) -> None:
        notes.flush()
        if info.epoch not in tasks:
            tasks[info.epoch] = progress.add_task(f"epoch {info.epoch}/{info.epochs}", total=info.steps, rate="")
        terms = "  ".join(f"{k} {v:.4f}" for k, v in info.running.items())
        progress.update(tasks[info.epoch], completed=info.step, rate=terms)

    def on_epoch(row: dict[str, Any]) -> None:
        notes.flush()
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


def resume_command(out: Path, run: FinetuneRun) -> str:
    """The command that continues an interrupted run as typed: ``oversmooth finetune --resume OUT`` and the options
    of how it runs that differ from their defaults (the model, folders and training options are in ``OUT``)."""
    words = ["oversmooth", "finetune", "--resume", str(out)]
    default = FinetuneRun()
    if run.device != default.device:
        words += ["--device", run.device]
    if run.workers != default.workers:
        words += ["--workers", str(run.workers)]
    if run.monitor_every is not None:
        words += ["--monitor-every", str(run.monitor_every)]
    words += [flag for flag, on in (("--control", run.control), ("--tensorboard", run.tensorboard)) if on]
    return shlex.join(words)


def _finish_finetune(result: Any, run: FinetuneRun, quiet: bool) -> None:
    """Print a finished (or interrupted: exit 130) fine-tuning run: before/after lines, the side-by-side table."""
    if not _is_main():
        if result.interrupted:
            raise typer.Exit(130)
        return
    target = escape(str(result.out))
    if result.interrupted:
        epoch, step = result.stopped_at
        arm = " (control arm)" if result.control is not None and result.control.interrupted else ""
        err_console.print(
            f"[yellow]Interrupted[/] at epoch {epoch}, step {step}{arm}: saved a resumable checkpoint; "
            f"continue with: {escape(resume_command(result.out, run))}",
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
    extra = ", control/, side_by_side.png/.csv/.json" if result.comparison is not None else ""
    out_console.print(
        f"Wrote {target}/ (checkpoint-last/best.safetensors, config.json, train_state.pt, history.csv, before/, "
        f"after/, compare.png, training.png{extra})",
        highlight=False,
    )
    if result.comparison is not None:  # the last line: whether the losses lowered over-smoothing, and at what cost
        out_console.print(result.comparison.verdict, highlight=False)


def _finish_seeds(result: Any, run: FinetuneRun, quiet: bool) -> None:
    """Print a finished (or interrupted: exit 130) ``--seeds`` run: the per-seed table, then the pooled verdict."""
    if not _is_main():
        if result.interrupted:
            raise typer.Exit(130)
        return
    if result.interrupted:
        seed, epoch, step = result.stopped_at
        err_console.print(
            f"[yellow]Interrupted[/] in seed {seed} at epoch {epoch}, step {step}: saved a resumable checkpoint; "
            f"continue with: {escape(resume_command(result.out, run))}",
            highlight=False,
        )
        raise typer.Exit(130)
    if quiet:
        return
    table = Table(title="per seed (final weights, validation images; differences: losses - twin)", title_justify="left")
    for name in ("seed", "val top-1 losses / twin", "diff", "McNemar p", "last-layer cosine losses / twin", "diff"):
        table.add_column(name, justify="right")
    for row in result.table.itertuples():
        table.add_row(
            str(row.seed),
            f"{row.treated_top1:.1f}% / {row.control_top1:.1f}%",
            f"{row.top1_diff:+.1f}",
            f"{row.mcnemar_p:.3g}",
            f"{row.treated_cosine:.3f} / {row.control_cosine:.3f}",
            f"{row.cosine_diff:+.3f}",
        )
    out_console.print(table)
    seeds = ", ".join(f"seed-{s}/" for s in result.seeds)
    out_console.print(f"Wrote {escape(str(result.out))}/ ({seeds} seeds.json, pooled.csv/.json/.png)", highlight=False)
    out_console.print(result.verdict, highlight=False)


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
