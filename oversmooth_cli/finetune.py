"""``finetune``: fine-tune a timm ViT with cross-entropy plus the patch-diversification losses.

Total loss = CE(model output) + w_cos * l_cos + w_cons * l_cons + w_token * l_token (see :mod:`.losses`).
Tokens with gradient come from forward hooks on the first and the last block, kept for one training forward
only; ``l_token`` runs the last block's patch tokens through the model's own final norm and head.

Runs as one process or under ``torchrun`` (DistributedDataParallel: gloo on CPU, nccl on CUDA); only rank 0
writes files, and every metric is summed over ranks before it is written.

Outputs in the run folder (every file written atomically, checkpoints and state every epoch):
``checkpoint-last.safetensors``, ``checkpoint-best.safetensors``, ``config.json`` (``oversmooth measure DIR``
loads the best checkpoint), ``train_state.pt`` (``--resume``), ``history.csv``, ``before/`` and ``after/``
(full ``measure`` runs on the validation images), ``compare.png`` and ``training.png``.

Reproducibility: every random draw is a function of ``seed``. Augmentations are seeded per image and epoch,
the sample order per epoch, and the training randomness (drop path, CutMix) is reseeded at every epoch start
and saved in ``train_state.pt``, so ``--resume`` reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import distributed as D
from . import losses as L
from .adapters import FamilyAdapter, UnsupportedModelError, resolve_adapter
from .compare import compare_runs, plot_compare
from .data import IMAGE_EXTENSIONS, build_transform, load_rgb
from .errors import UserError
from .measure import measure, resolve_device, write_run
from .metrics import token_cosine
from .models import LoadedModel, load_model
from .report import METRIC_LABELS, atomic_write, read_layers, save_figure, write_json

__all__ = [
    "HISTORY_COLUMNS",
    "FinetuneConfig",
    "FinetuneResult",
    "NonFiniteLossError",
    "StepInfo",
    "discover_classes",
    "finetune",
    "parse_losses",
    "plot_training",
    "stratified_split",
]

TERM_NAMES = tuple(L.LOSS_TERMS)
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
"""history.csv: one row per epoch; losses are unweighted means over training images, accuracies in percent."""

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
)
TRAIN_ONLY_ARGS = ("drop_path_rate",)
"""create_model arguments used for training only, left out of the saved ``config.json``."""
PRETRAINED_CFG_KEYS = (
    "input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "pool_size",
    "first_conv",
    "classifier",
)
TRAIN_STATE_FORMAT = 1


class NonFiniteLossError(UserError):
    """A loss term became NaN or infinite; the step was not applied and the last good checkpoint is kept."""


# -- options -------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Everything that changes the result of a fine-tuning run (``--resume`` requires the same values).

    Attributes:
        losses: terms added to cross-entropy, from ``cos``, ``cons``, ``token`` (empty: the control run).
        w_cos, w_cons, w_token: weights of the terms.
        cons_sim: similarity of ``l_cons``: ``cos`` (default) or ``dot`` (the paper's raw dot products).
        cons_grad_first: let ``l_cons`` pass gradient into the first block's tokens too.
        cutmix: patch CutMix; None means on exactly when ``token`` is in ``losses``.
        cutmix_prob, cutmix_alpha, cutmix_snap: chance per batch, ``Beta(alpha, alpha)`` of the kept area,
            snap the box to the patch grid.
        val_split: stratified fraction of the training images held out when no validation folder is given.
        epochs, batch_size, lr, min_lr, weight_decay, warmup_epochs, grad_clip, label_smoothing, drop_path,
            accum_steps: the usual AdamW + warmup/cosine fine-tuning options (batch size per process;
            ``grad_clip`` 0 disables clipping).
        hflip, crop_scale: timm train augmentation (horizontal flip chance, smallest random-resized-crop area).
        amp: bf16 autocast on CUDA.
        seed: seed of every random draw.
    """

    losses: tuple[str, ...] = ("cos", "cons", "token")
    w_cos: float = 0.5
    w_cons: float = 0.5
    w_token: float = 1.0
    cons_sim: str = "cos"
    cons_grad_first: bool = False
    cutmix: bool | None = None
    cutmix_prob: float = 0.5
    cutmix_alpha: float = 1.0
    cutmix_snap: bool = True
    val_split: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.1
    accum_steps: int = 1
    hflip: float = 0.5
    crop_scale: float = 0.08
    amp: bool = False
    seed: int = 0

    @property
    def weights(self) -> dict[str, float]:
        return {t: float(getattr(self, f"w_{t}")) for t in TERM_NAMES}

    @property
    def use_cutmix(self) -> bool:
        return ("token" in self.losses) if self.cutmix is None else bool(self.cutmix)


def parse_losses(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"cos,cons,token"`` -> ``("cos", "cons", "token")``; ``"none"`` -> ``()``; unknown names are an error."""
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text)]
    items = [p for p in items if p]
    choices = f"choose a comma-separated subset of {', '.join(TERM_NAMES)}, or none"
    if not items:
        raise UserError(f"--loss is empty; {choices}")
    if "none" in items:
        if len(items) > 1:
            raise UserError(f"--loss none cannot be combined with other terms ({', '.join(items)}); {choices}")
        return ()
    unknown = [p for p in items if p not in L.LOSS_TERMS]
    if unknown:
        raise UserError(f"unknown loss {', '.join(repr(u) for u in unknown)} in --loss; {choices}")
    return tuple(t for t in TERM_NAMES if t in items)


def _in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> tuple[Callable, str]:
    def ok(v: float) -> bool:
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
_POSITIVE = (lambda v: v > 0, "> 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "w_cos": _AT_LEAST_0,
    "w_cons": _AT_LEAST_0,
    "w_token": _AT_LEAST_0,
    "cutmix_prob": _in_range(0, 1),
    "cutmix_alpha": _POSITIVE,
    "epochs": _AT_LEAST_1,
    "batch_size": _AT_LEAST_1,
    "lr": _POSITIVE,
    "min_lr": _AT_LEAST_0,
    "weight_decay": _AT_LEAST_0,
    "warmup_epochs": _AT_LEAST_0,
    "grad_clip": _AT_LEAST_0,
    "label_smoothing": _in_range(0, 1, hi_open=True),
    "drop_path": _in_range(0, 1, hi_open=True),
    "accum_steps": _AT_LEAST_1,
    "hflip": _in_range(0, 1),
    "crop_scale": _in_range(0, 1, lo_open=True),
}
"""Option -> (check, requirement); a failed check is one ``UserError`` line naming the flag."""


def validate_config(cfg: FinetuneConfig, needs_val_split: bool) -> FinetuneConfig:
    """Check every option; returns ``cfg`` with ``losses`` normalised."""
    cfg = replace(cfg, losses=parse_losses(list(cfg.losses)) if cfg.losses else ())
    for name, (ok, requirement) in OPTION_RULES.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise UserError(f"--{name.replace('_', '-')} must be {requirement}, got {value}")
    if cfg.cons_sim not in L.SIMILARITIES:
        raise UserError(f"--cons-sim must be one of {', '.join(L.SIMILARITIES)}, got {cfg.cons_sim!r}")
    if needs_val_split and not 0 < cfg.val_split < 1:
        raise UserError(f"--val-split must be in (0, 1) when no --val-dir is given, got {cfg.val_split}")
    return cfg


# -- data ----------------------------------------------------------------------------------------------------------
Sample = tuple[Path, int]


def discover_classes(root: str | Path, flag: str = "TRAIN_DIR") -> dict[str, list[Path]]:
    """Images per class of an ImageFolder layout ``root/<class>/...`` (classes sorted by name, files recursive)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a folder (expected {root}/<class>/<image>, the ImageFolder layout)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{flag} {root} has no class sub-folders; expected {root}/<class>/<image> (ImageFolder layout)")
    if len(classes) < 2:
        raise UserError(f"{flag} {root} has one class folder ({classes[0]}); classification needs at least 2 classes")
    per_class = {
        c: sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        for c in classes
    }
    empty = [c for c in classes if not per_class[c]]
    if empty:
        raise UserError(
            f"class folder {root / empty[0]} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it"
        )
    return per_class


def stratified_split(
    per_class: dict[str, list[Path]], fraction: float, seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Hold out ``round(fraction * n_c)`` random images of every class (each class keeps at least one for training)."""
    rng = random.Random(seed)
    train, val = {}, {}
    for c, paths in per_class.items():
        shuffled = list(paths)
        rng.shuffle(shuffled)
        k = min(len(paths) - 1, round(fraction * len(paths)))
        val[c], train[c] = sorted(shuffled[:k]), sorted(shuffled[k:])
    if not any(val.values()):
        raise UserError(f"--val-split {fraction} holds out no image; raise it or give --val-dir")
    return train, val


def _samples(per_class: dict[str, list[Path]], classes: list[str]) -> list[Sample]:
    return [(p, classes.index(c)) for c in classes for p in per_class.get(c, [])]


def prepare_data(
    train_dir: str | Path, val_dir: str | Path | None, val_split: float, seed: int
) -> tuple[list[str], list[Sample], list[Sample]]:
    """Class names, training samples and validation samples ``(path, label)``."""
    train = discover_classes(train_dir)
    classes = list(train)
    if val_dir is None:
        train, val = stratified_split(train, val_split, seed)
    else:
        val = discover_classes(val_dir, "--val-dir")
        if list(val) != classes:
            missing = sorted(set(classes) - set(val))
            extra = sorted(set(val) - set(classes))
            raise UserError(
                f"--val-dir {val_dir} has other classes than {train_dir}: missing {missing or 'none'}, "
                f"extra {extra or 'none'}; both need the same class folders"
            )
    return classes, _samples(train, classes), _samples(val, classes)


def _derive(*parts: Any) -> int:
    """A stable 63-bit seed from any values (the same on every machine and process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU) inside the block and restore the previous states after it."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class LabelledImages(Dataset):
    """``(image tensor, label)``; with ``seed``, the augmentation of image ``i`` in epoch ``e`` is seeded by both."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, seed: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except Exception as e:
            raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
        if self.seed is None:
            return self.transform(image), label
        with _seeded(_derive(self.seed, "item", self.epoch, index)):
            return self.transform(image), label


class ShardSampler(Sampler[int]):
    """This rank's part of a per-epoch permutation (padded by wrapping so every rank gets as many), minus ``skip``."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.rank, self.world, self.skip = n, seed, epoch, rank, world, skip

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(_derive(self.seed, "order", self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        total = math.ceil(self.n / self.world) * self.world
        order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank :: self.world][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.world) - self.skip)


def _ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops at the next step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_transform(data_config: dict[str, Any], cfg: FinetuneConfig) -> Callable:
    """timm's training transform for the model's data config (random-resized crop, flip, colour jitter)."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(
        **{k: data_config[k] for k in keys if k in data_config},
        is_training=True,
        hflip=cfg.hflip,
        scale=(cfg.crop_scale, 1.0),
    )


# -- RNG state -----------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _rng_state(mix_rng: random.Random) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "mix": mix_rng.getstate(),
    }


def _set_rng_state(state: dict[str, Any], mix_rng: random.Random) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    mix_rng.setstate(_as_tuple(state["mix"]))


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- model ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def block_tokens(model: nn.Module, adapter: FamilyAdapter, which: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Patch tokens ``(B, n, d)`` (prefix removed, with gradient) output by the blocks at positions ``which``.

    Positions index the blocks that output tokens, in execution order (``0``: the first, ``-1``: the last); the
    adapter turns each output into tokens exactly as ``measure`` reads them. The hooks live only inside the block.
    """
    specs = [s for s in adapter.block_specs(model) if s.group.tokens]
    store: dict[int, torch.Tensor] = {}

    def keep(key: int, spec: Any) -> Callable:
        return lambda _m, _a, out: store.__setitem__(key, adapter.tokens(out, spec)[:, spec.prefix :])

    handles = [specs[i].module.register_forward_hook(keep(i, specs[i])) for i in set(which)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _patch_grid(model: nn.Module, data_config: dict[str, Any]) -> tuple[tuple[int, int], int]:
    """``((patch_h, patch_w), n_patches)`` of the model's patch embedding at the data config's input size."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "patch_size", None)
    if size is None:
        raise UserError(f"{type(model).__name__} has no patch_embed.patch_size; patch CutMix and --loss token need it")
    ph, pw = (size, size) if isinstance(size, int) else tuple(size)
    _, h, w = data_config["input_size"]
    if h % ph or w % pw:
        raise UserError(f"input size {h}x{w} does not tile into {ph}x{pw} patches; patch CutMix needs whole patches")
    return (ph, pw), (h // ph) * (w // pw)


def _build_model(
    spec: str, num_classes: int, cfg: FinetuneConfig, load_kwargs: dict[str, Any]
) -> tuple[LoadedModel, list[str]]:
    args = dict(load_kwargs.pop("model_args", None) or {})
    if cfg.drop_path > 0:
        args["drop_path_rate"] = cfg.drop_path
    loaded = load_model(spec, model_args=args, **load_kwargs)
    notes = []
    current = getattr(loaded.model, "num_classes", None)
    if current != num_classes:
        loaded.model.reset_classifier(num_classes)
        notes.append(f"classifier head reset to {num_classes} classes (the model had {current})")
    return loaded, notes


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# -- collectives ---------------------------------------------------------------------------------------------------
def _reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or max of a small CPU tensor over ranks (identity in one process)."""
    if D.world_size() == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(device)
    dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x.cpu()


class _StopRequest:
    """Ctrl-C sets a flag; training stops at the next optimizer step, saves, and returns. A second Ctrl-C interrupts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _StopRequest:
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


# -- one run -------------------------------------------------------------------------------------------------------
@dataclass
class StepInfo:
    """Progress of one optimizer step: 1-based ``epoch`` and ``step``, running means of the loss terms this epoch."""

    epoch: int
    epochs: int
    step: int
    steps: int
    running: dict[str, float]


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


@dataclass
class _Run:
    """State of one training process (one rank)."""

    cfg: FinetuneConfig
    out: Path
    model: nn.Module
    net: nn.Module
    adapter: FamilyAdapter
    num_classes: int
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    mix_rng: random.Random
    patch: tuple[int, int] | None
    n_patches: int | None
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(2 + len(TERM_NAMES) + 1, dtype=torch.float64))
    history: list[dict[str, Any]] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int | None = None
    last_lr: float = 0.0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def keys(self) -> list[str]:
        """Names of the entries of ``sums`` after the image count: total, ce, then every registered term."""
        return ["total", "ce", *TERM_NAMES]


def _targets(run: _Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Smoothed targets, with patch CutMix when on: ``(images, image targets, patch targets or None)``."""
    cfg = run.cfg
    targets = L.smooth_one_hot(y, run.num_classes, cfg.label_smoothing)
    if cfg.use_cutmix and run.mix_rng.random() < cfg.cutmix_prob:
        x, targets, patch_targets, _ = L.patch_cutmix(
            x, targets, run.patch, cfg.cutmix_alpha, run.mix_rng, cfg.cutmix_snap
        )
        return x, targets, patch_targets
    if "token" in cfg.losses:
        return x, targets, targets[:, None, :].expand(-1, run.n_patches, -1)
    return x, targets, None


def _loss_terms(run: _Run, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward one micro-batch: ``{"total", "ce", <term>...}`` as differentiable scalars."""
    cfg = run.cfg
    x, targets, patch_targets = _targets(run, x, y)
    needs_tokens = bool(cfg.losses)
    with block_tokens(run.model, run.adapter, (0, -1) if needs_tokens else ()) as outs, run.autocast():
        logits = run.net(x)
        h = outs[-1] if needs_tokens else None
        token_logits = L.token_head_logits(run.model, h, run.adapter.name) if "token" in cfg.losses else None
    values = {"ce": L.soft_cross_entropy(logits, targets).mean()}
    if "cons" in cfg.losses and outs[0].shape != h.shape:
        raise UserError(
            f"--loss cons needs first- and last-block tokens of one shape; this model gives {tuple(outs[0].shape)} "
            f"and {tuple(h.shape)}; use --loss cos,token"
        )
    if needs_tokens:
        inputs = L.TermInputs(
            h=h,
            e=outs[0],
            token_logits=token_logits,
            patch_targets=patch_targets,
            cons_sim=cfg.cons_sim,
            cons_grad_first=cfg.cons_grad_first,
        )
        for name in cfg.losses:
            values[name] = L.LOSS_TERMS[name].fn(inputs)
    weights = cfg.weights
    total = values["ce"] + sum(weights[n] * values[n] for n in cfg.losses)
    return {"total": total, **values}


def _non_finite_message(run: _Run, name: str, value: float, step: int) -> str:
    last = run.history[-1]["epoch"] if run.history else None
    kept = (
        f"the last good checkpoint is {run.out / 'checkpoint-last.safetensors'} (epoch {last}); "
        f"continue with --resume {run.out} after lowering --lr"
        if last is not None
        else "no checkpoint had been written yet; lower --lr"
    )
    term = "cross-entropy" if name == "ce" else f"l_{name}"
    weight = "" if name in ("ce", "total") else f" or --w-{name}"
    where = f"at epoch {run.epoch + 1}, step {step}"
    return f"non-finite loss: {term} = {value} {where}; the step was not applied; {kept}{weight}"


def _train_window(run: _Run, window: list[tuple[torch.Tensor, torch.Tensor]], stop: _StopRequest) -> bool:
    """One optimizer step over ``len(window)`` micro-batches; returns whether every rank was asked to stop."""
    ddp = isinstance(run.net, nn.parallel.DistributedDataParallel)
    stop_flag = 0.0
    step_sums = torch.zeros_like(run.sums)
    for j, (x, y) in enumerate(window):
        x = x.to(run.device, non_blocking=run.device.type == "cuda")
        y = y.to(run.device, non_blocking=run.device.type == "cuda")
        sync = run.net.no_sync() if ddp and j < len(window) - 1 else contextlib.nullcontext()
        with sync:
            values = _loss_terms(run, x, y)
            names = list(values)
            vec = torch.stack([v.detach().float().cpu() for v in values.values()])
            flags = torch.cat([(~torch.isfinite(vec)).double(), torch.tensor([float(stop.requested)])])
            flags = _reduce(flags, "max")  # every rank learns about a bad value before any backward
            bad = [n for n, f in zip(names, flags[:-1].tolist(), strict=True) if f > 0]
            if bad:
                name = next(n for n in bad if n != "total") if len(bad) > 1 else bad[0]
                local = values[name].item()
                raise NonFiniteLossError(_non_finite_message(run, name, local, run.step + 1))
            stop_flag = max(stop_flag, float(flags[-1]))
            (values["total"] / len(window)).backward()
        n = x.shape[0]
        step_sums[0] += n
        for name, value in zip(names, vec.tolist(), strict=True):
            step_sums[1 + run.keys.index(name)] += value * n
    if run.cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.last_lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.sums += step_sums
    run.step += 1
    run.global_step += 1
    return stop_flag > 0


@torch.inference_mode()
def evaluate(run: _Run, loader: DataLoader) -> dict[str, float]:
    """Validation loss, top-1/top-5 (percent) and last-layer token cosine, summed over ranks."""
    run.model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # images, loss, top1, top5, token cosine
    k = min(5, run.num_classes)
    with block_tokens(run.model, run.adapter, (-1,)) as outs:
        for x, y in loader:
            x, y = x.to(run.device), y.to(run.device)
            with run.autocast():
                logits = run.model(x).float()
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
    n, loss, top1, top5, cos = _reduce(sums).tolist()
    return {
        "val_loss": loss / n,
        "val_top1": 100.0 * top1 / n,
        "val_top5": 100.0 * top5 / n if run.num_classes >= 5 else math.nan,
        "val_token_cosine": cos / n,
    }


# -- files ---------------------------------------------------------------------------------------------------------
def _save_weights(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata={k: str(v) for k, v in meta.items()}))


def _weights_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _model_config(loaded: LoadedModel, classes: list[str], run_record: dict[str, Any]) -> dict[str, Any]:
    """``config.json``: what ``load_model`` needs to rebuild the model, plus the labels and how it was trained."""
    base = dict(getattr(loaded.model, "pretrained_cfg", None) or {})
    pretrained_cfg = {k: base[k] for k in PRETRAINED_CFG_KEYS if k in base}
    pretrained_cfg.update({k: v for k, v in loaded.data_config.items() if k in PRETRAINED_CFG_KEYS})
    pretrained_cfg.update({"num_classes": len(classes), "label_names": classes})
    return {
        "architecture": loaded.architecture,
        "num_classes": len(classes),
        "model_args": {k: v for k, v in loaded.model_args.items() if k not in TRAIN_ONLY_ARGS},
        "pretrained_cfg": pretrained_cfg,
        "label_names": classes,
        "finetune": run_record,
    }


def _history_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def _save_state(run: _Run, run_record: dict[str, Any]) -> None:
    """Write checkpoint-last (weights) then train_state.pt (everything else) on rank 0; collective over ranks."""
    per_rank = D.all_gather_objects({"rng": _rng_state(run.mix_rng), "sums": run.sums.clone()})
    if not D.is_main():
        return
    meta = {"epoch": run.epoch, "step_in_epoch": run.step, "global_step": run.global_step}
    _save_weights(run.out / "checkpoint-last.safetensors", run.model, meta)
    state = {
        "format": TRAIN_STATE_FORMAT,
        **meta,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaling
        "last_lr": run.last_lr,
        "ranks": per_rank,
        "world_size": D.world_size(),
        "history": run.history,
        "best_top1": run.best_top1,
        "best_epoch": run.best_epoch,
        "run": run_record,
    }
    atomic_write(run.out / "train_state.pt", lambda p: torch.save(state, p))


def _load_state(out: Path) -> dict[str, Any]:
    path = out / "train_state.pt"
    if not path.is_file():
        raise UserError(f"--resume {out}: no train_state.pt there (not a finetune run folder, or never checkpointed)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--resume {out}: cannot read train_state.pt: {str(e).splitlines()[0]}") from e
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise UserError(
            f"--resume {out}: train_state.pt has format {state.get('format')}, expected {TRAIN_STATE_FORMAT}"
        )
    weights = out / "checkpoint-last.safetensors"
    if not weights.is_file() or _weights_meta(weights).get("global_step") != str(state["global_step"]):
        raise UserError(f"--resume {out}: checkpoint-last.safetensors is missing or does not match train_state.pt")
    return state


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """Refuse to resume with options that change the result (the device and workers may differ)."""
    old = json.loads(json.dumps(saved, default=str))
    new = json.loads(json.dumps(current, default=str))
    flat_old = {**{k: v for k, v in old.items() if k != "config"}, **old.get("config", {})}
    flat_new = {**{k: v for k, v in new.items() if k != "config"}, **new.get("config", {})}
    diff = [k for k in flat_new if flat_old.get(k) != flat_new[k]]
    if diff:
        shown = "; ".join(f"{k.replace('_', '-')}: run used {flat_old.get(k)!r}, now {flat_new[k]!r}" for k in diff[:3])
        raise UserError(f"--resume {out}: options differ from the saved run ({shown}); pass the run's options")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an unusable --out before any work (nothing is deleted here)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file; give a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {out} exists and is not empty; pass --overwrite, --resume {out}, or another --out"
        )


def _prepare_out(out: Path) -> None:
    """Remove a previous run's outputs (only once the new run's model and data were accepted)."""
    if out.is_dir():
        for name in OUTPUT_NAMES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# -- figures -------------------------------------------------------------------------------------------------------
def plot_training(history: pd.DataFrame, title: str | None = None):
    """Loss terms, validation accuracy and last-layer token cosine per epoch."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    loss_cols = ["train_loss", "train_ce", *(f"train_{t}" for t in TERM_NAMES), "val_loss"]
    for col in loss_cols:
        if col in history and history[col].notna().any():
            style = "--" if col == "val_loss" else "-"
            axes[0].plot(history["epoch"], history[col], style, marker="o", ms=3, label=col)
    axes[0].set_title("(a) loss terms (unweighted)", loc="left", fontsize=11)
    for col in ("val_top1", "val_top5"):
        if history[col].notna().any():
            axes[1].plot(history["epoch"], history[col], marker="o", ms=3, label=col)
    axes[1].set_title("(b) validation accuracy (%)", loc="left", fontsize=11)
    axes[2].plot(history["epoch"], history["val_token_cosine"], marker="o", ms=3, color="C3", label="last layer")
    axes[2].set_title(f"(c) validation {METRIC_LABELS['token_cosine']}", loc="left", fontsize=11)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _write_best(run: _Run, loaded: LoadedModel, classes: list[str], run_record: dict[str, Any], best: bool) -> None:
    """checkpoint-best (when this epoch is the best so far) and config.json, before train_state.pt records it."""
    if not D.is_main():
        return
    if best:
        meta = {"epoch": run.epoch, "global_step": run.global_step, "val_top1": run.best_top1}
        _save_weights(run.out / "checkpoint-best.safetensors", run.model, meta)
    write_json(run.out / "config.json", _model_config(loaded, classes, run_record))


def _write_reports(run: _Run, loaded: LoadedModel) -> None:
    """history.csv and training.png."""
    if not D.is_main():
        return
    history = _history_frame(run.history)
    atomic_write(run.out / "history.csv", lambda p: history.to_csv(p, index=False))
    save_figure(
        plot_training(history, f"{loaded.name} · losses: {', '.join(run.cfg.losses) or 'none'}"),
        run.out / "training.png",
    )


# -- the command ---------------------------------------------------------------------------------------------------
def finetune(
    model: str,
    train_dir: str | Path,
    out: str | Path,
    config: FinetuneConfig | None = None,
    *,
    val_dir: str | Path | None = None,
    arch: str | None = None,
    pretrained: bool = False,
    model_args: dict[str, Any] | None = None,
    strict_load: bool = True,
    trust_checkpoint: bool = False,
    device: str = "auto",
    workers: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
) -> FinetuneResult:
    """Fine-tune a timm ViT with cross-entropy plus the patch-diversification losses and measure it before and after.

    Args:
        model: timm model name, checkpoint file or folder (as for ``measure``).
        train_dir: ImageFolder root ``train_dir/<class>/<image>``; classes sorted by name.
        out: run folder (with ``resume``: the folder of the run to continue).
        config: training options (see :class:`FinetuneConfig`).
        val_dir: validation ImageFolder with the same classes; without it ``config.val_split`` is held out.
        arch, pretrained, model_args, strict_load, trust_checkpoint: see :func:`~oversmooth_cli.models.load_model`.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (under torchrun: this rank's CUDA device).
        workers: DataLoader worker processes.
        resume: continue the run saved in ``out`` (same options) from its last checkpoint.
        overwrite: replace the outputs of an earlier run in a non-empty ``out``.
        on_step: called after every optimizer step with the running loss terms.
        on_epoch: called with each history row.
        log: called with notes for the user (e.g. a classifier head reset).
        command: the command line to record in ``before/`` and ``after/``.

    Returns:
        A :class:`FinetuneResult` (``interrupted`` when Ctrl-C stopped it after saving a resumable checkpoint).
    """
    cfg = validate_config(config or FinetuneConfig(), needs_val_split=val_dir is None)
    say = log or (lambda _msg: None)
    dev = resolve_device(device)
    if D.init_from_env(dev) and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    out = Path(out)
    classes, train_samples, val_samples = prepare_data(train_dir, val_dir, cfg.val_split, cfg.seed)
    run_record = {
        "model": model,
        "arch": arch,
        "pretrained": pretrained,
        "model_args": dict(model_args or {}),
        "train_dir": str(Path(train_dir).expanduser().resolve()),
        "val_dir": str(Path(val_dir).expanduser().resolve()) if val_dir is not None else None,
        "config": asdict(cfg),
    }
    state = _load_state(out) if resume else None
    if state is not None:
        _check_same_run(state["run"], run_record, out)
    elif D.is_main():
        _check_out(out, overwrite)

    _seed_everything(cfg.seed)
    load_kwargs = {
        "arch": arch,
        "pretrained": pretrained,
        "model_args": model_args,
        "strict": strict_load,
        "trust_checkpoint": trust_checkpoint,
    }
    loaded, notes = _build_model(model, len(classes), cfg, load_kwargs)
    for note in notes:
        say(note)
    net_module = loaded.model.to(dev)
    try:
        adapter = resolve_adapter(net_module)
    except UnsupportedModelError as e:
        raise UserError(str(e)) from e
    if "token" in cfg.losses and adapter.name not in L.TOKEN_HEAD_PATHS:
        raise UserError(
            f"--loss token has no per-token head for {adapter.name} models (supported: "
            f"{', '.join(L.TOKEN_HEAD_PATHS)}); use --loss cos,cons"
        )
    patch, n_patches = _patch_grid(net_module, loaded.data_config) if cfg.losses or cfg.use_cutmix else (None, None)
    if state is None and D.is_main():
        _prepare_out(out)

    world, rank = D.world_size(), D.rank()
    train_set = LabelledImages(train_samples, train_transform(loaded.data_config, cfg), seed=cfg.seed)
    val_set = LabelledImages(val_samples[rank::world], build_transform(loaded.data_config))
    val_loader = DataLoader(
        val_set,
        batch_size=cfg.batch_size,
        num_workers=workers,
        worker_init_fn=_ignore_sigint,
        generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG alone
    )
    batches = math.ceil(math.ceil(len(train_samples) / world) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches / cfg.accum_steps)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    from timm.optim import param_groups_weight_decay

    no_decay = net_module.no_weight_decay() if hasattr(net_module, "no_weight_decay") else ()
    optimizer = torch.optim.AdamW(param_groups_weight_decay(net_module, cfg.weight_decay, no_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup_steps, cfg.min_lr / cfg.lr))
    mix_rng = random.Random(0)
    val_paths = [p for p, _ in val_samples]
    before_layers = None
    if state is not None:
        from safetensors.torch import load_file

        net_module.load_state_dict(load_file(str(out / "checkpoint-last.safetensors"), device=str(dev)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if (out / "before").is_dir():
            before_layers = read_layers(out / "before")
    net = (
        nn.parallel.DistributedDataParallel(net_module, device_ids=[dev.index] if dev.type == "cuda" else None)
        if world > 1
        else net_module
    )
    run = _Run(
        cfg=cfg,
        out=out,
        model=net_module,
        net=net,
        adapter=adapter,
        num_classes=len(classes),
        device=dev,
        optimizer=optimizer,
        scheduler=scheduler,
        mix_rng=mix_rng,
        patch=patch,
        n_patches=n_patches,
        steps_per_epoch=steps_per_epoch,
        last_lr=cfg.lr,
    )
    if state is not None:
        run.epoch, run.step, run.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        run.history, run.best_top1, run.best_epoch = list(state["history"]), state["best_top1"], state["best_epoch"]
        run.last_lr = state["last_lr"]
        if run.step and state["world_size"] == world:
            _set_rng_state(state["ranks"][rank]["rng"], mix_rng)
            run.sums = state["ranks"][rank]["sums"].clone()
        elif run.step:
            say(f"resuming mid-epoch with {world} processes instead of {state['world_size']}: not bit-identical")
        say(f"resuming {out} at epoch {run.epoch + 1}, step {run.step} of {steps_per_epoch}")
    if before_layers is None:
        before = measure(
            loaded, val_paths, device=str(dev), batch_size=cfg.batch_size, workers=workers, amp=cfg.amp, command=command
        )
        before_layers = before.layers
        if D.is_main():
            write_run(before, out / "before", overwrite=True)

    with _StopRequest() as stop:
        if stop.requested:
            raise KeyboardInterrupt
        interrupted = _train(run, train_set, val_loader, loaded, classes, run_record, stop, workers, on_step, on_epoch)

    history = _history_frame(run.history)
    result = FinetuneResult(
        out, history, before_layers, None, run.best_epoch, run.best_top1 if run.best_epoch else None, notes=notes
    )
    if interrupted:
        result.interrupted, result.stopped_at = True, (run.epoch + 1, run.step)
        return result
    after = measure(
        loaded, val_paths, device=str(dev), batch_size=cfg.batch_size, workers=workers, amp=cfg.amp, command=command
    )
    result.after_layers = after.layers
    if D.is_main():
        write_run(after, out / "after", overwrite=True)
        title = f"{loaded.name} · {len(val_paths)} val images · losses: {', '.join(cfg.losses) or 'none'}"
        runs = compare_runs([out / "before", out / "after"], labels=["before", "after"])
        save_figure(plot_compare(runs, ci=True, title=title), out / "compare.png")
    return result


def _windows(loader: DataLoader, size: int) -> Iterator[list]:
    window: list = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _train(
    run: _Run,
    train_set: LabelledImages,
    val_loader: DataLoader,
    loaded: LoadedModel,
    classes: list[str],
    run_record: dict[str, Any],
    stop: _StopRequest,
    workers: int,
    on_step: Callable[[StepInfo], None] | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> bool:
    """The epoch loop from ``run.epoch`` / ``run.step``; returns True when stopped by Ctrl-C (state saved)."""
    cfg = run.cfg
    world, rank = D.world_size(), D.rank()
    while run.epoch < cfg.epochs:
        started = time.perf_counter()
        if run.step == 0:  # a fresh epoch: its randomness depends on (seed, epoch, rank) only
            _seed_everything(_derive(cfg.seed, "epoch", run.epoch, rank))
            run.mix_rng.seed(_derive(cfg.seed, "mix", run.epoch, rank))
            run.sums.zero_()
        train_set.epoch = run.epoch
        sampler = ShardSampler(
            len(train_set), cfg.seed, run.epoch, rank, world, skip=run.step * cfg.accum_steps * cfg.batch_size
        )
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=run.device.type == "cuda",
            worker_init_fn=_ignore_sigint,
            generator=torch.Generator().manual_seed(_derive(cfg.seed, "loader", run.epoch, rank)),
        )
        run.net.train()
        for window in _windows(loader, cfg.accum_steps):
            stopping = _train_window(run, window, stop)
            if on_step is not None:
                n = max(run.sums[0].item(), 1.0)
                running = {
                    k: run.sums[1 + i].item() / n for i, k in enumerate(run.keys) if k in ("total", "ce", *cfg.losses)
                }
                on_step(StepInfo(run.epoch + 1, cfg.epochs, run.step, run.steps_per_epoch, running))
            if stopping:
                _save_state(run, run_record)
                return True
        totals = _reduce(run.sums.clone())
        metrics = evaluate(run, val_loader)
        n = max(totals[0].item(), 1.0)
        mean = {k: totals[1 + i].item() / n for i, k in enumerate(run.keys)}
        row = {
            "epoch": run.epoch + 1,
            "lr": run.last_lr,
            "train_loss": mean["total"],
            "train_ce": mean["ce"],
            **{f"train_{t}": (mean[t] if t in cfg.losses else math.nan) for t in TERM_NAMES},
            **metrics,
            "cons_sim": cfg.cons_sim,
            "seconds": round(time.perf_counter() - started, 3),
        }
        run.history.append(row)
        best = metrics["val_top1"] > run.best_top1
        if best:
            run.best_top1, run.best_epoch = metrics["val_top1"], run.epoch + 1
        run.epoch, run.step = run.epoch + 1, 0
        run.sums.zero_()
        _write_best(run, loaded, classes, run_record, best)
        _save_state(run, run_record)
        _write_reports(run, loaded)
        if on_epoch is not None:
            on_epoch(row)
        if _reduce(torch.tensor([float(stop.requested)]), "max").item() > 0 and run.epoch < cfg.epochs:
            return True
    return False
