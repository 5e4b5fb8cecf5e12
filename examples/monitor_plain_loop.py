#!/usr/bin/env python3
"""Fine-tune the bundled digits ViT in a plain PyTorch loop with the patch-diversification losses as a drop-in
module, and watch over-smoothing develop with :class:`~oversmooth_cli.measuring.monitor.OversmoothingMonitor`.

The loop is the user's own: ``PatchDiversificationLoss`` reads the first and last block's tokens from the model's
normal forward pass, ``patch_cutmix`` mixes the batch with per-patch targets, and the monitor measures the 40
bundled example digits (``examples/images``) every ``--every`` steps. Writes ``monitor.csv`` and ``monitor.png``
(a layer x step heatmap) into ``--out``.

Example:
    python examples/monitor_plain_loop.py --steps 200 --every 20 --out runs/monitor-plain
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from timm.data import ImageDataset, create_transform
from timm.loss import SoftTargetCrossEntropy

from oversmooth_cli import OversmoothingMonitor, PatchDiversificationLoss, load_model, patch_cutmix, smooth_one_hot
from oversmooth_cli.plots import plot_monitor_heatmap, save_figure

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "examples" / "digits-vit"), help="anything `measure` accepts")
    p.add_argument("--train-dir", type=Path, default=REPO / "tests" / "data" / "digits" / "train")
    p.add_argument("--probe", type=Path, default=REPO / "examples" / "images")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/monitor-plain"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(args.model)  # the timm model and its data config
    model, num_classes = loaded.model, loaded.model.num_classes
    train_set = ImageDataset(str(args.train_dir), transform=create_transform(**loaded.data_config))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)

    weights = {"cos": 0.5, "cons": 0.5, "token": 1.0}
    criterion = PatchDiversificationLoss(model, tuple(weights), weights, input_size=loaded.data_config["input_size"])
    grid = criterion.plan.h_grid  # the token grid patch CutMix snaps to and l_token scores
    monitor = OversmoothingMonitor(model, args.probe, every=args.every)
    soft_ce, rng = SoftTargetCrossEntropy(), random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    step = 0
    monitor.step(step)  # the weights before training
    model.train()
    while step < args.steps:
        for x, y in loader:
            targets = smooth_one_hot(y, num_classes, 0.1)
            x, targets, patch_targets, _ = patch_cutmix(x, targets, None, 1.0, rng, grid=grid)
            logits, diversity, _terms = criterion(lambda x=x: model(x), patch_targets)
            loss = soft_ce(logits, targets) + diversity
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            monitor.step(step)
            if step == args.steps:
                break

    args.out.mkdir(parents=True, exist_ok=True)
    monitor.history.to_csv(args.out / "monitor.csv", index=False)
    save_figure(plot_monitor_heatmap(monitor.history, title=loaded.name), args.out / "monitor.png")
    last = monitor.history[monitor.history["step"] == monitor.history["step"].max()]
    cosine = last[last["metric"] == "token_cosine"].sort_values("layer")["mean"]
    print(f"step {step}: token cosine per layer {[round(v, 3) for v in cosine]}; wrote {args.out}")


if __name__ == "__main__":
    main()
