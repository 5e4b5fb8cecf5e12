"""Over-smoothing metrics: pure tensor functions and streaming, mergeable accumulators.

Every formula lives here once. The capture code, the losses, the reports and ``check`` all call these
functions; the tests compare each one with a float64 brute-force loop.

Token metrics take patch tokens ``(..., n, d)`` and return one value per image ``(...)``.
Attention metrics take softmax attention rows ``(..., Q, K)`` and return one value per query row
``(..., Q)``; the caller averages rows into a per-head and a per-layer figure, which lets the capture
code compute them on chunks of queries without ever holding a full ``T x T`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ATTENTION_METRICS",
    "EPS",
    "METRICS_VERSION",
    "TOKEN_METRICS",
    "MetricDef",
    "OversmoothingAccumulator",
    "RunningMoments",
    "attention_row_std",
    "attention_std",
    "iter_attention_probs",
    "token_cosine",
]

METRICS_VERSION = "1"
"""Bumped whenever the definition of any metric changes; ``check`` refuses to compare across versions."""

EPS = 1e-8
"""Norm floor for L2 normalisation (a zero token has cosine 0 with everything)."""

Z_95 = 1.959963984540054
"""Two-sided 95% normal quantile used for the confidence interval of a mean over images."""


def _float(x: torch.Tensor) -> torch.Tensor:
    """Metric arithmetic is float32 or wider, whatever the model's autocast dtype."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_cosine(tokens: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Mean pairwise cosine similarity of distinct tokens, ``1/(n(n-1)) sum_{i != j} cos(h_i, h_j)``.

    Computed in O(n d) without an ``n x n`` matrix: with ``u_i = h_i / |h_i|`` and ``s = sum_i u_i``,
    ``sum_{i != j} u_i . u_j = |s|^2 - sum_i |u_i|^2``. Differentiable (the ``cos`` loss calls it).

    Args:
        tokens: ``(..., n, d)`` tokens of one image per leading index, ``n >= 2``.
        eps: floor for the norm of a token.

    Returns:
        ``(...)`` one similarity per image, in ``[-1/(n-1), 1]``.
    """
    x = _float(tokens)
    n = x.shape[-2]
    if n < 2:
        raise ValueError(f"token_cosine needs at least 2 tokens per image, got {n}")
    u = F.normalize(x, dim=-1, eps=eps)
    s = u.sum(dim=-2)
    pairs = s.pow(2).sum(dim=-1) - u.pow(2).sum(dim=(-2, -1))
    return pairs / (n * (n - 1))


def attention_row_std(probs: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of each attention row over its keys.

    Args:
        probs: ``(..., Q, K)`` softmax attention, each row summing to 1.

    Returns:
        ``(..., Q)``. A uniform row gives 0; a one-hot row gives ``sqrt(K - 1) / K``.
    """
    return _float(probs).std(dim=-1, correction=0)


def attention_std(probs: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of :func:`attention_row_std`: ``(..., Q, K) -> (...)`` (e.g. per image and head)."""
    return attention_row_std(probs).mean(dim=-1)


@dataclass(frozen=True)
class MetricDef:
    """A registered metric: its per-image (token) or per-row (attention) function and how to read it."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    kind: str  # "token" or "attention"
    definition: str
    higher_is_smoother: bool  # True: a rising curve means more over-smoothing


TOKEN_METRICS: dict[str, MetricDef] = {
    "token_cosine": MetricDef(
        "token_cosine",
        token_cosine,
        "token",
        "1/(n(n-1)) * sum_{i != j} cos(h_i, h_j) over the n patch tokens of one image, mean over images",
        higher_is_smoother=True,
    ),
}

ATTENTION_METRICS: dict[str, MetricDef] = {
    "attention_std": MetricDef(
        "attention_std",
        attention_row_std,
        "attention",
        "population std of each patch query's softmax attention row over all keys; mean over queries and "
        "heads, then over images",
        higher_is_smoother=False,
    ),
}


def iter_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_start: int = 0,
    bias: torch.Tensor | None = None,
    max_elements: int = 1 << 24,
) -> Iterator[torch.Tensor]:
    """Yield softmax attention rows ``softmax(q k^T * scale + bias)`` for chunks of queries, in float32.

    The full ``(B, H, Q, K)`` probability tensor never exists at once: each chunk holds at most about
    ``max_elements`` values. Autocast is switched off so the logits are float32 on every device.

    Args:
        q: ``(B, H, T, dh)`` queries, after any q-norm / rotary embedding the model applies.
        k: ``(B, H, S, dh)`` keys, likewise.
        scale: logit scale (``head_dim ** -0.5`` in timm).
        query_start: first query row to yield (e.g. ``num_prefix_tokens`` to skip class tokens).
        bias: optional additive logit bias broadcastable to ``(B, H, T, S)`` (relative position bias).
        max_elements: chunk budget in probability elements.

    Yields:
        ``(B, H, c, S)`` probabilities for consecutive query chunks covering rows ``query_start..T-1``.
    """
    B, H, T, _ = q.shape
    S = k.shape[-2]
    chunk = max(1, max_elements // max(1, B * H * S))
    with torch.autocast(device_type=q.device.type, enabled=False):
        kt = _float(k).transpose(-2, -1)
        for start in range(query_start, T, chunk):
            stop = min(T, start + chunk)
            logits = (_float(q[:, :, start:stop]) * scale) @ kt
            if bias is not None:
                logits = logits + _float(bias[..., start:stop, :])
            yield logits.softmax(dim=-1)


class RunningMoments:
    """Count, sum and sum of squares of a fixed-shape quantity, in float64, on the CPU.

    Constant memory whatever the number of samples. Two instances merge by adding their states, which
    is also how :meth:`OversmoothingAccumulator.all_reduce` combines processes.
    """

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.shape = tuple(shape)
        self.reset()

    def reset(self) -> None:
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
        m = self.sum.numel()
        self.count = flat[0].clone()
        self.sum = flat[1 : 1 + m].reshape(self.shape).clone()
        self.sumsq = flat[1 + m : 1 + 2 * m].reshape(self.shape).clone()

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean, sample standard deviation over samples and a normal-approximation 95% interval of the mean."""
        n = self.count
        if n < 1:
            nan = torch.full(self.shape, math.nan, dtype=torch.float64)
            return {"mean": nan, "std": nan, "ci95_low": nan, "ci95_high": nan, "n": n}
        mean = self.sum / n
        if n > 1:
            var = ((self.sumsq - n * mean.pow(2)) / (n - 1)).clamp_min(0.0)
            std = var.sqrt()
            half = Z_95 * std / n.sqrt()
        else:
            std = torch.zeros_like(mean)
            half = torch.full_like(mean, math.nan)
        return {"mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "n": n}


class OversmoothingAccumulator:
    """Streaming per-layer statistics over images, keyed by ``(metric, layer)``.

    ``layers`` holds one scalar per image (the layer figure); ``heads`` holds one vector per image
    (one value per attention head). Every state is a sum, so batches, shards and processes combine
    exactly; memory is constant in the number of images.
    """

    def __init__(self) -> None:
        self.layers: dict[tuple[str, int], RunningMoments] = {}
        self.heads: dict[tuple[str, int], RunningMoments] = {}

    def reset(self) -> None:
        self.layers.clear()
        self.heads.clear()

    @property
    def n_images(self) -> int:
        return int(max((m.count.item() for m in self.layers.values()), default=0))

    def update(self, layer_values: dict[tuple[str, int], torch.Tensor], head_values: dict | None = None) -> None:
        """Add one batch: ``{(metric, layer): (B,)}`` and optionally ``{(metric, layer): (B, H)}``."""
        for key, v in layer_values.items():
            self.layers.setdefault(key, RunningMoments()).update(v)
        for key, v in (head_values or {}).items():
            self.heads.setdefault(key, RunningMoments((v.shape[-1],))).update(v)

    def merge(self, other: OversmoothingAccumulator) -> OversmoothingAccumulator:
        for mine, theirs in ((self.layers, other.layers), (self.heads, other.heads)):
            for key, m in theirs.items():
                mine.setdefault(key, RunningMoments(m.shape)).merge(m)
        return self

    def all_reduce(self) -> None:
        """Sum every state over the ranks of the default process group (no-op without one)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        # A rank that saw no image has no keys: agree on the union of keys and shapes first.
        mine = {
            "layers": {k: m.shape for k, m in self.layers.items()},
            "heads": {k: m.shape for k, m in self.heads.items()},
        }
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        for part in ("layers", "heads"):
            store = getattr(self, part)
            for other in gathered:
                for key, shape in other[part].items():
                    store.setdefault(key, RunningMoments(shape))
        ordered = [store[k] for store in (self.layers, self.heads) for k in sorted(store)]
        flat = torch.cat([m.state() for m in ordered])
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flat = flat.to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
        offset = 0
        for m in ordered:
            size = m.state().numel()
            m.load_state(flat[offset : offset + size])
            offset += size

    def layer_rows(self) -> Iterable[dict]:
        """One row per ``(layer, metric)`` with mean, std, 95% CI and image count, sorted by metric then layer."""
        for (metric, layer), m in sorted(self.layers.items()):
            s = m.compute()
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
            s = m.compute()
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
