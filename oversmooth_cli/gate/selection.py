"""What a check looks at: layer selections (``0-5,12`` parsed and printed back) and the direction of change that
fails it. Torch-free: the command line reads it at start-up."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import UserError

__all__ = ["DIRECTIONS", "format_layers", "parse_layers"]

DIRECTIONS: dict[str, tuple[int, ...]] = {"both": (1, -1), "up": (1,), "down": (-1,)}
"""``--direction``: which signs of (change x the metric's smoothing sign) fail a check: ``up`` only more
over-smoothing, ``down`` only less, ``both`` either."""


# -- layer selections ---------------------------------------------------------------------------------------------
def parse_layers(spec: str) -> list[int]:
    """``"0-5,12"`` -> ``[0, 1, 2, 3, 4, 5, 12]`` (sorted, without repeats).

    Raises:
        UserError: an empty item, a non-integer, a negative layer or a reversed range.
    """
    out: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(item), int(item))
        except ValueError:
            raise UserError(
                f"--layers {spec!r}: {item!r} is not a layer or a range; write e.g. 0-5,12 (non-negative integers)"
            ) from None
        if a < 0 or b < a:
            raise UserError(f"--layers {spec!r}: {item!r} is not a range from low to high; write e.g. 0-5,12")
        out.update(range(a, b + 1))
    return sorted(out)


def _layer_list(layers: Sequence[int] | str | None) -> list[int] | None:
    """A layer selection as a list: ``"0-5,12"`` parsed (see :func:`parse_layers`), ``None`` kept."""
    if layers is None:
        return None
    return parse_layers(layers) if isinstance(layers, str) else list(layers)


def format_layers(layers: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 5, 12]`` -> ``"0-3,5,12"`` (``"none"`` when empty)."""
    xs = sorted(set(int(x) for x in layers))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts) or "none"
