"""Optional integrations of :class:`~oversmooth_cli.monitor.OversmoothingMonitor` with training frameworks.

Each lives in its own module and needs its extra; nothing is imported here, so ``oversmooth_cli`` itself never
needs them:

* :mod:`oversmooth_cli.integrations.lightning`: a PyTorch Lightning ``Callback`` that runs the monitor and logs
  each layer's metric to the trainer's loggers (``pip install 'oversmooth-cli[lightning]'``).
* :mod:`oversmooth_cli.integrations.tensorboard`: per (metric, layer) scalars and a layer x step heatmap image
  written with ``torch.utils.tensorboard`` (``pip install 'oversmooth-cli[tensorboard]'``).
"""

from __future__ import annotations


def missing_extra(module: str, extra: str, what: str) -> ImportError:
    """The one-line error for an integration whose optional dependency is not installed."""
    return ImportError(f"oversmooth_cli.integrations.{module} needs {what}: pip install 'oversmooth-cli[{extra}]'")
