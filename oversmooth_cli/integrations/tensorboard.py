"""TensorBoard curves of a monitor's history: one scalar per (metric, layer) and a layer x step heatmap image.

Example::

    from oversmooth_cli.integrations.tensorboard import TensorBoardWriter
    from oversmooth_cli.measuring.monitor import OversmoothingMonitor

    tb = TensorBoardWriter("runs/tb")
    mon = OversmoothingMonitor(model, "examples/images", every=100, on_measure=tb)
    ...  # training, calling mon.step(step)
    tb.close()

Scalars are tagged ``oversmooth/<metric>/layer_<NN>`` (the mean over the probe images) at the training step; at
every measured step the image ``oversmooth/heatmap`` shows :func:`~oversmooth_cli.plots.plot_monitor_heatmap` of
the history so far. Needs the ``tensorboard`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from . import missing_extra

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError as e:  # torch.utils.tensorboard needs the tensorboard package
    raise missing_extra("tensorboard", "tensorboard", "TensorBoard") from e
from ..measuring.monitor import MONITOR_COLUMNS
from ..plots import plot_monitor_heatmap
from . import metric_key as scalar_tag

__all__ = ["TensorBoardWriter", "scalar_tag"]


class TensorBoardWriter:
    """Writes each measurement of an :class:`~oversmooth_cli.measuring.monitor.OversmoothingMonitor` to TensorBoard.

    Pass it as the monitor's ``on_measure`` (it is called as ``writer(step, rows)``), or call it with rows of a
    saved ``monitor.csv``.

    Args:
        log_dir: folder of the event files, or a ``SummaryWriter`` to write into (e.g. a Lightning
            ``TensorBoardLogger``'s ``experiment``); a writer passed in is flushed, not closed, by :meth:`close`.
        heatmap_metrics: panels of the heatmap image (default: ``token_cosine`` and ``attention_std``).
        prefix: first part of every tag.
    """

    def __init__(
        self,
        log_dir: str | Path | SummaryWriter,
        heatmap_metrics: Sequence[str] | None = None,
        prefix: str = "oversmooth",
    ) -> None:
        self._owned = not isinstance(log_dir, SummaryWriter)
        self.writer: SummaryWriter = log_dir if isinstance(log_dir, SummaryWriter) else SummaryWriter(str(log_dir))
        self.heatmap_metrics, self.prefix = heatmap_metrics, prefix
        self._history: list[pd.DataFrame] = []

    def __call__(self, step: int, rows: pd.DataFrame) -> None:
        """Write one measurement: its scalars, then the heatmap of every measurement so far."""
        for metric, layer, mean in rows[["metric", "layer", "mean"]].itertuples(index=False):
            self.writer.add_scalar(scalar_tag(metric, layer, self.prefix), mean, step)
        self._history.append(rows[MONITOR_COLUMNS])
        history = pd.concat(self._history, ignore_index=True)
        if len(history):
            figure = plot_monitor_heatmap(history, self.heatmap_metrics, title=f"step {step}")
            self.writer.add_figure(f"{self.prefix}/heatmap", figure, step, close=True)
        self.writer.flush()

    def close(self) -> None:
        """Flush the event files; close the writer this object opened."""
        self.writer.flush()
        if self._owned:
            self.writer.close()
