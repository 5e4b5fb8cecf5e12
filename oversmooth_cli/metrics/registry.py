"""The metric registry: every metric's definition, range, direction and default tolerance (:class:`MetricDef`), the
presets, and :func:`parse_metrics`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from .formulas import (
    attention_column_sums,
    attention_row_distance,
    attention_row_entropy,
    attention_row_entropy_normalised,
    attention_row_std,
    cls_patch_cosine,
    column_cosine,
    effective_rank,
    linear_cka,
    rank_collapse,
    token_abs_cosine,
    token_cosine,
)

__all__ = [
    "ALL_METRICS",
    "ATTENTION_METRICS",
    "DEFAULT_METRICS",
    "METRICS_VERSION",
    "METRIC_PRESETS",
    "TOKEN_METRICS",
    "MetricDef",
    "describe_metric",
    "layer_span",
    "metric_def",
    "metric_label",
    "metric_order",
    "metric_range",
    "parse_metrics",
    "split_metrics",
]


METRICS_VERSION = "1"
"""Bumped whenever the definition of any metric changes; ``check`` refuses to compare across versions."""


@dataclass(frozen=True)
class MetricDef:
    """A registered metric: its function, what the capture feeds it, and how to read it.

    Attributes:
        name: the name in ``layers.csv`` / ``heads.csv`` and on the command line.
        fn: token metrics return one value per image, attention metrics one value per query row (``inputs="rows"``)
            or per image and head (``inputs="consecutive"``).
        kind: ``token`` or ``attention``.
        definition: one line, recorded in ``summary.json``.
        higher_is_smoother: a rising curve means more over-smoothing.
        label: the metric's name on figures (axis and panel titles); empty: its registry name.
        inputs: what the capture passes. Token metrics: ``tokens`` (the measured token set), ``class_patches``
            (class token, patch tokens) or ``consecutive`` (layer ``l - 1`` and layer ``l`` token sets). Attention
            metrics: ``rows`` (probability rows of a query chunk) or ``consecutive`` (the same query chunk of
            layers ``l - 1`` and ``l``; see ``finish``).
        needs: extra keyword arguments the capture supplies: ``max_elements`` (chunk budget), ``distances``
            (query-key distances in pixels for the chunk).
        tokens: which tokens enter the value, for the summary.
        prefix_option: ``--include-prefix`` adds the prefix tokens (class, distillation, registers) to the token set.
        uses_prefix: prefix tokens enter the value even without ``--include-prefix`` (e.g. as attention keys).
        cost: ``cheap`` (O(n d) per image or O(T^2) already paid by the attention statistics) or ``extra``.
        source: the paper the definition follows.
        finish: for ``consecutive`` attention metrics, ``fn(prev_chunk, cur_chunk)`` returns partial sums that add
            up over query chunks and ``finish(*sums)`` turns them into one value per image and head.
        atol, rtol: ``check``'s default tolerance for this metric, ``allowed = atol + rtol * |baseline| (+ sigma
            term)``, set from the metric's scale: bounded metrics (cosines, CKA, normalised entropy, residual in
            [0, 1]) get an absolute band, metrics whose scale depends on the model (number of keys or tokens, image
            size) a relative one with a tiny absolute floor. ``--atol`` / ``--rtol`` override them; the README's
            gate section lists the values and the measurements they come from.
        range: ``(low, high)``, the values the metric can take (``-inf`` / ``inf`` where it has no bound, e.g. an
            effective rank or an entropy whose maximum depends on the model). Intervals over images are clipped to
            it, and a ``layers.csv`` or ``heads.csv`` value outside it is refused as unusable input.
    """

    name: str
    fn: Callable[..., Any]
    kind: str  # "token" or "attention"
    definition: str
    higher_is_smoother: bool  # True: a rising curve means more over-smoothing
    label: str = ""
    inputs: str = "tokens"
    needs: tuple[str, ...] = ()
    tokens: str = "patch tokens (prefix tokens excluded)"
    prefix_option: bool = False
    uses_prefix: bool = False
    cost: str = "cheap"
    source: str = ""
    finish: Callable[..., torch.Tensor] | None = None
    atol: float = 0.01
    rtol: float = 0.0
    range: tuple[float, float] = (-math.inf, math.inf)


TOKEN_METRICS: dict[str, MetricDef] = {
    "token_cosine": MetricDef(
        "token_cosine",
        token_cosine,
        "token",
        "1/(n(n-1)) * sum_{i != j} cos(h_i, h_j) over the n patch tokens of one image, mean over images",
        higher_is_smoother=True,
        label="token cosine similarity",
        prefix_option=True,
        source="Gong et al. 2021 (Vision Transformers with Patch Diversification), Eq. 2",
        range=(-1.0, 1.0),
    ),
    "rank_collapse": MetricDef(
        "rank_collapse",
        rank_collapse,
        "token",
        "|X - 1 mean(X)^T|_F / |X|_F for the n x d token matrix X of one image (0: all tokens equal), mean over images",
        higher_is_smoother=False,
        label="rank-collapse residual",
        prefix_option=True,
        source="Dong et al. 2021 (Attention is not all you need: pure attention loses rank); Wang et al. 2022",
        range=(0.0, 1.0),
    ),
    "effective_rank": MetricDef(
        "effective_rank",
        effective_rank,
        "token",
        "exp(-sum_k p_k log p_k), p_k = s_k / sum_j s_j, s = singular values of the centred token matrix of one "
        "image (1 when all tokens are equal), mean over images",
        higher_is_smoother=False,
        label="effective rank",
        prefix_option=True,
        cost="extra",
        source="Roy and Vetterli 2007 (The effective rank: a measure of effective dimensionality)",
        atol=0.01,
        rtol=0.02,
        range=(1.0, math.inf),
    ),
    "token_abs_cosine": MetricDef(
        "token_abs_cosine",
        token_abs_cosine,
        "token",
        "1/n^2 * sum_{i,j} |cos(h_i, h_j)| over all ordered pairs of the n tokens of one image, diagonal included, "
        "mean over images",
        higher_is_smoother=True,
        label="mean |cosine| (incl. diagonal)",
        needs=("max_elements",),
        prefix_option=True,
        cost="extra",
        source="Wang et al. 2022 (Anti-oversmoothing in deep vision transformers via the Fourier domain), app. F.3",
        range=(0.0, 1.0),
    ),
    "cls_patch_cosine": MetricDef(
        "cls_patch_cosine",
        cls_patch_cosine,
        "token",
        "1/n * sum_i cos(h_cls, h_i) between the class token and the n patch tokens of one image, mean over images "
        "(models with a class token only)",
        higher_is_smoother=True,
        label="class-patch cosine",
        inputs="class_patches",
        tokens="class token vs patch tokens",
        uses_prefix=True,
        source="class-token variant of the token cosine of Gong et al. 2021",
        range=(-1.0, 1.0),
    ),
    "layer_cka": MetricDef(
        "layer_cka",
        linear_cka,
        "token",
        "linear CKA |Y^T X|_F^2 / (|X^T X|_F |Y^T Y|_F) between the centred token matrices X of layer l-1 and Y of "
        "layer l of one image, at layer l, mean over images",
        higher_is_smoother=True,
        label="CKA with previous layer",
        inputs="consecutive",
        prefix_option=True,
        cost="extra",
        source="Kornblith et al. 2019 (Similarity of neural network representations revisited)",
        range=(0.0, 1.0),
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
        label="attention std",
        inputs="rows",
        tokens="patch queries, all keys (prefix keys included)",
        uses_prefix=True,
        source="Gong et al. 2021 (Vision Transformers with Patch Diversification), Fig. 1",
        atol=1e-6,
        rtol=0.05,
        range=(0.0, 0.5),
    ),
    "attention_entropy": MetricDef(
        "attention_entropy",
        attention_row_entropy,
        "attention",
        "-sum_j A_ij log A_ij (nats) of each patch query's softmax attention row over all keys; mean over queries "
        "and heads, then over images",
        higher_is_smoother=True,
        label="attention entropy (nats)",
        inputs="rows",
        tokens="patch queries, all keys (prefix keys included)",
        uses_prefix=True,
        source="Shannon entropy of attention rows (e.g. Zhai et al. 2023, attention entropy collapse)",
        atol=1e-3,
        rtol=0.01,
        range=(0.0, math.inf),
    ),
    "attention_entropy_normalised": MetricDef(
        "attention_entropy_normalised",
        attention_row_entropy_normalised,
        "attention",
        "attention_entropy / log(K), K = number of keys (1: uniform attention, 0: one key); mean over queries and "
        "heads, then over images",
        higher_is_smoother=True,
        label="attention entropy / log K",
        inputs="rows",
        tokens="patch queries, all keys (prefix keys included)",
        uses_prefix=True,
        source="Shannon entropy of attention rows, normalised by its maximum log K",
        range=(0.0, 1.0),
    ),
    "attention_distance": MetricDef(
        "attention_distance",
        attention_row_distance,
        "attention",
        "sum_j A_ij |pos_i - pos_j| / sum_j A_ij over patch keys j (prefix keys left out, weights renormalised), "
        "positions = patch centres in input pixels; mean over patch queries and heads, then over images",
        higher_is_smoother=True,
        label="mean attention distance (px)",
        needs=("distances",),
        inputs="rows",
        tokens="patch queries, patch keys (prefix keys excluded, row renormalised)",
        source="Dosovitskiy et al. 2021 (An image is worth 16x16 words), Fig. 7 mean attention distance",
        atol=0.01,
        rtol=0.01,
        range=(0.0, math.inf),
    ),
    "cross_layer_attention_similarity": MetricDef(
        "cross_layer_attention_similarity",
        attention_column_sums,
        "attention",
        "1/K * sum_t cos(A^{l-1}[:, t], A^l[:, t]) between the key columns of the attention maps of layers l-1 and "
        "l, per head; at layer l, mean over heads, then over images",
        higher_is_smoother=True,
        label="attention similarity to previous layer",
        inputs="consecutive",
        tokens="patch queries (column entries), all key columns (prefix keys included)",
        uses_prefix=True,
        cost="extra",
        source="Zhou et al. 2021 (DeepViT: towards deeper vision transformer), Eq. 4",
        finish=column_cosine,
        range=(0.0, 1.0),
    ),
}


ALL_METRICS: dict[str, MetricDef] = {**TOKEN_METRICS, **ATTENTION_METRICS}
"""Every metric in report order: token metrics, then attention metrics."""


DEFAULT_METRICS: tuple[str, ...] = ("token_cosine", "attention_std")
"""The paper's two metrics. Kept as the default so that runs, baselines and ``check`` stay comparable across
versions; ``cheap`` and ``all`` select more (see :data:`METRIC_PRESETS`)."""


METRIC_PRESETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_METRICS,
    "cheap": tuple(n for n, m in ALL_METRICS.items() if m.cost == "cheap"),
    "all": tuple(ALL_METRICS),
}
"""Names ``--metrics`` accepts besides metric names."""


def metric_def(name: str) -> MetricDef:
    """The registry entry of a metric; ``KeyError`` names the known ones."""
    try:
        return ALL_METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(ALL_METRICS)}") from None


def metric_range(name: str) -> tuple[float, float]:
    """The values a metric can take (:attr:`MetricDef.range`); ``(-inf, inf)`` for a metric this version lacks."""
    definition = TOKEN_METRICS.get(name) or ATTENTION_METRICS.get(name)
    return definition.range if definition is not None else (-math.inf, math.inf)


def layer_span(name: str) -> str:
    """Which layers a metric has rows for: token metrics ``0..L``, attention ``1..L``, one later for pairs."""
    m = metric_def(name)
    first = (0 if m.kind == "token" else 1) + (m.inputs == "consecutive")
    pair = " (layer l compares layers l-1 and l)" if m.inputs == "consecutive" else ""
    return f"{first}..L{pair}"


def describe_metric(name: str, include_prefix: bool = False) -> dict[str, object]:
    """What ``summary.json`` records for a metric, so two runs can be compared knowing what was measured.

    Args:
        name: a registered metric.
        include_prefix: ``--include-prefix`` was given (it changes the token set of ``prefix_option`` metrics).

    Returns:
        ``definition``, ``source``, ``tokens``, ``prefix_included``, ``layers`` and ``higher_is_smoother``.
    """
    m = metric_def(name)
    with_prefix = include_prefix and m.prefix_option
    tokens = "all tokens (prefix tokens included: --include-prefix)" if with_prefix else m.tokens
    return {
        "definition": m.definition,
        "source": m.source,
        "tokens": tokens,
        "prefix_included": bool(with_prefix or m.uses_prefix),
        "layers": layer_span(name),
        "higher_is_smoother": m.higher_is_smoother,
    }


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """Metric names from ``--metrics``: comma-separated names and presets (``default``, ``cheap``, ``all``).

    Args:
        spec: e.g. ``"default,effective_rank"``, ``"all"`` or ``["token_cosine", "layer_cka"]``.

    Returns:
        The selected metrics once each, in registry order (token metrics first).

    Raises:
        UserError: an empty selection or an unknown name.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    names = [word.strip() for item in items for word in str(item).split(",") if word.strip()]
    if not names:
        raise UserError(f"--metrics selects nothing; give metric names or one of {', '.join(METRIC_PRESETS)}")
    unknown = [n for n in names if n not in ALL_METRICS and n not in METRIC_PRESETS]
    if unknown:
        raise UserError(
            f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(ALL_METRICS)}, or {', '.join(METRIC_PRESETS)}"
        )
    chosen = {m for n in names for m in METRIC_PRESETS.get(n, (n,))}
    return [m for m in ALL_METRICS if m in chosen]


def split_metrics(spec: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """:func:`parse_metrics`, split into ``(token metrics, attention metrics)``."""
    names = parse_metrics(spec)
    return [m for m in names if m in TOKEN_METRICS], [m for m in names if m in ATTENTION_METRICS]


def metric_order(names) -> list[str]:
    """Metrics in registry order (token metrics first), unknown names last, alphabetically."""
    known = [*TOKEN_METRICS, *ATTENTION_METRICS]
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))


def metric_label(name: str) -> str:
    """The figure label of a metric (its registry ``label``; its name when this version's registry does not know it)."""
    definition = TOKEN_METRICS.get(name) or ATTENTION_METRICS.get(name)
    return (definition.label if definition is not None else "") or name
