"""A PyTorch Lightning ``Callback`` that runs an :class:`~oversmooth_cli.measuring.monitor.OversmoothingMonitor` during
``Trainer.fit`` and logs each layer's metric to the trainer's loggers.

Example::

    from oversmooth_cli.integrations.lightning import OversmoothingCallback

    trainer = L.Trainer(max_steps=1000, callbacks=[OversmoothingCallback("examples/images", every=100)])
    trainer.fit(lit_module, loader)   # lit_module.model is the timm model
    callback.history                  # the monitor's table

The probe is measured before the first step (step 0) and whenever ``trainer.global_step`` (optimizer steps done) is
a multiple of ``every``; each value is logged as ``oversmooth/<metric>/layer_<NN>`` at that step, through
``logger.log_metrics`` of every logger of the trainer (TensorBoard, CSV, W&B, ...). Under a multi-process strategy
only rank 0 measures and logs, and no collective runs. The history is part of the callback's state in Lightning
checkpoints, so a ``Trainer.fit(..., ckpt_path=...)`` that resumes continues it; a trainer without a logger gets one
warning (the values are still in ``callback.history``). Needs the ``lightning`` extra (``lightning.pytorch``; the
older ``pytorch_lightning`` package is used when it is the one installed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from . import missing_extra

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise missing_extra("lightning", "lightning", "PyTorch Lightning") from e
from ..data import find_images
from ..errors import UserError
from ..measuring.config import MeasureConfig
from ..measuring.monitor import MONITOR_COLUMNS, MonitorWarning, OnMeasure, OversmoothingMonitor
from ..metrics.registry import parse_metrics
from . import metric_key

__all__ = ["OversmoothingCallback", "metric_key"]


class OversmoothingCallback(pl.Callback):
    """Runs an :class:`~oversmooth_cli.measuring.monitor.OversmoothingMonitor` on the trained model and logs its values.

    Args:
        probe: as the monitor's: an image batch, or a folder / image / list file / list of paths. A path is
            checked here; the images are decoded with the model's data config when fitting starts.
        every: measure when ``trainer.global_step`` is a multiple of ``every`` (and before the first step).
        config: what to measure, as the monitor's (:class:`~oversmooth_cli.measuring.config.MeasureConfig`:
            ``metrics``, ``batch_size``, ``attention_tap``, ``include_prefix``).
        model: the timm model: an attribute name of the LightningModule, a module, or a function of the
            LightningModule; default: its ``model`` attribute when it has one, else the LightningModule itself.
        prefix: first part of every logged name.
        **monitor_kwargs: more :class:`~oversmooth_cli.measuring.monitor.OversmoothingMonitor` arguments
        (``data_config``,
            ``on_measure``).
    """

    def __init__(
        self,
        probe: torch.Tensor | str | Path | Sequence[str | Path],
        every: int = 100,
        config: MeasureConfig | None = None,
        *,
        model: str | nn.Module | Callable[[pl.LightningModule], nn.Module] | None = None,
        prefix: str = "oversmooth",
        **monitor_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(probe, (str, Path)):
            find_images(probe)  # a missing or empty probe is an error now, not when fitting starts
        if every < 1:
            raise UserError(f"the monitor's every must be at least 1 step, got {every}")
        config = config or MeasureConfig()
        self.metrics = parse_metrics(config.metrics)  # an unknown metric is an error now, not when fitting starts
        self.probe, self.every, self.config = probe, every, replace(config, metrics=self.metrics)
        self.model, self.prefix, self.monitor_kwargs = model, prefix, monitor_kwargs
        self.monitor: OversmoothingMonitor | None = None
        self._trainer: pl.Trainer | None = None
        self._restored: pd.DataFrame | None = None  # the history of a checkpoint, until the monitor exists
        self._warned_no_logger = False

    @property
    def history(self) -> pd.DataFrame:
        """The monitor's history (empty before fitting and on ranks other than 0)."""
        return self.monitor.history if self.monitor is not None else pd.DataFrame(columns=MONITOR_COLUMNS)

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        if isinstance(self.model, str):
            return getattr(pl_module, self.model)
        if isinstance(self.model, nn.Module):
            return self.model
        if callable(self.model):
            return self.model(pl_module)
        inner = getattr(pl_module, "model", None)
        return inner if isinstance(inner, nn.Module) else pl_module

    def _log(self, step: int, rows: pd.DataFrame) -> None:
        values = {
            metric_key(metric, layer, self.prefix): float(mean)
            for metric, layer, mean in rows[["metric", "layer", "mean"]].itertuples(index=False)
        }
        loggers = self._trainer.loggers if self._trainer is not None else []
        if not loggers and not self._warned_no_logger:
            self._warned_no_logger = True
            warnings.warn(
                "OversmoothingCallback: the trainer has no logger (logger=False), so nothing is logged; the values "
                "are kept in callback.history",
                MonitorWarning,
                stacklevel=2,
            )
        for logger in loggers:
            logger.log_metrics(values, step=step)

    def state_dict(self) -> dict[str, Any]:
        """The history so far, saved in Lightning checkpoints (a resumed ``Trainer.fit`` continues it)."""
        history = self.history if self.monitor is not None else self._restored
        records = [] if history is None else history[MONITOR_COLUMNS].to_dict("records")
        return {"history": records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the history of a checkpoint (:meth:`state_dict`); the steps it holds are not measured again."""
        history = pd.DataFrame(state_dict.get("history", []), columns=MONITOR_COLUMNS)
        if self.monitor is not None:
            self.monitor.load_history(history)
        else:
            self._restored = history

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self.monitor is None:
            extra = self.monitor_kwargs.get("on_measure", ())
            sinks: list[OnMeasure] = [self._log, *([extra] if callable(extra) else extra)]
            kwargs = {**self.monitor_kwargs, "on_measure": sinks}
            self.monitor = OversmoothingMonitor(self._model(pl_module), self.probe, self.every, self.config, **kwargs)
        if self._restored is not None:
            self.monitor.load_history(self._restored)
            self._restored = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._monitor().step(trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._monitor().step(trainer.global_step)

    def _monitor(self) -> OversmoothingMonitor:
        if self.monitor is None:
            raise RuntimeError("OversmoothingCallback used before Lightning called its setup()")
        return self.monitor
