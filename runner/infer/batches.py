"""Batches of similar length: less padding, so less wasted compute."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def length_batches(items: Sequence[T], size: int, *, length: Callable[[T], int],
                   group: Callable[[T], Hashable] | None = None) -> Iterator[list[T]]:
    """``items`` sorted by length (ties kept in input order) and cut into batches of ``size``. With ``group``,
    a batch holds one group's items only (requests with different sampling settings), groups in order of
    first appearance. The same items always give the same batches, which a resumed job relies on."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(group(item) if group else None, []).append(item)
    for members in groups.values():
        ordered = sorted(members, key=length)  # stable: equal lengths stay in input order
        for first in range(0, len(ordered), size):
            yield ordered[first:first + size]
