"""Exceptions the command line maps to exit codes (see ``cli.py``)."""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED_CHECK", "EXIT_INTERNAL", "UserError"]


EXIT_FAILED_CHECK = 1


EXIT_BAD_INPUT = 2


EXIT_INTERNAL = 3
"""A bug in oversmooth, never a failed check: CI can tell the two apart."""


class UserError(Exception):
    """Bad input from the user: the message is one line saying what is wrong and how to fix it (exit code 2)."""
