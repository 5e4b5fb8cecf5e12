"""oversmooth: measure, fix and gate over-smoothing in timm Vision Transformers.

The command line (``oversmooth``) is a thin layer over these functions::

    from oversmooth_cli import MeasureConfig, measure, write_run
    result = measure("examples/digits-vit", "examples/images", MeasureConfig(device="cpu"))
    print(result.layers)

The package is laid out by purpose: ``reading`` (a model: loading, family registry, attention, capture), ``metrics``
(formulas, registry, accumulation), ``measuring`` (the measure run, its summary, the training monitor), ``training``
(losses, trainer, finetune), ``gate`` (check, baseline, compare), ``integrations`` (optional extras) and ``cli``; beside
them ``data`` (images), ``io`` (files), ``plots`` (figures), ``runtime`` (devices, processes) and ``errors``.

Names are imported lazily, so ``oversmooth --help`` does not pay for importing torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # measuring
    "measure": "measuring.run",
    "MeasureConfig": "measuring.config",
    "LoadOptions": "measuring.config",
    "MeasureResult": "measuring.summary",
    "write_run": "measuring.summary",
    "OversmoothingMonitor": "measuring.monitor",
    # reading a model
    "LoadedModel": "reading.loading",
    "load_model": "reading.loading",
    "OversmoothingCapture": "reading.capture",
    "ADAPTERS": "reading.registry",
    "register_adapter": "reading.registry",
    "resolve_adapter": "reading.registry",
    # metrics
    "METRICS_VERSION": "metrics.registry",
    "attention_std": "metrics.formulas",
    "token_cosine": "metrics.formulas",
    "OversmoothingAccumulator": "metrics.accumulate",
    # training (finetune() itself: oversmooth_cli.training.finetune)
    "FinetuneConfig": "training.config",
    "PatchDiversificationLoss": "training.losses",
    "patch_cutmix": "training.cutmix",
    "smooth_one_hot": "training.cutmix",
    # the gate
    "check_runs": "gate.check",
    "Tolerance": "gate.tolerances",
    "make_baseline": "gate.baseline",
    "compare_runs": "gate.compare",
    "load_run": "gate.runs",
    "UserError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
