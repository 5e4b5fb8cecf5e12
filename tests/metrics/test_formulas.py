"""Metric formulas and accumulators against float64 brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from oversmooth_cli.metrics.accumulate import OversmoothingAccumulator, RunningMoments
from oversmooth_cli.metrics.formulas import attention_row_std, attention_std, token_cosine

from .._helpers import attention_chunks, brute_attention_std, brute_token_cosine

pytestmark = pytest.mark.metrics

BATCH_SIZE = 4
NUM_BATCHES = 5


@pytest.mark.parametrize("shape", [(3, 2, 5), (2, 7, 16), (1, 50, 3)])
def test_token_cosine_matches_brute_force(shape):
    x = torch.randn(*shape) + 0.3
    torch.testing.assert_close(token_cosine(x).double(), brute_token_cosine(x), atol=1e-5, rtol=0)


def test_token_cosine_float64_is_exact():
    x = torch.randn(3, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(token_cosine(x), brute_token_cosine(x), atol=1e-12, rtol=0)


def test_token_cosine_extremes():
    v = torch.randn(1, 1, 8)
    assert token_cosine(v.expand(2, 6, 8)).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)  # collapsed
    assert token_cosine(torch.eye(5).unsqueeze(0)).item() == pytest.approx(0.0, abs=1e-7)  # orthogonal
    assert token_cosine(torch.stack([v[0, 0], -v[0, 0]]).unsqueeze(0)).item() == pytest.approx(-1.0, abs=1e-6)


def test_token_cosine_zero_token_counts_as_zero_cosine():
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    x[0, 2] = 0
    torch.testing.assert_close(token_cosine(x), brute_token_cosine(x), atol=1e-12, rtol=0)


def test_token_cosine_bf16_input_is_computed_in_float32():
    x = torch.randn(2, 6, 4)
    out = token_cosine(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), brute_token_cosine(x.bfloat16().float()), atol=1e-5, rtol=0)


def test_token_cosine_rejects_single_token():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_cosine(torch.randn(2, 1, 4))


def test_token_cosine_is_differentiable():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(token_cosine, (x,))


def test_attention_std_matches_brute_force():
    probs = torch.randn(2, 3, 6, 7).softmax(-1)
    torch.testing.assert_close(attention_std(probs).double(), brute_attention_std(probs), atol=1e-6, rtol=0)
    assert attention_row_std(probs).shape == (2, 3, 6)


def test_attention_std_extremes():
    K = 9
    uniform = torch.full((1, 1, 4, K), 1.0 / K)
    assert attention_std(uniform).item() == pytest.approx(0.0, abs=1e-7)
    one_hot = torch.zeros(1, 1, 4, K)
    one_hot[..., 0] = 1
    assert attention_std(one_hot).item() == pytest.approx(math.sqrt(K - 1) / K, abs=1e-6)


@pytest.mark.parametrize("block_elements", [1, 30, 1 << 20])
def test_attention_row_std_in_row_blocks_matches_brute_force(block_elements):
    probs = torch.randn(2, 3, 13, 7).softmax(-1)[:, :, 2:]  # a strided view, as the capture passes it
    want = probs.double().std(dim=-1, correction=0)
    got = attention_row_std(probs, block_elements=block_elements)
    assert got.shape == (2, 3, 11)
    torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=0)
    rows = torch.rand(5, 7)  # rows that do not sum to 1 (talking heads, gating): still the exact std
    torch.testing.assert_close(
        attention_row_std(rows, 7).double(), rows.double().std(-1, correction=0), atol=1e-7, rtol=0
    )
    assert attention_row_std(rows[0]).shape == ()


@pytest.mark.parametrize("max_elements", [1, 50, 1 << 20])
@pytest.mark.parametrize("query_start", [0, 2])
def test_iter_attention_probs_with_scratch_memory_is_the_same_and_allocates_no_chunk(max_elements, query_start):
    B, H, T, dh = 2, 3, 11, 4
    qkv = torch.randn(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # strided q, k as timm's attention makes them
    q, k = qkv[0], qkv[1]
    bias = torch.randn(1, H, T, T)
    memory: dict[str, torch.Tensor] = {}

    def scratch(slot: str, shape: tuple[int, ...]) -> torch.Tensor:
        memory.setdefault(slot, torch.empty(B * H * T * max(T, dh)))
        return memory[slot][: math.prod(shape)].view(shape)

    plain = [c.clone() for c in attention_chunks(q, k, 0.5, query_start, bias=bias, max_elements=max_elements)]
    pointers = set()
    for want, got in zip(plain, attention_chunks(q, k, 0.5, query_start, bias, max_elements, scratch), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        pointers.add(got.data_ptr())
    assert pointers == {memory["probs"].data_ptr()}, "every chunk lives in the same scratch memory"


@pytest.mark.parametrize("max_elements", [1, 50, 1 << 20])
@pytest.mark.parametrize("query_start", [0, 2])
def test_iter_attention_probs_chunks_equal_full_softmax(max_elements, query_start):
    B, H, T, dh = 2, 3, 11, 4
    q, k = torch.randn(B, H, T, dh), torch.randn(B, H, T, dh)
    bias = torch.randn(1, H, T, T)
    scale = dh**-0.5
    chunks = list(attention_chunks(q, k, scale, query_start, bias=bias, max_elements=max_elements))
    got = torch.cat(chunks, dim=-2)
    want = ((q.double() @ k.double().transpose(-1, -2)) * scale + bias.double()).softmax(-1)[:, :, query_start:]
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    if max_elements == 1:
        assert len(chunks) == T - query_start


def test_running_moments_stream_equals_concatenated_reference():
    data = [torch.randn(BATCH_SIZE, 3) * (i + 1) for i in range(NUM_BATCHES)]
    m = RunningMoments((3,))
    for batch in data:
        m.update(batch)
    full = torch.cat(data).double()
    s = m.compute()
    n = full.shape[0]
    torch.testing.assert_close(s["mean"], full.mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(s["std"], full.std(0, correction=1), atol=1e-10, rtol=0)
    stats = pytest.importorskip("scipy.stats")
    half = stats.t.ppf(0.975, n - 1) * full.std(0, correction=1) / math.sqrt(n)  # Student's t, n - 1 = 19
    torch.testing.assert_close(s["ci95_low"], full.mean(0) - half, atol=1e-10, rtol=0)
    torch.testing.assert_close(s["ci95_high"], full.mean(0) + half, atol=1e-10, rtol=0)
    assert s["n"].item() == n


def test_running_moments_merge_and_state_roundtrip():
    a, b = RunningMoments(), RunningMoments()
    x = torch.rand(13)
    a.update(x[:6])
    b.update(x[6:])
    whole = RunningMoments()
    whole.update(x)
    merged = a.merge(b)
    for key in ("mean", "std"):
        torch.testing.assert_close(merged.compute()[key], whole.compute()[key], atol=1e-12, rtol=0)
    copy = RunningMoments()
    copy.load_state(whole.state())
    torch.testing.assert_close(copy.compute()["mean"], whole.compute()["mean"])
    with pytest.raises(ValueError):
        RunningMoments((2,)).merge(RunningMoments((3,)))


def test_running_moments_single_sample_and_empty():
    m = RunningMoments()
    assert math.isnan(m.compute()["mean"].item())
    m.update(torch.tensor([0.25]))
    s = m.compute()
    assert s["mean"].item() == 0.25 and s["std"].item() == 0.0 and math.isnan(s["ci95_low"].item())


def test_accumulator_streams_like_one_batch_and_merges():
    layers = [{("token_cosine", l): torch.rand(BATCH_SIZE) for l in range(3)} for _ in range(NUM_BATCHES)]
    heads = [{("attention_std", l): torch.rand(BATCH_SIZE, 2) for l in (1, 2)} for _ in range(NUM_BATCHES)]
    acc, first, second = OversmoothingAccumulator(), OversmoothingAccumulator(), OversmoothingAccumulator()
    for i, (lv, hv) in enumerate(zip(layers, heads, strict=True)):
        acc.update(lv, hv)
        (first if i < 2 else second).update(lv, hv)
    first.merge(second)
    rows = list(acc.layer_rows())
    assert [(r["metric"], r["layer"]) for r in rows] == [("token_cosine", l) for l in range(3)]
    for r in rows:
        ref = torch.cat([b[("token_cosine", r["layer"])] for b in layers]).double()
        assert r["mean"] == pytest.approx(ref.mean().item(), abs=1e-12)
        assert r["std"] == pytest.approx(ref.std().item(), abs=1e-10)
        assert r["n_images"] == BATCH_SIZE * NUM_BATCHES
    for mine, theirs in zip(rows, first.layer_rows(), strict=True):
        assert mine["mean"] == pytest.approx(theirs["mean"], abs=1e-12)
        assert mine["std"] == pytest.approx(theirs["std"], abs=1e-10)
    for mine, theirs in zip(acc.head_rows(), first.head_rows(), strict=True):
        assert mine["mean"] == pytest.approx(theirs["mean"], abs=1e-12)
    head_rows = list(acc.head_rows())
    assert len(head_rows) == 2 * 2
    ref = torch.cat([b[("attention_std", 2)] for b in heads]).double()[:, 1]
    (row,) = [r for r in head_rows if r["layer"] == 2 and r["head"] == 1]
    assert row["mean"] == pytest.approx(ref.mean().item(), abs=1e-12)
