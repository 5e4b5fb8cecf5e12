"""Study: do the patch-diversification losses help when a ViT is trained from scratch? (the paper's setting, at
CPU scale, converged).

Tiny ViTs (``vit_tiny_patch16_224`` with ``img_size=32``, ``--patch`` pixels per patch, ``--width`` channels,
``--heads`` heads, ``mlp_ratio=4``) are trained **from scratch** on the UCI handwritten digits (ImageFolder
``DATA/train`` and ``DATA/val``, 32 px):

* at each depth of ``--depths``, ``--loss none`` and ``--loss cos,cons,token``, for every seed of ``--seeds``;
* at depth ``--ablation-depth``, each term alone (``cos``, ``cons``, ``token``) for every seed of
  ``--ablation-seeds`` (against the same seeds' ``none`` runs).

Every arm of one seed shares every random draw (initial weights, sample order, augmentations, CutMix draws: patch
CutMix is on in every arm, as ``finetune --control`` does). The recipe: AdamW lr ``--lr`` with ``--warmup-epochs``
of linear warmup then cosine down to 1e-5, weight decay 0.05, drop path 0.1, label smoothing 0.1, random-resized
crop down to ``--crop-scale`` of the area, no flips, patch CutMix on every batch (the finetune default), batch 64,
term weights at the finetune defaults. Each run is :func:`oversmooth_cli.training.finetune.finetune` (the code
``oversmooth finetune`` runs) in its own process with one thread (``--jobs`` at a time), so a row depends only on
its settings, the commit and torch: rerunning it there reproduces it exactly.

One row per run goes to ``--results`` (default ``benchmarks/results/finetune_effect.csv``, :data:`COLUMNS`), with
the commit it ran on and the version of the code it ran (:func:`code_version`); a run whose row is already there for
the same code and settings is skipped, so the study can be stopped and started
again (in the background, across sessions)::

    nohup python benchmarks/finetune_effect.py --jobs 2 > study.log 2>&1 &   # 24 runs, ~1.5 h on 2 vCPUs
    python benchmarks/finetune_effect.py --report    # the tables and the figure, from the CSV alone

``--report`` draws ``docs/finetune_effect.png``: val top-1 and last-layer token cosine against depth,
one point per seed, the mean with its 95% interval over seeds (Student's t).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from defaults_sweep import commit  # noqa: E402  (one definition of a row's commit)

RESULTS = REPO / "benchmarks" / "results" / "finetune_effect.csv"

ARMS = {"none": (), "cos,cons,token": ("cos", "cons", "token")}
"""The main arms: cross-entropy alone, and cross-entropy plus every patch-diversification term."""

ABLATION = {"cos": ("cos",), "cons": ("cons",), "token": ("token",)}
"""The ablation arms: one term at a time."""

SETTINGS = ("epochs", "width", "heads", "patch", "lr", "warmup_epochs", "crop_scale")
"""The options a row depends on besides depth, loss and seed (recorded in every row; skipping compares them)."""

COLUMNS = [
    "depth",
    "loss",
    "seed",
    "status",
    "val_top1",
    "token_cosine",
    "best_epoch",
    "best_top1",
    "epochs_to_80",
    "largest_loss_spike",
    *SETTINGS,
    "seconds",
    "commit",
    "code",
    "torch",
    "threads",
    "error",
]
"""``finetune_effect.csv``: ``val_top1`` (%) and ``token_cosine`` (last layer, validation images) of the final
weights; ``best_epoch`` / ``best_top1`` the epoch of the highest val top-1; ``epochs_to_80`` the first epoch at
>= 80% val top-1 (empty: never); ``largest_loss_spike`` the largest ratio of an epoch's training cross-entropy to the
lowest of the epochs before it (<= 1: it never rose); ``status`` ``ok``, ``diverged`` (final val top-1 below half the
best, or final training cross-entropy above 1.5 times the first epoch's), ``non-finite`` or ``error``."""


def code_version() -> str:
    """What a row's numbers depend on in the repository: the git trees of ``oversmooth_cli/``'s entries except
    ``cli/`` and ``pages/`` (the study calls the library, and the report pages are written after the numbers), and the
    blob of this script, at HEAD (``-dirty`` when any differs from HEAD). Rows are skipped by it, not by the commit,
    so a later commit that changes none of it (documentation, the command line, the report pages, other benchmarks)
    continues the study instead of restarting it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    script = "benchmarks/finetune_effect.py"
    kept = [
        line
        for line in git("ls-tree", "HEAD", "oversmooth_cli/").splitlines()
        if line.split("\t")[1] not in NOT_NUMBERS
    ]
    package = hashlib.sha1("\n".join(kept).encode()).hexdigest()[:12]
    dirty = git("status", "--porcelain", "--", *(line.split("\t")[1] for line in kept), script).strip()
    return f"{package}+{git('rev-parse', f'HEAD:{script}').strip()[:12]}" + ("-dirty" if dirty else "")


NOT_NUMBERS = ("oversmooth_cli/cli", "oversmooth_cli/pages")
"""Parts of the package no number of the study depends on (left out of :func:`code_version`)."""


def plan(args: argparse.Namespace) -> list[tuple[int, str, int]]:
    """Every (depth, loss, seed) of the study, main arms first, deepest last within a seed."""
    runs = [(d, arm, s) for s in args.seeds for d in args.depths for arm in ARMS]
    runs += [(args.ablation_depth, arm, s) for s in args.ablation_seeds for arm in ABLATION]
    return runs


def _terms(loss: str) -> tuple[str, ...]:
    return {**ARMS, **ABLATION}[loss]


def history_stats(history: Any) -> dict[str, Any]:
    """Best epoch, epochs to 80% top-1, the largest loss spike and whether the run diverged, from ``history.csv``."""
    trained = history[history["epoch"] > 0]
    top1 = trained["val_top1"].to_numpy()
    ce = trained["train_ce"].to_numpy()
    best = int(trained["epoch"].iloc[int(top1.argmax())])
    reached = trained.loc[trained["val_top1"] >= 80.0, "epoch"]
    spikes = [ce[i] / ce[:i].min() for i in range(1, len(ce))]
    diverged = top1[-1] < 0.5 * top1.max() or ce[-1] > 1.5 * ce[0]
    return {
        "best_epoch": best,
        "best_top1": float(top1.max()),
        "epochs_to_80": int(reached.iloc[0]) if len(reached) else None,
        "largest_loss_spike": float(max(spikes)) if spikes else math.nan,
        "diverged": bool(diverged),
    }


def run_one(args: argparse.Namespace, depth: int, loss: str, seed: int, code: tuple[str, str]) -> dict[str, Any]:
    """Train one model from scratch in this (fresh, one-thread) process; its row."""
    import pandas as pd
    import torch

    from oversmooth_cli.errors import UserError
    from oversmooth_cli.measuring.config import LoadOptions
    from oversmooth_cli.training.finetune import FinetuneConfig, RunOptions, finetune
    from oversmooth_cli.training.trainer import NonFiniteLossError

    torch.set_num_threads(1)
    cfg = FinetuneConfig(
        losses=_terms(loss),
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
    model_args = {"img_size": 32, "patch_size": args.patch, "embed_dim": args.width, "depth": depth}
    model_args.update(num_heads=args.heads, mlp_ratio=4)
    row: dict[str, Any] = {"depth": depth, "loss": loss, "seed": seed, "val_top1": math.nan, "token_cosine": math.nan}
    row.update({k: getattr(args, k) for k in SETTINGS})
    row.update(commit=code[0], code=code[1], torch=torch.__version__, threads=torch.get_num_threads())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oversmooth-study-") as scratch:
        try:
            result = finetune(
                "vit_tiny_patch16_224",
                Path(args.data) / "train",
                Path(scratch) / "run",
                cfg,
                val_dir=Path(args.data) / "val",
                load=LoadOptions(model_args=model_args),
                run=RunOptions(device="cpu", monitor_every=0),  # the per-epoch history is enough: no monitor
            )
            history = pd.DataFrame(result.history)
            last = history.iloc[-1]
            row.update(val_top1=float(last["val_top1"]), token_cosine=float(last["val_token_cosine"]))
            stats = history_stats(history)
            row["status"] = "diverged" if stats.pop("diverged") else "ok"
            row.update(stats)
            if not (math.isfinite(row["val_top1"]) and math.isfinite(row["token_cosine"])):
                row["status"] = "non-finite"
        except NonFiniteLossError as e:
            row.update(status="non-finite", error=str(e))
        except UserError as e:
            row.update(status="error", error=str(e))
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _settings_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(float(row[k])) for k in SETTINGS)


def done(path: Path, code: str, args: argparse.Namespace) -> set[tuple[int, str, int]]:
    """The (depth, loss, seed) runs already in the CSV for this code (:func:`code_version`) and these settings."""
    if not path.is_file():
        return set()
    want = _settings_key({k: getattr(args, k) for k in SETTINGS})
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["code"] == code and _settings_key(r) == want]
    return {(int(r["depth"]), r["loss"], int(r["seed"])) for r in rows}


def append(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in COLUMNS})


# -- the report, from the CSV alone --------------------------------------------------------------------------------
def _latest(path: Path) -> Any:
    """The CSV's rows of its most recent code version (the rows a report reads)."""
    import pandas as pd

    df = pd.read_csv(path)
    return df[df["code"] == df["code"].iloc[-1]]


def _mean_ci(values: Any) -> tuple[float, float]:
    """Mean and half-width of its 95% interval over seeds (Student's t; nan for one value)."""
    from oversmooth_cli.metrics.intervals import half_width

    values = values[values.notna()]
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), half_width(float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values))


def _cell(values: Any, digits: int) -> str:
    mean, half = _mean_ci(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def _paired(df: Any, depth: int, loss: str, column: str) -> str:
    """Mean (± 95% half-width) over seeds of ``loss`` minus ``none`` at ``depth``, paired by seed."""
    a = df[(df["depth"] == depth) & (df["loss"] == loss)].set_index("seed")[column]
    b = df[(df["depth"] == depth) & (df["loss"] == "none")].set_index("seed")[column]
    diff = (a - b).dropna()
    mean, half = _mean_ci(diff)
    if math.isnan(mean):
        return "-"
    digits = 1 if column == "val_top1" else 3
    return f"{mean:+.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}") + f" ({len(diff)})"


def table(path: Path = RESULTS) -> str:
    """The study's Markdown table: per depth and arm, mean ± 95% half-width over seeds, paired differences against
    ``none``, and the stability columns."""
    df = _latest(path)
    done_rows = df[df["status"].isin(["ok", "diverged"])]
    lines = [
        "| depth | loss | seeds | val top-1 % | Δ top-1 vs none (paired) | last-layer token cosine | Δ cosine vs none "
        "(paired) | epochs to 80% | largest loss spike | diverged | non-finite |",
        "|---:|---|---:|---|---|---|---|---|---|---:|---:|",
    ]
    order = {name: i for i, name in enumerate([*ARMS, *ABLATION])}
    groups = sorted(df.groupby(["depth", "loss"]), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99)))
    for (depth, loss), g in groups:
        ok = done_rows[(done_rows["depth"] == depth) & (done_rows["loss"] == loss)]
        paired = loss != "none"
        lines.append(
            f"| {depth} | {loss} | {len(g)} | {_cell(ok['val_top1'], 1)} | "
            f"{_paired(done_rows, depth, loss, 'val_top1') if paired else ''} | {_cell(ok['token_cosine'], 3)} | "
            f"{_paired(done_rows, depth, loss, 'token_cosine') if paired else ''} | {_cell(ok['epochs_to_80'], 1)} | "
            f"{ok['largest_loss_spike'].max():.2f} | {(g['status'] == 'diverged').sum()} | "
            f"{(g['status'] == 'non-finite').sum()} |"
        )
    first = df.iloc[0]
    settings = ", ".join(f"{k} {first[k]:g}" for k in SETTINGS)
    commits = ", ".join(sorted(df["commit"].unique()))
    return "\n".join(lines) + (
        f"\n\n{len(df)} runs on commit {commits} (code {first['code']}), torch {first['torch']}, "
        f"{int(first['threads'])} thread each; "
        f"{settings}. ± is the half-width of the 95% interval over seeds (Student's t); the paired Δ columns are per "
        "seed, against the same seed's `none` run (number of pairs in brackets)."
    )


FIGURE = REPO / "docs" / "finetune_effect.png"
"""Where ``--report`` draws the figure (in the documentation, which shows it)."""


def figure(path: Path = RESULTS, out: Path = FIGURE) -> Path:
    """The study's figure: val top-1 and last-layer token cosine against depth, one point per seed, the mean and its
    95% interval, per main arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _latest(path)
    df = df[df["loss"].isin(list(ARMS)) & df["status"].isin(["ok", "diverged"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, column, label in (
        (axes[0], "val_top1", "val top-1 (%)"),
        (axes[1], "token_cosine", "last-layer token cosine"),
    ):
        for i, (loss, colour) in enumerate((("none", "C0"), ("cos,cons,token", "C3"))):
            g = df[df["loss"] == loss]
            shift = -0.6 if i == 0 else 0.6
            ax.scatter(g["depth"] + shift, g[column], s=12, color=colour, alpha=0.5)
            stats = [(d, *_mean_ci(gd[column])) for d, gd in g.groupby("depth")]
            depths = [d + shift for d, _, _ in stats]
            ax.errorbar(depths, [m for _, m, _ in stats], yerr=[h for _, _, h in stats], color=colour, marker="o",
                        capsize=4, label=f"--loss {loss}")  # fmt: skip
        ax.set_xlabel("depth (blocks)")
        ax.set_xticks(sorted(df["depth"].unique()))
        ax.set_title(label, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    first = df.iloc[0]
    fig.suptitle(
        f"from scratch on the digits: one point per seed, mean ± 95% interval · code {first['code']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "digits"), help="train/ and val/")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the CSV (one row per run)")
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation-depth", type=int, default=12)
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=64, help="embedding width (divisible by --heads)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=8, help="patch size in pixels of the 32 px input")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-epochs", type=float, default=3.0)
    parser.add_argument("--crop-scale", type=float, default=0.8)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one process and one thread each")
    parser.add_argument("--report", action="store_true", help="print the table and draw the figure from the CSV")
    args = parser.parse_args(argv)
    if args.report:
        print(table(args.results))
        print(f"figure: {figure(args.results)}")
        return 0
    code = (commit(), code_version())
    finished = done(args.results, code[1], args)
    todo = [r for r in plan(args) if r not in finished]
    print(f"commit {code[0]} (code {code[1]}): {len(todo)} to do, {len(finished)} done in {args.results}", flush=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_one, args, *r, code): r for r in todo}
        for future in as_completed(futures):  # each row as soon as its run ends
            depth, loss, seed = futures[future]
            row = future.result()
            append(args.results, row)
            print(
                f"depth {depth:3d}  seed {seed}  loss {loss:15s} {row['status']:10s} val top-1 {row['val_top1']:6.2f}%"
                f"  token cosine {row['token_cosine']:.3f}  {row['seconds']:.0f}s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
