"""Moved in 0.2: ``oversmooth_cli.losses`` is now :mod:`oversmooth_cli.training.losses`,
:mod:`oversmooth_cli.training.cutmix`, :mod:`oversmooth_cli.training.token_plan`.

This alias keeps code written for 0.1 (and its README) working; it warns once and goes in 0.3.
"""

from __future__ import annotations

from ._moved import moved
from .training.cutmix import *  # noqa: F403
from .training.losses import *  # noqa: F403
from .training.token_plan import *  # noqa: F403

moved(__name__, "oversmooth_cli.training.losses, oversmooth_cli.training.cutmix, oversmooth_cli.training.token_plan")
