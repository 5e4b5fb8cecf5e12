"""Optional integrations of :class:`~oversmooth_cli.measuring.monitor.OversmoothingMonitor` with training frameworks.

Each lives in its own module and needs its extra; nothing is imported here, so ``oversmooth_cli`` itself never
needs them:

* :mod:`oversmooth_cli.integrations.lightning`: a PyTorch Lightning ``Callback`` that runs the monitor and logs
  each layer's metric to the trainer's loggers (``pip install 'oversmooth-cli[lightning]'``).
* :mod:`oversmooth_cli.integrations.tensorboard`: per (metric, layer) scalars and a layer x step heatmap image
  written with ``torch.utils.tensorboard`` (``pip install 'oversmooth-cli[tensorboard]'``).
"""

from __future__ import annotations

__all__ = ["metric_key", "missing_extra"]


def metric_key(metric: str, layer: int, prefix: str = "oversmooth") -> str:
    """The name of one metric at one layer, ``oversmooth/token_cosine/layer_03`` (layers sort as numbers): the
    TensorBoard scalar tag (:func:`~.tensorboard.scalar_tag`) and the key logged by the Lightning callback."""
    return f"{prefix}/{metric}/layer_{int(layer):02d}"


def missing_extra(module: str, extra: str, what: str) -> ImportError:
    """The one-line error for an integration whose optional dependency is not installed."""
    return ImportError(f"oversmooth_cli.integrations.{module} needs {what}: pip install 'oversmooth-cli[{extra}]'")
