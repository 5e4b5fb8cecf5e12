"""Moved in 0.2: ``oversmooth_cli.report`` is now :mod:`oversmooth_cli.io`, :mod:`oversmooth_cli.gate.runs`,
:mod:`oversmooth_cli.metrics.registry`, :mod:`oversmooth_cli.plots`.

This alias keeps code written for 0.1 (and its README) working; it warns once and goes in 0.3.
"""

from __future__ import annotations

from ._moved import moved
from .gate.runs import *  # noqa: F403
from .io import *  # noqa: F403
from .metrics.registry import *  # noqa: F403
from .plots import *  # noqa: F403

moved(__name__, "oversmooth_cli.io, oversmooth_cli.gate.runs, oversmooth_cli.metrics.registry, oversmooth_cli.plots")
