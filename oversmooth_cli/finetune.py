"""Moved in 0.2: ``oversmooth_cli.finetune`` is now :mod:`oversmooth_cli.training.finetune`,
:mod:`oversmooth_cli.training.config`.

This alias keeps code written for 0.1 (and its README) working; it warns once and goes in 0.3.
"""

from __future__ import annotations

from ._moved import moved
from .training.config import *  # noqa: F403
from .training.finetune import *  # noqa: F403

moved(__name__, "oversmooth_cli.training.finetune, oversmooth_cli.training.config")
