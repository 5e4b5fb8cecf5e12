"""Benchmark: do the patch-diversification losses help when training a ViT from scratch? (the paper's setting, at
laptop scale).

Tiny ViTs (``vit_tiny_patch16_224`` with ``img_size=32``, ``--patch`` pixels per patch, ``--width`` channels,
``--heads`` heads, ``mlp_ratio=4``) are trained **from scratch** on the UCI handwritten digits (ImageFolder
``DATA/train`` and ``DATA/val``, 32 px) at each depth of ``--depths``, once with ``--loss none`` and once with
``--loss cos,cons,token``, for every seed of ``--seeds``. Both arms of one seed share every random draw (initial
weights, sample order, augmentations; CutMix is on in both, as ``finetune --control`` does). The recipe is the
README's "training from scratch" one (the bundled ``examples/digits-vit`` was trained with lr 2e-3 and 3 warmup
epochs): AdamW lr ``--lr`` with ``--warmup-epochs`` of linear warmup then cosine down to 1e-5, weight decay 0.05,
drop path 0.1, label smoothing 0.1, random-resized crop down to ``--crop-scale`` of the area, no flips, patch
CutMix, batch 64.

Each run is :func:`oversmooth_cli.training.finetune.finetune` (the code ``oversmooth finetune`` runs). Per depth and
arm it
prints the final val top-1 (mean ± std over seeds), the final last-layer token cosine on the validation images
(mean ± std over every run that finished with finite values), how many runs diverged (their final val top-1 fell
below half of their best epoch's, or their final training loss rose above 1.5 times their first epoch's), how many
stopped on a non-finite loss, and how many never learned (final val top-1 below twice chance). Every run's numbers
go to ``OUT/runs.csv``, the table to ``OUT/table.md``.

Usage (from the repository root)::

    python benchmarks/finetune_effect.py     # depths 6 12 24, seeds 0 1 2, 30 epochs: ~7 h on 2 vCPUs
    python benchmarks/finetune_effect.py --epochs 8 --width 32 --heads 2 --patch 8 --warmup-epochs 1 --threads 1
                                                     # the README's table: 18 runs, ~20 min on 2 quiet vCPUs
    python benchmarks/finetune_effect.py --depths 12 --seeds 0 1 2 3 4 --device cuda
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from oversmooth_cli.errors import UserError  # noqa: E402
from oversmooth_cli.measuring.config import LoadOptions  # noqa: E402
from oversmooth_cli.training.finetune import FinetuneConfig, RunOptions, finetune  # noqa: E402
from oversmooth_cli.training.trainer import NonFiniteLossError  # noqa: E402

ARMS = {"none": (), "cos,cons,token": ("cos", "cons", "token")}
"""The two arms: cross-entropy alone, and cross-entropy plus every patch-diversification term."""


def recipe(args: argparse.Namespace, losses: tuple[str, ...], seed: int) -> FinetuneConfig:
    """The from-scratch recipe (README, "training from scratch"); CutMix on in both arms."""
    return FinetuneConfig(
        losses=losses,
        epochs=args.epochs,
        batch_size=64,
        lr=args.lr,
        min_lr=1e-5,
        warmup_epochs=args.warmup_epochs,
        weight_decay=0.05,
        drop_path=0.1,
        label_smoothing=0.1,
        hflip=0.0,
        crop_scale=args.crop_scale,
        cutmix=True,
        seed=seed,
    )


def run_one(args: argparse.Namespace, depth: int, arm: str, seed: int) -> dict:
    """Train one model from scratch; its final val top-1 and last-layer token cosine, or how it failed."""
    out = Path(args.out) / f"depth{depth}" / arm.replace(",", "+") / f"seed{seed}"
    model_args = {
        "img_size": 32,
        "patch_size": args.patch,
        "embed_dim": args.width,
        "depth": depth,
        "num_heads": args.heads,
        "mlp_ratio": 4,
    }
    row = {
        "depth": depth,
        "arm": arm,
        "seed": seed,
        "val_top1": math.nan,
        "token_cosine": math.nan,
        "not_learned": False,
    }
    started = time.perf_counter()
    try:
        result = finetune(
            "vit_tiny_patch16_224",
            Path(args.data) / "train",
            out,
            recipe(args, ARMS[arm], seed),
            val_dir=Path(args.data) / "val",
            load=LoadOptions(model_args=model_args),
            # the before / after measure runs and the per-epoch history are enough here: no monitor
            run=RunOptions(device=args.device, workers=args.workers, overwrite=True, monitor_every=0),
        )
        last = result.history.iloc[-1]
        trained = result.history[result.history["epoch"] > 0]
        row.update(val_top1=float(last["val_top1"]), token_cosine=float(last["val_token_cosine"]), status="ok")
        finite = math.isfinite(row["val_top1"]) and math.isfinite(row["token_cosine"])
        collapsed = row["val_top1"] < 0.5 * float(trained["val_top1"].max())
        blew_up = float(trained["train_loss"].iloc[-1]) > 1.5 * float(trained["train_loss"].iloc[0])
        if not finite:
            row["status"] = "non-finite"
        elif collapsed or blew_up:
            row["status"] = "diverged"
        row["not_learned"] = bool(finite and row["val_top1"] < 2 * 100.0 / args.classes)
    except NonFiniteLossError as e:
        row["status"], row["error"] = "non-finite", str(e)
    except UserError as e:
        row["status"], row["error"] = "error", str(e)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _mean_std(values: list[float], digits: int) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(runs: pd.DataFrame) -> str:
    """Per depth and arm: val top-1 and last-layer token cosine (mean ± std over the runs that finished with finite
    values), then the diverged, non-finite and never-learned counts."""
    lines = [
        "| depth | loss | runs | val top-1 % (mean ± std) | last-layer token cosine (mean ± std) | diverged "
        "| non-finite | below 2x chance |",
        "|---:|---|---:|---|---|---:|---:|---:|",
    ]
    for (depth, arm), group in runs.groupby(["depth", "arm"], sort=False):
        done = group[group["status"].isin(["ok", "diverged"])]
        lines.append(
            f"| {depth} | {arm} | {len(group)} | {_mean_std(done['val_top1'].tolist(), 1)} | "
            f"{_mean_std(done['token_cosine'].tolist(), 3)} | {(group['status'] == 'diverged').sum()} | "
            f"{(group['status'] == 'non-finite').sum()} | {int(group['not_learned'].sum())} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "digits"), help="train/ and val/")
    parser.add_argument("--out", default="runs/finetune_effect", help="folder of the runs, runs.csv and table.md")
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=96, help="embedding width (divisible by --heads)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=4, help="patch size in pixels of the 32 px input")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-epochs", type=float, default=3.0)
    parser.add_argument("--crop-scale", type=float, default=0.8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.classes = sum(1 for d in (Path(args.data) / "train").iterdir() if d.is_dir())
    print(
        f"# {date.today()} {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__.split('+')[0]} ({torch.get_num_threads()} threads), device {args.device}; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print("# " + " ".join(sys.argv), flush=True)
    rows = []
    for depth in args.depths:
        for seed in args.seeds:
            for arm in ARMS:
                row = run_one(args, depth, arm, seed)
                rows.append(row)
                print(
                    f"depth {depth:3d}  seed {seed}  loss {arm:15s} {row['status']:10s} "
                    f"val top-1 {row['val_top1']:6.2f}%  token cosine {row['token_cosine']:.3f}  {row['seconds']:.0f}s",
                    flush=True,
                )
                pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)
    text = table(pd.DataFrame(rows))
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
