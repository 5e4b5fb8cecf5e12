"""Redraw the README's pictures from the README's first command, run for real.

    python scripts/readme_figures.py

Runs ``oversmooth measure examples/digits-vit examples/images`` (the bundled ViT on the bundled images, CPU) into
a temporary folder, copies its ``curves.png`` to ``docs/demo-curves.png`` and its ``patches.png`` to
``docs/demo-patches.png``, and rewrites the line under the README's patch-map picture with the commit it ran on.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = {"curves.png": REPO / "docs" / "demo-curves.png", "patches.png": REPO / "docs" / "demo-patches.png"}
CAPTION = re.compile(r"^<sub>Drawn by `python scripts/readme_figures.py` on commit [^<]*</sub>$", re.M)


def commit() -> str:
    """HEAD, with ``-dirty`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main() -> int:
    ran_on = commit()  # before the figures are replaced
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        cmd = [sys.executable, "-m", "oversmooth_cli", "measure", "examples/digits-vit", "examples/images"]
        subprocess.run([*cmd, "--out", str(out), "--device", "cpu", "-q"], cwd=REPO, check=True)
        for name, dest in FIGURES.items():
            shutil.copyfile(out / name, dest)
            print(f"wrote {dest.relative_to(REPO)}")
    readme = REPO / "README.md"
    text = readme.read_text()
    line = f"<sub>Drawn by `python scripts/readme_figures.py` on commit {ran_on}.</sub>"
    if not CAPTION.search(text):
        print("README.md has no caption line to update", file=sys.stderr)
        return 1
    readme.write_text(CAPTION.sub(line, text, count=1))
    print(f"README.md: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
