"""``oversmooth models``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import UserError
from .app import command, out_console


@command("models")
def models_cmd(
    pattern: Annotated[
        str, typer.Argument(help="Architecture name or wildcard pattern (e.g. 'swin*', '*distilled*').")
    ] = "*",
) -> None:
    """List the timm architectures matching PATTERN and, for each family, which metrics are measured.

    Token metrics (token_cosine...) and attention metrics (attention_std...) apply at every layer, at some layers
    (e.g. only the class-attention blocks of XCiT), or not at all; docs/compatibility.md has the full table.
    Example: `oversmooth models 'swin*'`
    """
    from ..reading.registry import architecture_families, family_support

    rows = architecture_families(pattern)
    if not rows:
        raise UserError(f"no timm architecture matches {pattern!r}; try a wildcard such as 'vit_*' or '*swin*'")
    support = {family: family_support(family) for family in dict.fromkeys(f for _, f in rows)}
    table = Table(title=f"{len(rows)} timm architecture(s) matching {pattern!r}", title_justify="left")
    for column in ("architecture", "family", "status", "token metrics", "attention metrics"):
        table.add_column(column)
    for name, family in rows:
        s = support[family]
        table.add_row(name, family, s.status, s.tokens, s.attention)
    out_console.print(table)
    for s in support.values():
        out_console.print(f"[bold]{escape(s.family)}[/] ({s.status}): {escape(s.note)}", highlight=False)
