"""Pin a fine-tune bit for bit across a refactoring: run a fixed-seed ``oversmooth finetune`` and compare two runs.

The run uses every loss term, patch CutMix, drop-path, the ``--control`` twin and the monitor on the bundled model and
the training digits in ``tests/data`` (one thread, CPU), so it touches every part of the training code. ``compare``
checks every checkpoint tensor with ``torch.equal`` and every CSV value exactly (the ``seconds`` column aside)::

    git worktree add /tmp/before <old commit>
    python scripts/pin_finetune.py run /tmp/pin-before --repo /tmp/before
    python scripts/pin_finetune.py run /tmp/pin-after
    python scripts/pin_finetune.py compare /tmp/pin-before /tmp/pin-after    # exit 0: bit-identical
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OPTIONS = [
    "--val-split", "0.25", "--loss", "cos,cons,token", "--epochs", "2", "--batch-size", "16", "--seed", "3",
    "--lr", "1e-4", "--cutmix-prob", "0.7", "--drop-path", "0.1", "--device", "cpu", "--control",
    "--monitor-every", "2", "-q",
]  # fmt: skip


def run(out: Path, repo: Path) -> int:
    """Fine-tune with :data:`OPTIONS` into ``out`` using the code in ``repo``."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "oversmooth_cli", "finetune", "examples/digits-vit", "tests/data/digits/train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    return subprocess.run([*cmd, *OPTIONS, "--out", str(out)], cwd=repo, env=env).returncode


def compare(a: Path, b: Path) -> int:
    """0 when every checkpoint tensor and CSV value of run ``a`` equals run ``b``'s, else 1 (lists what differs)."""
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    differ = []
    for path in sorted(a.rglob("*.safetensors")):
        x, y = load_file(path), load_file(b / path.relative_to(a))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            differ.append(str(path.relative_to(a)))
    for path in sorted(a.rglob("*.csv")):
        x, y = pd.read_csv(path), pd.read_csv(b / path.relative_to(a))
        columns = [c for c in x.columns if c != "seconds"]
        if list(x.columns) != list(y.columns) or not x[columns].equals(y[columns]):
            differ.append(str(path.relative_to(a)))
    checked = len(list(a.rglob("*.safetensors"))) + len(list(a.rglob("*.csv")))
    print(f"{checked} files compared: " + ("bit-identical" if not differ else f"differ: {', '.join(differ)}"))
    return 1 if differ or not checked else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="fine-tune into OUT")
    r.add_argument("out", type=Path)
    r.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code runs (default: this one)")
    c = sub.add_parser("compare", help="compare two runs")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.what == "run":
        return run(args.out.resolve(), args.repo.resolve())
    return compare(args.a, args.b)


if __name__ == "__main__":
    raise SystemExit(main())
