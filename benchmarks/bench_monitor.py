"""Benchmark: what :class:`~oversmooth_cli.measuring.monitor.OversmoothingMonitor` adds to the time of a training run.

The bundled example: ``examples/digits-vit`` (8 blocks, 65 tokens of width 96) fine-tuned with AdamW and
cross-entropy on the labelled digits (``../shared/data/digits/train`` when present, else the 40 of
``tests/data/digits/train``), batches of ``--batch-size`` decoded once into memory, so the timed loop is the training
compute alone (no decoding: a conservative denominator). The monitor measures the 40 bundled example digits
(``examples/images``) with the default metrics at the default frequency (``every=100``) and at step 0.

Each repeat runs the same ``--steps`` steps from the same weights twice, without and with the monitor, in alternating
order (background load hits both alike); the figures are medians over repeats:

* ``overhead``: ``time with / time without - 1`` (what the user pays; noisy when the machine is shared);
* ``cpu overhead``: the same ratio of this process's CPU time (all its threads), which moves less under load;
* ``monitor share``: the monitor's own measured seconds over the monitored run's time (the same cost read directly,
  less sensitive to noise);
* ``per measurement``: seconds of one probe pass, and training seconds per step; ``steady state``: one probe pass
  over ``every`` training steps (the long-run share, without the extra measurement at step 0).

It also checks that both runs end with bit-identical weights. Run from the repository root on a quiet machine::

    python benchmarks/bench_monitor.py                          # 300 steps, every 100, 3 repeats
    python benchmarks/bench_monitor.py --steps 100 --repeats 1  # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import ImageDataset, create_transform

from oversmooth_cli.measuring.monitor import OversmoothingMonitor
from oversmooth_cli.reading.loading import load_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DIGITS = REPO.parent / "shared" / "data" / "digits" / "train"
DEFAULT_TRAIN = SHARED_DIGITS if SHARED_DIGITS.is_dir() else REPO / "tests" / "data" / "digits" / "train"


def load_batches(train_dir: Path, data_config: dict, batch_size: int, steps: int) -> list[tuple]:
    """``steps`` batches of decoded images and labels, cycling through a fixed shuffle of the folder."""
    data = ImageDataset(str(train_dir), transform=create_transform(**data_config))
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    order = order.repeat(1 + steps * batch_size // len(data))[: steps * batch_size].reshape(steps, batch_size)
    return [(images[idx], labels[idx]) for idx in order]


def train(
    model: torch.nn.Module, init: dict, batches: list[tuple], mon: OversmoothingMonitor | None
) -> tuple[float, float]:
    """Train from ``init`` over ``batches``; returns wall and CPU seconds (the monitor measuring at 0, every, ...)."""
    model.load_state_dict(init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(0)
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    if mon is not None:
        mon.step(0)
    for step, (x, y) in enumerate(batches, start=1):
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if mon is not None:
            mon.step(step)
    return time.perf_counter() - start, time.process_time() - cpu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "examples" / "digits-vit"))
    p.add_argument("--train-dir", type=Path, default=DEFAULT_TRAIN)
    p.add_argument("--probe", type=Path, default=REPO / "examples" / "images")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100, help="the monitor's frequency (its default: 100)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batches = load_batches(args.train_dir, loaded.data_config, args.batch_size, args.steps)
    load_before = os.getloadavg()
    without, with_, cpu_without, cpu_with, shares, per_measure, probe_images = [], [], [], [], [], [], 0
    weights = {}
    train(model, init, batches[:5], None)  # warm-up
    for r in range(args.repeats):
        for monitored in (r % 2 == 0, r % 2 == 1):
            mon = OversmoothingMonitor(model, args.probe, every=args.every) if monitored else None
            seconds, cpu = train(model, init, batches, mon)
            weights[monitored] = torch.cat([p.detach().flatten() for p in model.parameters()])
            if mon is None:
                without.append(seconds)
                cpu_without.append(cpu)
                continue
            with_.append(seconds)
            cpu_with.append(cpu)
            shares.append(mon.seconds / seconds)
            per_measure.append(mon.seconds / mon.history["step"].nunique())
            probe_images = mon.n_images
        assert torch.equal(weights[True], weights[False]), "monitored training changed the weights"
    t0, t1 = statistics.median(without), statistics.median(with_)
    ratios = [w / wo - 1 for w, wo in zip(with_, without, strict=True)]
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}",
        "load_1min_before_after": (round(load_before[0], 2), round(os.getloadavg()[0], 2)),
        "train_images": f"{sum(1 for _ in args.train_dir.rglob('*.png'))} in {args.train_dir}",
        "steps": args.steps,
        "every": args.every,
        "measurements_per_run": len(range(0, args.steps + 1, args.every)),
        "probe_images": probe_images,
        "seconds_without": round(t0, 3),
        "seconds_with": round(t1, 3),
        "seconds_per_step": round(t0 / args.steps, 4),
        "seconds_per_measurement": round(statistics.median(per_measure), 4),
        "overhead_pct": round(100 * (t1 / t0 - 1), 2),
        "overhead_pct_range": (round(100 * min(ratios), 2), round(100 * max(ratios), 2)),
        "cpu_overhead_pct": round(100 * (statistics.median(cpu_with) / statistics.median(cpu_without) - 1), 2),
        "monitor_share_pct": round(100 * statistics.median(shares), 2),
        "monitor_share_pct_range": (round(100 * min(shares), 2), round(100 * max(shares), 2)),
        "steady_state_pct": round(100 * statistics.median(per_measure) / (args.every * t0 / args.steps), 2),
        "bit_identical_weights": True,
    }
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    return result


if __name__ == "__main__":
    main()
