"""Sweep: which finetune defaults make the losses lower over-smoothing on the bundled example, at no accuracy cost.

Every run is ``oversmooth finetune examples/digits-vit TRAIN --val-dir VAL --hflip 0 --epochs 5 --control --seed K``
plus one candidate's options (the command users run; its ``--loss none`` twin shares the seed, samples,
augmentations and CutMix draws). Per candidate and seed it records the last-layer token cosine and val top-1 of both
arms, McNemar's exact p of the top-1 difference, and what the run ran on (commit, torch, threads). A candidate
*meets* the target when, in every seed, the treated arm's last-layer token cosine is at least 0.05 below the twin's and
McNemar's p >= 0.05, and the mean top-1 difference is >= -1 point.

Runs are parallel processes with one thread each (``--jobs``); a (candidate, seed) row already in the CSV for the
same commit is skipped, so the sweep can be stopped and started again (e.g. in the background across sessions):

    nohup python benchmarks/defaults_sweep.py --jobs 2 > sweep.log 2>&1 &
    python benchmarks/defaults_sweep.py --candidates current,former --data textures   # another kind of image
    python benchmarks/defaults_sweep.py --report      # the table per candidate, from the CSV alone

Results: ``benchmarks/results/defaults_sweep.csv`` (one row per run; ``defaults_sweep_textures.csv`` for
``--data textures``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO.parent / "shared" / "data" / "digits"
RESULTS = REPO / "benchmarks" / "results" / "defaults_sweep.csv"

BASE = ["--hflip", "0", "--epochs", "5", "--control", "-q", "--device", "cpu"]
"""Options every run shares (issue 22: the bundled example, no flips, 5 epochs, with its --loss none twin)."""

FORMER = ["--lr", "5e-5", "--w-cos", "0.5", "--cutmix-prob", "0.5"]
"""The defaults before this sweep (issue 22): with them the losses raised the last-layer token cosine."""

CANDIDATES: dict[str, list[str]] = {
    "current": [],
    "former": FORMER,
    "cutmix1": ["--lr", "5e-5", "--w-cos", "0.5", "--cutmix-prob", "1.0"],
    "lr1e-4": ["--lr", "1e-4", "--w-cos", "0.5", "--cutmix-prob", "0.5"],
    "cutmix1-lr1e-4": ["--lr", "1e-4", "--w-cos", "0.5", "--cutmix-prob", "1.0"],
    "cutmix1-cos2-lr1e-4": ["--lr", "1e-4", "--w-cos", "2.0", "--cutmix-prob", "1.0"],
}
"""Candidate defaults, by name: the options added to :data:`BASE`, each spelling out the learning rate, the weight of
``cos`` and the CutMix probability, so a name means the same run whatever the defaults are; ``current`` is the
defaults of the tree that runs (``--lr 1e-4 --w-cos 1 --cutmix-prob 1`` since this sweep chose them)."""

DATA = {"digits": DIGITS, "textures": REPO / "runs" / "textures"}
"""The labelled sets (``--data``): the bundled model's digits, and grayscale texture crops made by
``benchmarks/make_textures.py`` (another kind of image, six classes), each with its own results CSV."""

COLUMNS = [
    "candidate",
    "options",
    "seed",
    "treated_top1",
    "control_top1",
    "top1_diff",
    "mcnemar_p",
    "treated_cosine",
    "control_cosine",
    "cosine_diff",
    "before_cosine",
    "n_val",
    "seconds",
    "commit",
    "torch",
    "threads",
]


def commit() -> str:
    """HEAD, with ``-dirty`` when tracked files differ from it (a row must say what code made it)."""
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def results_path(data: str) -> Path:
    """``benchmarks/results/defaults_sweep.csv`` for the digits, ``defaults_sweep_<data>.csv`` for another set."""
    return RESULTS if data == "digits" else RESULTS.with_name(f"defaults_sweep_{data}.csv")


def torch_version() -> str:
    import torch

    return torch.__version__


def done(path: Path, code: str) -> set[tuple[str, int]]:
    if not path.is_file():
        return set()
    with path.open() as f:
        return {(r["candidate"], int(r["seed"])) for r in csv.DictReader(f) if r["commit"] == code}


def run_one(name: str, seed: int, train: Path, val: Path, code: str, scratch: Path) -> dict[str, object]:
    out = scratch / f"{name}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "oversmooth_cli", "finetune", str(REPO / "examples" / "digits-vit"), str(train)]
    cmd += ["--val-dir", str(val), "--seed", str(seed), "--out", str(out), *BASE, *CANDIDATES[name]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    side = json.loads((out / "side_by_side.json").read_text())
    arms = {r["arm"]: r for r in side["rows"]}
    shutil.rmtree(out, ignore_errors=True)
    return {
        "candidate": name,
        "options": " ".join(CANDIDATES[name]) or "(defaults)",
        "seed": seed,
        "treated_top1": arms["treated"]["val_top1"],
        "control_top1": arms["control"]["val_top1"],
        "top1_diff": arms["treated"]["val_top1"] - arms["control"]["val_top1"],
        "mcnemar_p": side["p_value"],
        "treated_cosine": arms["treated"]["token_cosine"],
        "control_cosine": arms["control"]["token_cosine"],
        "cosine_diff": arms["treated"]["token_cosine"] - arms["control"]["token_cosine"],
        "before_cosine": arms["before"]["token_cosine"],
        "n_val": arms["treated"]["n_images"],
        "seconds": round(seconds, 1),
        "commit": code,
        "torch": torch_version(),
        "threads": 1,
    }


def append(path: Path, row: dict[str, object]) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def report(path: Path, latest: bool = False) -> str:
    """One line per candidate and commit: per-seed cosine and top-1 differences, and whether it meets the target
    (``latest``: the rows of the CSV's last commit only)."""
    import pandas as pd

    df = pd.read_csv(path)
    if latest:
        df = df[df["commit"] == df["commit"].iloc[-1]]
    lines = [
        "| candidate | options | commit | seeds | cosine diff per seed | top-1 diff per seed | McNemar p per seed |"
        " mean top-1 diff | meets |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, code), g in df.groupby(["candidate", "commit"], sort=False):
        g = g.sort_values("seed")
        meets = (len(g) >= 3 and (g["cosine_diff"] <= -0.05).all() and (g["mcnemar_p"] >= 0.05).all()) and g[
            "top1_diff"
        ].mean() >= -1.0
        lines.append(
            f"| {name} | `{g['options'].iloc[0]}` | {code} | {len(g)} | "
            f"{', '.join(f'{x:+.3f}' for x in g['cosine_diff'])} | "
            f"{', '.join(f'{x:+.1f}' for x in g['top1_diff'])} | {', '.join(f'{x:.2f}' for x in g['mcnemar_p'])} | "
            f"{g['top1_diff'].mean():+.2f} | {'yes' if meets else 'no'} |"
        )
    return "\n".join(lines)


README_START = "<!-- defaults: generated by python benchmarks/defaults_sweep.py --readme -->"
README_END = "<!-- /defaults -->"


def readme_summary(path: Path = RESULTS) -> str:
    """The README's "Defaults" paragraph, from the CSV's last commit: the defaults (``current``) against the former
    ones, per seed."""
    import pandas as pd

    df = pd.read_csv(path)
    df = df[df["commit"] == df["commit"].iloc[-1]]

    def arm(name: str) -> pd.DataFrame:
        return df[df["candidate"] == name].sort_values("seed")

    now, before = arm("current"), arm("former")
    quiet = int((now["mcnemar_p"] >= 0.05).sum())

    def diffs(g: pd.DataFrame, column: str, digits: int) -> str:
        return ", ".join(f"{x:+.{digits}f}" for x in g[column])

    def effect(g: pd.DataFrame) -> str:
        if (g["cosine_diff"] < 0).all():
            return "the losses lowered it in every seed"
        if (g["cosine_diff"] > 0).all():
            return "the losses raised it in every seed"
        return f"the losses lowered it in {int((g['cosine_diff'] < 0).sum())} of {len(g)} seeds"

    return textwrap.fill(
        "At the defaults, `--control --hflip 0 --epochs 5` on the bundled example gives last-layer token cosine "
        f"differences (with the losses minus the `--loss none` twin) of {diffs(now, 'cosine_diff', 3)} in seeds "
        f"{', '.join(str(s) for s in now['seed'])}: {effect(now)}; val top-1 differences of "
        f"{diffs(now, 'top1_diff', 1)} points, within noise (McNemar p >= 0.05) in {quiet} of {len(now)} seeds. At "
        f"the former defaults (`{FORMER_TEXT}`) they were {diffs(before, 'cosine_diff', 3)}: {effect(before)}. "
        f"Commit {now['commit'].iloc[0]}, `benchmarks/results/defaults_sweep.csv`; the sweep is on "
        "[experiments](docs/experiments.md#finetune-defaults).",
        width=120,
        break_on_hyphens=False,
    )


FORMER_TEXT = " ".join(FORMER)


def update_readme(readme: Path = REPO / "README.md", path: Path = RESULTS) -> bool:
    """Rewrite the README's block between :data:`README_START` and :data:`README_END`; whether it changed."""
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    new = text[:start] + "\n" + readme_summary(path) + "\n" + text[end:]
    readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names (default: all)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs, one thread each")
    parser.add_argument("--data", choices=list(DATA), default="digits", help="the labelled set (train/ and val/)")
    parser.add_argument("--results", type=Path, default=None, help="default: results/defaults_sweep[_DATA].csv")
    parser.add_argument("--report", action="store_true", help="print the table from the CSV and exit")
    parser.add_argument("--latest", action="store_true", help="with --report: the last commit's rows only")
    parser.add_argument("--readme", action="store_true", help="rewrite the README's Defaults paragraph from the CSV")
    args = parser.parse_args(argv)
    args.results = args.results or results_path(args.data)
    args.train, args.val = DATA[args.data] / "train", DATA[args.data] / "val"
    if args.data == "textures" and not args.train.is_dir():
        from make_textures import make

        make(DATA["textures"])
    if args.readme:
        print("README.md " + ("updated" if update_readme(path=args.results) else "already up to date"))
        return 0
    if args.report:
        print(report(args.results, args.latest))
        return 0
    code = commit()
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    finished = done(args.results, code)
    todo = [(n, s) for s in seeds for n in names if (n, s) not in finished]
    print(f"commit {code}: {len(todo)} runs to do, {len(finished)} already in {args.results}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="oversmooth-sweep-"))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, n, s, args.train, args.val, code, scratch): (n, s) for n, s in todo}
        for future, (n, s) in futures.items():
            try:
                row = future.result()
            except RuntimeError as e:
                print(f"FAILED {e}", flush=True)
                continue
            append(args.results, row)
            print(
                f"{n} seed {s}: cosine {row['treated_cosine']:.3f} vs {row['control_cosine']:.3f}, "
                f"top-1 {row['treated_top1']:.1f} vs {row['control_top1']:.1f} (p {row['mcnemar_p']:.2f}), "
                f"{row['seconds']} s",
                flush=True,
            )
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
