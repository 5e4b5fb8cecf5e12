"""Watch over-smoothing while any training loop runs: :class:`OversmoothingMonitor` measures a fixed probe every
``every`` steps and keeps a small tidy table.

The metric pass is :func:`~oversmooth_cli.measuring.run.measure_batches`, the one ``measure`` runs, on the probe's
images preprocessed as ``measure`` preprocesses them (the model's own eval transform), so the history at a step equals
``measure`` of the same weights on the same images. Between training steps the monitor runs the pass in eval mode,
without gradients and without autocast, then puts back exactly what it found: the train/eval flag of every module,
the Python, NumPy, torch CPU and CUDA generator states, the autocast and grad modes. Training with the monitor
therefore reaches bit-identical weights and optimizer state to training without it.

Several processes (``torchrun``, DDP): only rank 0 measures; the others return at once. The monitor runs no
collective: a DDP-wrapped model is unwrapped (``.module``) and its trunk called directly, since DDP's own forward
broadcasts buffers and would wait for ranks that are not measuring.

Example::

    mon = OversmoothingMonitor(model, "examples/images", every=100)
    for step, (x, y) in enumerate(loader):
        ...  # forward, backward, optimizer step
        mon.step(step)
    mon.history.to_csv("monitor.csv", index=False)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .. import runtime
from ..data import build_loader, find_images
from ..errors import UserError, first_line
from ..metrics.registry import parse_metrics
from ..reading.loading import LoadedModel, resolve_data_config
from ..reading.readers import UnsupportedModelError
from ..reading.registry import resolve_adapter
from .config import MeasureConfig
from .run import measure_batches
from .summary import layer_table

__all__ = [
    "MONITOR_COLUMNS",
    "MonitorWarning",
    "OversmoothingMonitor",
    "check_probe",
    "load_probe",
    "preserved_state",
    "unwrap_model",
]


MONITOR_COLUMNS = ["step", "layer", "stage", "metric", "mean", "std", "ci95_low", "ci95_high", "n_images"]
"""``monitor.csv`` / :attr:`OversmoothingMonitor.history`: one row per measured step, metric and layer."""


OnMeasure = Callable[[int, pd.DataFrame], None]
"""``on_measure(step, rows)``: called with the new :data:`MONITOR_COLUMNS` rows after every measurement."""


class MonitorWarning(UserWarning):
    """The monitor measured less than asked (a metric the model cannot give) or failed at a step (training goes on)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module itself under DistributedDataParallel / DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(compiled := getattr(model, "_orig_mod", None), nn.Module):
            model = compiled
        else:
            return model


def _device(model: nn.Module) -> torch.device:
    return next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device


def _process_rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK`` (before the group is joined), else 0."""
    return runtime.rank() if runtime.is_distributed() else int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def _same_rng() -> Iterator[None]:
    """The Python, NumPy, torch CPU and CUDA generator states after the block are those before it."""
    rng = runtime.rng_state()
    try:
        yield
    finally:
        runtime.set_rng_state(rng)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Inside: ``model`` in eval mode, autocast off on its device. After: every module's train/eval flag, the
    Python / NumPy / torch CPU / CUDA generator states and the grad mode exactly as they were (autocast's own
    context restores its state)."""
    modes = [(m, m.training) for m in model.modules()]
    grad = torch.is_grad_enabled()
    try:
        with _same_rng():
            model.eval()
            with torch.autocast(_device(model).type, enabled=False):
                yield
    finally:
        for m, training in modes:
            m.training = training
        torch.set_grad_enabled(grad)


def load_probe(
    probe: torch.Tensor | str | Path | Sequence[str | Path], data_config: dict[str, Any], batch_size: int = 32
) -> torch.Tensor:
    """The probe as one ``(N, C, H, W)`` float tensor on the CPU (the global random generators are left as found).

    Args:
        probe: a batch of preprocessed images, or a folder / image / list file / list of paths, decoded and
            transformed as ``measure`` does it (:func:`~oversmooth_cli.data.build_loader`, the model's eval transform).
        data_config: the model's resolved data config.
        batch_size: images decoded at a time.

    Raises:
        UserError: an empty probe, a tensor that is not an image batch, a missing path, or an unreadable image.
    """
    if isinstance(probe, torch.Tensor):
        if probe.dim() != 4 or probe.shape[0] == 0 or not probe.is_floating_point():
            raise UserError(
                f"the probe tensor must be a non-empty float image batch (N, C, H, W); got {probe.dtype} "
                f"of shape {tuple(probe.shape)}"
            )
        return probe.detach().to("cpu", copy=True)
    paths = [Path(p) for p in probe] if isinstance(probe, (list, tuple)) else find_images(Path(str(probe)))
    if not paths:
        raise UserError("the probe names no images; give a folder, an image, a list file or an image batch")
    images: list[torch.Tensor] = []
    with _same_rng():  # a DataLoader draws its base seed from the global generator
        for batch, _indices, failures in build_loader(paths, data_config, batch_size):
            if failures:
                i, err = failures[0]
                raise UserError(f"cannot read probe image {paths[i]}: {err}; fix or remove it (the probe is fixed)")
            images.append(batch)
    return torch.cat(images)


def check_probe(model: nn.Module, images: torch.Tensor, data_config: dict[str, Any]) -> None:
    """Refuse a probe the model cannot take, once, before training: its channels (the data config's), its dtype (the
    model's parameters'), and its image size and batch (one forward pass of the first image, gradients off, every
    state the monitor restores restored).

    Raises:
        UserError: one line saying what does not fit and what the model takes.
    """
    name, shape = type(model).__name__, tuple(images.shape)
    expected = tuple(data_config.get("input_size") or ())
    takes = f"images of shape (N, {', '.join(map(str, expected))})" if len(expected) == 3 else "its own input size"
    if len(expected) == 3 and shape[1] != expected[0]:
        raise UserError(f"the probe has {shape[1]} channels (shape {shape}); {name} takes {takes}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), images.dtype)
    if images.dtype != dtype:
        raise UserError(f"the probe is {images.dtype} but {name} computes in {dtype}; give probe.to({dtype})")
    try:
        with preserved_state(model), torch.no_grad():
            model(images[:1].to(_device(model)))
    except Exception as e:  # the model's own error: a wrong image size, a batch it cannot take...
        raise UserError(
            f"the probe of shape {shape} does not fit {name} ({type(e).__name__}: {first_line(e)[:200]}); give {takes}"
        ) from e


class OversmoothingMonitor:
    """Measures layer-wise over-smoothing on a fixed probe every ``every`` training steps.

    Example:
        >>> mon = OversmoothingMonitor(model, "examples/images", every=100)
        >>> for step, (x, y) in enumerate(loader):
        ...     ...  # the loop's own forward, backward, optimizer step
        ...     mon.step(step)  # measures the probe when step % every == 0
        >>> mon.history  # step, layer, stage, metric, mean, std, ci95_low, ci95_high, n_images

    Args:
        model: any model ``measure`` supports (a DDP / ``torch.compile`` wrapper is unwrapped), or a
            :class:`~oversmooth_cli.reading.loading.LoadedModel`. It is read, never changed; the pass runs on its
            device.
        probe: an image batch ``(N, C, H, W)`` already preprocessed for the model, or a folder / image / list file /
            list of paths, decoded and transformed with the model's data config as ``measure`` does.
        every: measure at the steps that are multiples of ``every``.
        config: what to measure, as for ``measure`` (:class:`~oversmooth_cli.measuring.config.MeasureConfig`); the
            monitor reads its ``metrics`` (default ``token_cosine,attention_std``), ``batch_size`` (probe images per
            forward pass), ``attention_tap`` and ``include_prefix``, and runs on the model's device without autocast.
        data_config: preprocessing of a path probe (default: the model's, as ``measure`` resolves it).
        on_measure: called as ``fn(step, rows)`` with each measurement's new rows (e.g. a
            :class:`~oversmooth_cli.integrations.tensorboard.TensorBoardWriter`); its errors are handled like the
            monitor's own.

    Raises:
        UserError: at construction, for an empty or unreadable probe, a probe the model cannot take (channels,
            dtype, image size: :func:`check_probe`), an unknown metric, ``every < 1``, or a model family that cannot
            be measured.

    Faults never stop training: a metric the model cannot give is left out with one :class:`MonitorWarning` line
    (:attr:`unavailable` says why), and an exception inside :meth:`step` is reported once as a
    :class:`MonitorWarning` (every failure is kept in :attr:`errors`) while training goes on.
    """

    def __init__(
        self,
        model: nn.Module | LoadedModel,
        probe: torch.Tensor | str | Path | Sequence[str | Path],
        every: int = 100,
        config: MeasureConfig | None = None,
        *,
        data_config: dict[str, Any] | None = None,
        on_measure: OnMeasure | Sequence[OnMeasure] = (),
    ) -> None:
        if isinstance(model, LoadedModel):
            data_config = data_config or model.data_config
            model = model.model
        config = config or MeasureConfig()
        batch_size = config.batch_size
        if every < 1:
            raise UserError(f"the monitor's every must be at least 1 step, got {every}")
        if batch_size < 1:
            raise UserError(f"the monitor's batch_size must be at least 1, got {batch_size}")
        self.model = unwrap_model(model)
        try:
            resolve_adapter(self.model)
        except UnsupportedModelError as e:
            raise UserError(str(e)) from e
        self.every = int(every)
        self.metrics = parse_metrics(config.metrics)
        self.config = replace(config, metrics=self.metrics, amp=False, channels_last=False, compile=False)
        self.data_config = data_config or resolve_data_config(self.model)
        self.batch_size = batch_size
        self.images = load_probe(probe, self.data_config, batch_size)
        check_probe(self.model, self.images, self.data_config)
        self.on_measure = [on_measure] if callable(on_measure) else list(on_measure)
        self.unavailable: dict[str, str] = {}
        self.errors: list[tuple[int, str]] = []
        self.seconds = 0.0
        self._rows: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._warned_unavailable = self._warned_error = False

    @property
    def n_images(self) -> int:
        """Images in the probe."""
        return int(self.images.shape[0])

    @property
    def active(self) -> bool:
        """This process measures: always in one process, rank 0 only under ``torchrun``."""
        return _process_rank() == 0

    @property
    def history(self) -> pd.DataFrame:
        """Every measurement so far, one row per step, metric and layer (:data:`MONITOR_COLUMNS`)."""
        return pd.DataFrame(self._rows, columns=MONITOR_COLUMNS)

    def load_history(self, history: pd.DataFrame) -> None:
        """Continue an earlier run's history (e.g. a resumed training run's ``monitor.csv``)."""
        self._rows = history[MONITOR_COLUMNS].to_dict("records")
        self._last_step = int(history["step"].max()) if len(history) else None

    def due(self, step: int) -> bool:
        """Whether :meth:`step` measures at ``step`` (a multiple of ``every``, not measured yet, rank 0)."""
        return step % self.every == 0 and step != self._last_step and self.active

    def step(self, step: int) -> pd.DataFrame | None:
        """Measure the probe when ``step`` is due (see :meth:`due`); never raises.

        Returns:
            The new rows, or ``None`` when nothing was measured (not due, another rank, or a failure, reported once
            as a :class:`MonitorWarning`).
        """
        if not self.due(step):
            return None
        try:
            return self.measure(step)
        except Exception as e:  # the training loop must go on, whatever happens here
            message = f"{type(e).__name__}: {first_line(e)[:300]}"
            self.errors.append((step, message))
            if not self._warned_error:
                self._warned_error = True
                warnings.warn(
                    f"oversmooth monitor failed at step {step} ({message}); training continues, and later "
                    "failures are kept in monitor.errors without a warning",
                    MonitorWarning,
                    stacklevel=2,
                )
            return None

    def measure(self, step: int) -> pd.DataFrame:
        """Measure the probe now and record it under ``step`` (raises on failure, unlike :meth:`step`).

        Returns:
            The new :data:`MONITOR_COLUMNS` rows.
        """
        started = time.perf_counter()
        self._last_step = step
        model = self.model
        with preserved_state(model):
            device = _device(model)
            chunks = self.images.split(self.batch_size)
            batches: Iterator[tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]]
            batches = ((x, list(range(len(x))), []) for x in chunks)
            result = measure_batches(model, batches, device, self.config, inference=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        rows = layer_table(result).assign(step=step)[MONITOR_COLUMNS]
        self._note_unavailable(result.unavailable, rows)
        self._rows.extend(rows.to_dict("records"))
        self.seconds += time.perf_counter() - started
        for fn in self.on_measure:
            fn(step, rows)
        return rows

    def _note_unavailable(self, unavailable: dict[str, str], rows: pd.DataFrame) -> None:
        """One warning line, the first time, for selected metrics the model cannot give."""
        self.unavailable.update(unavailable)
        missing = [m for m in self.metrics if m not in set(rows["metric"])]
        if self._warned_unavailable or not missing:
            return
        self._warned_unavailable = True
        why = "; ".join(f"{m}: {self.unavailable.get(m, 'no layer gave a value')}" for m in missing)
        kept = ", ".join(m for m in self.metrics if m not in missing) or "nothing"
        warnings.warn(
            f"oversmooth monitor: {type(self.model).__name__} cannot give {why}; monitoring {kept}",
            MonitorWarning,
            stacklevel=3,
        )
