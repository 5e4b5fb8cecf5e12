"""``finetune --control``: the ``--loss none`` twin of a run, trained in the same command, and the side-by-side.

The twin (:func:`control_config`) has the run's options without loss terms and with the run's patch CutMix setting
(CutMix stays on when the run had it), so both arms see the same seed, sample order, augmentations and CutMix draws;
it is written to ``OUT/control`` as a complete run folder, equal bit for bit to a separate ``finetune --loss none``
with those options. The arms run one after the other, each on every process of a torchrun launch; ``--resume`` picks
up whichever arm was interrupted.

The side-by-side (rank 0) compares the final weights of both arms on the validation images:

* ``side_by_side.csv``: per arm (``before``, ``control``, ``treated``), val top-1 with its 95% Wilson interval over
  images and last-layer token cosine with its 95% interval over images (from the ``measure`` runs' mean, std and
  image count: Student's t with ``N - 1`` degrees of freedom, clipped to [-1, 1], none for one image);
* ``side_by_side.json``: the same rows plus the verdict: McNemar's exact test, paired over the same validation images
  (images one arm gets right and the other wrong), the accuracy difference within noise when ``p >= 0.05``;
* ``side_by_side.png``: the before / control / treated token-cosine curves over layers (95% bands) and both arms'
  training curves per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from .. import runtime
from ..data import LabelledImages, Sample, build_transform, prepare_data
from ..errors import UserError
from ..io import atomic_write, read_layers, write_json
from ..metrics.intervals import INTERVAL, mean_interval
from ..metrics.registry import metric_range
from ..pages.finetune import write_finetune_page
from ..plots import plot_side_by_side, save_figure
from ..reading.loading import load_model, load_state_dict_file
from .config import FinetuneConfig
from .evaluation import correct_per_image
from .state import LAST_CHECKPOINT, STATE_FILE

__all__ = [
    "CONTROL_DIR",
    "SIDE_BY_SIDE_COLUMNS",
    "SideBySide",
    "control_config",
    "cosine_clause",
    "finetune_with_control",
    "mcnemar_exact",
    "side_by_side",
    "wilson_interval",
]


CONTROL_DIR = "control"
"""The twin's run folder inside the run's folder."""


SIDE_BY_SIDE_COLUMNS = [
    "arm",
    "val_top1",
    "val_top1_ci95_low",
    "val_top1_ci95_high",
    "token_cosine",
    "token_cosine_ci95_low",
    "token_cosine_ci95_high",
    "n_images",
]
"""side_by_side.csv: accuracies in percent, token cosine of the last token layer; 95% intervals over images."""


ALPHA = 0.05
"""Significance level of the verdict."""


def control_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """The twin's options: no loss term, the run's patch CutMix setting (so the CutMix draws are the same)."""
    return replace(cfg, losses=(), cutmix=cfg.use_cutmix)


# -- statistics ----------------------------------------------------------------------------------------------------
def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / n``, in percent (``(nan, nan)`` for ``n = 0``)."""
    if n <= 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: ``only_a`` items right in arm A only, ``only_b``
    in arm B only (a binomial test of ``only_a`` out of ``only_a + only_b`` at 1/2); 1.0 when there are none."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


# -- the comparison --------------------------------------------------------------------------------------------------
@dataclass
class SideBySide:
    """The comparison of a run with its ``--loss none`` twin.

    Attributes:
        table: one :data:`SIDE_BY_SIDE_COLUMNS` row per arm (``before``, ``control``, ``treated``).
        treated_only: validation images the treated arm gets right and the control wrong.
        control_only: the reverse.
        p_value: McNemar's exact test over those discordant images.
        within_noise: ``p_value >= ALPHA``.
        verdict: the one-line reading.
        files: what was written.
    """

    table: pd.DataFrame
    treated_only: int
    control_only: int
    p_value: float
    within_noise: bool
    verdict: str
    files: list[Path]


def _last_layer_cosine(layers: pd.DataFrame) -> tuple[float, float, float, int]:
    """``(mean, ci95_low, ci95_high, n_images)`` of ``token_cosine`` at the last layer that has it; the interval is
    the one every mean over images gets (Student's t, clipped to the metric's range, none for one image:
    :func:`~oversmooth_cli.metrics.intervals.mean_interval`), computed here from the mean, std and image count."""
    rows = layers[layers["metric"] == "token_cosine"]
    row = rows.loc[rows["layer"].idxmax()]
    mean, n = float(row["mean"]), int(row["n_images"])
    low, high = mean_interval(mean, float(row["std"]), n, metric_range("token_cosine"))
    return mean, low, high, n


def _correct(run: Path, samples: list[Sample], batch_size: int, device: torch.device) -> torch.Tensor:
    """Whether the run's final weights (``checkpoint-last``) classify each validation image right, in order."""
    loaded = load_model(str(run))
    model = loaded.model
    model.load_state_dict(load_state_dict_file(run / LAST_CHECKPOINT))
    loader = DataLoader(LabelledImages(samples, build_transform(loaded.data_config)), batch_size=batch_size)
    return correct_per_image(model.to(device), loader, device)


def cosine_clause(treated: float, control: float, where: str = "") -> str:
    """The cosine half of a verdict, plain about the direction: ``last-layer token cosine 0.302 with the losses vs
    0.476 without (-0.174): the losses lowered over-smoothing`` (or ``did NOT lower``)."""
    diff = treated - control
    where = f" {where}" if where else ""
    head = f"last-layer token cosine{where} {treated:.3f} with the losses vs {control:.3f} without ({diff:+.3f})"
    if diff < 0:
        return f"{head}: the losses lowered over-smoothing"
    return f"{head}: the losses did NOT lower over-smoothing against the --loss none twin"


def _verdict(cosine: tuple[float, float], top1: tuple[float, float], only: tuple[int, int], p: float, n: int) -> str:
    """One line: the cosine clause, then the accuracy difference and McNemar's test."""
    (treated, control), (only_t, only_c) = top1, only
    diff = treated - control
    head = f"val top-1 {treated:.1f}% with the losses vs {control:.1f}% without ({diff:+.1f} points)"
    test = (
        f"McNemar's exact test over the {n} paired validation images ({only_t} right only with the losses, "
        f"{only_c} only without): p = {p:.3g}"
    )
    if p >= ALPHA:
        accuracy = f"{head}: within noise ({test} >= {ALPHA})"
    else:
        direction = "raised" if diff > 0 else "lowered"
        accuracy = f"{head}: the losses {direction} accuracy beyond noise ({test} < {ALPHA})"
    return f"{cosine_clause(*cosine)}; {accuracy}"


def side_by_side(out: Path, arguments: dict[str, Any]) -> SideBySide:
    """Compare ``out`` (treated) with ``out/control`` and write the side-by-side files (call on rank 0)."""
    cfg: FinetuneConfig = arguments["config"]
    twin = out / CONTROL_DIR
    _, _, val = prepare_data(arguments["train_dir"], arguments["val_dir"], cfg.val_split, cfg.seed)
    device = runtime.resolve_device(str(arguments.get("device", "cpu")))
    hits = {arm: _correct(folder, val, cfg.batch_size, device) for arm, folder in (("treated", out), ("control", twin))}
    n = len(val)
    histories = {"treated": pd.read_csv(out / "history.csv"), "control": pd.read_csv(twin / "history.csv")}
    layers = {
        "before": read_layers(out / "before"),
        "control": read_layers(twin / "after"),
        "treated": read_layers(out / "after"),
    }
    rows = []
    for arm, table in layers.items():
        if arm == "before":
            first = histories["treated"]
            correct = round(float(first.loc[first["epoch"] == 0, "val_top1"].iloc[0]) * n / 100.0)
        else:
            correct = int(hits[arm].sum())
        mean, low, high, images = _last_layer_cosine(table)
        rows.append([arm, 100.0 * correct / n, *wilson_interval(correct, n), mean, low, high, images])
    table = pd.DataFrame(rows, columns=SIDE_BY_SIDE_COLUMNS)
    only_t = int((hits["treated"] & ~hits["control"]).sum())
    only_c = int((hits["control"] & ~hits["treated"]).sum())
    p = mcnemar_exact(only_t, only_c)
    top1 = dict(zip(table["arm"], table["val_top1"], strict=True))
    cosine = dict(zip(table["arm"], table["token_cosine"], strict=True))
    verdict = _verdict(
        (cosine["treated"], cosine["control"]), (top1["treated"], top1["control"]), (only_t, only_c), p, n
    )
    report = {
        "rows": table.to_dict(orient="records"),
        "test": "McNemar's exact test (two-sided), paired over the same validation images, final weights",
        "intervals": {"val_top1": "Wilson score 95%", "token_cosine": INTERVAL},
        "treated_only_right": only_t,
        "control_only_right": only_c,
        "p_value": p,
        "alpha": ALPHA,
        "within_noise": p >= ALPHA,
        "verdict": verdict,
        "losses": list(cfg.losses),
    }
    files = [
        atomic_write(out / "side_by_side.csv", lambda f: table.to_csv(f, index=False)),
        write_json(out / "side_by_side.json", report),
        save_figure(plot_side_by_side(layers, histories, table, verdict), out / "side_by_side.png"),
    ]
    return SideBySide(table, only_t, only_c, p, p >= ALPHA, verdict, files)


# -- the command -----------------------------------------------------------------------------------------------------
def finetune_with_control(run: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    """Train the run (``arguments``: every argument of :func:`~.finetune.finetune`, ``config`` validated), then its
    twin into ``out/control``, then write the side-by-side; returns the run's result with ``control`` and
    ``comparison`` filled (``interrupted`` when Ctrl-C stopped either arm: ``--resume`` with ``control`` goes on).

    Raises:
        UserError: ``--loss none`` (there is nothing to compare).
    """
    cfg: FinetuneConfig = arguments["config"]
    if not cfg.losses:
        raise UserError(
            "--control trains the --loss none twin of a run with loss terms; this run has --loss none, so there is "
            "nothing to compare: pass --loss cos,cons,token (or a subset), or drop --control"
        )
    out = Path(arguments["out"])
    say = arguments.get("log") or (lambda _msg: None)
    treated = run(**{**arguments, "control": False})
    if treated.interrupted:
        return treated
    twin_out = out / CONTROL_DIR
    resume_twin = bool(arguments.get("resume")) and (twin_out / STATE_FILE).is_file()
    say(f"control arm: the --loss none twin (same seed, samples, augmentations, CutMix draws) into {twin_out}")
    twin = run(
        **{
            **arguments,
            "out": twin_out,
            "config": control_config(cfg),
            "resume": resume_twin,
            "overwrite": True,
            "control": False,
        }
    )
    treated.control = twin
    if twin.interrupted:
        treated.interrupted, treated.stopped_at = True, twin.stopped_at
        return treated
    if runtime.is_main():
        treated.comparison = side_by_side(out, arguments)
        write_finetune_page(out)  # again, now with the side-by-side
    return treated
