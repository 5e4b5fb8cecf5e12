"""The ``oversmooth`` command line: parse, call the library, render. No maths lives here.

One module per command group (``measure``, ``gate``: check / compare / baseline, ``finetune``, ``models``); each
registers its commands on :data:`~oversmooth_cli.cli.app.app` when imported, as timm's family files fill its model
registry. ``app`` holds the plumbing: the error contract (exit codes in :mod:`oversmooth_cli.errors`), help
formatting, progress bars; ``options`` the options several commands share.
"""

from __future__ import annotations

import sys

from . import finetune, gate, measure, models  # noqa: F401  (each registers its commands on `app`)
from .app import app, one_line

__all__ = ["app", "main", "one_line"]


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="oversmooth")  # also under `python -m oversmooth_cli` and torchrun
    finally:
        if "torch.distributed" in sys.modules:
            from ..runtime import shutdown

            shutdown()


if __name__ == "__main__":
    main()
