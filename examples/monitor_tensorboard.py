#!/usr/bin/env python3
"""Watch over-smoothing in TensorBoard: a plain PyTorch loop fine-tunes the bundled digits ViT while
:class:`~oversmooth_cli.integrations.tensorboard.TensorBoardWriter` writes, at every monitored step, one scalar per
(metric, layer) and an image of the layer x step heatmap into ``--out/tb``.

Needs the ``tensorboard`` extra (``pip install 'oversmooth-cli[tensorboard]'``); then ``tensorboard --logdir OUT/tb``.

Example:
    python examples/monitor_tensorboard.py --steps 200 --every 20 --out runs/monitor-tb
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import ImageDataset, create_transform

from oversmooth_cli import OversmoothingMonitor, load_model
from oversmooth_cli.integrations.tensorboard import TensorBoardWriter

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "examples" / "digits-vit"), help="anything `measure` accepts")
    p.add_argument("--train-dir", type=Path, default=REPO / "tests" / "data" / "digits" / "train")
    p.add_argument("--probe", type=Path, default=REPO / "examples" / "images")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/monitor-tb"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> OversmoothingMonitor:
    args = parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    model = loaded.model
    train_set = ImageDataset(str(args.train_dir), transform=create_transform(**loaded.data_config))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    tensorboard = TensorBoardWriter(args.out / "tb")
    monitor = OversmoothingMonitor(model, args.probe, every=args.every, on_measure=tensorboard)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    step = 0
    monitor.step(step)
    model.train()
    while step < args.steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            monitor.step(step)
            if step == args.steps:
                break
    tensorboard.close()
    steps = monitor.history["step"].nunique()
    print(f"{len(monitor.history)} values over {steps} steps; tensorboard --logdir {args.out / 'tb'}")
    return monitor


if __name__ == "__main__":
    main()
