"""Benchmark: where the metric pass's attention time goes, one layer of a timm ViT at a time.

The default CPU tap (``inline``) answers each attention module's SDPA call itself: it computes ``softmax(q k^T) v``
unfused, block by block, and measures every probability row on the way. This script times, on the ``q``, ``k``,
``v`` that the first block of ``--model`` makes from random tokens (the model's own strided views), interleaved,
median over ``--samples``:

* ``sdpa``: what the bare model runs (PyTorch's fused CPU flash-attention kernel);
* ``inline tap``: what ``measure`` runs instead (attention output and the ``attention_std`` rows);
* the eager operations the unfused path cannot avoid, each on one block of the tap's size, repeated to cover the
  layer, in a hot cache: ``q k^T``, softmax, ``p v``, and the row std (``|p - 1/K|`` and its norm).

The sum of the last rows is a floor for any exact unfused path built from PyTorch operations; the ``sdpa`` share of
the bare forward pass (printed from ``torch.profiler``) says how much of the whole pass the attention is. Together
they bound ``(2)/(1)`` of ``bench_measure.py``::

    python benchmarks/bench_attention.py --model vit_tiny_patch16_224
    python benchmarks/bench_attention.py --model vit_small_patch16_224 --img-size 384 --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from oversmooth_cli.reading.attention import CPU_BLOCK_ELEMENTS, block_plan
from oversmooth_cli.reading.capture import LayerContext, OversmoothingCapture
from oversmooth_cli.reading.loading import load_model


def interleaved(cases: dict[str, Callable[[], object]], samples: int, inner: int) -> dict[str, list[float]]:
    """Milliseconds per call of every case, the cases taking turns within each sample."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(samples):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner * 1e3)
    return times


def sdpa_share(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of the bare ``forward_features`` CPU time spent in SDPA kernels (``torch.profiler``)."""
    with torch.inference_mode():
        model.forward_features(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.forward_features(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--inner", type=int, default=3)
    args = p.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model, pretrained=False, model_args={"img_size": args.img_size}).model
    attn = model.blocks[0].attn
    B, H = args.batch_size, attn.num_heads
    T = model.patch_embed.num_patches + model.num_prefix_tokens
    C = model.embed_dim
    dh, K, prefix = C // H, T, model.num_prefix_tokens
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, args.img_size, args.img_size, generator=gen)
    with torch.inference_mode():
        tokens = torch.randn(B, T, C, generator=gen)
        q, k, v = attn.qkv(tokens).reshape(B, T, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
        capture = OversmoothingCapture(model, [], ["attention_std"], "inline")
        capture.__enter__()

        context = LayerContext(1, capture.prefix, capture.cls_index, capture.geometry)

        def inline_tap() -> None:
            capture._metrics.on_qk(context, q, k, attn.scale, v=v)
            capture._metrics.pop()

        b0, b1, chunks = block_plan(B, H * T, T, 0, capture.max_elements, CPU_BLOCK_ELEMENTS)[0]
        n, rows = b1 - b0, chunks[0][1] - chunks[0][0]
        blocks = sum(len(c) for *_, c in block_plan(B, H * T, T, 0, capture.max_elements, CPU_BLOCK_ELEMENTS))
        qs, ks, vs = (torch.randn(n, H, r, dh, generator=gen) for r in (rows, T, T))
        probs = torch.softmax(qs @ ks.transpose(-2, -1), dim=-1)
        out, centred = torch.empty(n, H, rows, dh), torch.empty(n, H, rows - prefix, K)

        def per_layer(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                for _ in range(blocks):
                    fn()

            return run

        cases = {
            "sdpa (bare model)": lambda: F.scaled_dot_product_attention(q, k, v),
            "inline tap (measure)": inline_tap,
            "q k^T": per_layer(lambda: torch.matmul(qs, ks.transpose(-2, -1), out=probs)),
            "softmax": per_layer(lambda: torch.softmax(probs, dim=-1, out=probs)),
            "p v": per_layer(lambda: torch.matmul(probs, vs, out=out)),
            "row std": per_layer(
                lambda: torch.linalg.vector_norm(torch.sub(probs[:, :, prefix:], 1.0 / K, out=centred), dim=-1)
            ),
        }
        times = interleaved(cases, args.samples, args.inner)
        capture.close()
    share = sdpa_share(model, images)
    base = statistics.median(times["sdpa (bare model)"])
    print(
        f"{args.model} at {args.img_size} px, batch {B}, {H} heads, {T} tokens: {blocks} blocks per layer of "
        f"{n} image(s) x {rows} query rows; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"SDPA share of the bare forward pass (profiler CPU time): {share:.1%}")
    print("| per layer | ms (median) | x sdpa |\n|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f} |")
    floor = sum(statistics.median(times[n]) for n in ("q k^T", "softmax", "p v", "row std")) / base
    print(f"eager floor (sum of the last four rows): {floor:.2f} x sdpa")
    tap = statistics.median(times["inline tap (measure)"]) / base
    print(
        f"(2)/(1) if the attention were the only cost: with the tap {1 / (1 + share * (tap - 1)):.3f}, "
        f"at the eager floor {1 / (1 + share * (floor - 1)):.3f}"
    )


if __name__ == "__main__":
    main()
