"""Moved in 0.2: ``oversmooth_cli.models`` is now :mod:`oversmooth_cli.reading.loading`,
:mod:`oversmooth_cli.reading.checkpoints`.

This alias keeps code written for 0.1 (and its README) working; it warns once and goes in 0.3.
"""

from __future__ import annotations

from ._moved import moved
from .errors import first_line as one_line_reason  # noqa: F401  (0.1's name)
from .reading.checkpoints import *  # noqa: F403
from .reading.loading import *  # noqa: F403

moved(__name__, "oversmooth_cli.reading.loading, oversmooth_cli.reading.checkpoints")
