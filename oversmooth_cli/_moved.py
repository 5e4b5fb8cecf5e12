"""The one warning every 0.1 import path that moved in 0.2 gives (see the alias modules beside this one)."""

from __future__ import annotations

import warnings

__all__ = ["ALIASES", "moved"]

ALIASES = ("finetune", "losses", "models", "monitor", "report")
"""The 0.1 modules kept as aliases of their new homes (``oversmooth_cli.<name>``)."""


def moved(old: str, new: str) -> None:
    """Warn that ``old`` is an alias of ``new`` (a ``DeprecationWarning``, shown where the importing code runs)."""
    warnings.warn(
        f"{old} moved to {new} in oversmooth 0.2; import from there (or from oversmooth_cli); this alias goes in 0.3",
        DeprecationWarning,
        stacklevel=3,
    )
