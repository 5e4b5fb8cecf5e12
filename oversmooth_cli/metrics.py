"""Over-smoothing metrics: the pure tensor formulas and the metric registry.

Every formula lives here once. The capture code, the losses, the reports and ``check`` all call these
functions; the tests compare each one with a float64 brute-force loop.

Token metrics take patch tokens ``(..., n, d)`` and return one value per image ``(...)``.
Attention metrics take softmax attention rows ``(..., Q, K)`` and return one value per query row
``(..., Q)``; the caller averages rows into a per-head and a per-layer figure, which lets the capture
code compute them on chunks of queries without ever holding a full ``T x T`` matrix
(:mod:`oversmooth_cli.attention`).

Cross-layer metrics compare layer ``l - 1`` with layer ``l`` of the same image (``inputs="consecutive"`` in the
registry): :func:`linear_cka` on token matrices, and :func:`attention_column_sums` /
:func:`column_cosine` on attention maps, whose column sums add up over query chunks.

The registry (:data:`TOKEN_METRICS`, :data:`ATTENTION_METRICS`) says what the capture feeds each metric, how to read
it and where its definition comes from; :func:`parse_metrics` turns ``--metrics`` into registry names. Streaming
statistics over images live in :mod:`oversmooth_cli.accumulate`, token positions in :mod:`oversmooth_cli.geometry`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError

__all__ = [
    "ALL_METRICS",
    "ATTENTION_METRICS",
    "DEFAULT_METRICS",
    "EPS",
    "METRICS_VERSION",
    "METRIC_PRESETS",
    "TOKEN_METRICS",
    "MetricDef",
    "attention_column_sums",
    "attention_row_distance",
    "attention_row_entropy",
    "attention_row_entropy_normalised",
    "attention_row_std",
    "attention_std",
    "cls_patch_cosine",
    "column_cosine",
    "cross_layer_attention_similarity",
    "describe_metric",
    "effective_rank",
    "layer_span",
    "linear_cka",
    "metric_def",
    "parse_metrics",
    "rank_collapse",
    "scalar_like",
    "softmax_row_std",
    "split_metrics",
    "to_float",
    "token_abs_cosine",
    "token_cosine",
]

METRICS_VERSION = "1"
"""Bumped whenever the definition of any metric changes; ``check`` refuses to compare across versions."""

EPS = 1e-8
"""Norm floor for L2 normalisation (a zero token has cosine 0 with everything)."""


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Metric arithmetic is float32 or wider, whatever the model's autocast dtype."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@functools.lru_cache(maxsize=64)
def _scalar_on(value: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(value, device=device, dtype=dtype)


def scalar_like(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor of ``like``'s device and dtype, for elementwise operations on blocks.

    An operation given a Python number first turns it into a tensor, a conversion and a copy that cost as much as
    the arithmetic on a cache-sized block; in inference mode the tensor is made once per value, device and dtype.
    """
    if torch.is_inference_mode_enabled():  # made and used in inference mode only
        return _scalar_on(value, like.device, like.dtype)
    return torch.tensor(value, device=like.device, dtype=like.dtype)


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
    x = to_float(tokens)
    n = x.shape[-2]
    if n < 2:
        raise ValueError(f"token_cosine needs at least 2 tokens per image, got {n}")
    # u_i = h_i / max(|h_i|, eps) as F.normalize makes it, without writing u: s is one weighted sum of the tokens
    # (a matrix-vector product per image) and sum_i |u_i|^2 comes from the norms; two passes over the tokens.
    norms = torch.linalg.vector_norm(x, dim=-1)
    inv = norms.clamp_min(eps).reciprocal()
    with torch.autocast(device_type=x.device.type, enabled=False):  # float32 under --amp too
        s = (inv.unsqueeze(-2) @ x).squeeze(-2)
    pairs = s.square().sum(dim=-1) - (norms * inv).square().sum(dim=-1)
    return pairs / (n * (n - 1))


def attention_row_std(probs: torch.Tensor, block_elements: int = 1 << 20) -> torch.Tensor:
    """Population standard deviation of each attention row over its keys.

    Args:
        probs: ``(..., Q, K)`` softmax attention, each row summing to 1.
        block_elements: rows are taken in blocks of about this many elements (the temporaries stay small).

    Returns:
        ``(..., Q)``. A uniform row gives 0; a one-hot row gives ``sqrt(K - 1) / K``.

    Two passes, ``|p - mean(p)| / sqrt(K)``: exact for rows that do not sum to 1 (talking heads, gated attention),
    and on CPU about 4x faster than ``Tensor.std`` (which the tests check it against).
    """
    p = to_float(probs)
    if p.dim() < 2:
        return attention_row_std(p.unsqueeze(0), block_elements).squeeze(0)
    rows = max(1, block_elements * p.shape[-2] // max(1, p.numel()))
    norms = [torch.linalg.vector_norm(b - b.mean(dim=-1, keepdim=True), dim=-1) for b in p.split(rows, dim=-2)]
    return (norms[0] if len(norms) == 1 else torch.cat(norms, dim=-1)) / math.sqrt(p.shape[-1])


def softmax_row_std(
    probs: torch.Tensor, centred: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`attention_row_std` of softmax rows (rows that sum to 1): ``|p - 1/K| / sqrt(K)``.

    The mean of such a row is ``1/K``, so the centring needs no pass of its own: one subtraction and one norm, each
    reading the row once (on CPU about half the time of the general form). A row summing to ``1 + e`` gives
    ``sqrt(std^2 + (e/K)^2)``: for float32 softmax rows (``|e|`` about 1e-7) within about ``1e-7 / K`` of its exact
    standard deviation. Rows that need not sum to 1 (talking heads, gating) take :func:`attention_row_std`.

    Args:
        probs: ``(..., Q, K)`` softmax attention.
        centred: memory of ``probs``' shape (float32 or wider) for ``p - 1/K``; default: a new tensor.
        out: ``(..., Q)`` memory for the result; default: a new tensor.

    Returns:
        ``(..., Q)`` (``out`` when given).
    """
    p = to_float(probs)
    keys = p.shape[-1]
    if centred is None:
        centred = p - 1.0 / keys
    else:
        torch.sub(p, scalar_like(1.0 / keys, p), out=centred)
    if out is None:
        return torch.linalg.vector_norm(centred, dim=-1) / math.sqrt(keys)
    torch.linalg.vector_norm(centred, dim=-1, out=out)
    return out.mul_(scalar_like(1.0 / math.sqrt(keys), out))


def attention_std(probs: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of :func:`attention_row_std`: ``(..., Q, K) -> (...)`` (e.g. per image and head)."""
    return attention_row_std(probs).mean(dim=-1)


# -- more token metrics --------------------------------------------------------------------------------------------
def rank_collapse(tokens: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Relative residual from the best "all tokens equal" approximation, ``|X - 1 mean(X)^T|_F / |X|_F``.

    The residual of Dong et al. (2021); Wang et al. (2022) call the same quantity the high-frequency component
    of the token signal. O(n d).

    Args:
        tokens: ``(..., n, d)`` tokens of one image per leading index.
        eps: floor for ``|X|_F`` (an all-zero matrix gives 0).

    Returns:
        ``(...)`` in ``[0, 1]``: 0 when every token is the same vector, 1 when the tokens average to zero.
    """
    x = to_float(tokens)
    residual = x - x.mean(dim=-2, keepdim=True)
    return residual.pow(2).sum(dim=(-2, -1)).sqrt() / x.pow(2).sum(dim=(-2, -1)).sqrt().clamp_min(eps)


def effective_rank(tokens: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy and Vetterli 2007) of the centred token matrix: ``exp(-sum_k p_k log p_k)``.

    ``p_k = s_k / sum_j s_j`` are the normalised singular values of ``X - 1 mean(X)^T``; ``0 log 0 = 0``. A matrix
    whose tokens are exactly equal (centred matrix zero) gives 1, the bottom of the range. The value ignores scale:
    tokens equal up to tiny noise still give the rank of that noise, so read it beside ``rank_collapse``. One batched
    ``torch.linalg.svdvals`` on the tokens' device, in float32 (or float64 for float64 input).

    Args:
        tokens: ``(..., n, d)``.

    Returns:
        ``(...)`` in ``[1, min(n, d)]``.
    """
    x = to_float(tokens)
    with torch.autocast(device_type=x.device.type, enabled=False):
        s = torch.linalg.svdvals(x - x.mean(dim=-2, keepdim=True))
    p = s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    return torch.exp(-torch.special.xlogy(p, p).sum(dim=-1))


def token_abs_cosine(tokens: torch.Tensor, eps: float = EPS, max_elements: int = 1 << 24) -> torch.Tensor:
    """Mean absolute cosine over all ordered token pairs, diagonal included: ``1/n^2 sum_{i,j} |cos(h_i, h_j)|``.

    The variant of Wang et al. (2022, appendix F.3). The ``n x n`` cosine matrix is built in chunks of rows of at
    most about ``max_elements`` values. A zero token has cosine 0 with everything, itself included.

    Args:
        tokens: ``(..., n, d)``.
        eps: floor for the norm of a token.
        max_elements: chunk budget in cosine-matrix elements.

    Returns:
        ``(...)`` in ``[0, 1]`` (at least ``1/n`` when no token is zero).
    """
    u = F.normalize(to_float(tokens), dim=-1, eps=eps)
    n = u.shape[-2]
    images = math.prod(u.shape[:-2])
    chunk = max(1, max_elements // max(1, images * n))
    ut = u.transpose(-2, -1)
    total = torch.zeros(u.shape[:-2], dtype=u.dtype, device=u.device)
    for start in range(0, n, chunk):
        total = total + (u[..., start : start + chunk, :] @ ut).abs().sum(dim=(-2, -1))
    return total / (n * n)


def cls_patch_cosine(cls_token: torch.Tensor, patches: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Mean cosine between the class token and each patch token, ``1/n sum_i cos(h_cls, h_i)``.

    Args:
        cls_token: ``(..., d)``.
        patches: ``(..., n, d)``.
        eps: floor for the norm of a token.

    Returns:
        ``(...)`` in ``[-1, 1]``.
    """
    c = F.normalize(to_float(cls_token), dim=-1, eps=eps)
    u = F.normalize(to_float(patches), dim=-1, eps=eps)
    return (u.sum(dim=-2) * c).sum(dim=-1) / u.shape[-2]


def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Linear CKA (Kornblith et al. 2019) between two token matrices of the same image.

    With centred ``Xc = X - 1 mean(X)^T`` and ``Yc`` likewise, ``CKA = |Yc^T Xc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F)``.
    Computed from ``n x n`` Gram matrices when ``n`` is smaller than the widths, else from the feature-space ones
    (the same number). Each matrix is scaled to unit norm first (CKA is scale invariant) so float32 cannot overflow.

    Args:
        x: ``(..., n, d1)``.
        y: ``(..., n, d2)``, the same ``n`` tokens.
        eps: floor for the norms; a matrix whose tokens are all equal gives 0.

    Returns:
        ``(...)`` in ``[0, 1]``.
    """
    if x.shape[-2] != y.shape[-2]:
        raise ValueError(f"linear_cka needs the same tokens in both matrices, got {x.shape[-2]} and {y.shape[-2]}")
    xs, ys = (to_float(t) - to_float(t).mean(dim=-2, keepdim=True) for t in (x, y))
    xs, ys = (t / t.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(eps) for t in (xs, ys))
    n = xs.shape[-2]
    if n <= min(xs.shape[-1], ys.shape[-1]):
        gx, gy = xs @ xs.transpose(-2, -1), ys @ ys.transpose(-2, -1)
        cross = (gx * gy).sum(dim=(-2, -1))
    else:
        gx, gy = xs.transpose(-2, -1) @ xs, ys.transpose(-2, -1) @ ys
        cross = (ys.transpose(-2, -1) @ xs).pow(2).sum(dim=(-2, -1))
    norms = gx.pow(2).sum(dim=(-2, -1)).sqrt() * gy.pow(2).sum(dim=(-2, -1)).sqrt()
    return cross / norms.clamp_min(eps)


# -- more attention metrics ----------------------------------------------------------------------------------------
def attention_row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each attention row, ``-sum_j A_ij log A_ij`` (``0 log 0 = 0``).

    Args:
        probs: ``(..., Q, K)`` softmax attention.

    Returns:
        ``(..., Q)`` in ``[0, log K]``: 0 for a one-hot row, ``log K`` for a uniform one.
    """
    p = to_float(probs)
    return -torch.special.xlogy(p, p).sum(dim=-1)


def attention_row_entropy_normalised(probs: torch.Tensor) -> torch.Tensor:
    """:func:`attention_row_entropy` divided by ``log K`` (K = number of keys, at least 2): ``(..., Q)`` in [0, 1]."""
    keys = probs.shape[-1]
    if keys < 2:
        raise ValueError(f"normalised attention entropy needs at least 2 keys, got {keys}")
    return attention_row_entropy(probs) / math.log(keys)


def attention_row_distance(probs: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Mean attention distance of each row, ``sum_j A_ij |pos_i - pos_j| / sum_j A_ij`` over keys with a position.

    Keys without a position (prefix tokens: class, distillation, register tokens; ``NaN`` in ``distances``) are
    left out and the row's remaining weights are renormalised, so the value is the mean distance of the
    attention that goes to patches (Dosovitskiy et al. 2021, Fig. 7, uses patch positions only).

    Args:
        probs: ``(..., Q, K)`` softmax attention.
        distances: ``(..., Q, K)`` (broadcastable) query-key distances in pixels, ``NaN`` where a token has no
            position (:func:`pairwise_distances`).

    Returns:
        ``(..., Q)`` in pixels.
    """
    d = to_float(distances)
    valid = torch.isfinite(d)
    w = to_float(probs) * valid
    weighted = (w * torch.where(valid, d, torch.zeros((), dtype=d.dtype, device=d.device))).sum(dim=-1)
    return weighted / w.sum(dim=-1).clamp_min(torch.finfo(w.dtype).tiny)


def attention_column_sums(prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key column, the sums over query rows that :func:`column_cosine` needs; add them up over row chunks.

    Args:
        prev: ``(..., Q, K)`` attention of layer ``l - 1``.
        cur: ``(..., Q, K)`` attention of layer ``l``, same queries and keys.

    Returns:
        ``(dot, prev_sq, cur_sq)``, each ``(..., K)``: ``sum_i prev_it cur_it``, ``sum_i prev_it^2`` and
        ``sum_i cur_it^2``.
    """
    a, b = to_float(prev), to_float(cur)
    return (a * b).sum(dim=-2), a.pow(2).sum(dim=-2), b.pow(2).sum(dim=-2)


def column_cosine(dot: torch.Tensor, prev_sq: torch.Tensor, cur_sq: torch.Tensor) -> torch.Tensor:
    """Mean over key columns of the cosine between two attention maps' columns, from :func:`attention_column_sums`.

    Returns:
        ``(...)``: ``1/K sum_t cos(A^{l-1}_{:,t}, A^l_{:,t})`` in ``[0, 1]`` (attention weights are non-negative).
    """
    return (dot / (prev_sq * cur_sq).sqrt().clamp_min(torch.finfo(dot.dtype).tiny)).mean(dim=-1)


def cross_layer_attention_similarity(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """DeepViT's cross-layer similarity (Zhou et al. 2021): mean over keys ``t`` of ``cos(A^{l-1}_{:,t}, A^l_{:,t})``.

    Column ``t`` of a head's attention map says how much token ``t`` contributes to every output token.

    Args:
        prev: ``(..., Q, K)`` attention of layer ``l - 1``.
        cur: ``(..., Q, K)`` attention of layer ``l``.

    Returns:
        ``(...)`` one similarity per image and head.
    """
    return column_cosine(*attention_column_sums(prev, cur))


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
    """

    name: str
    fn: Callable[..., torch.Tensor]
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
