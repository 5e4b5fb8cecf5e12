"""The metrics beyond the paper: float64 brute force on random tensors, a tiny timm ViT through the capture, the CLI.

Every reference below is an explicit float64 loop (or an independent formula: eigenvalues instead of singular
values, HSIC with a centring matrix instead of centred Gram matrices), never the function under test.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import pandas as pd
import pytest
import torch

from oversmooth_cli.errors import UserError
from oversmooth_cli.io import HEAD_COLUMNS, LAYER_COLUMNS
from oversmooth_cli.metrics.formulas import (
    attention_column_sums,
    attention_row_distance,
    attention_row_entropy,
    attention_row_entropy_normalised,
    attention_std,
    cls_patch_cosine,
    column_cosine,
    cross_layer_attention_similarity,
    effective_rank,
    linear_cka,
    rank_collapse,
    token_abs_cosine,
    token_cosine,
)
from oversmooth_cli.metrics.registry import (
    ALL_METRICS,
    ATTENTION_METRICS,
    METRIC_PRESETS,
    TOKEN_METRICS,
    describe_metric,
    parse_metrics,
)
from oversmooth_cli.reading.capture import OversmoothingCapture
from oversmooth_cli.reading.geometry import infer_grid, pairwise_distances, patch_positions

from .._helpers import (
    IMG,
    MODELS,
    TINY_ARCH,
    TINY_ARGS,
    TINY_ARGS_DEPTH2,
    attention_chunks,
    brute_attention_std,
    brute_token_cosine,
    invoke,
    make,
    reference_attention,
    reference_states,
)

pytestmark = pytest.mark.metrics

STRIDE = 8  # patch_size of the tiny models: patch centres sit at 4, 12, 20, 28 px
ALL = list(ALL_METRICS)


# -- float64 brute-force references -------------------------------------------------------------------------------
def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b).item() / (max(a.norm().item(), 1e-8) * max(b.norm().item(), 1e-8))


def brute_rank_collapse(tokens: torch.Tensor) -> torch.Tensor:
    out = []
    for x in tokens.double():
        n, d = x.shape
        mean = [sum(x[i, c].item() for i in range(n)) / n for c in range(d)]
        residual = sum((x[i, c].item() - mean[c]) ** 2 for i in range(n) for c in range(d))
        total = sum(x[i, c].item() ** 2 for i in range(n) for c in range(d))
        out.append(math.sqrt(residual) / math.sqrt(total))
    return torch.tensor(out, dtype=torch.float64)


def brute_effective_rank(tokens: torch.Tensor) -> torch.Tensor:
    """Singular values as square roots of the eigenvalues of the smaller Gram matrix of the centred tokens."""
    out = []
    for x in tokens.double():
        xc = x - x.mean(0)
        gram = xc @ xc.T if xc.shape[0] <= xc.shape[1] else xc.T @ xc
        eig = torch.linalg.eigvalsh(gram).tolist()
        s = [math.sqrt(e) if e > 1e-12 * max(eig) else 0.0 for e in eig]  # rounding noise of the zero eigenvalues
        total = sum(s)
        if total == 0:
            out.append(1.0)
            continue
        out.append(math.exp(-sum(v / total * math.log(v / total) for v in s if v > 0)))
    return torch.tensor(out, dtype=torch.float64)


def brute_token_abs_cosine(tokens: torch.Tensor) -> torch.Tensor:
    out = []
    for x in tokens.double():
        n = x.shape[0]
        out.append(sum(abs(_cos(x[i], x[j])) for i, j in itertools.product(range(n), range(n))) / n**2)
    return torch.tensor(out, dtype=torch.float64)


def brute_cls_patch_cosine(cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    out = []
    for c, x in zip(cls.double(), patches.double(), strict=True):
        out.append(sum(_cos(c, x[i]) for i in range(x.shape[0])) / x.shape[0])
    return torch.tensor(out, dtype=torch.float64)


def brute_linear_cka(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """HSIC form: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T, H = I - 11^T / n."""
    out = []
    for x, y in zip(xs.double(), ys.double(), strict=True):
        n = x.shape[0]
        h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
        k, l = x @ x.T, y @ y.T

        def hsic(a, b, h=h):
            return torch.trace(a @ h @ b @ h).item()

        out.append(hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l)))
    return torch.tensor(out, dtype=torch.float64)


def brute_attention_entropy(probs: torch.Tensor, normalised: bool = False) -> torch.Tensor:
    """Mean over rows of -sum p log p (optionally / log K): (B, H, Q, K) -> (B, H)."""
    p = probs.double()
    B, H, Q, K = p.shape
    out = torch.zeros(B, H, dtype=torch.float64)
    for b, hd in itertools.product(range(B), range(H)):
        rows = [-sum(v * math.log(v) for v in p[b, hd, q].tolist() if v > 0) for q in range(Q)]
        out[b, hd] = sum(rows) / Q / (math.log(K) if normalised else 1.0)
    return out


def brute_position(token: int, prefix: int, grid_cols: int, stride: float = STRIDE) -> tuple[float, float] | None:
    if token < prefix:
        return None
    r, c = divmod(token - prefix, grid_cols)
    return ((r + 0.5) * stride, (c + 0.5) * stride)


def brute_attention_distance(
    probs: torch.Tensor, prefix: int, grid_cols: int, query_start: int, stride: float = STRIDE
) -> torch.Tensor:
    """Mean over query rows of sum_j A_ij d_ij / sum_j A_ij over keys with a position: (B, H, Q, K) -> (B, H)."""
    p = probs.double()
    B, H, Q, K = p.shape
    out = torch.zeros(B, H, dtype=torch.float64)
    for b, hd in itertools.product(range(B), range(H)):
        rows = []
        for q in range(Q):
            pq = brute_position(query_start + q, prefix, grid_cols, stride)
            num = den = 0.0
            for j in range(K):
                pj = brute_position(j, prefix, grid_cols, stride)
                if pj is None:
                    continue
                a = p[b, hd, q, j].item()
                num += a * math.hypot(pq[0] - pj[0], pq[1] - pj[1])
                den += a
            rows.append(num / den)
        out[b, hd] = sum(rows) / Q
    return out


def brute_cross_layer(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Mean over key columns t of cos(prev[:, t], cur[:, t]): (B, H, Q, K) -> (B, H)."""
    a, c = prev.double(), cur.double()
    B, H, _, K = a.shape
    out = torch.zeros(B, H, dtype=torch.float64)
    for b, hd in itertools.product(range(B), range(H)):
        out[b, hd] = sum(_cos(a[b, hd, :, t], c[b, hd, :, t]) for t in range(K)) / K
    return out


def random_probs(*shape: int, sharp: float = 3.0) -> torch.Tensor:
    probs = (torch.randn(*shape) * sharp).softmax(-1)
    probs[..., 0, :] = 0  # a one-hot row: 0 log 0 must count as 0
    probs[..., 0, -1] = 1
    return probs


# -- pure functions against float64 loops --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 4, 9), (1, 12, 3)])
def test_rank_collapse_matches_brute_force(shape):
    x = torch.randn(*shape) + 0.5
    torch.testing.assert_close(rank_collapse(x).double(), brute_rank_collapse(x), atol=1e-6, rtol=0)
    assert rank_collapse(torch.zeros(1, 3, 2)).item() == 0.0


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 9, 4), (1, 6, 6)])
def test_effective_rank_matches_eigenvalue_reference(shape):
    x = torch.randn(*shape) * torch.linspace(0.1, 2.0, shape[-1])
    torch.testing.assert_close(effective_rank(x).double(), brute_effective_rank(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(effective_rank(x.double()), brute_effective_rank(x), atol=1e-9, rtol=0)


def test_effective_rank_of_known_spectra():
    # Two orthogonal directions with equal energy around the mean: exactly rank 2.
    x = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]]) + 5.0
    assert effective_rank(x.unsqueeze(0)).item() == pytest.approx(2.0, abs=1e-5)
    line = torch.arange(6.0).unsqueeze(-1) * torch.tensor([[1.0, 2.0, -1.0]])
    assert effective_rank(line.unsqueeze(0)).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("max_elements", [1, 7, 1 << 20])
def test_token_abs_cosine_matches_brute_force_in_any_chunking(max_elements):
    x = torch.randn(3, 6, 4)
    x[1, 2] = 0  # a zero token: cosine 0 with everything, itself included
    got = token_abs_cosine(x, max_elements=max_elements)
    torch.testing.assert_close(got.double(), brute_token_abs_cosine(x), atol=1e-6, rtol=0)


def test_token_abs_cosine_orthogonal_tokens_count_only_the_diagonal():
    assert token_abs_cosine(torch.eye(5).unsqueeze(0)).item() == pytest.approx(1 / 5, abs=1e-7)


def test_cls_patch_cosine_matches_brute_force():
    cls, patches = torch.randn(4, 7), torch.randn(4, 5, 7)
    torch.testing.assert_close(
        cls_patch_cosine(cls, patches).double(), brute_cls_patch_cosine(cls, patches), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(("n", "d1", "d2"), [(5, 8, 9), (12, 3, 4), (6, 6, 2)])
def test_linear_cka_matches_hsic_reference_on_both_gram_sides(n, d1, d2):
    x = torch.randn(3, n, d1)
    y = torch.randn(3, n, d2) + x[..., :1] * 2  # partly related
    torch.testing.assert_close(linear_cka(x, y).double(), brute_linear_cka(x, y), atol=1e-5, rtol=0)
    torch.testing.assert_close(linear_cka(x.double(), y.double()), brute_linear_cka(x, y), atol=1e-10, rtol=0)


def test_linear_cka_invariances_and_shape_check():
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    torch.testing.assert_close(linear_cka(x, 3.0 * x @ q + 1.0), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same tokens"):
        linear_cka(torch.randn(1, 4, 3), torch.randn(1, 5, 3))


def test_attention_entropy_matches_brute_force():
    probs = random_probs(2, 3, 5, 7)
    got = attention_row_entropy(probs).mean(-1)
    torch.testing.assert_close(got.double(), brute_attention_entropy(probs), atol=1e-6, rtol=0)
    got = attention_row_entropy_normalised(probs).mean(-1)
    torch.testing.assert_close(got.double(), brute_attention_entropy(probs, normalised=True), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 2 keys"):
        attention_row_entropy_normalised(torch.ones(1, 1, 1, 1))


@pytest.mark.parametrize(("prefix", "grid"), [(1, (3, 3)), (2, (2, 4)), (0, (3, 2))])
def test_attention_distance_matches_brute_force(prefix, grid):
    T = prefix + grid[0] * grid[1]
    probs = random_probs(2, 3, T - prefix, T)
    pos = patch_positions(grid, (STRIDE, STRIDE), prefix)
    dist = pairwise_distances(pos[prefix:], pos)
    got = attention_row_distance(probs, dist).mean(-1)
    want = brute_attention_distance(probs, prefix, grid[1], query_start=prefix)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


def test_attention_distance_leaves_prefix_keys_out_and_renormalises():
    pos = patch_positions((2, 2), (8, 8), num_prefix=1)  # patches at (4,4), (4,12), (12,4), (12,12)
    dist = pairwise_distances(pos, pos)
    row = torch.tensor([[0.5, 0.0, 0.125, 0.0, 0.375]])  # half on the class token; query = patch (4, 4)
    got = attention_row_distance(row, dist[1:2])
    assert got.item() == pytest.approx((0.125 * 8 + 0.375 * math.hypot(8, 8)) / 0.5, abs=1e-5)


def test_cross_layer_similarity_matches_brute_force_and_adds_over_chunks():
    prev, cur = random_probs(2, 3, 6, 8), random_probs(2, 3, 6, 8)
    want = brute_cross_layer(prev, cur)
    torch.testing.assert_close(cross_layer_attention_similarity(prev, cur).double(), want, atol=1e-6, rtol=0)
    parts = [attention_column_sums(prev[:, :, i : i + 2], cur[:, :, i : i + 2]) for i in range(0, 6, 2)]
    summed = [sum(p[k] for p in parts) for k in range(3)]
    torch.testing.assert_close(column_cosine(*summed).double(), want, atol=1e-6, rtol=0)


def test_patch_positions_distances_and_grid_inference():
    pos = patch_positions((2, 3), (8, 16), num_prefix=1)
    assert torch.isnan(pos[0]).all()
    assert pos[1:].tolist() == [[4, 8], [4, 24], [4, 40], [12, 8], [12, 24], [12, 40]]
    d = pairwise_distances(pos[1:3], pos)
    assert torch.isnan(d[:, 0]).all()
    assert d[0, 1:].tolist() == pytest.approx([0, 16, 32, 8, math.hypot(8, 16), math.hypot(8, 32)])
    assert infer_grid(16, (4, 4)) == (4, 4)
    assert infer_grid(36, (4, 4)) == (6, 6)  # dynamic image size, square input
    assert infer_grid(24, (4, 4)) == (4, 6)  # tie: landscape
    assert infer_grid(32, (2, 8)) == (2, 16)
    with pytest.raises(ValueError):
        infer_grid(0, (4, 4))


def test_collapsed_tokens_and_uniform_attention_hit_the_ends_of_every_scale():
    v = torch.randn(1, 1, 12)
    same = v.expand(3, 9, 12)
    assert token_cosine(same).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert rank_collapse(same).tolist() == pytest.approx([0.0] * 3, abs=1e-6)
    assert effective_rank(same).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert token_abs_cosine(same).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert cls_patch_cosine(same[:, 0], same).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    K = 10
    uniform = torch.full((2, 3, 4, K), 1.0 / K)
    assert attention_std(uniform).flatten().tolist() == pytest.approx([0.0] * 6, abs=1e-7)
    normalised = attention_row_entropy_normalised(uniform)
    assert normalised.flatten().tolist() == pytest.approx([1.0] * 24, abs=1e-6)
    assert attention_row_entropy(uniform).flatten().tolist() == pytest.approx([math.log(K)] * 24, abs=1e-5)
    assert cross_layer_attention_similarity(uniform, uniform).flatten().tolist() == pytest.approx([1.0] * 6)


def test_new_token_metrics_compute_bf16_input_in_float32():
    x = torch.randn(2, 6, 5)
    xb = x.bfloat16()
    for fn, ref in ((rank_collapse, brute_rank_collapse), (token_abs_cosine, brute_token_abs_cosine)):
        out = fn(xb)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref(xb.float()), atol=1e-5, rtol=0)
    assert effective_rank(xb).dtype == torch.float32


# -- registry, presets, summary entries -----------------------------------------------------------------------------
def test_registry_entries_are_complete():
    assert list(ALL_METRICS) == [*TOKEN_METRICS, *ATTENTION_METRICS]
    for name, m in ALL_METRICS.items():
        assert m.name == name and m.definition and m.source and m.label
        assert (m.inputs == "consecutive" and m.kind == "attention") == (m.finish is not None)
        described = describe_metric(name)
        assert set(described) == {"definition", "source", "tokens", "prefix_included", "layers", "higher_is_smoother"}
    assert METRIC_PRESETS["default"] == ("token_cosine", "attention_std")
    assert set(METRIC_PRESETS["all"]) - set(METRIC_PRESETS["cheap"]) == {
        "effective_rank",
        "token_abs_cosine",
        "layer_cka",
        "cross_layer_attention_similarity",
    }
    assert describe_metric("layer_cka")["layers"].startswith("1..L")
    assert describe_metric("cross_layer_attention_similarity")["layers"].startswith("2..L")
    assert describe_metric("token_cosine")["prefix_included"] is False
    assert describe_metric("token_cosine", include_prefix=True)["prefix_included"] is True
    assert describe_metric("attention_distance", include_prefix=True)["prefix_included"] is False
    assert describe_metric("attention_std")["prefix_included"] is True  # prefix tokens are keys


def test_parse_metrics_presets_lists_and_errors():
    assert parse_metrics("default") == ["token_cosine", "attention_std"]
    assert parse_metrics("all") == ALL
    assert parse_metrics("attention_entropy, token_cosine,token_cosine") == ["token_cosine", "attention_entropy"]
    assert parse_metrics(["default", "layer_cka"]) == ["token_cosine", "layer_cka", "attention_std"]
    with pytest.raises(UserError, match=r"unknown metric.*nope.*known: token_cosine"):
        parse_metrics("token_cosine,nope")
    with pytest.raises(UserError, match="selects nothing"):
        parse_metrics(" , ")


# -- a tiny timm ViT through the capture, against a direct float64 recomputation ----------------------------------
def capture_all(model, x, tap="qk", **kw):
    with torch.no_grad(), OversmoothingCapture(model, TOKEN_METRICS, ATTENTION_METRICS, tap, **kw) as cap:
        model.forward_features(x)
        layers, heads = cap.pop_batch()
    return cap, layers, heads


def expected_values(model, x, prefix: int, include_prefix: bool = False, img: int = IMG):
    """{(metric, layer): (B,) or (B, H)} recomputed from the modules called directly, float64 brute force."""
    with torch.no_grad():
        states = reference_states(model, x)
        probs = {l: reference_attention(model.blocks[l - 1], states[l - 1], prefix) for l in range(1, len(states))}
    grid_cols = img // STRIDE
    layers, heads = {}, {}
    has_cls = getattr(model, "cls_token", None) is not None
    for l, h in enumerate(states):
        tokens = h if include_prefix else h[:, prefix:]
        layers[("token_cosine", l)] = brute_token_cosine(tokens)
        layers[("rank_collapse", l)] = brute_rank_collapse(tokens)
        layers[("effective_rank", l)] = brute_effective_rank(tokens)
        layers[("token_abs_cosine", l)] = brute_token_abs_cosine(tokens)
        if has_cls:
            layers[("cls_patch_cosine", l)] = brute_cls_patch_cosine(h[:, 0], h[:, prefix:])
        if l > 0:
            before = states[l - 1] if include_prefix else states[l - 1][:, prefix:]
            layers[("layer_cka", l)] = brute_linear_cka(before, tokens)
    for l, p in probs.items():
        heads[("attention_std", l)] = brute_attention_std(p)
        heads[("attention_entropy", l)] = brute_attention_entropy(p)
        heads[("attention_entropy_normalised", l)] = brute_attention_entropy(p, normalised=True)
        heads[("attention_distance", l)] = brute_attention_distance(p, prefix, grid_cols, query_start=prefix)
        if l > 1:
            heads[("cross_layer_attention_similarity", l)] = brute_cross_layer(probs[l - 1], p)
    for key, v in heads.items():
        layers[key] = v.mean(-1)
    return layers, heads


def assert_matches(got: dict, want: dict, atol: float = 2e-4) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        tol = atol * 10 if key[0] in ("effective_rank", "attention_distance") else atol  # values of ~1-16, not ~0-1
        torch.testing.assert_close(got[key].double(), want[key], atol=tol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("key", ["vit", "deit_distilled", "registers_no_cls"])
@pytest.mark.parametrize("tap", ["qk", "softmax"])
def test_capture_all_metrics_match_float64_recomputation(key, tap):
    name, kw, prefix = MODELS[key]
    model = make(name, **kw)
    x = torch.randn(2, 3, IMG, IMG)
    cap, layers, heads = capture_all(model, x, tap)
    want_layers, want_heads = expected_values(model, x, prefix)
    assert_matches(layers, want_layers)
    assert_matches(heads, want_heads)
    depth = len(model.blocks)
    assert sorted(l for m, l in layers if m == "cross_layer_attention_similarity") == list(range(2, depth + 1))
    assert sorted(l for m, l in layers if m == "layer_cka") == list(range(1, depth + 1))
    if key == "registers_no_cls":
        assert cap.unavailable == {"cls_patch_cosine": "VisionTransformer has no class token"}
    else:
        assert cap.unavailable == {}
    assert cap._metrics.prev_tokens is None and cap._metrics.prev_attention is None, (
        "pop_batch drops the previous layer's state"
    )


def test_include_prefix_measures_every_token():
    name, kw, prefix = MODELS["deit_distilled"]
    model = make(name, **kw)
    x = torch.randn(2, 3, IMG, IMG)
    _, layers, _ = capture_all(model, x, include_prefix=True)
    want, _ = expected_values(model, x, prefix, include_prefix=True)
    for metric in ("token_cosine", "rank_collapse", "effective_rank", "token_abs_cosine", "layer_cka"):
        for l in range(len(model.blocks) + 1):
            if (metric, l) in want:
                torch.testing.assert_close(layers[(metric, l)].double(), want[(metric, l)], atol=2e-3, rtol=0)
    _, patches_only, _ = capture_all(model, x)
    assert not torch.allclose(layers[("token_cosine", 2)], patches_only[("token_cosine", 2)])
    torch.testing.assert_close(layers[("attention_std", 2)], patches_only[("attention_std", 2)])


def test_chunked_qk_equals_softmax_tap_for_every_metric():
    model = make(TINY_ARCH, patch_size=4, depth=3, embed_dim=32, num_heads=2)
    x = torch.randn(2, 3, IMG, IMG)
    _, qk_layers, qk_heads = capture_all(model, x, "qk", max_elements=2000)  # chunks of 7 query rows
    _, sm_layers, sm_heads = capture_all(model, x, "softmax")
    for a, b in ((qk_layers, sm_layers), (qk_heads, sm_heads)):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-5)


def test_stale_state_of_an_earlier_forward_is_not_used():
    model = make(TINY_ARCH, **TINY_ARGS_DEPTH2)
    x1, x2 = torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, IMG, IMG)
    with torch.no_grad(), OversmoothingCapture(model, ["layer_cka"], ["cross_layer_attention_similarity"]) as cap:
        model.forward_features(x1)
        model.forward_features(x2)  # no pop_batch in between: layer 1 must not pair with x1's last layer
        twice = cap.pop_batch()
        model.forward_features(x2)
        once = cap.pop_batch()
    assert ("layer_cka", 1) in twice[0] and ("cross_layer_attention_similarity", 2) in twice[1]
    for a, b in zip(twice, once, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_dynamic_image_size_places_tokens_on_the_grid_of_the_input():
    name, kw, prefix = MODELS["registers_no_cls"]  # test_vit2: dynamic_img_size, one register token
    model = make(name, **kw)
    assert model.dynamic_img_size
    x = torch.randn(1, 3, 48, 48)  # a 6 x 6 grid instead of the configured 4 x 4
    with torch.no_grad(), OversmoothingCapture(model, [], ["attention_distance"]) as cap:
        model.forward_features(x)
        _, heads = cap.pop_batch()
        states = reference_states(model, x)
    p = reference_attention(model.blocks[1], states[1], prefix)
    want = brute_attention_distance(p, prefix, grid_cols=6, query_start=prefix)
    torch.testing.assert_close(heads[("attention_distance", 2)].double(), want, atol=2e-3, rtol=0)


def test_iter_attention_probs_chunks_pair_up_across_layers():
    """Cross-layer similarity zips two layers' query chunks: equal shapes give equal chunk boundaries."""
    q1, k1, q2, k2 = (torch.randn(2, 2, 9, 4) for _ in range(4))
    a = [c.shape[-2] for c in attention_chunks(q1, k1, 0.5, 1, max_elements=40)]
    b = [c.shape[-2] for c in attention_chunks(q2, k2, 0.5, 1, max_elements=40)]
    assert a == b and len(a) > 1


# -- the command line, end to end ------------------------------------------------------------------------------
@pytest.mark.cli
def test_cli_metrics_all_per_head_writes_every_metric(tiny_folder, few_images, tmp_path):
    out = tmp_path / "all"
    res = invoke("measure", tiny_folder, few_images, "--out", out, "--metrics", "all", "--per-head", "-q")
    assert res.exit_code == 0, res.output
    depth, n_heads = TINY_ARGS["depth"], TINY_ARGS["num_heads"]
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers.columns) == LAYER_COLUMNS and (layers.n_images == 5).all()
    first_layer = {"layer_cka": 1, "cross_layer_attention_similarity": 2}
    for metric, m in ALL_METRICS.items():
        start = first_layer.get(metric, 0 if m.kind == "token" else 1)
        assert layers[layers.metric == metric].layer.tolist() == list(range(start, depth + 1)), metric
    heads = pd.read_csv(out / "heads.csv")
    assert list(heads.columns) == HEAD_COLUMNS
    for metric in ATTENTION_METRICS:
        rows = heads[heads.metric == metric]
        start = first_layer.get(metric, 1)
        assert len(rows) == (depth + 1 - start) * n_heads, metric
        per_layer = rows.groupby("layer")["mean"].mean()
        want = layers[layers.metric == metric].set_index("layer")["mean"]
        pd.testing.assert_series_equal(per_layer, want, check_names=False, atol=1e-6, rtol=0)  # float32 means
        assert (out / f"heads_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("heads_token_cosine.png")), "no heatmap for token metrics"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["metrics"]) == ALL and set(summary["layers"]) == set(ALL)
    for name, entry in summary["metrics"].items():
        assert entry["definition"] == ALL_METRICS[name].definition and entry["measured"] is True
        assert entry["tokens"] and isinstance(entry["prefix_included"], bool)
    assert summary["metrics"]["token_cosine"]["prefix_included"] is False
    assert summary["run"]["include_prefix"] is False
    assert (out / "curves.png").stat().st_size > 20_000


@pytest.mark.cli
def test_cli_values_equal_float64_reference_and_include_prefix(tiny_folder, few_images, tmp_path):
    from oversmooth_cli.data import build_loader, find_images
    from oversmooth_cli.reading.loading import load_model

    args = ["measure", str(tiny_folder), str(few_images), "--metrics", "rank_collapse,layer_cka,attention_entropy"]
    res = invoke(*args, "--out", tmp_path / "p", "-q")
    assert res.exit_code == 0, res.output
    res = invoke(*args, "--out", tmp_path / "i", "-q", "--include-prefix")
    assert res.exit_code == 0, res.output
    loaded = load_model(str(tiny_folder))
    ((x, _, _),) = list(build_loader(find_images(few_images), loaded.data_config, batch_size=16))
    with torch.no_grad():
        states = reference_states(loaded.model, x)
    for folder, start in (("p", 1), ("i", 0)):
        layers = pd.read_csv(tmp_path / folder / "layers.csv")
        assert sorted(layers.metric.unique()) == ["attention_entropy", "layer_cka", "rank_collapse"]
        for l, h in enumerate(states):
            got = layers[(layers.metric == "rank_collapse") & (layers.layer == l)]["mean"].item()
            assert got == pytest.approx(brute_rank_collapse(h[:, start:]).mean().item(), abs=1e-5)
        got = layers[(layers.metric == "layer_cka") & (layers.layer == 3)]["mean"].item()
        assert got == pytest.approx(
            brute_linear_cka(states[2][:, start:], states[3][:, start:]).mean().item(), abs=1e-5
        )
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        assert summary["metrics"]["rank_collapse"]["prefix_included"] is (folder == "i")
        assert summary["metrics"]["attention_entropy"]["tokens"].startswith("patch queries")
    assert not list((tmp_path / "p").glob("heads_*.png")), "heatmaps only with --per-head"


@pytest.mark.cli
def test_cli_metric_without_class_token_is_recorded_as_unavailable(few_images, tmp_path):
    model_args = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "depth=2"]
    out = str(tmp_path / "r")
    metrics = "default,cls_patch_cosine"
    res = invoke("measure", "test_vit2", few_images, "--out", out, "--metrics", metrics, *model_args)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    entry = summary["metrics"]["cls_patch_cosine"]
    assert entry["measured"] is False and "no class token" in entry["unavailable"]
    assert "cls_patch_cosine" not in set(pd.read_csv(tmp_path / "r" / "layers.csv").metric)


@pytest.mark.cli
def test_cli_unknown_metric_is_bad_input(tiny_folder, few_images, tmp_path):
    res = invoke("measure", tiny_folder, few_images, "--out", tmp_path / "x", "--metrics", "entropy")
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("Error: unknown metric(s) entropy; known: token_cosine")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


# -- attention entropy on talking-heads attention ------------------------------------------------------------------
def _cait_softmax(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CaiT's talking-heads softmax maps from the block's attention input, in the module's dtype (float64 here)."""
    B, N, C = x.shape
    H = attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    logits = (qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)
    return attn.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)


def _efficientformer_v2_softmax(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """EfficientFormer-V2's talking-heads softmax maps (before ``talking_head2`` mixes them)."""
    if attn.stride_conv is not None:
        x = attn.stride_conv(x)
    B, H = x.shape[0], attn.num_heads
    q = attn.q(x).reshape(B, H, -1, attn.N).permute(0, 1, 3, 2)
    k = attn.k(x).reshape(B, H, -1, attn.N)
    logits = (q @ k) * attn.scale + attn.get_attention_biases(x.device)
    return attn.talking_head1(logits).softmax(dim=-1)


@pytest.mark.parametrize(
    ("family", "reference"), [("cait", _cait_softmax), ("efficientformer_v2", _efficientformer_v2_softmax)]
)
def test_attention_entropy_of_talking_heads_is_the_entropy_of_their_softmax_maps(family, reference):
    """Talking heads mix the heads' softmax maps after the softmax, into weights of any sign: the entropy (NaN from
    those weights before) is that of the softmax maps, equal to a float64 recomputation from the block's input."""
    from oversmooth_cli.measuring.config import MeasureConfig
    from oversmooth_cli.measuring.run import measure_batches
    from oversmooth_cli.measuring.summary import layer_table
    from oversmooth_cli.reading.registry import resolve_adapter
    from oversmooth_cli.reading.small_models import SMALL_MODELS

    recipe = SMALL_MODELS[family]
    model = recipe.create()
    with torch.no_grad():  # sharper, non-uniform attention than random init gives
        for name, p in model.named_parameters():
            if name.endswith(("qkv.weight", "q.conv.weight", "k.conv.weight", "proj_l.weight", "talking_head1.weight")):
                p.mul_(25.0)
    x = torch.randn(3, 3, recipe.img_size, recipe.img_size, generator=torch.Generator().manual_seed(0))
    metrics = "attention_entropy,attention_entropy_normalised,attention_std"
    result = measure_batches(model, iter([(x, [0, 1, 2], [])]), torch.device("cpu"), MeasureConfig(metrics=metrics))
    got = layer_table(result).set_index(["metric", "layer"])["mean"]

    ref_model = copy.deepcopy(model).double()
    specs = resolve_adapter(ref_model).block_specs(ref_model)
    talking = {i: s for i, s in enumerate(specs, start=1) if s.attention is not None and s.group.reader != "intercept"}
    assert talking, "the family has talking-heads layers"
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        s.attention.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0]))
        for i, s in talking.items()
    ]
    with torch.no_grad():
        ref_model(x.double())
        for h in hooks:
            h.remove()
        for layer, spec in talking.items():
            probs = reference(spec.attention, inputs[layer])[:, :, spec.query_prefix :]
            entropy = -(probs * probs.log()).sum(-1)  # (B, H, T): no zero in a softmax of finite logits
            for name, scale in (
                ("attention_entropy", 1.0),
                ("attention_entropy_normalised", math.log(probs.shape[-1])),
            ):
                want = (entropy / scale).mean(dim=(1, 2)).mean().item()
                assert math.isfinite(got[(name, layer)]), (name, layer)
                assert got[(name, layer)] == pytest.approx(want, abs=1e-5), (name, layer)
            assert entropy.mean().item() < 0.98 * math.log(probs.shape[-1])  # not the uniform map
