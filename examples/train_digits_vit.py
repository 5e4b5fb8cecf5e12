#!/usr/bin/env python3
"""Train the bundled ``digits-vit`` demo model: a tiny timm ViT trained from scratch on 8x8 handwritten digits.

The data are the 1,797 UCI optical-recognition handwritten digits (as shipped in scikit-learn) in ImageFolder layout
(``<data-root>/{train,val}/<class>/*.png``). Every image is loaded into memory once, converted to RGB, resized to
32x32 with bicubic interpolation and normalised with mean/std 0.5. Training uses light random-affine augmentation,
AdamW, a linear-warmup + cosine learning-rate schedule and label smoothing 0.1, on the CPU.

The result is written in the timm / Hugging Face hub layout (``model.safetensors`` + ``config.json``), so it can be
loaded with ``timm.create_model('local-dir:examples/digits-vit')``.

Example:
    python3 examples/train_digits_vit.py --out examples/digits-vit
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

ARCHITECTURE = "vit_tiny_patch16_224"
NUM_CLASSES = 10
IMG_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
MODEL_ARGS: dict[str, int | float] = {
    "img_size": IMG_SIZE,
    "patch_size": 4,
    "embed_dim": 96,
    "depth": 8,
    "num_heads": 4,
    "mlp_ratio": 4,
}
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared/data/digits"
DEFAULT_OUT = Path(__file__).resolve().parent / "digits-vit"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs and ask torch for deterministic kernels.

    Args:
        seed: The seed value.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load every image of one split into memory as un-normalised RGB tensors.

    Args:
        root: Data root containing ``train/`` and ``val/`` in ImageFolder layout.
        split: Split name (``"train"`` or ``"val"``).

    Returns:
        A tuple ``(images, labels)``: float32 images of shape ``(N, 3, 32, 32)`` with values in [0, 1] and int64
        labels of shape ``(N,)``.

    Raises:
        FileNotFoundError: If the split directory is missing or holds no PNG files.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split directory not found: {split_dir}")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label in range(NUM_CLASSES):
        for path in sorted((split_dir / str(label)).glob("*.png")):
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((IMG_SIZE, IMG_SIZE), Image.Resampling.BICUBIC)
            images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0)
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"no PNG images found under {split_dir}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Normalise a batch of [0, 1] images with the model's mean/std.

    Args:
        x: Images of shape ``(B, 3, H, W)`` in [0, 1].

    Returns:
        The normalised images.
    """
    mean = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    max_rotate_deg: float = 10.0,
    max_translate: float = 0.1,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Apply an independent small random affine transform (rotate, scale, translate) to each image.

    Out-of-frame pixels are filled with 0 (the black digit background), so call this before ``normalize``.

    Args:
        x: Images of shape ``(B, C, H, W)`` in [0, 1].
        generator: RNG used to draw the transform parameters.
        max_rotate_deg: Maximum absolute rotation in degrees.
        max_translate: Maximum absolute translation as a fraction of the image size.
        scale_range: Range of the isotropic scale factor.

    Returns:
        The augmented images, same shape as ``x``.
    """
    b = x.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(max_rotate_deg)
    scale = scale_range[0] + torch.rand(b, generator=generator) * (scale_range[1] - scale_range[0])
    # affine_grid uses coordinates in [-1, 1], so a shift of 2 * fraction moves the image by that fraction.
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * max_translate * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def build_model() -> nn.Module:
    """Create the (randomly initialised) tiny ViT.

    Returns:
        The timm Vision Transformer.
    """
    return timm.create_model(ARCHITECTURE, pretrained=False, num_classes=NUM_CLASSES, **MODEL_ARGS)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate for a linear-warmup + cosine-decay schedule.

    Args:
        step: Current optimisation step (0-based).
        total_steps: Total number of optimisation steps.
        warmup_steps: Number of linear warmup steps.
        base_lr: Peak learning rate reached at the end of warmup.
        min_lr: Final learning rate.

    Returns:
        The learning rate for ``step``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on in-memory images.

    Args:
        model: The classifier.
        images: Un-normalised images of shape ``(N, 3, H, W)`` in [0, 1].
        labels: Integer labels of shape ``(N,)``.
        batch_size: Evaluation batch size.

    Returns:
        Top-1 accuracy in [0, 1].
    """
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(normalize(images[i : i + batch_size]))
        correct += int((logits.argmax(dim=1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def save_hub_layout(model: nn.Module, out_dir: Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` in the timm / Hugging Face hub layout.

    Args:
        model: The trained model.
        out_dir: Output directory (created if missing).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict, str(out_dir / "model.safetensors"))
    config = {
        "architecture": ARCHITECTURE,
        "num_classes": NUM_CLASSES,
        "num_features": int(model.num_features),
        "model_args": MODEL_ARGS,
        "pretrained_cfg": {
            "input_size": [3, IMG_SIZE, IMG_SIZE],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(MEAN),
            "std": list(STD),
            "num_classes": NUM_CLASSES,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "label_names": [str(i) for i in range(NUM_CLASSES)],
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def parse_args() -> argparse.Namespace:
    """Parse command-line arguments.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="ImageFolder root with train/ val/")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (hub layout)")
    parser.add_argument("--epochs", type=int, default=40, help="number of training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine schedule")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--warmup-epochs", type=int, default=3, help="linear warmup epochs")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    """Train, save and verify the digits ViT."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    train_x, train_y = load_split(args.data_root, "train")
    val_x, val_y = load_split(args.data_root, "val")
    print(f"data: {len(train_x)} train / {len(val_x)} val images from {args.data_root}")

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {ARCHITECTURE} {MODEL_ARGS} -> {n_params:,} parameters")

    # No weight decay on biases, norms, positional embedding and class token.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in ("pos_embed", "cls_token")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in ("pos_embed", "cls_token"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    step = 0
    val_acc = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(train_x), generator=generator)
        loss_sum, seen = 0.0, 0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            x = normalize(random_affine(train_x[idx], generator))
            y = train_y[idx]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, args.lr, args.min_lr)
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            step += 1
        val_acc = evaluate(model, val_x, val_y)
        elapsed = time.perf_counter() - start
        print(
            f"epoch {epoch:3d}/{args.epochs} loss {loss_sum / seen:.4f} val_top1 {val_acc * 100:6.2f}% "
            f"lr {optimizer.param_groups[0]['lr']:.2e} elapsed {elapsed:6.1f}s",
            flush=True,
        )
    train_time = time.perf_counter() - start
    print(f"training finished in {train_time:.1f}s; final val top-1 {val_acc * 100:.2f}%")

    save_hub_layout(model, args.out)
    size_mb = (args.out / "model.safetensors").stat().st_size / 1e6
    print(f"saved {args.out / 'model.safetensors'} ({size_mb:.2f} MB) and {args.out / 'config.json'}")

    # Verify: rebuild with the same arguments, load strictly, re-evaluate.
    reloaded = build_model()
    reloaded.load_state_dict(load_file(str(args.out / "model.safetensors")), strict=True)
    reloaded_acc = evaluate(reloaded, val_x, val_y)
    print(f"reloaded (strict) val top-1 {reloaded_acc * 100:.2f}%")
    if abs(reloaded_acc - val_acc) > 1e-9:
        raise RuntimeError("reloaded model accuracy differs from the trained model")


if __name__ == "__main__":
    main()
