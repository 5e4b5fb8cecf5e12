"""Hook-based capture on real timm models against an independent float64 recomputation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F

from oversmooth_cli.reading.attention import resolve_attention_tap
from oversmooth_cli.reading.capture import OversmoothingCapture
from oversmooth_cli.reading.readers import UnsupportedModelError
from oversmooth_cli.reading.registry import resolve_adapter

from .._helpers import (
    IMG,
    MODELS,
    TINY_ARCH,
    TINY_ARGS,
    TINY_ARGS_DEPTH2,
    SdpaCalls,
    assert_same_values,
    brute_attention_std,
    brute_token_cosine,
    make,
    reference_attention,
    reference_states,
)

pytestmark = pytest.mark.capture


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("tap", ["qk", "inline", "softmax"])
def test_capture_matches_float64_reference(key, tap):
    name, kw, prefix = MODELS[key]
    model = make(name, **kw)
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        states = reference_states(model, x)
        with OversmoothingCapture(model, attention_tap=tap) as cap:
            assert cap.prefix == prefix
            model.forward_features(x)
            layers, heads = cap.pop_batch()
    depth = len(model.blocks)
    assert [info.index for info in cap.layers] == list(range(depth + 1))
    assert sorted(layers) == sorted(
        [("token_cosine", l) for l in range(depth + 1)] + [("attention_std", l) for l in range(1, depth + 1)]
    )
    for l, h in enumerate(states):
        want = brute_token_cosine(h[:, prefix:])
        torch.testing.assert_close(layers[("token_cosine", l)].double(), want, atol=1e-5, rtol=0)
    for l in range(1, depth + 1):
        want_heads = brute_attention_std(reference_attention(model.blocks[l - 1], states[l - 1], prefix))
        torch.testing.assert_close(heads[("attention_std", l)].double(), want_heads, atol=1e-5, rtol=0)
        torch.testing.assert_close(layers[("attention_std", l)].double(), want_heads.mean(-1), atol=1e-5, rtol=0)


def test_qk_tap_equals_unfused_softmax_and_keeps_fused_attention():
    model = make(TINY_ARCH, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    for blk in model.blocks:
        blk.attn.fused_attn = True
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        with OversmoothingCapture(model, attention_tap="qk", max_elements=100) as cap:
            assert all(blk.attn.fused_attn for blk in model.blocks)
            model.forward_features(x)
            qk = cap.pop_batch()
        with OversmoothingCapture(model, attention_tap="softmax") as cap:
            assert not any(blk.attn.fused_attn for blk in model.blocks)
            model.forward_features(x)
            sm = cap.pop_batch()
    assert all(blk.attn.fused_attn for blk in model.blocks), "softmax tap must restore fused_attn"
    assert_same_values(qk, sm)


def test_hooks_are_removed_and_model_output_unchanged():
    model = make(TINY_ARCH, **TINY_ARGS_DEPTH2)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        before = model.forward_features(x)
        with OversmoothingCapture(model) as cap:
            during = model.forward_features(x)
            cap.pop_batch()
        after = model.forward_features(x)
    torch.testing.assert_close(during, before)
    torch.testing.assert_close(after, before)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_pop_batch_clears_and_values_are_on_cpu():
    model = make(TINY_ARCH, **{**TINY_ARGS, "depth": 1})
    with torch.no_grad(), OversmoothingCapture(model) as cap:
        model.forward_features(torch.randn(2, 3, IMG, IMG))
        layers, heads = cap.pop_batch()
        assert cap.pop_batch() == ({}, {})
    assert all(v.device.type == "cpu" and v.shape == (2,) for v in layers.values())
    assert all(v.shape == (2, 2) for v in heads.values())


def test_unsupported_family_names_itself():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(UnsupportedModelError, match=r"family 'resnet'.*supported families: .*vision_transformer"):
        resolve_adapter(model)


def test_bad_tap_is_refused():
    model = make(TINY_ARCH, **{**TINY_ARGS, "depth": 1})
    with pytest.raises(ValueError, match="attention_tap"):
        OversmoothingCapture(model, attention_tap="nope")


def test_auto_tap_is_inline_on_cpu_and_qk_elsewhere():
    assert resolve_attention_tap("auto", "cpu") == "inline"
    assert resolve_attention_tap("auto", torch.device("cuda", 1)) == "qk"
    assert resolve_attention_tap("auto", "mps") == "qk"
    assert resolve_attention_tap("softmax", "cuda") == "softmax"
    with pytest.raises(ValueError, match="attention_tap must be one of"):
        resolve_attention_tap("fast", "cpu")
    model = make(TINY_ARCH, **{**TINY_ARGS, "depth": 1})
    assert OversmoothingCapture(model).attention_tap == "inline"
    assert OversmoothingCapture(model, attention_tap="qk").attention_tap == "qk"


@pytest.mark.parametrize("max_elements", [100, 1 << 24])  # 100: one query row per chunk, prefix-only chunks first
def test_inline_tap_answers_every_sdpa_call_with_the_same_features_and_values(max_elements):
    model = make(TINY_ARCH, **TINY_ARGS, reg_tokens=4)
    for blk in model.blocks:
        blk.attn.fused_attn = True
    x = torch.randn(2, 3, IMG, IMG)
    attention = ["attention_std", "attention_entropy", "cross_layer_attention_similarity"]
    metrics = {"token_metrics": ["token_cosine"], "attention_metrics": attention}
    with torch.no_grad():
        with SdpaCalls() as fused_calls:
            fused = model.forward_features(x)
        with OversmoothingCapture(model, attention_tap="qk", **metrics) as cap:
            model.forward_features(x)
            want = cap.pop_batch()
        with (
            SdpaCalls() as inline_calls,
            OversmoothingCapture(model, attention_tap="inline", max_elements=max_elements, **metrics) as cap,
        ):
            assert cap.prefix == 5
            inline = model.forward_features(x)
            got = cap.pop_batch()
        after = model.forward_features(x)
    assert fused_calls.calls == 3 and inline_calls.calls == 0, "inline computes each attention itself, once"
    torch.testing.assert_close(inline, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, fused, atol=0, rtol=0)
    assert all(blk.attn.fused_attn for blk in model.blocks)
    assert ("cross_layer_attention_similarity", 2) in got[0] and ("attention_entropy", 3) in got[1]
    assert_same_values(got, want)


def test_inline_tap_leaves_calls_that_need_gradients_to_the_model():
    model = make(TINY_ARCH, **TINY_ARGS_DEPTH2)
    x = torch.randn(2, 3, IMG, IMG)
    want = model.forward_features(x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), model.blocks[0].attn.qkv.weight)
    with SdpaCalls() as calls, OversmoothingCapture(model, attention_tap="inline") as cap:
        got = model.forward_features(x)
        layers, _ = cap.pop_batch()
    (got_grad,) = torch.autograd.grad(got.square().sum(), model.blocks[0].attn.qkv.weight)
    assert calls.calls == 2, "with autograd on, the model's own SDPA runs (the statistics come from q and k)"
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    assert ("attention_std", 2) in layers


@pytest.mark.parametrize("tap", ["qk", "inline"])
def test_autocast_state_of_the_model_is_left_alone(tap):
    """Chunk generators must not hold autocast off across a yield (a half-consumed one would leak it to the model);
    the statistics of the first attention (the same bf16 q and k for both taps) are computed in float32 alike."""
    model = make(TINY_ARCH, patch_size=8, depth=3, embed_dim=48, num_heads=2)  # scale 24**-0.5
    x = torch.randn(2, 3, IMG, IMG)
    with (
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16),
        OversmoothingCapture(model, attention_tap="qk") as cap,
    ):
        model.forward_features(x)
        reference = cap.pop_batch()[1][("attention_std", 1)]
    seen = []
    handles = [b.mlp.fc1.register_forward_hook(lambda _m, _a, y: seen.append(y.dtype)) for b in model.blocks]
    metrics = ["attention_std", "cross_layer_attention_similarity"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with OversmoothingCapture(model, attention_metrics=metrics, attention_tap=tap, max_elements=200) as cap:
            model.forward_features(x)
            layers, heads = cap.pop_batch()
        still_on = torch.is_autocast_enabled("cpu")
    for h in handles:
        h.remove()
    assert seen == [torch.bfloat16] * 3 and still_on, "every block after an attention still runs under autocast"
    assert torch.isfinite(layers[("attention_std", 3)]).all()
    torch.testing.assert_close(heads[("attention_std", 1)], reference, atol=1e-8, rtol=0)


class OneSdpaCall(torch.nn.Module):
    """An attention module that makes one SDPA call with fixed keyword arguments."""

    def __init__(self, num_heads: int, **kwargs) -> None:
        super().__init__()
        self.num_heads, self.kwargs = num_heads, kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs)


def _bool_mask(T: int, S: int, full_row: bool = True) -> torch.Tensor:
    mask = torch.rand(T, S, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[:, 0] = full_row  # every query keeps a key, unless full_row is False and the row was all False
    if not full_row:
        mask[0] = False
    return mask


INLINE_CALLS = {  # q, k, v shapes, SDPA keyword arguments, heads, heads_dim
    "4d_dv_differs": ((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6), {}, 3, -3),
    "bool_mask": ((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4), {"attn_mask": _bool_mask(5, 7)}, 3, -3),
    "additive_mask": ((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4), {"attn_mask": torch.randn(1, 3, 5, 7)}, 3, -3),
    "causal_and_scale": ((2, 3, 6, 4), (2, 3, 6, 4), (2, 3, 6, 4), {"is_causal": True, "scale": 0.3}, 3, -3),
    "grouped_keys": ((2, 4, 5, 4), (2, 2, 5, 4), (2, 2, 5, 4), {"enable_gqa": True}, 4, -3),
    "3d_heads_in_batch": ((6, 5, 4), (6, 7, 4), (6, 7, 4), {}, 3, -3),
    "5d_heads_at_dim_1": ((2, 3, 4, 5, 4), (2, 3, 4, 9, 4), (2, 3, 4, 9, 4), {}, 3, 1),
}


@pytest.mark.parametrize("case", list(INLINE_CALLS))
def test_inline_tap_answers_sdpa_calls_of_every_layout_like_sdpa(case):
    from oversmooth_cli.reading.readers import READERS

    q_shape, k_shape, v_shape, kwargs, heads, heads_dim = INLINE_CALLS[case]
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)
    module = OneSdpaCall(heads, **kwargs)
    with torch.no_grad():
        want = module(q, k, v)
    seen = {"attend": 0, "qk": 0}

    def on_attend(q4, k4, v4, scale, bias):  # a float64 reference computed from what the reader hands over
        seen["attend"] += 1
        logits = q4.double() @ k4.double().transpose(-1, -2) * scale
        return (logits if bias is None else logits + bias.double()).softmax(-1) @ v4.double()

    sink = SimpleNamespace(qk=lambda *a: seen.update(qk=seen["qk"] + 1), probs=lambda p: None, attend=on_attend)
    handles, undo = READERS["intercept"].install(module, "inline", sink, heads_dim)
    try:
        with torch.no_grad():
            got = module(q, k, v)
    finally:
        for h in handles:
            h.remove()
        undo()
    assert seen == {"attend": 1, "qk": 0}
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"dropout_p": 0.5}, {"attn_mask": _bool_mask(5, 7, full_row=False)}],
    ids=["dropout", "a_query_without_keys"],
)
def test_inline_tap_leaves_calls_it_cannot_answer_to_sdpa(kwargs):
    from oversmooth_cli.reading.readers import READERS, inline_inputs

    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    assert inline_inputs((q, k, v), kwargs, 3) is None
    module, seen = OneSdpaCall(3, **kwargs), []
    sink = SimpleNamespace(
        qk=lambda *a: seen.append("qk"), probs=lambda p: None, attend=lambda *a: seen.append("attend")
    )
    handles, _ = READERS["intercept"].install(module, "inline", sink, -3)
    with torch.no_grad():
        module(q, k, v)
    for h in handles:
        h.remove()
    assert seen == ["qk"], "the call ran as SDPA and its q and k were reported as in the qk tap"
