"""The training loop of ``finetune``: one :class:`Trainer` per process, its resumable state and the run's checkpoints.

A :class:`Trainer` runs optimizer steps over windows of ``accum_steps`` micro-batches, each scored by cross-entropy
plus the patch-diversification terms (:class:`~oversmooth_cli.losses.PatchDiversificationLoss`), validates after
every epoch and writes ``checkpoint-last.safetensors``, ``checkpoint-best.safetensors``, ``config.json`` and
``train_state.pt`` (rank 0 only; every metric is summed over ranks first).

Reproducibility: at every epoch start the global generators and the CutMix generator are reseeded from
``(seed, epoch, rank)``, and their states are saved with everything else in ``train_state.pt``, so ``--resume``
reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from ..io import atomic_write, write_json
from ..metrics.formulas import to_float, token_cosine
from ..reading.capture import block_tokens
from ..reading.loading import load_state_dict_file, one_line_reason, save_weights, weights_meta
from .config import TERM_NAMES, FinetuneConfig
from .cutmix import patch_cutmix, smooth_one_hot
from .losses import PatchDiversificationLoss

__all__ = [
    "HISTORY_COLUMNS",
    "TRAIN_STATE_FORMAT",
    "NonFiniteLossError",
    "Progress",
    "StepInfo",
    "StopRequest",
    "Trainer",
    "check_same_run",
    "load_train_state",
    "warmup_cosine",
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


SUM_KEYS = ("total", "ce", *TERM_NAMES)
"""The entries of :attr:`Progress.sums` after the image count."""


TRAIN_STATE_FORMAT = 1


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


@dataclass
class Progress:
    """Where a run stands; all of it is saved in ``train_state.pt``.

    Attributes:
        epoch: finished epochs.
        step: optimizer steps done in the running epoch.
        global_step: optimizer steps done in all.
        sums: this rank's sums over the running epoch: the image count, then each of :data:`SUM_KEYS` times images.
        history: one :data:`HISTORY_COLUMNS` row per finished epoch.
        best_top1: best validation top-1 so far (-1 before the first epoch ends).
        best_epoch: its 1-based epoch.
        last_lr: learning rate of the last optimizer step.
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(1 + len(SUM_KEYS), dtype=torch.float64))
    history: list[dict[str, Any]] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int | None = None
    last_lr: float = 0.0


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
            layer's, :class:`~oversmooth_cli.losses.TokenPlan`); patch CutMix snaps to it and ``l_token`` scores it.
        out: the run folder (written on rank 0 only).
        run_record: the options that must match to ``--resume`` (saved in ``train_state.pt``).
        model_config: the ``config.json`` written next to the best checkpoint (:func:`~.models.model_config`).
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
        self.patch, self.n_patches = patch or (None, None)
        no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        self.optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay, no_decay), lr=cfg.lr)
        total, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
        factor = warmup_cosine(total, warmup, cfg.min_lr / cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.mix_rng = random.Random(0)
        self.cross_entropy = SoftTargetCrossEntropy()
        ddp = runtime.world_size() > 1
        ids = [device.index] if device.type == "cuda" else None
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

    def _non_finite_message(self, name: str, value: float, step: int) -> str:
        history, out = self.progress.history, self.out
        last = history[-1]["epoch"] if history else None
        kept = (
            f"the last good checkpoint is {out / 'checkpoint-last.safetensors'} (epoch {last}); "
            f"continue with --resume {out} after lowering --lr"
            if last is not None
            else "no checkpoint had been written yet; lower --lr"
        )
        term = "cross-entropy" if name == "ce" else f"l_{name}"
        weight = "" if name in ("ce", "total") else f" or --w-{name}"
        where = f"at epoch {self.progress.epoch + 1}, step {step}"
        return f"non-finite loss: {term} = {value} {where}; the step was not applied; {kept}{weight}"

    def train_window(self, window: list[tuple[torch.Tensor, torch.Tensor]], stop: StopRequest) -> bool:
        """One optimizer step over ``len(window)`` micro-batches; returns whether every rank was asked to stop."""
        p, device = self.progress, self.device
        ddp = isinstance(self.net, nn.parallel.DistributedDataParallel)
        stop_flag = 0.0
        step_sums = torch.zeros_like(p.sums)
        for j, (x, y) in enumerate(window):
            x = x.to(device, non_blocking=device.type == "cuda")
            y = y.to(device, non_blocking=device.type == "cuda")
            sync = self.net.no_sync() if ddp and j < len(window) - 1 else contextlib.nullcontext()
            with sync:
                values = self.loss_terms(x, y)
                names = list(values)
                vec = torch.stack([v.detach().float().cpu() for v in values.values()])
                flags = torch.cat([(~torch.isfinite(vec)).double(), torch.tensor([float(stop.requested)])])
                flags = runtime.all_reduce(flags, "max")  # every rank learns about a bad value before any backward
                bad = [n for n, f in zip(names, flags[:-1].tolist(), strict=True) if f > 0]
                if bad:
                    name = next(n for n in bad if n != "total") if len(bad) > 1 else bad[0]
                    raise NonFiniteLossError(self._non_finite_message(name, values[name].item(), p.step + 1))
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
    @torch.inference_mode()
    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Validation loss, top-1/top-5 (percent) and last-layer token cosine, summed over ranks."""
        self.model.eval()
        sums = torch.zeros(5, dtype=torch.float64)  # images, loss, top1, top5, token cosine
        k = min(5, self.num_classes)
        with block_tokens(self.model, self.criterion.adapter, (-1,)) as outs:
            for x, y in loader:
                x, y = x.to(self.device), y.to(self.device)
                with runtime.autocast(self.device, self.cfg.amp):
                    logits = self.model(x).float()
                top = logits.topk(k, dim=-1).indices
                hits = top == y[:, None]
                sums += torch.tensor(
                    [
                        x.shape[0],
                        nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                        hits[:, 0].sum().item(),
                        hits.any(dim=-1).sum().item(),
                        token_cosine(outs[-1]).sum().item(),
                    ],
                    dtype=torch.float64,
                )
        n, loss, top1, top5, cos = runtime.all_reduce(sums).tolist()
        return {
            "val_loss": loss / n,
            "val_top1": 100.0 * top1 / n,
            "val_top5": 100.0 * top5 / n if self.num_classes >= 5 else math.nan,
            "val_token_cosine": cos / n,
        }

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
        row = {
            "epoch": 0,
            "lr": math.nan,
            "train_loss": math.nan,
            "train_ce": math.nan,
            **{f"train_{t}": math.nan for t in TERM_NAMES},
            **metrics,
            "cons_sim": self.cfg.cons_sim,
            "seconds": round(time.perf_counter() - started, 3),
        }
        p.history.append(row)
        return row

    def _epoch_loader(self, train_set: LabelledImages, workers: int) -> DataLoader:
        """This rank's batches of the running epoch (reseeding everything first when the epoch starts afresh)."""
        cfg, p, rank = self.cfg, self.progress, runtime.rank()
        if p.step == 0:  # a fresh epoch: its randomness depends on (seed, epoch, rank) only
            runtime.seed_everything(runtime.derive_seed(cfg.seed, "epoch", p.epoch, rank))
            self.mix_rng.seed(runtime.derive_seed(cfg.seed, "mix", p.epoch, rank))
            p.sums.zero_()
        train_set.epoch = p.epoch
        skip = p.step * cfg.accum_steps * cfg.batch_size
        return DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            sampler=ShardSampler(len(train_set), cfg.seed, p.epoch, rank, runtime.world_size(), skip=skip),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_sigint,
            generator=torch.Generator().manual_seed(runtime.derive_seed(cfg.seed, "loader", p.epoch, rank)),
        )

    def _running_means(self, sums: torch.Tensor, keys: tuple[str, ...] = SUM_KEYS) -> dict[str, float]:
        n = max(sums[0].item(), 1.0)
        return {k: sums[1 + i].item() / n for i, k in enumerate(SUM_KEYS) if k in keys}

    def _end_epoch(self, val_loader: DataLoader, seconds: float) -> dict[str, Any]:
        """Validate, append the history row, write the checkpoints and the state; returns the row."""
        cfg, p = self.cfg, self.progress
        mean = self._running_means(runtime.all_reduce(p.sums.clone()))
        metrics = self.evaluate(val_loader)
        row = {
            "epoch": p.epoch + 1,
            "lr": p.last_lr,
            "train_loss": mean["total"],
            "train_ce": mean["ce"],
            **{f"train_{t}": (mean[t] if t in cfg.losses else math.nan) for t in TERM_NAMES},
            **metrics,
            "cons_sim": cfg.cons_sim,
            "seconds": round(seconds, 3),
        }
        p.history.append(row)
        best = metrics["val_top1"] > p.best_top1
        if best:
            p.best_top1, p.best_epoch = metrics["val_top1"], p.epoch + 1
        p.epoch, p.step = p.epoch + 1, 0
        p.sums.zero_()
        self._save_best(best)
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
                        running = self._running_means(p.sums, shown)
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

    def _save_best(self, best: bool) -> None:
        """checkpoint-best (when this epoch is the best so far), before train_state.pt records it."""
        if not runtime.is_main():
            return
        if best:
            p = self.progress
            meta = {"epoch": p.epoch, "global_step": p.global_step, "val_top1": p.best_top1}
            save_weights(self.out / "checkpoint-best.safetensors", self.model, meta)

    def save(self) -> None:
        """Write config.json, checkpoint-last (weights) then train_state.pt (everything else) on rank 0; collective
        over ranks. Every save leaves a folder ``measure`` loads and ``--resume`` continues, also one made by a
        Ctrl-C in the first epoch."""
        p = self.progress
        per_rank = runtime.all_gather_objects({"rng": runtime.rng_state(self.mix_rng), "sums": p.sums.clone()})
        if not runtime.is_main():
            return
        write_json(self.out / "config.json", self.model_config)
        meta = {"epoch": p.epoch, "step_in_epoch": p.step, "global_step": p.global_step}
        save_weights(self.out / "checkpoint-last.safetensors", self.model, meta)
        state = {
            "format": TRAIN_STATE_FORMAT,
            **meta,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "last_lr": p.last_lr,
            "ranks": per_rank,
            "world_size": runtime.world_size(),
            "history": p.history,
            "best_top1": p.best_top1,
            "best_epoch": p.best_epoch,
            "run": self.run_record,
        }
        atomic_write(self.out / "train_state.pt", lambda f: torch.save(state, f))

    def restore(self, state: dict[str, Any]) -> list[str]:
        """Continue from a saved ``train_state.pt`` (see :func:`load_train_state`) and its checkpoint-last.

        Returns:
            Notes for the user (where the run resumes; a mid-epoch resume on another number of processes).
        """
        self.model.load_state_dict(load_state_dict_file(self.out / "checkpoint-last.safetensors"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        p = self.progress = Progress(
            epoch=state["epoch"],
            step=state["step_in_epoch"],
            global_step=state["global_step"],
            history=list(state["history"]),
            best_top1=state["best_top1"],
            best_epoch=state["best_epoch"],
            last_lr=state["last_lr"],
        )
        notes = []
        world, rank = runtime.world_size(), runtime.rank()
        if p.step and state["world_size"] == world:
            runtime.set_rng_state(state["ranks"][rank]["rng"], self.mix_rng)
            p.sums = state["ranks"][rank]["sums"].clone()
        elif p.step:
            notes.append(
                f"resuming mid-epoch with {world} processes instead of {state['world_size']}: not bit-identical"
            )
        notes.append(f"resuming {self.out} at epoch {p.epoch + 1}, step {p.step} of {self.steps_per_epoch}")
        return notes


def load_train_state(out: Path) -> dict[str, Any]:
    """``out/train_state.pt``, checked against ``out/checkpoint-last.safetensors`` (``--resume``)."""
    path = out / "train_state.pt"
    if not path.is_file():
        raise UserError(f"--resume {out}: no train_state.pt there (not a finetune run folder, or never checkpointed)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated or not a torch file
        raise UserError(f"--resume {out}: cannot read train_state.pt (damaged?): {one_line_reason(e)}") from e
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else f"none (it holds a {type(state).__name__})"
        raise UserError(f"--resume {out}: train_state.pt has format {found}, expected {TRAIN_STATE_FORMAT}")
    weights = out / "checkpoint-last.safetensors"
    try:
        saved_step = weights_meta(weights).get("global_step") if weights.is_file() else None
    except Exception as e:  # a damaged safetensors header
        raise UserError(f"--resume {out}: cannot read checkpoint-last.safetensors: {one_line_reason(e)}") from e
    if saved_step is None or saved_step != str(state.get("global_step")):
        raise UserError(f"--resume {out}: checkpoint-last.safetensors is missing or does not match train_state.pt")
    return state


def check_same_run(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """Refuse to resume with options that change the result (the device and workers may differ)."""
    old = json.loads(json.dumps(saved, default=str))
    new = json.loads(json.dumps(current, default=str))
    flat_old = {**{k: v for k, v in old.items() if k != "config"}, **old.get("config", {})}
    flat_new = {**{k: v for k, v in new.items() if k != "config"}, **new.get("config", {})}
    diff = [k for k in flat_new if flat_old.get(k) != flat_new[k]]
    if diff:
        shown = "; ".join(f"{k.replace('_', '-')}: run used {flat_old.get(k)!r}, now {flat_new[k]!r}" for k in diff[:3])
        raise UserError(f"--resume {out}: options differ from the saved run ({shown}); pass the run's options")
