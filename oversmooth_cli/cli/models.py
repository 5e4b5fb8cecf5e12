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
    """List the timm architectures matching PATTERN and, for each, whether and where metrics are measured.

    Token metrics (token_cosine...) and attention metrics (attention_std...) apply at every layer, at some layers
    (e.g. only the class-attention blocks of XCiT), or not at all; docs/compatibility.md has the full table. Where the
    models of one family differ (convolution-only MobileNetV3s beside hybrid MobileNetV4s, ByobNet), each is built
    on the meta device (no weights) to tell.
    Example: `oversmooth models 'swin*'`
    """
    from ..reading.registry import architecture_families, architecture_support, family_support

    rows = architecture_families(pattern)
    if not rows:
        raise UserError(f"no timm architecture matches {pattern!r}; try a wildcard such as 'vit_*' or '*swin*'")
    support = {family: family_support(family) for family in dict.fromkeys(f for _, f in rows)}
    table = Table(title=f"{len(rows)} timm architecture(s) matching {pattern!r}", title_justify="left")
    for column in ("architecture", "family", "status", "token metrics", "attention metrics"):
        table.add_column(column)
    own: list[tuple[str, str]] = []  # (architecture, why) where it is not measured for reasons of its own
    for name, family in rows:
        s = architecture_support(name, family)
        table.add_row(name, family, s.status, s.tokens, s.attention)
        if s.status != "measured" and s.note != support[family].note:
            own.append((name, s.note))
    out_console.print(table)
    for s in support.values():
        out_console.print(f"[bold]{escape(s.family)}[/]: {escape(s.note)}", highlight=False)
    for name, note in own:
        out_console.print(f"[bold]{escape(name)}[/]: {escape(note)}", highlight=False)
