"""Attention in cache-sized blocks of batch rows and query rows (the CPU path of the ``inline`` and ``qk`` taps).

The blocks must cover every (batch row, query row) once and equal the whole softmax; a capture computing its
attention in small blocks must give the values and the features it gives with blocks of the whole batch, for
windowed attention, relative position bias and rotary embeddings too.
"""

from __future__ import annotations

import math

import pytest
import torch

from oversmooth_cli.metrics.formulas import attention_row_std, scalar_like, softmax_row_std
from oversmooth_cli.reading.attention import Scratch, block_plan, iter_attention_blocks
from oversmooth_cli.reading.capture import OversmoothingCapture
from oversmooth_cli.reading.small_models import SMALL_MODELS

pytestmark = pytest.mark.capture

B, H, T, DH = 3, 2, 9, 4
BIASES = {
    "none": None,
    "per_head": (1, H, T, T),
    "per_batch_row": (B, H, T, T),
    "heads_only": (H, T, T),
    "rows_only": (T, T),
}


@pytest.mark.parametrize("block_elements", [None, 1, 25, 2 * T * T, 1 << 20])
@pytest.mark.parametrize("query_start", [0, 2])
@pytest.mark.parametrize("bias", list(BIASES))
def test_blocks_cover_every_row_once_and_equal_the_whole_softmax(block_elements, query_start, bias):
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3, H, DH, generator=gen).permute(2, 0, 3, 1, 4)  # strided, as timm makes them
    q, k = qkv[0], qkv[1]
    b = None if BIASES[bias] is None else torch.randn(BIASES[bias], generator=gen)
    logits = q.double() @ k.double().transpose(-1, -2) * 0.5
    want = (logits if b is None else logits + b.double()).softmax(-1)
    got = torch.full((B, H, T, T), float("nan"), dtype=torch.float64)
    seen = torch.zeros(B, T, dtype=torch.long)
    blocks = list(iter_attention_blocks(q, k, 0.5, query_start, b, 1 << 24, None, block_elements))
    for b0, b1, start, probs in blocks:
        stop = start + probs.shape[-2]
        got[b0:b1, :, start:stop] = probs.double()
        seen[b0:b1, start:stop] += 1
    assert (seen[:, query_start:] == 1).all() and (seen[:, :query_start] == 0).all()
    torch.testing.assert_close(got[:, :, query_start:], want[:, :, query_start:], atol=1e-6, rtol=0)
    if block_elements is not None:
        assert all(p.numel() <= max(block_elements, H * T) for *_, p in blocks), "a block exceeds its budget"


def test_block_plan_keeps_whole_images_while_they_fit_and_shares_them_out_evenly():
    per_row, queries = 6 * 197, 197
    image = per_row * queries
    assert block_plan(32, per_row, queries, 1) == [(0, 32, [(1, 197)])]  # no block budget: every batch row
    plan = block_plan(32, per_row, queries, 0, block_elements=3 * image)
    assert [(b0, b1) for b0, b1, _ in plan] == [(i, min(32, i + 3)) for i in range(0, 32, 3)]
    plan = block_plan(10, per_row, queries, 0, block_elements=4 * image)  # 4 fit: 3 blocks
    assert [b1 - b0 for b0, b1, _ in plan] == [4, 4, 2]
    plan = block_plan(2, per_row, queries, 1, block_elements=image // 4)  # less than an image: row chunks
    assert [(b0, b1) for b0, b1, _ in plan] == [(0, 1), (1, 2)]
    chunks = plan[0][2]
    assert chunks[0][0] == 1 and chunks[-1][1] == queries and len(chunks) == 4  # 196 rows, 49 a chunk
    assert block_plan(4, per_row, queries, 0, max_elements=image, block_elements=1 << 30)[0][:2] == (0, 1)


FAMILIES = ["vision_transformer", "swin_transformer", "beit", "eva"]
METRICS = {
    "token_metrics": ["token_cosine"],
    "attention_metrics": [
        "attention_std",
        "attention_entropy",
        "attention_distance",
        "cross_layer_attention_similarity",
    ],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tap", ["inline", "qk"])
def test_capture_in_small_blocks_equals_blocks_of_the_whole_batch(family, tap):
    """Windows (Swin), relative position bias (BEiT) and rotary embeddings (EVA) split into blocks of a few batch
    rows, or of a few query rows of one: the same values, and with ``inline`` the same features, as whole blocks."""
    recipe = SMALL_MODELS[family]
    model = recipe.create()
    x = torch.randn(3, 3, recipe.img_size, recipe.img_size, generator=torch.Generator().manual_seed(1))
    results = []
    with torch.no_grad():
        for block_elements in (None, 64, 4096):
            with OversmoothingCapture(model, attention_tap=tap, **METRICS) as cap:
                cap.block_elements = block_elements
                features = model.forward_features(x)
                results.append((features, cap.pop_batch()))
    (want_features, want), *others = results
    for features, got in others:
        for g, w in zip(got, want, strict=True):  # same keys; float rounding only (distances are in pixels)
            assert g.keys() == w.keys()
            for key in w:
                torch.testing.assert_close(g[key], w[key], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(features, want_features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [2, 7, 197])
def test_softmax_row_std_equals_the_two_pass_std_for_softmax_rows(keys):
    gen = torch.Generator().manual_seed(keys)
    logits = torch.cat(
        [
            torch.randn(4, 3, keys, generator=gen) * 4,  # peaked rows
            torch.randn(4, 3, keys, generator=gen) * 1e-4,  # nearly uniform rows: std close to 0
            torch.zeros(4, 1, keys),  # uniform rows: std 0
            torch.full((4, 1, keys), -math.inf).index_fill(-1, torch.tensor([0]), 0.0),  # one-hot rows (masked keys)
        ],
        dim=1,
    )
    probs = logits.softmax(-1)[:, 1:]  # a strided view, as the capture passes it
    want = probs.double().std(-1, correction=0)
    torch.testing.assert_close(softmax_row_std(probs).double(), want, atol=1e-7, rtol=0)
    out = torch.empty(probs.shape)
    torch.testing.assert_close(softmax_row_std(probs, centred=out), attention_row_std(probs), atol=1e-7, rtol=0)


def test_softmax_row_std_writes_into_out_and_matches_the_float64_std():
    gen = torch.Generator().manual_seed(3)
    probs = (torch.randn(2, 3, 6, 11, generator=gen) * 3).softmax(-1)
    centred, out = torch.empty(probs.shape), torch.full((2, 3, 6), float("nan"))
    got = softmax_row_std(probs, centred=centred, out=out)
    assert got is out
    torch.testing.assert_close(out.double(), probs.double().std(-1, correction=0), atol=1e-7, rtol=0)


def test_scratch_views_are_kept_per_shape_and_share_their_slot():
    scratch = Scratch()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        a = scratch.view("probs", (2, 3, 4), cpu, torch.float32)
        assert scratch.view("probs", (2, 3, 4), cpu, torch.float32) is a, "the same shape gives the same view"
        b = scratch.view("probs", (6, 4), cpu, torch.float32)
        assert b.data_ptr() == a.data_ptr() and b.is_contiguous(), "another shape views the same memory"
        bigger = scratch.view("probs", (100,), cpu, torch.float32)  # the slot grows: old views are not reused
        assert scratch.view("probs", (2, 3, 4), cpu, torch.float32).data_ptr() == bigger.data_ptr()
        assert scratch.view("probs", (2, 3, 4), cpu, torch.float64).dtype == torch.float64
    outside = scratch.view("probs", (2, 3, 4), cpu, torch.float64)  # inference tensors cannot be written outside
    assert not outside.is_inference()
    outside.fill_(1.0)


def test_scalar_like_has_the_dtype_and_device_and_is_made_once_in_inference_mode():
    x = torch.zeros(3, dtype=torch.float64)
    with torch.inference_mode():
        c = scalar_like(0.1, x)
        assert c.dtype == torch.float64 and c.dim() == 0 and c.item() == 0.1
        assert scalar_like(0.1, x) is c
    outside = scalar_like(0.1, x)
    assert not outside.is_inference() and outside.item() == 0.1


def test_blocks_under_cpu_autocast_stay_float32():
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(B, H, T, DH, generator=gen) for _ in range(2))
    want = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
    scratch = Scratch().bind(torch.device("cpu"), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for b0, b1, start, probs in iter_attention_blocks(q, k, 0.5, 0, None, 1 << 24, scratch, 2 * H * T * T):
            assert probs.dtype == torch.float32
            torch.testing.assert_close(probs, want[b0:b1, :, start : start + probs.shape[-2]], atol=1e-6, rtol=0)
