"""Exceptions the command line maps to exit codes (:mod:`oversmooth_cli.cli.app` is the one place that does), and the
one way a caught exception is quoted in a message: its first line."""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED_CHECK", "EXIT_INTERNAL", "UserError", "first_line"]


EXIT_FAILED_CHECK = 1


EXIT_BAD_INPUT = 2


EXIT_INTERNAL = 3
"""A bug in oversmooth, never a failed check: CI can tell the two apart."""


class UserError(Exception):
    """Bad input from the user: the message is one line saying what is wrong and how to fix it (exit code 2)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its first sentence when long), or its type when it has none."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    first = lines[0]
    if len(first) > 160 and ". " in first:
        first = first.split(". ", 1)[0]
    return first
