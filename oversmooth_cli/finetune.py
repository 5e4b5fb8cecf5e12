"""Moved in 0.2: ``oversmooth_cli.finetune`` is now :mod:`oversmooth_cli.training.finetune`,
:mod:`oversmooth_cli.training.config`.

This alias keeps code written for 0.1 (and its README) working; it warns once and goes in 0.3.
"""

from __future__ import annotations

from ._moved import moved
from .training.config import FinetuneConfig, parse_losses
from .training.finetune import (
    CONTROL_OUTPUT_NAMES,
    MONITOR_IMAGES,
    OUTPUT_NAMES,
    TENSORBOARD_OUTPUT_NAMES,
    FinetuneResult,
    finetune,
)

__all__ = [
    "CONTROL_OUTPUT_NAMES",
    "MONITOR_IMAGES",
    "OUTPUT_NAMES",
    "TENSORBOARD_OUTPUT_NAMES",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "parse_losses",
]

moved(__name__, "oversmooth_cli.training.finetune, oversmooth_cli.training.config")
