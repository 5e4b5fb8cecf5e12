"""``finetune``: fine-tune a timm ViT with cross-entropy plus the patch-diversification losses, measured before and
after.

Total loss = CE(model output) + w_cos * l_cos + w_cons * l_cons + w_token * l_token (see :mod:`.losses`). This module
only puts the run together: the options (:mod:`.finetune_config`), the labelled images (:mod:`.data`), the model
(:mod:`.models`), the training loop (:class:`~.training.Trainer`), and ``measure`` runs before and after.

Runs as one process or under ``torchrun`` (DistributedDataParallel: gloo on CPU, nccl on CUDA); only rank 0
writes files, and every metric is summed over ranks before it is written.

Outputs in the run folder (every file written atomically, checkpoints and state every epoch):
``checkpoint-last.safetensors``, ``checkpoint-best.safetensors``, ``config.json`` (``oversmooth measure DIR``
loads the best checkpoint), ``train_state.pt`` (``--resume``), ``history.csv``, ``before/`` and ``after/``
(full ``measure`` runs on the validation images), ``compare.png`` and ``training.png``; ``monitor.csv`` and
``monitor.png`` (:class:`~.monitor.OversmoothingMonitor` on up to :data:`MONITOR_IMAGES` validation images, once per
epoch unless ``monitor_every`` says otherwise) and, with ``tensorboard``, event files in ``tb/``.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from .. import runtime
from ..data import LabelledImages, Sample, build_transform, ignore_sigint, prepare_data, sample_paths, train_transform
from ..errors import UserError
from ..gate.compare import compare_runs
from ..io import atomic_write, check_out_dir, read_layers
from ..measuring.config import LoadOptions, MeasureConfig
from ..measuring.monitor import OversmoothingMonitor
from ..measuring.run import measure
from ..measuring.summary import write_run
from ..pages.finetune import write_finetune_page
from ..plots import plot_compare, plot_monitor_heatmap, plot_training, save_figure
from ..reading.loading import LoadedModel, load_model, model_config
from ..reading.readers import UnsupportedModelError
from ..reading.registry import resolve_adapter
from .config import FinetuneConfig, parse_losses, validate_config
from .losses import PatchDiversificationLoss
from .state import check_same_run, load_train_state
from .trainer import StepInfo, Trainer

__all__ = [
    "CONTROL_OUTPUT_NAMES",
    "MONITOR_IMAGES",
    "OUTPUT_NAMES",
    "TENSORBOARD_OUTPUT_NAMES",
    "FinetuneConfig",
    "FinetuneResult",
    "RunHooks",
    "RunOptions",
    "finetune",
    "parse_losses",
    "run_record",
]


OUTPUT_NAMES = (
    "checkpoint-last.safetensors",
    "checkpoint-best.safetensors",
    "config.json",
    "train_state.pt",
    "history.csv",
    "before",
    "after",
    "compare.png",
    "training.png",
    "monitor.csv",
    "monitor.png",
    "report.html",
)
"""Everything a run writes into its folder (``--overwrite`` removes these, :data:`CONTROL_OUTPUT_NAMES` and
:data:`TENSORBOARD_OUTPUT_NAMES`, only)."""


CONTROL_OUTPUT_NAMES = ("control", "side_by_side.png", "side_by_side.csv", "side_by_side.json")
"""What ``control=True`` adds: the twin's run folder and the side-by-side (:mod:`.control`)."""


TENSORBOARD_OUTPUT_NAMES = ("tb",)
"""What ``tensorboard=True`` adds: the event files of the monitor's curves."""


MONITOR_IMAGES = 64
"""The monitor's probe: a seeded sample of at most this many validation images, fixed for the whole run."""


@dataclass(frozen=True)
class RunOptions:
    """How a fine-tuning run is carried out and what it writes besides the model (the ``finetune`` command's options
    that are not :class:`~.config.FinetuneConfig`'s).

    Attributes:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (under torchrun: this rank's CUDA device).
        workers: DataLoader worker processes.
        resume: continue the run saved in ``out`` (same options) from its last checkpoint.
        overwrite: replace the outputs of an earlier run in a non-empty ``out``.
        control: also train the ``--loss none`` twin (same seed, sample order, augmentations and CutMix draws) into
            ``out/control`` and write the side-by-side (:func:`~.control.finetune_with_control`).
        monitor_every: measure over-smoothing on up to :data:`MONITOR_IMAGES` validation images every this many
            optimizer steps and at step 0, into ``monitor.csv`` and ``monitor.png`` (default: once per epoch; 0: off).
        tensorboard: also write the monitor's scalars and heatmap as TensorBoard event files into ``out/tb``.
    """

    device: str = "auto"
    workers: int = 0
    resume: bool = False
    overwrite: bool = False
    control: bool = False
    monitor_every: int | None = None
    tensorboard: bool = False


@dataclass(frozen=True)
class RunHooks:
    """What a fine-tuning run reports to its caller while it runs.

    Attributes:
        on_step: called after every optimizer step with the running loss terms.
        on_epoch: called with each history row.
        log: called with notes for the user (e.g. a classifier head reset).
        command: the command line to record in ``before/`` and ``after/``.
    """

    on_step: Callable[[StepInfo], None] | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    log: Callable[[str], None] | None = None
    command: str | None = None


@dataclass
class FinetuneResult:
    """A finished (or interrupted) run: the history, the before/after layer tables and where things went."""

    out: Path
    history: pd.DataFrame
    before_layers: pd.DataFrame | None
    after_layers: pd.DataFrame | None
    best_epoch: int | None
    best_top1: float | None
    interrupted: bool = False
    stopped_at: tuple[int, int] | None = None  # (epoch, step) for an interrupted run, 1-based epoch
    notes: list[str] = field(default_factory=list)
    control: FinetuneResult | None = None  # the --loss none twin of a control=True run (in out/control)
    comparison: Any = None  # its side-by-side with this run (:class:`~.control.SideBySide`)


# -- the steps of a run --------------------------------------------------------------------------------------------
def run_record(
    model: str,
    train_dir: str | Path,
    val_dir: str | Path | None,
    load: LoadOptions,
    cfg: FinetuneConfig,
) -> dict[str, Any]:
    """What made the run (saved in train_state.pt and config.json; ``--resume`` must match it)."""
    return {
        "model": model,
        "arch": load.arch,
        "pretrained": load.pretrained,
        "model_args": dict(load.model_args or {}),
        "train_dir": str(Path(train_dir).expanduser().resolve()),
        "val_dir": str(Path(val_dir).expanduser().resolve()) if val_dir is not None else None,
        "config": asdict(cfg),
    }


def _build_model(spec: str, num_classes: int, cfg: FinetuneConfig, load: LoadOptions) -> tuple[LoadedModel, list[str]]:
    """The model with ``cfg.drop_path`` and a ``num_classes`` head (notes say when the head was reset)."""
    load_kwargs = load.load_kwargs()
    args = load_kwargs.pop("model_args")
    if cfg.drop_path > 0:
        args["drop_path_rate"] = cfg.drop_path
    loaded = load_model(spec, model_args=args, **load_kwargs)
    notes = []
    current = getattr(loaded.model, "num_classes", None)
    if current != num_classes:
        loaded.model.reset_classifier(num_classes)  # type: ignore[operator]  # timm classifiers have it
        notes.append(f"classifier head reset to {num_classes} classes (the model had {current})")
    return loaded, notes


def _criterion(model: torch.nn.Module, cfg: FinetuneConfig, input_size: Any) -> PatchDiversificationLoss:
    """The loss terms; when a term or patch CutMix is on, the model is probed at the training input size, so a term
    it cannot run is refused (one line naming the family, the term and why) before anything is written."""
    try:
        adapter = resolve_adapter(model)
    except UnsupportedModelError as e:
        raise UserError(str(e)) from e
    probe = input_size if cfg.losses or cfg.use_cutmix else None
    return PatchDiversificationLoss(
        model, cfg.losses, cfg.weights, cfg.cons_sim, cfg.cons_grad_first, adapter, input_size=probe
    )


def _prepare_out(out: Path) -> None:
    """Remove a previous run's outputs (only once the new run's model and data were accepted)."""
    if out.is_dir():
        for name in OUTPUT_NAMES + CONTROL_OUTPUT_NAMES + TENSORBOARD_OUTPUT_NAMES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _datasets(
    train: list[Sample], val: list[Sample], data_config: dict[str, Any], cfg: FinetuneConfig, workers: int
) -> tuple[LabelledImages, DataLoader]:
    """The augmented training set (all of it; the trainer shards it) and this rank's validation loader."""
    train_set = LabelledImages(train, train_transform(data_config, cfg.hflip, cfg.crop_scale), seed=cfg.seed)
    val_set = LabelledImages(val[runtime.rank() :: runtime.world_size()], build_transform(data_config))
    val_loader = DataLoader(
        val_set,
        batch_size=cfg.batch_size,
        num_workers=workers,
        worker_init_fn=ignore_sigint,
        generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG alone
    )
    return train_set, val_loader


def _steps_per_epoch(n_train: int, cfg: FinetuneConfig) -> int:
    batches = math.ceil(math.ceil(n_train / runtime.world_size()) / cfg.batch_size)
    return math.ceil(batches / cfg.accum_steps)


def _measure_into(run_measure: Callable[[], Any], folder: Path) -> pd.DataFrame:
    """A ``measure`` run on the validation images, written to ``folder`` on rank 0; returns its layer table."""
    result = run_measure()
    if runtime.is_main():
        write_run(result, folder, overwrite=True)
    return result.layers


def _write_reports(out: Path, history: pd.DataFrame, title: str) -> None:
    """history.csv and training.png (rank 0)."""
    if not runtime.is_main():
        return
    atomic_write(out / "history.csv", lambda p: history.to_csv(p, index=False))
    save_figure(plot_training(history, title), out / "training.png")


def _write_compare(out: Path, title: str) -> None:
    """compare.png: the before and after curves (rank 0)."""
    if runtime.is_main():
        runs = compare_runs([out / "before", out / "after"], labels=["before", "after"])
        save_figure(plot_compare(runs, ci=True, title=title), out / "compare.png")


def _with_definitions(config: dict[str, Any], plan: Any) -> dict[str, Any]:
    """``config.json`` with what the loss terms read (``h``, ``e``, the per-token head, the CutMix grid) under
    ``finetune.losses_read`` (:meth:`~.losses.TokenPlan.describe`)."""
    if plan is not None:
        config["finetune"] = {**config["finetune"], "losses_read": plan.describe()}
    return config


def _tensorboard_writer_class() -> type:
    """The writer of ``--tensorboard``; a missing extra is a one-line UserError (checked before anything runs)."""
    try:
        from ..integrations.tensorboard import TensorBoardWriter
    except ImportError as e:
        raise UserError(f"--tensorboard: {e}") from e
    return TensorBoardWriter


def _monitor(
    model: torch.nn.Module,
    val_paths: list[Path],
    loaded: LoadedModel,
    out: Path,
    every: int,
    tensorboard: Any,
    cfg: FinetuneConfig,
    resumed: bool,
) -> OversmoothingMonitor:
    """The monitor of the run: up to :data:`MONITOR_IMAGES` validation images; a resumed run continues monitor.csv."""
    probe = sample_paths(val_paths, MONITOR_IMAGES, cfg.seed)
    sinks = [tensorboard] if tensorboard is not None else []
    monitor = OversmoothingMonitor(model, probe, every, data_config=loaded.data_config, on_measure=sinks)
    if resumed and (out / "monitor.csv").is_file():
        monitor.load_history(pd.read_csv(out / "monitor.csv"))
    return monitor


def _write_monitor(out: Path, monitor: OversmoothingMonitor | None, title: str) -> None:
    """monitor.csv and monitor.png (rank 0, once something was measured)."""
    if monitor is None or not runtime.is_main() or monitor.history.empty:
        return
    history = monitor.history
    atomic_write(out / "monitor.csv", lambda p: history.to_csv(p, index=False))
    save_figure(plot_monitor_heatmap(history, title=title), out / "monitor.png")


def _with_control(
    model: str,
    train_dir: str | Path,
    out: str | Path,
    cfg: FinetuneConfig,
    val_dir: str | Path | None,
    load: LoadOptions,
    run: RunOptions,
    hooks: RunHooks,
) -> FinetuneResult:
    """A ``run.control`` run: :func:`~.control.finetune_with_control` with the arguments it reads and changes
    (``out``, ``config``, ``resume``, ``overwrite``, ``control``) as flat keywords, each arm a :func:`finetune`."""
    from .control import finetune_with_control

    def arm(**a: Any) -> FinetuneResult:
        options = replace(a["run"], resume=a["resume"], overwrite=a["overwrite"], control=a["control"])
        return finetune(
            a["model"],
            a["train_dir"],
            a["out"],
            a["config"],
            val_dir=a["val_dir"],
            load=a["load"],
            run=options,
            hooks=a["hooks"],
        )

    arguments = {
        **{"model": model, "train_dir": train_dir, "out": out, "config": cfg, "val_dir": val_dir},
        **{"load": load, "run": run, "hooks": hooks, "device": run.device, "log": hooks.log},
        **{"resume": run.resume, "overwrite": run.overwrite, "control": run.control},
    }
    return finetune_with_control(arm, arguments)


# -- the command ---------------------------------------------------------------------------------------------------
def _fit(
    trainer: Trainer,
    train_set: Any,
    val_loader: Any,
    workers: int,
    out: Path,
    monitor: Any,
    writer: Any,
    titles: tuple[str, str],
    on_step: Callable[[StepInfo], None] | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> bool:
    """The epoch-0 row, then :meth:`Trainer.fit` with the monitor stepped and the reports written after every epoch;
    returns whether Ctrl-C stopped it (state saved)."""

    def step_done(info: StepInfo) -> None:
        if monitor is not None:
            monitor.step(trainer.progress.global_step)
        if on_step is not None:
            on_step(info)

    def epoch_done(row: dict[str, Any]) -> None:
        _write_reports(out, trainer.history(), titles[0])
        _write_monitor(out, monitor, titles[1])
        if on_epoch is not None:
            on_epoch(row)

    if monitor is not None:
        monitor.step(trainer.progress.global_step)  # step 0: the weights before training
    start = trainer.record_start(val_loader)  # the epoch-0 row: validation before the first step (once per run)
    if start is not None:
        epoch_done(start)
    try:
        return trainer.fit(train_set, val_loader, workers, step_done, epoch_done)
    finally:
        _write_monitor(out, monitor, titles[1])
        if writer is not None:
            writer.close()


def finetune(
    model: str,
    train_dir: str | Path,
    out: str | Path,
    config: FinetuneConfig | None = None,
    *,
    val_dir: str | Path | None = None,
    load: LoadOptions | None = None,
    run: RunOptions | None = None,
    hooks: RunHooks | None = None,
) -> FinetuneResult:
    """Fine-tune a timm ViT with cross-entropy plus the patch-diversification losses and measure it before and after.

    Args:
        model: timm model name, checkpoint file or folder (as for ``measure``).
        train_dir: ImageFolder root ``train_dir/<class>/<image>``; classes sorted by name.
        out: run folder (with ``run.resume``: the folder of the run to continue).
        config: training options (see :class:`~.config.FinetuneConfig`).
        val_dir: validation ImageFolder with the same classes; without it ``config.val_split`` is held out.
        load: how ``model`` is built (:class:`~oversmooth_cli.measuring.config.LoadOptions`).
        run: device, workers, resume / overwrite, the control twin, the monitor and TensorBoard (:class:`RunOptions`).
        hooks: progress callbacks, user notes and the command line to record (:class:`RunHooks`).

    Returns:
        A :class:`FinetuneResult` (``interrupted`` when Ctrl-C stopped it after saving a resumable checkpoint); with
        ``run.control``, the twin's result and the comparison are in ``control`` and ``comparison``.

    Example:
        >>> finetune("examples/digits-vit", "data/train", "runs/ft", FinetuneConfig(epochs=3))
    """
    load, run, hooks = load or LoadOptions(), run or RunOptions(), hooks or RunHooks()
    cfg = validate_config(config or FinetuneConfig(), needs_val_split=val_dir is None)
    monitor_every, workers = run.monitor_every, run.workers
    if monitor_every is not None and monitor_every < 0:
        raise UserError(f"--monitor-every must be at least 0 (0: off), got {monitor_every}")
    tensorboard_writer = _tensorboard_writer_class() if run.tensorboard and monitor_every != 0 else None
    if run.control:
        return _with_control(model, train_dir, out, cfg, val_dir, load, run, hooks)
    on_step, on_epoch, log, command = hooks.on_step, hooks.on_epoch, hooks.log, hooks.command
    device, resume, overwrite = run.device, run.resume, run.overwrite
    say = log or (lambda _msg: None)
    dev, out = runtime.setup_device(device), Path(out)
    classes, train_samples, val_samples = prepare_data(train_dir, val_dir, cfg.val_split, cfg.seed)
    record = run_record(model, train_dir, val_dir, load, cfg)
    state = load_train_state(out) if resume else None
    if state is not None:
        check_same_run(state["run"], record, out)
    elif runtime.is_main():
        check_out_dir(out, overwrite, hint=f"pass --overwrite, --resume {out}, or another --out")

    runtime.seed_everything(cfg.seed)
    loaded, notes = _build_model(model, len(classes), cfg, load)
    for note in notes:
        say(note)
    net = loaded.model.to(dev)
    criterion = _criterion(net, cfg, loaded.data_config["input_size"])
    plan = criterion.plan
    patch = (plan.h_grid, plan.h_shape[0]) if plan is not None else None  # the grid CutMix snaps to, l_token's tokens
    if state is None and runtime.is_main():
        _prepare_out(out)

    train_set, val_loader = _datasets(train_samples, val_samples, loaded.data_config, cfg, workers)
    trainer = Trainer(
        cfg,
        net,
        criterion,
        device=dev,
        num_classes=len(classes),
        steps_per_epoch=_steps_per_epoch(len(train_samples), cfg),
        patch=patch,
        out=out,
        run_record=record,
        model_config=_with_definitions(model_config(loaded, classes, record), plan),
    )
    before_layers = None
    if state is not None:
        for note in trainer.restore(state):
            say(note)
        before_layers = read_layers(out / "before") if (out / "before").is_dir() else None
    val_paths = [p for p, _ in val_samples]
    measure_config = MeasureConfig(device=str(dev), batch_size=cfg.batch_size, workers=workers, amp=cfg.amp)
    run_measure = functools.partial(measure, loaded, val_paths, measure_config, command=command)
    if before_layers is None:
        before_layers = _measure_into(run_measure, out / "before")

    losses = ", ".join(cfg.losses) or "none"
    writer = tensorboard_writer(out / "tb") if tensorboard_writer is not None and runtime.is_main() else None
    every = trainer.steps_per_epoch if monitor_every is None else monitor_every
    monitor = _monitor(net, val_paths, loaded, out, every, writer, cfg, state is not None) if every else None
    monitor_title = f"{loaded.name} · losses: {losses} · {monitor.n_images if monitor else 0} val images"

    titles = (f"{loaded.name} · losses: {losses}", monitor_title)
    interrupted = _fit(trainer, train_set, val_loader, workers, out, monitor, writer, titles, on_step, on_epoch)
    p = trainer.progress
    result = FinetuneResult(
        out, trainer.history(), before_layers, None, p.best_epoch, p.best_top1 if p.best_epoch else None, notes=notes
    )
    if interrupted:
        result.interrupted, result.stopped_at = True, (p.epoch + 1, p.step)
        return result
    result.after_layers = _measure_into(run_measure, out / "after")
    _write_compare(out, f"{loaded.name} · {len(val_paths)} val images · losses: {losses}")
    if runtime.is_main():
        write_finetune_page(out)
    return result
