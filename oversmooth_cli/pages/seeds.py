"""``finetune --control --seeds``: the pooled page of a seeds folder (``seeds.json``, ``pooled.json``,
``seed-<k>/``): the pooled verdict with the mean differences over seeds and their intervals, the per-seed table,
every seed's treated and control curves per layer, and each seed's own side-by-side."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..gate.runs import load_run
from .control import arms_table
from .document import KeyNumber, Section, details, note, table
from .history import read_json, run_options
from .measure import layer_charts
from .svg import PALETTE, Html, esc, number

__all__ = ["is_seeds_run", "pooled_table", "seed_table", "seeds_sections"]


def is_seeds_run(folder: str | Path) -> bool:
    """``folder`` is a ``--control --seeds`` run (it has ``seeds.json``)."""
    return (Path(folder) / "seeds.json").is_file()


def _interval(stats: Mapping[str, Any], digits: int) -> str:
    low, high = stats.get("ci95_low"), stats.get("ci95_high")
    if low is None or high is None:
        return "none (one seed)"
    return f"{number(low, digits)} to {number(high, digits)}"


def pooled_table(pooled: Mapping[str, Any]) -> Html:
    """The mean differences (treated - control) over seeds with their 95% intervals, and the seed counts."""
    n = pooled.get("seeds")
    rows = []
    for key, label in (
        ("cosine_diff", "last-layer token cosine, treated - control"),
        ("top1_diff", "val top-1 (points), treated - control"),
    ):
        stats = pooled.get(key)
        if isinstance(stats, Mapping):
            rows.append([label, number(stats.get("mean"), 4), _interval(stats, 4)])
    table_html = table(["over seeds", "mean", "95% interval"], rows, numeric=(1, 2))
    counts = (
        f"token cosine lower with the losses in {number(pooled.get('seeds_cosine_lowered'))} of {number(n)} seeds; "
        f"val top-1 within noise in {number(pooled.get('seeds_top1_within_noise'))} of {number(n)} seeds "
        f"(McNemar p >= {number(pooled.get('alpha'))}); intervals: {pooled.get('interval', '')}."
    )
    return Html(f'{table_html}<p class="intro">{esc(counts)}</p>')


def seed_table(rows: list[Mapping[str, Any]]) -> Html:
    """One row per seed (``pooled.json``'s rows): both arms' val top-1 and last-layer token cosine, their
    differences and McNemar's p (each row ``data-seed``)."""
    cells = [
        [
            number(r.get("seed")),
            number(r.get("treated_top1"), 4),
            number(r.get("control_top1"), 4),
            number(r.get("top1_diff"), 4),
            number(r.get("mcnemar_p"), 3),
            number(r.get("treated_cosine")),
            number(r.get("control_cosine")),
            number(r.get("cosine_diff")),
            number(r.get("n_images")),
        ]
        for r in rows
    ]
    headers = [
        "seed",
        "treated top-1 (%)",
        "control top-1 (%)",
        "difference",
        "McNemar p",
        "treated cosine",
        "control cosine",
        "difference",
        "images",
    ]
    return table(headers, cells, numeric=range(9), row_attrs=[{"data-seed": c[0]} for c in cells])


def _seed_curves(out: Path, seeds: list[int]) -> Html:
    tables, colors, dashed = {}, {}, set()
    for k, seed in enumerate(seeds):
        folder = out / f"seed-{seed}"
        for arm, path in (("treated", folder / "after"), ("control", folder / "control" / "after")):
            if (path / "layers.csv").is_file():
                label = f"seed {seed} {arm}"
                tables[label] = load_run(path).layers
                colors[label] = PALETTE[k % len(PALETTE)]
                if arm == "control":
                    dashed.add(label)
    return layer_charts(tables, colors=colors, dashed=dashed, bands=False) if tables else Html("")


def seeds_sections(out: str | Path) -> tuple[list[Section], list[KeyNumber]]:
    """The sections and header numbers of a ``--control --seeds`` folder.

    Raises:
        UserError: a seed's ``after/`` or ``control/after/`` folder breaks the run-file schema.
    """
    out = Path(out)
    record = read_json(out / "seeds.json") or {}
    seeds = [int(s) for s in record.get("seeds") or []]
    report = read_json(out / "pooled.json")
    pooled = (report or {}).get("pooled") or {}
    if report is None:
        verdict = note("pooled.json is missing: the seeds run has not finished (finetune --resume continues it).")
    else:
        verdict = Html(note(report.get("verdict", ""), "") + pooled_table(pooled))
    sections = [
        Section(
            "verdict",
            "Pooled verdict",
            verdict,
            f"The --control pair trained once per seed: {', '.join(map(str, seeds))}.",
        )
    ]
    rows = [r for r in (report or {}).get("rows") or [] if isinstance(r, Mapping)]
    if rows:
        sections.append(Section("per-seed", "Per seed", seed_table(rows), "Differences are treated - control."))
    curves = _seed_curves(out, seeds)
    if curves:
        intro = (
            "Final weights on the validation images: treated solid, control dashed, one colour per seed; hover a layer."
        )
        sections.append(Section("curves", "Curves per layer", curves, intro))
    blocks = []
    for seed in seeds:
        side = read_json(out / f"seed-{seed}" / "side_by_side.json")
        if side is not None:
            blocks.append(details(f"seed {seed}: {side.get('verdict', '')}", arms_table(side)))
    if blocks:
        sections.append(Section("seeds", "Each seed's side-by-side", Html("".join(blocks))))
    sections.append(Section("run", "Run", run_options(record.get("run") or {}), "The options shared by every seed."))
    numbers = [KeyNumber("seeds", number(len(seeds)), ", ".join(map(str, seeds)))]
    for key, label, digits in (
        ("cosine_diff", "cosine, treated - control", 3),
        ("top1_diff", "top-1, treated - control", 2),
    ):
        stats = pooled.get(key)
        if isinstance(stats, Mapping) and stats.get("mean") is not None:
            value = f"{float(stats['mean']):+.{digits}f}"
            numbers.append(KeyNumber(label, value, f"95% interval {_interval(stats, digits + 1)}"))
    if pooled.get("seeds_cosine_lowered") is not None:
        lowered = f"{number(pooled['seeds_cosine_lowered'])} of {number(pooled.get('seeds'))}"
        numbers.append(KeyNumber("seeds with lower cosine", lowered, "with the losses than without"))
    return sections, numbers
