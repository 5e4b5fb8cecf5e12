"""``FinetuneConfig``: every option that changes a fine-tuning run, each with its default, help text and constraint.

This is the one source of the finetune options: :func:`validate_config` checks a config from the field metadata,
and the ``finetune`` command builds one ``--option`` per field from it (so a default is written once). The module
imports nothing heavy, so the command line can read it at start-up without importing torch.

Field metadata:

* ``help``: the option's help text.
* ``flags``: its command-line declarations (default ``--field-name``), e.g. ``("--batch-size", "-b")``.
* ``check``: the constraint, ``">= 0"``, ``"> 0"``, ``">= 1"`` or an interval such as ``"in [0, 1)"``; a value
  that fails it is one :class:`~oversmooth_cli.errors.UserError` line naming the flag.
* ``when``: the check applies only in that case (said in the message).
* ``choices``: the allowed values of a text option.
* ``parse``: the command line gives text, parsed into the field's value by this function.
* ``show_default``: what ``--help`` shows instead of the default.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import UserError

__all__ = ["TERM_NAMES", "FinetuneConfig", "parse_losses", "validate_config"]

TERM_NAMES: tuple[str, ...] = ("cos", "cons", "token")
"""The loss terms ``--loss`` accepts, in the order they are applied and reported. Named here, where the command line
reads them without importing torch; :data:`~oversmooth_cli.training.losses.LOSS_TERMS` holds one entry per name."""


def parse_losses(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"cos,cons,token"`` -> ``("cos", "cons", "token")``; ``"none"`` -> ``()``; unknown names are an error."""
    names = TERM_NAMES
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text)]
    items = [p for p in items if p]
    choices = f"choose a comma-separated subset of {', '.join(names)}, or none"
    if not items:
        raise UserError(f"--loss is empty; {choices}")
    if "none" in items:
        if len(items) > 1:
            raise UserError(f"--loss none cannot be combined with other terms ({', '.join(items)}); {choices}")
        return ()
    unknown = [p for p in items if p not in names]
    if unknown:
        raise UserError(f"unknown loss {', '.join(repr(u) for u in unknown)} in --loss; {choices}")
    return tuple(t for t in names if t in items)


def _option(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class FinetuneConfig:
    """Everything that changes the result of a fine-tuning run (``--resume`` requires the same values).

    Each field's metadata holds its help text and constraint (see the module docstring); the ``w_<term>`` fields
    weigh the terms of :data:`~.losses.LOSS_TERMS`. The defaults are for fine-tuning a trained checkpoint and were
    chosen by a committed sweep (``benchmarks/defaults_sweep.py``, docs "Experiments"): with ``lr`` 1e-4, ``w_cos``
    1, and CutMix on every batch (``cutmix_prob`` 1: on a batch without CutMix ``l_token`` pulls every patch of an
    image towards one label, the opposite of diversification), 5 epochs of ``--control --hflip 0`` on the bundled
    digits model end with a last-layer token cosine well below the ``--loss none`` twin's in every seed, at the same
    val top-1. Training from scratch (the paper's setting) needs the from-scratch recipe instead.
    """

    val_split: float = _option(
        0.1,
        "Without --val-dir: stratified fraction of TRAIN_DIR held out.",
        check="in (0, 1)",
        when="no --val-dir is given",
    )
    losses: tuple[str, ...] = _option(
        ("cos", "cons", "token"),
        "Terms added to cross-entropy: any of cos,cons,token, or none (control run).",
        flags=("--loss",),
        parse=parse_losses,
    )
    w_cos: float = _option(1.0, "Weight of l_cos.", check=">= 0")
    w_cons: float = _option(0.5, "Weight of l_cons.", check=">= 0")
    w_token: float = _option(1.0, "Weight of l_token.", check=">= 0")
    cons_sim: str = _option(
        "cos", "l_cons similarity: cos (bounded) or dot (the paper's raw form).", choices=("cos", "dot")
    )
    cons_grad_first: bool = _option(False, "Let l_cons pass gradient into the first block's tokens too.")
    cutmix: bool | None = _option(
        None, "Patch CutMix.", flags=("--cutmix/--no-cutmix",), show_default="on when token is in --loss"
    )
    cutmix_prob: float = _option(1.0, "Chance of CutMix per batch.", check="in [0, 1]")
    cutmix_alpha: float = _option(1.0, "Kept area ~ Beta(alpha, alpha).", check="> 0")
    cutmix_snap: bool = _option(
        True, "Snap the CutMix box to the patch grid.", flags=("--cutmix-snap/--no-cutmix-snap",)
    )
    epochs: int = _option(10, "Training epochs.", check=">= 1")
    batch_size: int = _option(64, "Images per step and process.", check=">= 1", flags=("--batch-size", "-b"))
    lr: float = _option(1e-4, "Peak AdamW learning rate (for fine-tuning; from scratch: README).", check="> 0")
    min_lr: float = _option(1e-6, "Learning rate at the end of the cosine.", check=">= 0")
    weight_decay: float = _option(0.05, "AdamW weight decay (not on norms, biases, tokens).", check=">= 0")
    warmup_epochs: float = _option(0.5, "Linear warmup epochs.", check=">= 0")
    grad_clip: float = _option(1.0, "Gradient norm clip (0: off).", check=">= 0")
    label_smoothing: float = _option(0.1, "Label smoothing (image and patch targets).", check="in [0, 1)")
    drop_path: float = _option(0.0, "Stochastic depth rate.", check="in [0, 1)")
    accum_steps: int = _option(1, "Micro-batches per optimizer step.", check=">= 1")
    hflip: float = _option(0.5, "Horizontal flip chance of the timm train transform.", check="in [0, 1]")
    crop_scale: float = _option(0.9, "Smallest area of timm's random-resized crop.", check="in (0, 1]")
    amp: bool = _option(False, "bf16 autocast on CUDA (metrics stay float32).", flags=("--amp/--no-amp",))
    seed: int = _option(0, "Seed of every random draw.")

    @property
    def weights(self) -> dict[str, float]:
        """Weight of every loss term, by term name."""
        return {f.name[2:]: float(getattr(self, f.name)) for f in fields(self) if f.name.startswith("w_")}

    @property
    def use_cutmix(self) -> bool:
        return ("token" in self.losses) if self.cutmix is None else bool(self.cutmix)


_COMPARISONS = {">=": operator.ge, ">": operator.gt}


_INTERVAL = re.compile(r"in ([\[(])(\S+), (\S+)([\])])")


def _satisfies(value: float, check: str) -> bool:
    """Whether ``value`` meets a ``check`` of the field metadata (``">= 0"``, ``"in [0, 1)"``...)."""
    interval = _INTERVAL.fullmatch(check)
    if interval is None:
        op, bound = check.split()
        return _COMPARISONS[op](value, float(bound))
    left, lo, hi, right = interval.groups()
    above = value > float(lo) if left == "(" else value >= float(lo)
    below = value < float(hi) if right == ")" else value <= float(hi)
    return above and below


def validate_config(cfg: FinetuneConfig, needs_val_split: bool) -> FinetuneConfig:
    """Check every option against its field metadata; returns ``cfg`` with ``losses`` normalised.

    Args:
        cfg: the options.
        needs_val_split: no validation folder was given, so ``val_split`` is used (and checked).
    """
    cfg = replace(cfg, losses=parse_losses(list(cfg.losses)) if cfg.losses else ())
    for f in fields(cfg):
        flag, value, meta = f"--{f.name.replace('_', '-')}", getattr(cfg, f.name), f.metadata
        if "when" in meta and not needs_val_split:
            continue
        if "check" in meta and not _satisfies(value, meta["check"]):
            when = f" when {meta['when']}" if "when" in meta else ""
            raise UserError(f"{flag} must be {meta['check']}{when}, got {value}")
        if "choices" in meta and value not in meta["choices"]:
            raise UserError(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}")
    return cfg
