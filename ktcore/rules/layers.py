"""Index ranges for ``match.layers`` and ``split[].experts``.

Syntax: comma-separated items, each one of

- ``N``        one index;
- ``A-B``      A to B inclusive;
- ``A-``       A to the last index;
- ``P%-Q%``    indices i with round(P/100*n) <= i < round(Q/100*n), rounding half up, so that
               ``0%-50%`` and ``50%-100%`` split any depth (or expert count) in two without a
               gap or an overlap; ``P%-`` means ``P%-100%``;
- ``all``      every index.

YAML integers and lists of items are accepted too (``layers: 3``, ``layers: [0, 5-7]``).
Expert ranges also accept ``rest`` (alone): every expert no other part of the split lists.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

_INDEX = re.compile(r"^(\d+)(?:\s*-\s*(\d*))?$")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)\s*%\s*-\s*(?:(\d+(?:\.\d+)?)\s*%)?$")

SYNTAX = "N, A-B, A-, P%-Q%, all, or a comma-separated list of those"


@dataclass(frozen=True)
class RangeItem:
    """One item: ``[start, end]`` inclusive indices, or ``[start%, end%)`` of the count."""

    start: Fraction
    end: Fraction | None  # None: open (to the last index / 100%)
    percent: bool = False

    def resolve(self, count: int) -> range:
        if self.percent:
            end = Fraction(100) if self.end is None else self.end
            return range(_round_half_up(self.start * count / 100), _round_half_up(end * count / 100))
        last = count - 1 if self.end is None else min(int(self.end), count - 1)
        return range(int(self.start), last + 1)

    def explicit(self) -> range | None:
        """The indices when they do not depend on the count, else None."""
        if self.percent or self.end is None:
            return None
        return range(int(self.start), int(self.end) + 1)


@dataclass(frozen=True)
class IndexSet:
    """A parsed range expression; ``rest`` only for split parts."""

    text: str
    items: tuple[RangeItem, ...] = ()
    rest: bool = False

    def __post_init__(self) -> None:
        if self.rest == bool(self.items):
            raise ValueError("an IndexSet is either 'rest' or a non-empty list of items")

    def resolve(self, count: int) -> frozenset[int]:
        """Indices in ``0..count-1`` the expression selects (indices past the end are dropped)."""
        out: set[int] = set()
        for item in self.items:
            out.update(i for i in item.resolve(count) if 0 <= i < count)
        return frozenset(out)

    def beyond(self, count: int) -> list[int]:
        """Explicit indices that are ``>= count`` (the caller decides whether that is an error)."""
        out = set()
        for item in self.items:
            if not item.percent:
                if item.start >= count:
                    out.add(int(item.start))
                if item.end is not None and item.end >= count:
                    out.add(int(item.end))
        return sorted(out)

    def explicit(self) -> frozenset[int] | None:
        """The indices when no item depends on the count, else None."""
        out: set[int] = set()
        for item in self.items:
            r = item.explicit()
            if r is None:
                return None
            out.update(r)
        return frozenset(out)

    def __str__(self) -> str:
        return self.text


def parse_range(value: Any, allow_rest: bool = False) -> IndexSet:
    """Parses a YAML value into an ``IndexSet``; ``ValueError`` says what is wrong."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected {SYNTAX}, got {value!r}")
    if isinstance(value, int):
        pieces = [str(value)]
    elif isinstance(value, str):
        pieces = value.split(",")
    elif isinstance(value, list):
        pieces = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ValueError(f"expected {SYNTAX}, got {value!r}")
            pieces.extend(str(v).split(","))
    else:
        raise ValueError(f"expected {SYNTAX}, got {value!r}")
    pieces = [p.strip() for p in pieces]
    text = ",".join(pieces)
    if allow_rest and "rest" in pieces:
        if len(pieces) != 1:
            raise ValueError("'rest' stands alone: it means every expert the other parts do not list")
        return IndexSet("rest", rest=True)
    items = []
    for piece in pieces:
        items.extend(_parse_item(piece, allow_rest))
    return IndexSet(text, tuple(items))


def _parse_item(piece: str, allow_rest: bool) -> list[RangeItem]:
    syntax = SYNTAX + (", or rest" if allow_rest else "")
    if piece == "all":
        return [RangeItem(Fraction(0), None)]
    m = _INDEX.match(piece)
    if m:
        start = Fraction(int(m.group(1)))
        if m.group(2) is None:
            return [RangeItem(start, start)]
        if m.group(2) == "":
            return [RangeItem(start, None)]
        end = Fraction(int(m.group(2)))
        if end < start:
            raise ValueError(f"range {piece!r} ends before it starts")
        return [RangeItem(start, end)]
    m = _PERCENT.match(piece)
    if m:
        start = Fraction(m.group(1))
        end = Fraction(m.group(2)) if m.group(2) is not None else None
        for p in (start, end):
            if p is not None and p > 100:
                raise ValueError(f"percentage range {piece!r} goes past 100%")
        if end is not None and end < start:
            raise ValueError(f"percentage range {piece!r} ends before it starts")
        return [RangeItem(start, end, percent=True)]
    if not piece:
        raise ValueError(f"empty item in range; expected {syntax}")
    raise ValueError(f"cannot read {piece!r} as a range; expected {syntax}")


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def format_ranges(indices: Iterable[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"``."""
    values = sorted(set(indices))
    parts = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)
