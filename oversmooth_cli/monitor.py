"""Moved in 0.2: ``oversmooth_cli.monitor`` is now :mod:`oversmooth_cli.measuring.monitor`.

This alias keeps code written for 0.1 (and its README) working; it warns once and goes in 0.3.
"""

from __future__ import annotations

from ._moved import moved
from .measuring.monitor import *  # noqa: F403

moved(__name__, "oversmooth_cli.measuring.monitor")
