#!/usr/bin/env python3
"""Fine-tune the bundled digits ViT with PyTorch Lightning; :class:`OversmoothingCallback` measures the 40 bundled
example digits every ``--every`` steps and logs each layer's metric to the trainer's logger (a ``CSVLogger`` here:
``--out/lightning_logs/version_0/metrics.csv``, columns ``oversmooth/<metric>/layer_<NN>``).

Needs the ``lightning`` extra (``pip install 'oversmooth-cli[lightning]'``).

Example:
    python examples/monitor_lightning.py --steps 200 --every 20 --out runs/monitor-lightning
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from timm.data import ImageDataset, create_transform

from oversmooth_cli import PatchDiversificationLoss, load_model
from oversmooth_cli.integrations.lightning import OversmoothingCallback

REPO = Path(__file__).resolve().parents[1]


class DigitsModule(L.LightningModule):
    """Cross-entropy plus the ``cos`` and ``cons`` patch-diversification terms; ``self.model`` is the timm model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.diversity = PatchDiversificationLoss(model, ("cos", "cons"), {"cos": 0.5, "cons": 0.5})

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits, diversity, terms = self.diversity(lambda: self.model(x))
        loss = F.cross_entropy(logits, y, label_smoothing=0.1) + diversity
        self.log_dict({"train/loss": loss, **{f"train/{k}": v for k, v in terms.items()}})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "examples" / "digits-vit"), help="anything `measure` accepts")
    p.add_argument("--train-dir", type=Path, default=REPO / "tests" / "data" / "digits" / "train")
    p.add_argument("--probe", type=Path, default=REPO / "examples" / "images")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/monitor-lightning"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> OversmoothingCallback:
    args = parse_args(argv)
    L.seed_everything(0, verbose=False)
    loaded = load_model(args.model)
    train_set = ImageDataset(str(args.train_dir), transform=create_transform(**loaded.data_config))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    callback = OversmoothingCallback(args.probe, every=args.every)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        callbacks=[callback],
        logger=CSVLogger(args.out),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(DigitsModule(loaded.model.train()), loader)  # load_model returns eval mode
    last = callback.history[callback.history["step"] == callback.history["step"].max()]
    cosine = last[last["metric"] == "token_cosine"].sort_values("layer")["mean"]
    print(f"step {trainer.global_step}: token cosine per layer {[round(v, 3) for v in cosine]}; logs in {args.out}")
    return callback


if __name__ == "__main__":
    main()
