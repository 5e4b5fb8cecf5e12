"""The resumable state of a ``finetune`` run: :class:`Progress`, the checkpoints and ``train_state.pt``.

Every save (rank 0 writes, all ranks take part) leaves a run folder that ``measure`` loads and ``--resume``
continues: ``config.json``, ``checkpoint-last.safetensors`` (the weights), then ``train_state.pt`` (everything else:
optimizer, scheduler, each rank's CutMix generator and loss sums, the history). ``checkpoint-best.safetensors`` is
written before the state that records it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import runtime
from ..errors import UserError, first_line
from ..io import atomic_write, write_json
from ..reading.loading import load_state_dict_file, save_weights, weights_meta
from .config import TERM_NAMES

__all__ = [
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "STATE_FILE",
    "SUM_KEYS",
    "TRAIN_STATE_FORMAT",
    "Progress",
    "check_same_run",
    "first_difference",
    "load_train_state",
    "record_flag",
    "restore_state",
    "save_best",
    "save_state",
]


SUM_KEYS = ("total", "ce", *TERM_NAMES)
"""The entries of :attr:`Progress.sums` after the image count."""


TRAIN_STATE_FORMAT = 1

LAST_CHECKPOINT = "checkpoint-last.safetensors"
"""The weights of the last save (``--resume`` continues from them; the twin's side-by-side compares them)."""

BEST_CHECKPOINT = "checkpoint-best.safetensors"
"""The weights of the epoch with the best validation top-1 (what ``measure`` loads from the run folder)."""

STATE_FILE = "train_state.pt"
"""Everything of a save but the weights (:func:`save_state`)."""


@dataclass
class Progress:
    """Where a run stands; all of it is saved in ``train_state.pt``.

    Attributes:
        epoch: finished epochs.
        step: optimizer steps done in the running epoch.
        global_step: optimizer steps done in all.
        sums: this rank's sums over the running epoch: the image count, then each of :data:`SUM_KEYS` times images.
        history: one :data:`~.trainer.HISTORY_COLUMNS` row per finished epoch.
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


def save_best(out: Path, model: nn.Module, progress: Progress) -> None:
    """``checkpoint-best.safetensors`` of the epoch that just ended as the best so far (rank 0 only)."""
    if runtime.is_main():
        meta = {"epoch": progress.epoch, "global_step": progress.global_step, "val_top1": progress.best_top1}
        save_weights(out / BEST_CHECKPOINT, model, meta)


def save_state(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mix_rng: random.Random,
    progress: Progress,
    run_record: dict[str, Any],
    model_config: dict[str, Any],
) -> None:
    """Write config.json, checkpoint-last (weights) then train_state.pt (everything else) on rank 0.

    Collective over ranks (each rank's CutMix generator and loss sums are gathered first).
    """
    p = progress
    per_rank = runtime.all_gather_objects({"rng": runtime.rng_state(mix_rng), "sums": p.sums.clone()})
    if not runtime.is_main():
        return
    write_json(out / "config.json", model_config)
    meta = {"epoch": p.epoch, "step_in_epoch": p.step, "global_step": p.global_step}
    save_weights(out / LAST_CHECKPOINT, model, meta)
    state = {
        "format": TRAIN_STATE_FORMAT,
        **meta,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaling
        "last_lr": p.last_lr,
        "ranks": per_rank,
        "world_size": runtime.world_size(),
        "history": p.history,
        "best_top1": p.best_top1,
        "best_epoch": p.best_epoch,
        "run": run_record,
    }
    atomic_write(out / STATE_FILE, lambda f: torch.save(state, f))


def restore_state(
    state: dict[str, Any],
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    mix_rng: random.Random,
) -> tuple[Progress, list[str]]:
    """Load ``out``'s checkpoint-last into ``model`` and a saved ``train_state.pt`` (:func:`load_train_state`) into
    the optimizer, the scheduler and this rank's ``mix_rng``.

    Returns:
        ``(the restored progress, notes for the user)``: a note when a mid-epoch resume runs on another number of
        processes (this rank's generator and sums are then not restored: not bit-identical).
    """
    model.load_state_dict(load_state_dict_file(out / LAST_CHECKPOINT))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    p = Progress(
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
        runtime.set_rng_state(state["ranks"][rank]["rng"], mix_rng)
        p.sums = state["ranks"][rank]["sums"].clone()
    elif p.step:
        notes.append(f"resuming mid-epoch with {world} processes instead of {state['world_size']}: not bit-identical")
    return p, notes


def load_train_state(out: Path) -> dict[str, Any]:
    """``out/train_state.pt``, checked against ``out/checkpoint-last.safetensors`` (``--resume``).

    Raises:
        UserError: the file is missing, unreadable, of another format, or does not match checkpoint-last.
    """
    path = out / STATE_FILE
    refuse = f"--resume {out}"
    if not path.is_file():
        raise UserError(f"{refuse}: no train_state.pt there (not a finetune run folder, or never checkpointed)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated or not a torch file
        raise UserError(f"{refuse}: cannot read train_state.pt (damaged?): {first_line(e)}") from e
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else f"none (it holds a {type(state).__name__})"
        raise UserError(f"{refuse}: train_state.pt has format {found}, expected {TRAIN_STATE_FORMAT}")
    weights = out / LAST_CHECKPOINT
    try:
        saved_step = weights_meta(weights).get("global_step") if weights.is_file() else None
    except Exception as e:  # a damaged safetensors header
        raise UserError(f"{refuse}: cannot read checkpoint-last.safetensors: {first_line(e)}") from e
    if saved_step is None or saved_step != str(state.get("global_step")):
        raise UserError(f"{refuse}: checkpoint-last.safetensors is missing or does not match train_state.pt")
    return state


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """A run record as JSON would read it back, with its ``config`` entries at the top level."""
    plain = json.loads(json.dumps(record, default=str))
    return {**{k: v for k, v in plain.items() if k != "config"}, **plain.get("config", {})}


RECORD_FLAGS = {"model": "MODEL", "train_dir": "TRAIN_DIR", "losses": "--loss", "model_args": "--model-arg"}
"""How the command line spells the run-record entries whose flag is not ``--<name-with-dashes>``."""


def record_flag(key: str) -> str:
    """The command-line spelling of a run-record entry (``lr`` -> ``--lr``, ``train_dir`` -> ``TRAIN_DIR``)."""
    return RECORD_FLAGS.get(key, f"--{key.replace('_', '-')}")


def first_difference(saved: dict[str, Any], current: dict[str, Any], keys: Any = None) -> str | None:
    """``"--lr: the run used 0.002, now 0.001"`` for the first entry (of ``keys``, default all of ``current``'s) of
    two run records that differs, else ``None``."""
    flat_old, flat_new = _flat(saved), _flat(current)
    for k in flat_new if keys is None else keys:
        if k in flat_new and flat_old.get(k) != flat_new[k]:
            return f"{record_flag(k)}: the run used {flat_old.get(k)!r}, now {flat_new[k]!r}"
    return None


def check_same_run(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """Refuse to resume with options that change the result (the device and workers may differ).

    Raises:
        UserError: one line naming the first option that differs.
    """
    diff = first_difference(saved, current)
    if diff is not None:
        raise UserError(
            f"--resume {out}: {diff}; drop the option (--resume alone continues with the run's options) or start "
            "a new run with another --out"
        )
