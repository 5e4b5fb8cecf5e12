"""Reading a model: loading it, the family registry and its entries, token heads, where attention is read (the
readers), how its probabilities are computed (the attention tap and kernel), token geometry, the capture that hooks it
all into one forward pass, and a small model of every family (for the tests and the compatibility table).

Importing the package fills the family registry (:mod:`.families` registers every entry into :mod:`.registry`, as
timm's ``models/__init__`` imports its family files); the registry never imports its entries.
"""

from __future__ import annotations

from . import families  # noqa: F401  (fills the registry)
