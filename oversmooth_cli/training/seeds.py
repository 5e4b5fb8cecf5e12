"""``finetune --control --seeds 0,1,2``: the ``--control`` pair once per seed, each in ``OUT/seed-<k>/``, then pooled.

One seed of ``--control`` says little: on a few hundred validation images McNemar's test cannot separate a 1-2
point difference from noise, and seeds move results by several points. This trains the pair (the run and its
``--loss none`` twin, sharing every random draw) once per seed, each seed's folder equal bit for bit to a separate
``finetune --control --seed k`` run, and pools the per-seed side-by-sides (:mod:`.control`):

* ``seeds.json``: the run record (model, folders, options without ``seed``) and the seeds; ``--resume OUT`` reads it;
* ``pooled.csv``: one row per seed (:data:`POOLED_COLUMNS`): both arms' val top-1 and last-layer token cosine, their
  differences (treated - control) and McNemar's p;
* ``pooled.json``: those rows, the mean differences over seeds with their 95% intervals (Student's t with
  ``seeds - 1`` degrees of freedom; none for one seed), the seeds within noise, and one verdict line;
* ``pooled.png``: every seed's token-cosine curves and paired last-layer cosine and top-1.

``resume`` continues whichever seed and arm was interrupted; seeds whose side-by-side is written are read back.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .. import runtime
from ..errors import UserError
from ..io import atomic_write, check_out_dir, read_layers, write_json
from ..measuring.config import LoadOptions
from ..metrics.intervals import mean_interval
from ..pages.finetune import write_finetune_page
from ..plots import plot_seeds, save_figure
from .config import FinetuneConfig, validate_config
from .control import ALPHA, CONTROL_DIR, cosine_clause
from .finetune import FinetuneResult, RunHooks, RunOptions, finetune
from .state import STATE_FILE, first_difference

__all__ = [
    "POOLED_COLUMNS",
    "SEEDS_FILE",
    "SEEDS_OUTPUT_NAMES",
    "SeedsResult",
    "finetune_seeds",
    "parse_seeds",
    "read_seeds_run",
    "seed_dir",
]

SEEDS_FILE = "seeds.json"
"""The seeds run's record in ``OUT``: what ``--resume OUT`` continues."""

SEEDS_OUTPUT_NAMES = (SEEDS_FILE, "pooled.csv", "pooled.json", "pooled.png", "report.html")
"""What a seeds run writes into ``OUT`` besides its ``seed-<k>/`` folders."""

POOLED_COLUMNS = [
    "seed",
    "treated_top1",
    "control_top1",
    "top1_diff",
    "mcnemar_p",
    "treated_cosine",
    "control_cosine",
    "cosine_diff",
    "n_images",
]
"""pooled.csv: per seed, val top-1 (%) and last-layer token cosine of both arms (final weights, validation images);
differences are treated - control."""


def seed_dir(out: Path, seed: int) -> Path:
    """``OUT/seed-<k>``: one seed's ``--control`` run folder."""
    return Path(out) / f"seed-{seed}"


def parse_seeds(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; ``"0-4"`` -> ``(0, 1, 2, 3, 4)``.

    Raises:
        UserError: empty, not whole numbers >= 0, or a seed twice.
    """
    items: list[int] = []
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(s) for s in text]
    for part in (p for p in parts if p):
        low, sep, high = part.partition("-")
        if not (low.isdigit() and (not sep or high.isdigit())):
            raise UserError(f"--seeds: {part!r} is not a seed; give whole numbers >= 0 such as 0,1,2 or 0-4")
        items += range(int(low), int(high) + 1) if sep else [int(low)]
    if not items:
        raise UserError("--seeds is empty; give whole numbers >= 0 such as 0,1,2 or 0-4")
    twice = sorted({s for s in items if items.count(s) > 1})
    if twice:
        raise UserError(f"--seeds names seed {', '.join(map(str, twice))} more than once")
    return tuple(items)


@dataclass
class SeedsResult:
    """A finished (or interrupted) seeds run.

    Attributes:
        out: the run folder.
        seeds: the seeds, in order.
        runs: each trained seed's :class:`~.finetune.FinetuneResult` (seeds read back on resume are absent).
        table: one :data:`POOLED_COLUMNS` row per finished seed.
        pooled: the mean differences and their intervals (``pooled.json``'s ``pooled``).
        verdict: the one-line reading.
        interrupted: Ctrl-C stopped a seed (saved; ``resume`` continues it).
        stopped_at: ``(seed, epoch, step)`` of the interruption.
    """

    out: Path
    seeds: tuple[int, ...]
    runs: dict[int, FinetuneResult]
    table: pd.DataFrame | None = None
    pooled: dict[str, Any] | None = None
    verdict: str | None = None
    interrupted: bool = False
    stopped_at: tuple[int, int, int] | None = None


def _record(
    model: str, train_dir: str | Path, val_dir: str | Path | None, load: LoadOptions, cfg: FinetuneConfig
) -> dict[str, Any]:
    """The run record of ``seeds.json`` (:func:`~.finetune.run_record` without the seed)."""
    from .finetune import run_record

    record = run_record(model, train_dir, val_dir, load, cfg)
    record["config"] = {k: v for k, v in asdict(cfg).items() if k != "seed"}
    return json.loads(json.dumps(record, default=str))


def read_seeds_run(out: Path) -> dict[str, Any] | None:
    """``OUT/seeds.json`` (``{"seeds": [...], "run": record}``), or ``None`` when ``out`` is not a seeds run.

    Raises:
        UserError: the file is there but unreadable.
    """
    path = Path(out) / SEEDS_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        return {"seeds": [int(s) for s in saved["seeds"]], "run": dict(saved["run"])}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume {out}: cannot read {SEEDS_FILE} (damaged?): {e}") from e


def _start(out: Path, record: dict[str, Any], seeds: tuple[int, ...], resume: bool, overwrite: bool) -> None:
    """Check ``out`` (a fresh run) or the saved record (``resume``), then write ``seeds.json`` (rank 0)."""
    if resume:
        saved = read_seeds_run(out)
        if saved is None:
            raise UserError(f"--resume {out}: no {SEEDS_FILE} there (not a --seeds run folder)")
        diff = first_difference(saved["run"], record)
        if diff is None and saved["seeds"] != list(seeds):
            diff = f"--seeds: the run used {','.join(map(str, saved['seeds']))}, now {','.join(map(str, seeds))}"
        if diff is not None:
            raise UserError(f"--resume {out}: {diff}; drop it or start a new run with another --out")
        return
    if runtime.is_main():
        check_out_dir(out, overwrite, hint=f"pass --overwrite, --resume {out}, or another --out")
        out.mkdir(parents=True, exist_ok=True)
        for name in SEEDS_OUTPUT_NAMES:
            (out / name).unlink(missing_ok=True)
        for old in out.glob("seed-*"):  # an earlier run's seeds (--overwrite)
            if old.is_dir() and old.name[5:].isdigit():
                shutil.rmtree(old)
        write_json(out / SEEDS_FILE, {"seeds": list(seeds), "run": record})


def _seed_row(folder: Path, seed: int) -> list[Any]:
    """One :data:`POOLED_COLUMNS` row from a seed's ``side_by_side.json``."""
    report = json.loads((folder / "side_by_side.json").read_text())
    arms = {r["arm"]: r for r in report["rows"]}
    t, c = arms["treated"], arms["control"]
    return [
        seed,
        t["val_top1"],
        c["val_top1"],
        t["val_top1"] - c["val_top1"],
        report["p_value"],
        t["token_cosine"],
        c["token_cosine"],
        t["token_cosine"] - c["token_cosine"],
        t["n_images"],
    ]


def _mean_with_interval(values: pd.Series, bounds: tuple[float, float]) -> dict[str, float]:
    mean = float(values.mean())
    low, high = mean_interval(mean, float(values.std(ddof=1)) if len(values) > 1 else math.nan, len(values), bounds)
    return {"mean": mean, "ci95_low": low, "ci95_high": high}


def _interval_text(stats: dict[str, float], digits: int) -> str:
    if math.isnan(stats["ci95_low"]):
        return "no interval from one seed"
    return f"95% interval {stats['ci95_low']:+.{digits}f} to {stats['ci95_high']:+.{digits}f}"


def pool(table: pd.DataFrame) -> tuple[dict[str, Any], str]:
    """The mean cosine and top-1 differences over seeds with 95% intervals, and the verdict line."""
    cosine = _mean_with_interval(table["cosine_diff"], (-2.0, 2.0))
    top1 = _mean_with_interval(table["top1_diff"], (-100.0, 100.0))
    quiet = int((table["mcnemar_p"] >= ALPHA).sum())
    lowered = int((table["cosine_diff"] < 0).sum())
    n = len(table)
    pooled = {
        "seeds": n,
        "cosine_diff": cosine,
        "top1_diff": top1,
        "seeds_cosine_lowered": lowered,
        "seeds_top1_within_noise": quiet,
        "alpha": ALPHA,
        "interval": "Student's t over seeds (seeds - 1 degrees of freedom)",
    }
    head = cosine_clause(
        float(table["treated_cosine"].mean()), float(table["control_cosine"].mean()), f"over {n} seeds"
    )
    verdict = (
        f"{head} (lower in {lowered} of {n} seeds; {_interval_text(cosine, 3)}); val top-1 "
        f"{top1['mean']:+.1f} points ({_interval_text(top1, 1)}), within noise in {quiet} of {n} seeds "
        f"(McNemar p >= {ALPHA})"
    )
    return pooled, verdict


def _write_pooled(out: Path, seeds: tuple[int, ...]) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """pooled.csv, pooled.json and pooled.png from the seeds' folders (rank 0)."""
    table = pd.DataFrame([_seed_row(seed_dir(out, s), s) for s in seeds], columns=POOLED_COLUMNS)
    pooled, verdict = pool(table)
    atomic_write(out / "pooled.csv", lambda f: table.to_csv(f, index=False))
    write_json(out / "pooled.json", {"rows": table.to_dict(orient="records"), "pooled": pooled, "verdict": verdict})
    layers = {
        s: {
            "before": read_layers(seed_dir(out, s) / "before"),
            "control": read_layers(seed_dir(out, s) / CONTROL_DIR / "after"),
            "treated": read_layers(seed_dir(out, s) / "after"),
        }
        for s in seeds
    }
    save_figure(plot_seeds(layers, table, verdict), out / "pooled.png")
    return table, pooled, verdict


def finetune_seeds(
    model: str,
    train_dir: str | Path,
    out: str | Path,
    config: FinetuneConfig | None,
    seeds: Sequence[int] | str,
    *,
    val_dir: str | Path | None = None,
    load: LoadOptions | None = None,
    run: RunOptions | None = None,
    hooks: RunHooks | None = None,
) -> SeedsResult:
    """Train the ``--control`` pair once per seed into ``out/seed-<k>/`` and pool the side-by-sides.

    Each seed's folder is what ``finetune(..., replace(config, seed=k), run=replace(run, control=True))`` into it
    writes (bit for bit); ``config.seed`` is not used. With ``run.resume``, seeds already compared are read back,
    the interrupted one continues from its save, the rest start.

    Returns:
        A :class:`SeedsResult` (``interrupted`` when Ctrl-C stopped a seed; ``resume`` goes on).

    Raises:
        UserError: ``--loss none``, bad seeds, a non-empty ``out`` without ``overwrite``, or a resume whose options
            differ from the saved ones.
    """
    load, run, hooks = load or LoadOptions(), run or RunOptions(), hooks or RunHooks()
    seeds = parse_seeds(seeds)
    cfg = validate_config(config or FinetuneConfig(), needs_val_split=val_dir is None)
    if not cfg.losses:
        raise UserError("--seeds trains the --control pair of a run with loss terms; this run has --loss none")
    out = Path(out)
    _start(out, _record(model, train_dir, val_dir, load, cfg), seeds, run.resume, run.overwrite)
    result = SeedsResult(out, seeds, {})
    say = hooks.log or (lambda _msg: None)
    for seed in seeds:
        folder = seed_dir(out, seed)
        if (folder / "side_by_side.json").is_file() and run.resume:
            say(f"seed {seed}: already compared in {folder}, read back")
            continue
        say(f"seed {seed} of {', '.join(map(str, seeds))}: the --control pair into {folder}")
        resume = run.resume and (folder / STATE_FILE).is_file()
        options = replace(run, control=True, resume=resume, overwrite=True)
        done = finetune(model, train_dir, folder, replace(cfg, seed=seed), val_dir=val_dir, load=load, run=options,
                        hooks=hooks)  # fmt: skip
        result.runs[seed] = done
        if done.interrupted:
            epoch, step = done.stopped_at or (0, 0)
            result.interrupted, result.stopped_at = True, (seed, epoch, step)
            return result
    if runtime.is_main():
        result.table, result.pooled, result.verdict = _write_pooled(out, seeds)
        write_finetune_page(out)
    return result
