"""A numeric attribute of file names (age) grouped into bands: each value's band and label, and the bands' order
for tables and figures. Kept apart from the suite so that what draws figures in training needs nothing more."""

from __future__ import annotations

import math
import re
from bisect import bisect_right

from .data import DatasetError


def band(value: str, edges: list[float], what: str) -> tuple[int, str]:
    """(index, label) of the band of `edges` that holds the number `value`: 'under a', 'a to under b', ...,
    'z and over' (letters, digits and spaces: the label is also part of MLflow metric names)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DatasetError(f"{what} is {value!r}, not a finite number, but attribute_bins groups it into bands")
    i = bisect_right(edges, number)
    if i == 0:
        return i, f"under {_exact(edges[0])}"
    if i == len(edges):
        return i, f"{_exact(edges[-1])} and over"
    return i, f"{_exact(edges[i - 1])} to under {_exact(edges[i])}"


_BAND_LABEL = re.compile(r"^(?:under (?P<under>\S+)|(?P<low>\S+) to under \S+|(?P<over>\S+) and over)$")


def in_order(groups: dict[str, dict]) -> list[tuple[str, dict]]:
    """An attribute's groups for a table or a figure: bands (`band`'s labels) by their edges, other values by
    name. Stored JSON sorts keys as text ('13 to under 20' before '3 to under 13'), so the order is rebuilt."""

    def key(label: str):
        m = _BAND_LABEL.match(label)
        try:
            if m and m["under"]:
                return (0, -math.inf, label)
            if m:
                return (0, float(m["low"] or m["over"]), label)
        except ValueError:
            pass
        return (1, 0.0, label)

    return sorted(groups.items(), key=lambda item: key(item[0]))


def _exact(edge: float) -> str:
    """An edge as written: 3, not 3.0; 2.5 as 2.5; never rounded, so two edges never share a label."""
    return str(int(edge)) if float(edge).is_integer() else repr(float(edge))
