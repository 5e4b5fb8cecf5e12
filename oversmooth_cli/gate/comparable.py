"""Whether two runs measured the same things: metrics version, metric definitions, token geometry, image set (the one
comparability rule of ``check`` and ``compare``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import UserError
from ..metrics.registry import metric_order
from .runs import Run
from .selection import format_layers

__all__ = ["validate_comparable", "validate_definitions"]


# -- validation ---------------------------------------------------------------------------------------------------
def _sides(items: Sequence[tuple[str, Any]]) -> str:
    """``"baseline has"`` / ``"baseline and current have"`` for the names whose value is missing."""
    missing = [name for name, value in items if value is None]
    return f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'}"


def _tokens_text(definition: Mapping[str, Any]) -> str:
    return str(definition.get("tokens") or ("prefix tokens too" if definition.get("prefix_included") else "?"))


def validate_definitions(
    a: Run,
    b: Run,
    metrics: Sequence[str],
    *,
    allow_other_images: bool = False,
    gate: bool = True,
    names: tuple[str, str] = ("baseline", "current"),
) -> list[str]:
    """Refuse two runs whose numbers mean different things; return notes on what could not be compared.

    The one place that decides whether two runs' values may be compared, used by ``check``, ``measure --baseline``
    and ``compare``. It compares the runs' recorded definitions (:attr:`Run.definitions`): ``metrics_version``;
    each metric of ``metrics`` that both runs have (its definition, token set, e.g. patch tokens only vs
    ``--include-prefix``, and layers); the model input size and the patch tokens per layer; the image set (count
    and hash of the images' contents: the same files under other names or folders are the same set). The attention
    tap is recorded but not compared (the taps agree to 1e-5).

    Args:
        a, b: the two runs (baseline and current for a check).
        metrics: the metrics whose definitions matter.
        allow_other_images: accept a different image set (with a note) instead of refusing it.
        gate: ``True`` for a check of one model against its baseline: a different input size or token grid is
            refused. ``False`` for ``compare``, whose runs may be different models: those become notes.
        names: how the messages call the two runs.

    Returns:
        Human-readable notes (e.g. what an older ``summary.json`` does not record, so was not compared).

    Raises:
        UserError: one line naming the first difference and how to measure comparable runs.
    """
    na, nb = names
    da, db = a.definitions, b.definitions
    notes = _check_version(a, b, names, gate)
    images_compared = False
    if da and db:  # a run without summary.json is already named in the note above
        notes += _check_metric_definitions(da, db, metrics, names)
        notes += _check_geometry(da, db, names, gate)
        images_compared, image_notes = _check_image_set(da, db, names, allow_other_images)
        notes += image_notes
    if not images_compared and a.n_images != b.n_images:
        notes.append(f"image counts differ: {na} measured {a.n_images}, {nb} {b.n_images}")
    return notes


def _check_version(a: Run, b: Run, names: tuple[str, str], gate: bool) -> list[str]:
    """Refuse different ``metrics_version``s; a note when a run does not record one."""
    (na, nb), va, vb = names, a.metrics_version, b.metrics_version
    if va is None or vb is None:
        return [f"metrics_version not compared: {_sides([(na, va), (nb, vb)])} no summary.json with metrics_version"]
    if va != vb:
        advice = (
            "the metric definitions changed, so measure the baseline again with this version and commit it "
            "(`oversmooth baseline`)"
            if gate
            else "the metric definitions changed between them; measure both with the same version"
        )
        raise UserError(f"metrics_version differs: {na} {va}, {nb} {vb}; {advice}")
    return []


def _check_metric_definitions(
    da: Mapping[str, Any], db: Mapping[str, Any], metrics: Sequence[str], names: tuple[str, str]
) -> list[str]:
    """Refuse a metric measured on other tokens (``--include-prefix``), with another definition or other layers."""
    (na, nb), ma, mb = names, da.get("metrics"), db.get("metrics")
    if ma is None or mb is None:
        return [f"metric definitions not compared: {_sides([(na, ma), (nb, mb)])} none recorded"]
    for m in metrics:
        x, y = ma.get(m), mb.get(m)
        if x is None or y is None:
            continue
        if (x.get("tokens"), x.get("prefix_included")) != (y.get("tokens"), y.get("prefix_included")):
            how = " (with or without --include-prefix)" if da.get("include_prefix") != db.get("include_prefix") else ""
            raise UserError(
                f"{m} definitions differ: {na} measured {_tokens_text(x)}, {nb} measured {_tokens_text(y)}; "
                f"measure both the same way{how}"
            )
        for key in ("definition", "layers"):
            if key in x and key in y and x[key] != y[key]:
                raise UserError(
                    f"{m} definitions differ: {na} has {key} {x[key]!r}, {nb} has {y[key]!r}; measure both "
                    "with the same oversmooth version"
                )
    return []


def _check_geometry(da: Mapping[str, Any], db: Mapping[str, Any], names: tuple[str, str], gate: bool) -> list[str]:
    """Refuse (``gate``) or note (``compare``) a different input size or token grid."""
    na, nb = names
    size_a, size_b = da.get("input_size"), db.get("input_size")
    grid_a, grid_b = da.get("n_tokens") or [], db.get("n_tokens") or []
    grid = [(i, x, y) for i, (x, y) in enumerate(zip(grid_a, grid_b, strict=False)) if None not in (x, y) and x != y]
    if size_a is not None and size_b is not None and size_a != size_b:
        what = f"input size differs: {na} {'x'.join(map(str, size_a))}, {nb} {'x'.join(map(str, size_b))}"
        advice = "measure both at the same image size (the model's data config, e.g. --model-arg img_size)"
    elif grid:
        layer, x, y = grid[0]
        what = f"token grids differ: layer {layer} has {x} patch tokens in {na}, {y} in {nb}"
        advice = "measure the same model at the same image size"
    else:
        return []
    if gate:
        raise UserError(f"{what}; {advice}")
    return [f"{what}: attention metrics scale with the number of keys, so read them with care"]


def _check_image_set(
    da: Mapping[str, Any], db: Mapping[str, Any], names: tuple[str, str], allow_other_images: bool
) -> tuple[bool, list[str]]:
    """Refuse another image set unless ``allow_other_images``; returns whether the sets were compared, and notes.

    Sets are known by content (:func:`~oversmooth_cli.measuring.summary.describe_image_set`): the same bytes under
    other names or folders are the same set. A summary that hashed relative paths (``by`` ``"path"``: oversmooth 0.1)
    cannot be compared with one that hashed contents; that is a note.
    """
    (na, nb), ia, ib = names, da.get("images"), db.get("images")
    if ia is None or ib is None:
        return False, [
            f"image set not compared: {_sides([(na, ia), (nb, ib)])} no image hash in summary.json "
            "(measured with an older oversmooth)"
        ]
    if ia.get("by", "path") != ib.get("by", "path"):
        old = na if ia.get("by", "path") == "path" else nb
        return False, [
            f"image set not compared: {old} recorded its images by file name (an older oversmooth), not by content; "
            f"measure {old} again to compare image sets"
        ]
    if (ia["count"], ia["sha256"]) == (ib["count"], ib["sha256"]):
        return True, []
    what = (
        f"image sets differ: {na} measured {ia['count']} images (sha256 {ia['sha256'][:12]}), "
        f"{nb} {ib['count']} (sha256 {ib['sha256'][:12]}){_how_many_differ(ia, ib, names)}"
    )
    if not allow_other_images:
        raise UserError(
            f"{what}; measure the same images (same files, same --limit and --seed) or pass --allow-other-images"
        )
    return True, [f"{what}; compared anyway (--allow-other-images)"]


def _how_many_differ(ia: Mapping[str, Any], ib: Mapping[str, Any], names: tuple[str, str]) -> str:
    """``": 1 of baseline's images is not in current, 1 of current's not in baseline"`` from the recorded digests."""
    if not ia.get("digests") or not ib.get("digests"):
        return ""
    a, b = Counter(ia["digests"]), Counter(ib["digests"])
    only_a, only_b = sum((a - b).values()), sum((b - a).values())
    na, nb = names
    return f": {only_a} of {na}'s images {'is' if only_a == 1 else 'are'} not in {nb}, {only_b} of {nb}'s not in {na}"


def validate_comparable(
    baseline: Run,
    current: Run,
    metrics: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    *,
    allow_other_images: bool = False,
) -> tuple[list[str], list[str]]:
    """Refuse two runs that cannot be compared; return the metrics to check and notes for the report.

    Args:
        baseline, current: the two runs.
        metrics: metrics to check (default: every metric of the baseline, which the current run must all have;
            metrics only the current run has are listed in the notes as not checked).
        layers: restrict to these layers; each must exist in the runs for at least one selected metric.
        allow_other_images: accept runs measured on different images (see :func:`validate_definitions`).

    Returns:
        ``(metrics, notes)``: the metrics in registry order and human-readable notes (e.g. what was not compared).

    Raises:
        UserError: differing definitions (:func:`validate_definitions`), metrics or layers, saying exactly what
            differs.
    """
    common = [m for m in (metric_order(metrics) if metrics else baseline.metrics) if m in current.metrics]
    notes = validate_definitions(baseline, current, common, allow_other_images=allow_other_images)

    if metrics:
        selected = metric_order(metrics)
        for name, run in (("baseline", baseline), ("current", current)):
            absent = [m for m in selected if m not in run.metrics]
            if absent:
                raise UserError(
                    f"metric {', '.join(absent)} not in {name} {run.layers_csv} (it has {', '.join(run.metrics)})"
                )
    else:
        selected = baseline.metrics
        only_b = [m for m in baseline.metrics if m not in current.metrics]
        only_c = [m for m in current.metrics if m not in baseline.metrics]
        if only_b:
            what = "; ".join(
                f"only {side} has {', '.join(ms)}" for side, ms in (("baseline", only_b), ("current", only_c)) if ms
            )
            raise UserError(
                f"metrics differ: baseline has {', '.join(baseline.metrics)}, current has "
                f"{', '.join(current.metrics) or 'none'} ({what}); pass --metric NAME to check only common ones"
            )
        if only_c:
            notes.append(f"not checked: {', '.join(only_c)} (only in the current run, not in the baseline)")

    differ = [
        (m, baseline.layers_of(m), current.layers_of(m))
        for m in selected
        if baseline.layers_of(m) != current.layers_of(m)
    ]
    if differ:
        all_b = {x for m in selected for x in baseline.layers_of(m)}
        all_c = {x for m in selected for x in current.layers_of(m)}
        detail = (
            f"baseline has {format_layers(all_b)}, current has {format_layers(all_c)}"
            if all_b != all_c
            else "; ".join(
                f"{m}: baseline has {format_layers(b)}, current has {format_layers(c)}" for m, b, c in differ
            )
        )
        raise UserError(f"layers differ: {detail}; compare runs of models with the same depth")

    if layers is not None:
        have = {layer for m in selected for layer in baseline.layers_of(m)}
        missing = [x for x in layers if x not in have]
        if missing:
            raise UserError(
                f"--layers asks for {format_layers(missing)}, which the runs do not have "
                f"(they have {format_layers(have)})"
            )
    return selected, notes
