"""oversmooth: measure, fix and gate over-smoothing in timm Vision Transformers.

The command line (``oversmooth``) is a thin layer over these functions::

    from oversmooth_cli import measure, write_run
    result = measure("examples/digits-vit", "examples/images", device="cpu")
    print(result.layers)

Names are imported lazily, so ``oversmooth --help`` does not pay for importing torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "OversmoothingAccumulator": "accumulate",
    "ADAPTERS": "adapters",
    "register_adapter": "adapters",
    "resolve_adapter": "adapters",
    "OversmoothingCapture": "capture",
    "UserError": "errors",
    "MeasureResult": "measure",
    "measure": "measure",
    "write_run": "measure",
    "METRICS_VERSION": "metrics",
    "attention_std": "metrics",
    "token_cosine": "metrics",
    "LoadedModel": "models",
    "load_model": "models",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
