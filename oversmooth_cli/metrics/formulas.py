"""Over-smoothing metrics: the pure tensor formulas (their registry: :mod:`oversmooth_cli.metrics.registry`).

Every formula lives here once. The capture code, the losses, the reports and ``check`` all call these
functions; the tests compare each one with a float64 brute-force loop.

Token metrics take patch tokens ``(..., n, d)`` and return one value per image ``(...)``.
Attention metrics take softmax attention rows ``(..., Q, K)`` and return one value per query row
``(..., Q)``; the caller averages rows into a per-head and a per-layer figure, which lets the capture
code compute them on chunks of queries without ever holding a full ``T x T`` matrix
(:mod:`oversmooth_cli.reading.attention`).

Cross-layer metrics compare layer ``l - 1`` with layer ``l`` of the same image (``inputs="consecutive"`` in the
registry): :func:`linear_cka` on token matrices, and :func:`attention_column_sums` /
:func:`column_cosine` on attention maps, whose column sums add up over query chunks.

The registry (:data:`TOKEN_METRICS`, :data:`ATTENTION_METRICS`) says what the capture feeds each metric, how to read
it and where its definition comes from; :func:`parse_metrics` turns ``--metrics`` into registry names. Streaming
statistics over images live in :mod:`oversmooth_cli.metrics.accumulate`, token positions in
:mod:`oversmooth_cli.reading.geometry`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "EPS",
    "attention_column_sums",
    "attention_row_distance",
    "attention_row_entropy",
    "attention_row_entropy_normalised",
    "attention_row_std",
    "attention_std",
    "cls_patch_cosine",
    "column_cosine",
    "cross_layer_attention_similarity",
    "effective_rank",
    "linear_cka",
    "rank_collapse",
    "scalar_like",
    "softmax_row_std",
    "to_float",
    "token_abs_cosine",
    "token_cosine",
]


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
