"""Reading a model: loading it, the family registry and its entries, token heads, how attention is read, the
attention kernel, token geometry, and the capture that hooks it all into one forward pass.

Importing the package fills the family registry (:mod:`.families` registers every entry into :mod:`.registry`, as
timm's ``models/__init__`` imports its family files); the registry never imports its entries.
"""

from __future__ import annotations

from . import families  # noqa: F401  (fills the registry)
