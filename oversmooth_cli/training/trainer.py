"""The training loop of ``finetune``: one :class:`Trainer` per process.

A :class:`Trainer` runs optimizer steps over windows of ``accum_steps`` micro-batches, each scored by cross-entropy
plus the patch-diversification terms (:class:`~oversmooth_cli.training.losses.PatchDiversificationLoss`), validates
after every epoch (:mod:`.evaluation`) and writes ``checkpoint-last.safetensors``, ``checkpoint-best.safetensors``,
``config.json`` and ``train_state.pt`` (:mod:`.state`; rank 0 only, every metric summed over ranks first).

Reproducibility: at every epoch start the global generators and the CutMix generator are reseeded from
``(seed, epoch, rank)``, and their states are saved with everything else in ``train_state.pt``, so ``--resume``
reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader

from .. import runtime
from ..data import LabelledImages, ShardSampler, ignore_sigint
from ..errors import UserError
from ..metrics.formulas import to_float
from .config import TERM_NAMES, FinetuneConfig
from .cutmix import patch_cutmix, smooth_one_hot
from .evaluation import validation_metrics
from .losses import PatchDiversificationLoss
from .state import LAST_CHECKPOINT, SUM_KEYS, Progress, restore_state, save_best, save_state

__all__ = [
    "HISTORY_COLUMNS",
    "NonFiniteLossError",
    "StepInfo",
    "StopRequest",
    "Trainer",
    "history_row",
    "non_finite_message",
    "running_means",
    "shard_loader",
    "warmup_cosine",
    "weight_decay_groups",
]


HISTORY_COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_ce",
    *(f"train_{t}" for t in TERM_NAMES),
    "val_loss",
    "val_top1",
    "val_top5",
    "val_token_cosine",
    "cons_sim",
    "seconds",
]
"""history.csv: one row per epoch; losses are unweighted means over training images, accuracies in percent. Row 0 is
the validation before the first step (its ``lr`` and training columns empty; :meth:`Trainer.record_start`)."""


class NonFiniteLossError(UserError):
    """A loss term became NaN or infinite; the step was not applied and the last good checkpoint is kept."""


@dataclass
class StepInfo:
    """Progress of one optimizer step: 1-based ``epoch`` and ``step``, running means of the loss terms this epoch."""

    epoch: int
    epochs: int
    step: int
    steps: int
    running: dict[str, float]


class StopRequest:
    """Ctrl-C sets a flag; training stops at the next optimizer step, saves, and returns. A second Ctrl-C interrupts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """``LambdaLR`` factor of optimizer step ``s``: ``(s + 1) / warmup_steps`` while warming up, then a cosine from 1
    down to ``min_ratio`` at ``total_steps``.

    Not timm's ``CosineLRScheduler``: its warmup starts at ``warmup_lr_init`` and reaches the peak one step later,
    which would change every learning rate of a run.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _windows(loader: DataLoader, size: int) -> Iterator[list]:
    """The loader's batches in lists of ``size`` (the last one may be shorter)."""
    window: list = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def shard_loader(
    train_set: LabelledImages, cfg: FinetuneConfig, epoch: int, step: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    """This rank's shard of ``train_set`` in ``epoch``, from optimizer step ``step`` on (the batches before it are
    skipped), in an order that depends on ``(seed, epoch, rank)`` only."""
    rank = runtime.rank()
    train_set.epoch = epoch
    skip = step * cfg.accum_steps * cfg.batch_size
    return DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=ShardSampler(len(train_set), cfg.seed, epoch, rank, runtime.world_size(), skip=skip),
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=ignore_sigint,
        generator=torch.Generator().manual_seed(runtime.derive_seed(cfg.seed, "loader", epoch, rank)),
    )


def running_means(sums: torch.Tensor, keys: tuple[str, ...] = SUM_KEYS) -> dict[str, float]:
    """Per-image means of the :data:`~.state.SUM_KEYS` in ``keys`` from :attr:`~.state.Progress.sums`."""
    n = max(sums[0].item(), 1.0)
    return {k: sums[1 + i].item() / n for i, k in enumerate(SUM_KEYS) if k in keys}


def history_row(
    epoch: int, lr: float, train: dict[str, float], metrics: dict[str, float], cons_sim: str, seconds: float
) -> dict[str, Any]:
    """One :data:`HISTORY_COLUMNS` row: ``train`` holds the means of the training terms (``total``, ``ce`` and the
    terms the run scores; a missing one is NaN), ``metrics`` the validation columns."""
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": train.get("total", math.nan),
        "train_ce": train.get("ce", math.nan),
        **{f"train_{t}": train.get(t, math.nan) for t in TERM_NAMES},
        **metrics,
        "cons_sim": cons_sim,
        "seconds": round(seconds, 3),
    }


def non_finite_message(name: str, value: float, progress: Progress, out: Path) -> str:
    """The one-line refusal of a step whose loss term ``name`` is ``value`` (NaN or infinite): the term, where,
    and how to go on from the last good checkpoint."""
    history = progress.history
    last = history[-1]["epoch"] if history else None
    kept = (
        f"the last good checkpoint is {out / LAST_CHECKPOINT} (epoch {last}); "
        f"continue with --resume {out} after lowering --lr"
        if last is not None
        else "no checkpoint had been written yet; lower --lr"
    )
    term = "cross-entropy" if name == "ce" else f"l_{name}"
    weight = "" if name in ("ce", "total") else f" or --w-{name}"
    where = f"at epoch {progress.epoch + 1}, step {progress.step + 1}"
    return f"non-finite loss: {term} = {value} {where}; the step was not applied; {kept}{weight}"


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on weight matrices and kernels; none on biases, norms (every 1-D
    parameter) and the names the model's ``no_weight_decay()`` lists (position embeddings, class and register tokens).
    """
    no_weight_decay = getattr(model, "no_weight_decay", None)
    names = no_weight_decay() if callable(no_weight_decay) else ()
    # by keyword: timm 1.0.15 put ``weight_decay_exclude_1d`` third, where older versions had the names
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=names)


class Trainer:
    """Trains one process's model: AdamW steps with warmup/cosine, validation, and the run's checkpoint files.

    Fixed at construction: the options ``cfg``, the unwrapped ``model`` and the ``net`` that runs it (wrapped in
    DistributedDataParallel under torchrun), the ``criterion`` (the patch-diversification terms), the
    ``optimizer``, its ``scheduler`` and the CutMix generator ``mix_rng``. Everything that changes is in
    :attr:`progress`, which :meth:`save` writes and :meth:`restore` reads back.

    Args:
        cfg: the validated options.
        model: the model to train, on ``device``.
        criterion: the patch-diversification terms of ``model`` (``cfg.losses``, weighted).
        device: where the model runs.
        num_classes: classes of the labels.
        steps_per_epoch: optimizer steps per epoch on this rank.
        patch: ``((rows, cols), n_tokens)``: the grid and count of the tokens the loss terms read (the last token
            layer's, :class:`~.token_plan.TokenPlan`); patch CutMix snaps to it and ``l_token`` scores it.
        out: the run folder (written on rank 0 only).
        run_record: the options that must match to ``--resume`` (saved in ``train_state.pt``).
        model_config: the ``config.json`` written next to the best checkpoint (:func:`~..reading.loading.model_config`).
    """

    def __init__(
        self,
        cfg: FinetuneConfig,
        model: nn.Module,
        criterion: PatchDiversificationLoss,
        *,
        device: torch.device,
        num_classes: int,
        steps_per_epoch: int,
        patch: tuple[tuple[int, int], int] | None,
        out: Path,
        run_record: dict[str, Any],
        model_config: dict[str, Any],
    ) -> None:
        self.cfg, self.model, self.criterion, self.device = cfg, model, criterion, device
        self.num_classes, self.steps_per_epoch, self.out = num_classes, steps_per_epoch, out
        self.run_record, self.model_config = run_record, model_config
        if patch is None and "token" in cfg.losses:
            raise ValueError("the token term needs patch: the grid and count of the tokens it scores")
        self.patch: tuple[int, int] | None = patch[0] if patch else None
        self.n_patches: int = patch[1] if patch else 0
        self.optimizer = torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr)
        total, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
        factor = warmup_cosine(total, warmup, cfg.min_lr / cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.mix_rng = random.Random(0)
        self.cross_entropy = SoftTargetCrossEntropy()
        ddp = runtime.world_size() > 1
        self.on_cuda = device.type == "cuda"  # pinned memory, non-blocking copies, one DDP device id
        ids = [device.index] if self.on_cuda else None
        self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids) if ddp else model
        self.progress = Progress(last_lr=cfg.lr)

    # -- one optimizer step ------------------------------------------------------------------------------------------
    def targets(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Smoothed targets, with patch CutMix when on: ``(images, image targets, patch targets or None)``."""
        cfg = self.cfg
        targets = smooth_one_hot(y, self.num_classes, cfg.label_smoothing)
        if cfg.use_cutmix and self.mix_rng.random() < cfg.cutmix_prob:
            x, targets, patch_targets, _ = patch_cutmix(
                x, targets, None, cfg.cutmix_alpha, self.mix_rng, cfg.cutmix_snap, grid=self.patch
            )
            return x, targets, patch_targets
        if "token" in cfg.losses:
            return x, targets, targets[:, None, :].expand(-1, self.n_patches, -1)
        return x, targets, None

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward one micro-batch: ``{"total", "ce", <term>...}`` as differentiable scalars."""
        x, targets, patch_targets = self.targets(x, y)
        with runtime.autocast(self.device, self.cfg.amp):
            logits, diversity, terms = self.criterion(lambda: self.net(x), patch_targets)
        ce = self.cross_entropy(to_float(logits), targets)
        return {"total": ce + diversity, "ce": ce, **terms}

    def train_window(self, window: list[tuple[torch.Tensor, torch.Tensor]], stop: StopRequest) -> bool:
        """One optimizer step over ``len(window)`` micro-batches; returns whether every rank was asked to stop."""
        p, device = self.progress, self.device
        ddp = self.net if isinstance(self.net, nn.parallel.DistributedDataParallel) else None
        stop_flag = 0.0
        step_sums = torch.zeros_like(p.sums)
        for j, (x, y) in enumerate(window):
            x = x.to(device, non_blocking=self.on_cuda)
            y = y.to(device, non_blocking=self.on_cuda)
            sync = ddp.no_sync() if ddp is not None and j < len(window) - 1 else contextlib.nullcontext()
            with sync:
                values = self.loss_terms(x, y)
                names = list(values)
                vec = torch.stack([v.detach().float().cpu() for v in values.values()])
                flags = torch.cat([(~torch.isfinite(vec)).double(), torch.tensor([float(stop.requested)])])
                flags = runtime.all_reduce(flags, "max")  # every rank learns about a bad value before any backward
                bad = [n for n, f in zip(names, flags[:-1].tolist(), strict=True) if f > 0]
                if bad:
                    name = next(n for n in bad if n != "total") if len(bad) > 1 else bad[0]
                    raise NonFiniteLossError(non_finite_message(name, values[name].item(), p, self.out))
                stop_flag = max(stop_flag, float(flags[-1]))
                (values["total"] / len(window)).backward()
            n = x.shape[0]
            step_sums[0] += n
            for name, value in zip(names, vec.tolist(), strict=True):
                step_sums[1 + SUM_KEYS.index(name)] += value * n
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        p.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        p.sums += step_sums
        p.step += 1
        p.global_step += 1
        return stop_flag > 0

    # -- epochs ------------------------------------------------------------------------------------------------------
    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Validation loss, top-1/top-5 (percent) and last-layer token cosine, summed over ranks
        (:func:`~.evaluation.validation_metrics`)."""
        model, adapter, classes = self.model, self.criterion.adapter, self.num_classes
        return validation_metrics(model, loader, self.device, adapter, num_classes=classes, amp=self.cfg.amp)

    def record_start(self, val_loader: DataLoader) -> dict[str, Any] | None:
        """The epoch-0 row: validation loss, top-1, top-5 and last-layer token cosine before the first step, added to
        the history once per run (``None`` when the run already has it or has trained: a resumed run).

        Its training columns and ``lr`` are empty; it never counts as the best epoch (``checkpoint-best`` is always a
        trained model). The evaluation draws no random numbers, so training after it is unchanged.
        """
        p = self.progress
        if p.history or p.global_step:
            return None
        started = time.perf_counter()
        metrics = self.evaluate(val_loader)
        row = history_row(0, math.nan, {}, metrics, self.cfg.cons_sim, time.perf_counter() - started)
        p.history.append(row)
        return row

    def _epoch_loader(self, train_set: LabelledImages, workers: int) -> DataLoader:
        """This rank's batches of the running epoch (reseeding everything first when the epoch starts afresh)."""
        cfg, p, rank = self.cfg, self.progress, runtime.rank()
        if p.step == 0:  # a fresh epoch: its randomness depends on (seed, epoch, rank) only
            runtime.seed_everything(runtime.derive_seed(cfg.seed, "epoch", p.epoch, rank))
            self.mix_rng.seed(runtime.derive_seed(cfg.seed, "mix", p.epoch, rank))
            p.sums.zero_()
        return shard_loader(train_set, cfg, p.epoch, p.step, workers, pin_memory=self.on_cuda)

    def _end_epoch(self, val_loader: DataLoader, seconds: float) -> dict[str, Any]:
        """Validate, append the history row, write the checkpoints and the state; returns the row."""
        cfg, p = self.cfg, self.progress
        mean = running_means(runtime.all_reduce(p.sums.clone()), ("total", "ce", *cfg.losses))
        metrics = self.evaluate(val_loader)
        row = history_row(p.epoch + 1, p.last_lr, mean, metrics, cfg.cons_sim, seconds)
        p.history.append(row)
        best = metrics["val_top1"] > p.best_top1
        if best:
            p.best_top1, p.best_epoch = metrics["val_top1"], p.epoch + 1
        p.epoch, p.step = p.epoch + 1, 0
        p.sums.zero_()
        if best:
            save_best(self.out, self.model, p)
        self.save()
        return row

    def fit(
        self,
        train_set: LabelledImages,
        val_loader: DataLoader,
        workers: int = 0,
        on_step: Callable[[StepInfo], None] | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> bool:
        """Train from :attr:`progress` to ``cfg.epochs``; returns True when Ctrl-C stopped it (state saved).

        Args:
            train_set: the training images (all ranks; each takes its shard per epoch).
            val_loader: this rank's validation images.
            workers: DataLoader worker processes.
            on_step: called after every optimizer step with the running means of the loss terms.
            on_epoch: called with each history row, after the checkpoints are written.
        """
        cfg, p = self.cfg, self.progress
        shown = ("total", "ce", *cfg.losses)
        with StopRequest() as stop:
            if stop.requested:
                raise KeyboardInterrupt
            while p.epoch < cfg.epochs:
                started = time.perf_counter()
                loader = self._epoch_loader(train_set, workers)
                self.net.train()
                for window in _windows(loader, cfg.accum_steps):
                    stopping = self.train_window(window, stop)
                    if on_step is not None:
                        running = running_means(p.sums, shown)
                        on_step(StepInfo(p.epoch + 1, cfg.epochs, p.step, self.steps_per_epoch, running))
                    if stopping:
                        self.save()
                        return True
                row = self._end_epoch(val_loader, time.perf_counter() - started)
                if on_epoch is not None:
                    on_epoch(row)
                if runtime.all_reduce(torch.tensor([float(stop.requested)]), "max").item() > 0 and p.epoch < cfg.epochs:
                    return True
        return False

    # -- files -------------------------------------------------------------------------------------------------------
    def history(self) -> pd.DataFrame:
        """The finished epochs' rows (:data:`HISTORY_COLUMNS`)."""
        return pd.DataFrame(self.progress.history, columns=HISTORY_COLUMNS)

    def save(self) -> None:
        """Write config.json, checkpoint-last and train_state.pt on rank 0; collective over ranks. Every save leaves
        a folder ``measure`` loads and ``--resume`` continues, also one made by a Ctrl-C in the first epoch
        (:func:`~.state.save_state`)."""
        save_state(
            self.out,
            self.model,
            self.optimizer,
            self.scheduler,
            self.mix_rng,
            self.progress,
            self.run_record,
            self.model_config,
        )

    def restore(self, state: dict[str, Any]) -> list[str]:
        """Continue from a saved ``train_state.pt`` (see :func:`~.state.load_train_state`) and its checkpoint-last.

        Returns:
            Notes for the user (where the run resumes; a mid-epoch resume on another number of processes).
        """
        self.progress, notes = restore_state(state, self.out, self.model, self.optimizer, self.scheduler, self.mix_rng)
        p = self.progress
        notes.append(f"resuming {self.out} at epoch {p.epoch + 1}, step {p.step} of {self.steps_per_epoch}")
        return notes
