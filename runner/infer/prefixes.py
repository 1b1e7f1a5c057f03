"""Prefixes many prompts share (a system prompt, a few-shot block), their keys and values kept across a whole job.

A group of prompts being prefilled asks for the longest kept prefix that all of them start with. On a hit, their
caches start as copies of it and only the rest of each prompt is computed. On a miss, the prefix the group shares
(``shared_prefix``, when long enough) is computed once, for one row, and kept for later groups. The cache is bounded
in positions (``runtime.prefix_cache``, which the plan reserves): the least recently used prefix goes first.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

# A shared prefix shorter than this is recomputed per row: one more forward would cost more than it saves.
SHARED_PREFIX_MIN = 16


class PrefixCache:
    """Prefix token ids -> their one-row cache, at most ``positions`` positions in all."""

    def __init__(self, positions: int):
        self.positions = positions
        self._kept: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.lookups = 0
        self.hits = 0

    def find(self, prompts: Sequence[tuple[int, ...]]) -> tuple[tuple[int, ...], Any] | None:
        """The longest kept prefix every prompt starts with (leaving each a token of its own), and its cache."""
        self.lookups += 1
        shortest = min(len(p) for p in prompts)
        best = None
        for tokens in self._kept:
            if len(tokens) < shortest and all(p[:len(tokens)] == tokens for p in prompts):
                if best is None or len(tokens) > len(best):
                    best = tokens
        if best is None:
            return None
        self.hits += 1
        self._kept.move_to_end(best)
        return best, self._kept[best]

    def keep(self, tokens: tuple[int, ...], cache: Any) -> None:
        """Keep ``cache`` (one row, ``len(tokens)`` positions), dropping the least recently used to make room."""
        if len(tokens) > self.positions:
            return
        while sum(map(len, self._kept)) + len(tokens) > self.positions:
            self._kept.popitem(last=False)
        self._kept[tokens] = cache


def shared_prefix(prompts: Sequence[tuple[int, ...]], least: int = SHARED_PREFIX_MIN) -> int:
    """How many leading tokens every prompt of the group shares, when at least ``least`` and the group has two
    prompts or more; else 0. Each row keeps one token of its own, whose logits start its completion."""
    if len(prompts) < 2:
        return 0
    first, shortest = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < shortest and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= least else 0
