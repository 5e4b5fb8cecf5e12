"""Streaming, mergeable statistics over images: per-layer and per-head means, standard deviations and intervals.

Every state is a sum (count, sum, sum of squares in float64), so batches, shards and processes combine exactly and
memory stays constant in the number of images (torchmetrics' ``add_state(..., dist_reduce_fx="sum")`` pattern).

The 95% interval of a mean over ``N`` images uses Student's t with ``N - 1`` degrees of freedom and is clipped to the
metric's range (:mod:`~oversmooth_cli.metrics.intervals`); with one image none is claimed (``NaN``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .. import runtime
from .intervals import LEVEL, t_quantile
from .registry import metric_range

__all__ = ["Z_95", "OversmoothingAccumulator", "RunningMoments"]


Z_95 = 1.959963984540054
"""Two-sided 95% normal quantile: the limit of the Student-t quantile the intervals use as the image count grows."""


class RunningMoments:
    """Count, sum and sum of squares of a fixed-shape quantity, in float64, on the CPU.

    Constant memory whatever the number of samples. Two instances merge by adding their states, which
    is also how :meth:`OversmoothingAccumulator.all_reduce` combines processes.
    """

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.shape = tuple(shape)
        self.reset()

    def reset(self) -> None:
        """Back to no samples."""
        self.count = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(self.shape, dtype=torch.float64)
        self.sumsq = torch.zeros(self.shape, dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        """Add samples ``(N, *shape)``."""
        v = values.detach().to("cpu", torch.float64).reshape(-1, *self.shape)
        self.count += v.shape[0]
        self.sum += v.sum(dim=0)
        self.sumsq += v.pow(2).sum(dim=0)

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Add ``other``'s samples to these (the states add up); returns ``self``."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge moments of shape {other.shape} into {self.shape}")
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        return self

    def state(self) -> torch.Tensor:
        """All states as one flat float64 vector (for ``all_reduce``)."""
        return torch.cat([self.count.reshape(1), self.sum.reshape(-1), self.sumsq.reshape(-1)])

    def load_state(self, flat: torch.Tensor) -> None:
        """Set every state from a vector laid out as :meth:`state` returns it."""
        m = self.sum.numel()
        self.count = flat[0].clone()
        self.sum = flat[1 : 1 + m].reshape(self.shape).clone()
        self.sumsq = flat[1 + m : 1 + 2 * m].reshape(self.shape).clone()

    def compute(self, bounds: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
        """Mean, sample standard deviation over samples and the 95% interval of the mean.

        The interval is ``mean ± t(0.975, n - 1) · std / √n`` (Student's t), clipped to ``bounds`` (the metric's
        range, :attr:`~oversmooth_cli.metrics.registry.MetricDef.range`); ``NaN`` with one sample (none is claimed).
        """
        n = self.count
        if n < 1:
            nan = torch.full(self.shape, math.nan, dtype=torch.float64)
            return {"mean": nan, "std": nan, "ci95_low": nan, "ci95_high": nan, "n": n}
        mean = self.sum / n
        if n > 1:
            var = ((self.sumsq - n * mean.pow(2)) / (n - 1)).clamp_min(0.0)
            std = var.sqrt()
            half = t_quantile(0.5 + LEVEL / 2, float(n.item()) - 1.0) * std / n.sqrt()
        else:
            std = torch.zeros_like(mean)
            half = torch.full_like(mean, math.nan)
        low, high = mean - half, mean + half
        if bounds is not None:
            low, high = low.clamp_min(bounds[0]), high.clamp_max(bounds[1])  # NaN stays NaN
        return {"mean": mean, "std": std, "ci95_low": low, "ci95_high": high, "n": n}


class OversmoothingAccumulator:
    """Streaming per-layer statistics over images, keyed by ``(metric, layer)``.

    ``layers`` holds one scalar per image (the layer figure); ``heads`` holds one vector per image
    (one value per attention head). Every state is a sum, so batches, shards and processes combine
    exactly; memory is constant in the number of images.
    """

    def __init__(self) -> None:
        self.layers: dict[tuple[str, int], RunningMoments] = {}
        self.heads: dict[tuple[str, int], RunningMoments] = {}

    @property
    def n_images(self) -> int:
        """Images seen: the largest count of any layer statistic."""
        return int(max((m.count.item() for m in self.layers.values()), default=0))

    def update(self, layer_values: dict[tuple[str, int], torch.Tensor], head_values: dict | None = None) -> None:
        """Add one batch: ``{(metric, layer): (B,)}`` and optionally ``{(metric, layer): (B, H)}``."""
        for key, v in layer_values.items():
            self.layers.setdefault(key, RunningMoments()).update(v)
        for key, v in (head_values or {}).items():
            self.heads.setdefault(key, RunningMoments((v.shape[-1],))).update(v)

    def merge(self, other: OversmoothingAccumulator) -> OversmoothingAccumulator:
        """Add ``other``'s statistics to these, key by key; returns ``self``."""
        for mine, theirs in ((self.layers, other.layers), (self.heads, other.heads)):
            for key, m in theirs.items():
                mine.setdefault(key, RunningMoments(m.shape)).merge(m)
        return self

    def all_reduce(self) -> None:
        """Sum every state over the ranks of the default process group (no-op without one)."""
        if runtime.world_size() == 1:
            return
        # A rank that saw no image has no keys: agree on the union of keys and shapes first.
        mine = {
            "layers": {k: m.shape for k, m in self.layers.items()},
            "heads": {k: m.shape for k, m in self.heads.items()},
        }
        gathered = runtime.all_gather_objects(mine)
        for part in ("layers", "heads"):
            store = getattr(self, part)
            for other in gathered:
                for key, shape in other[part].items():
                    store.setdefault(key, RunningMoments(shape))
        ordered = [store[k] for store in (self.layers, self.heads) for k in sorted(store)]
        flat = runtime.all_reduce(torch.cat([m.state() for m in ordered]))
        offset = 0
        for m in ordered:
            size = m.state().numel()
            m.load_state(flat[offset : offset + size])
            offset += size

    def layer_rows(self) -> Iterable[dict]:
        """One row per ``(layer, metric)`` with mean, std, 95% CI (Student's t, clipped to the metric's range) and image
        count, sorted by metric then layer."""
        for (metric, layer), m in sorted(self.layers.items()):
            s = m.compute(metric_range(metric))
            yield {
                "layer": layer,
                "metric": metric,
                "mean": s["mean"].item(),
                "std": s["std"].item(),
                "ci95_low": s["ci95_low"].item(),
                "ci95_high": s["ci95_high"].item(),
                "n_images": int(s["n"].item()),
            }

    def head_rows(self) -> Iterable[dict]:
        """One row per ``(layer, metric, head)``."""
        for (metric, layer), m in sorted(self.heads.items()):
            s = m.compute(metric_range(metric))
            for h in range(m.shape[0]):
                yield {
                    "layer": layer,
                    "metric": metric,
                    "head": h,
                    "mean": s["mean"][h].item(),
                    "std": s["std"][h].item(),
                    "ci95_low": s["ci95_low"][h].item(),
                    "ci95_high": s["ci95_high"][h].item(),
                    "n_images": int(s["n"].item()),
                }
