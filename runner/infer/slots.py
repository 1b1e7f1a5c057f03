"""The rows of a running batch: which request holds each row, the attention mask over its cache's columns, and the
moves that keep the cache and the mask in step (a new group placed in free rows, columns rebased or compacted,
free rows dropped). ``runner.infer.generate`` decides when; this module does it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from runner.infer.column import Call
from runner.infer.model import Cache, SlotCache

# With no request waiting, finished rows leave once 1/DROP_SHARE of a batch's rows are free: moving the rows that
# stay is paid rarely.
DROP_SHARE = 8
# Dead leading columns are dropped once they outnumber the used ones and number at least this many (fewer cost a
# step less to read than to move).
DEAD_COLUMNS = 32


class Occupant(Protocol):
    """What a batch needs to know of the request in a row."""

    @property
    def prompt(self) -> tuple[int, ...]: ...

    @property
    def stopped(self) -> bool: ...


R = TypeVar("R", bound=Occupant)


class Slots(Generic[R]):
    """One batch of a column: its rows (None: a finished row's, free), their cache, and the attention mask over
    the cache's columns (1: a real token of that row)."""

    def __init__(self, cache: Cache):
        self.reset(cache)

    def reset(self, cache: Cache) -> None:
        self.cache = cache
        self.rows: list[R | None] = []
        self.mask: torch.Tensor | None = None

    @property
    def live(self) -> int:
        """Rows still decoding."""
        return sum(1 for r in self.rows if r is not None)

    def going(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None and not r.stopped]

    def release(self) -> list[R]:
        """The rows that stopped; their rows are free, their mask cleared (a free row's positions then stay at
        its shared prefix's length, if any: within every position table)."""
        out = []
        for i, r in enumerate(self.rows):
            if r is not None and r.stopped:
                out.append(r)
                self.rows[i] = None
                if self.mask is not None:
                    self.mask[i] = 0
        return out

    def drop_free(self) -> None:
        """Free rows leave the batch, and their cache rows with them: no request waits for them. They leave
        1/DROP_SHARE of the batch at a time (or all at once)."""
        kept = [i for i, r in enumerate(self.rows) if r is not None]
        if len(self.rows) - len(kept) >= max(1, len(self.rows) // DROP_SHARE) or not kept:
            keep = torch.tensor(kept, dtype=torch.long)
            self.cache.keep(keep)
            self.rows = [self.rows[i] for i in kept]
            self.mask = self.mask[keep] if self.mask is not None else None

    def make_room(self, n: int) -> None:
        """Enough free rows for ``n`` new requests: new rows past the end when the free ones are too few (only in a
        batch's first fill, before its cache has rows: a refill takes free rows only)."""
        free = sum(1 for r in self.rows if r is None)
        self.rows.extend([None] * max(0, n - free))

    def slots_for(self, n: int) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None][:n]

    def rebase(self, width: int) -> None:
        """Every row right-aligned on ``width`` columns, cache and mask alike (``SlotCache.rebase``)."""
        assert isinstance(self.cache, SlotCache) and self.mask is not None
        length = self.mask.shape[1]
        self.cache.rebase(width)
        kept = min(length, width)
        mask = self.mask.new_zeros(self.mask.shape[0], width)
        mask[:, width - kept:] = self.mask[:, length - kept:]
        self.mask = mask

    def used(self) -> int:
        """Columns the running rows use: the longest row's tokens (the leading columns before it are dead)."""
        going = self.going()
        return int(self.mask[torch.tensor(going)].sum(1).max()) if going and self.mask is not None else 0

    def needs_compaction(self) -> bool:
        """The next token has no column, or dead leading columns (rows joined after a long row left, or behind a
        shared prefix) outnumber the used ones: every decode step reads them, a compaction moves the rest once."""
        if not isinstance(self.cache, SlotCache):
            return False
        length, used = self.cache.length, self.used()
        return length + 1 > self.cache.capacity or length - used >= max(used, DEAD_COLUMNS)

    def compact(self) -> None:
        """Drop the leading columns no running row uses, so the next token has a column."""
        self.rebase(self.used())

    def place(self, group: PrefillGroup[R], slots: list[int]) -> None:
        """A group prefilled apart takes ``slots``: its rows' real tokens right-aligned on the cache's length. Rows
        whose prefix the batch shares (``SlotCache.share``) take only the tokens after it."""
        assert isinstance(self.cache, SlotCache) and group.cache is not None
        prefix = group.prompts[0][:group.prefix]
        continues = group.source is not None and self.cache.share(prefix, group.source)
        skip = group.prefix if continues else 0
        width = group.width - skip
        if self.cache.length and width > self.cache.length:
            self.rebase(width)
        rows = len(self.rows)
        self.cache.place(group.cache, torch.tensor(slots), group.columns(skip), rows, continues)
        length = self.cache.length
        mask = torch.zeros(rows, length, dtype=torch.long)
        if self.mask is not None:
            mask[:self.mask.shape[0], length - self.mask.shape[1]:] = self.mask
        for slot, row, n in zip(slots, group.rows, group.lengths()):
            self.rows[slot] = row
            mask[slot] = 0
            mask[slot, length - (n - skip):] = 1
        self.mask = mask


@dataclass
class PrefillGroup(Generic[R]):
    """Requests prefilled together: left-padded after the prefix they share, in a cache of their own (or, for a
    cache that cannot take rows in place, the batch's own)."""

    rows: list[R]
    prefix: int = 0                # leading tokens every row shares, computed once
    cache: Cache | None = None
    source: Cache | None = None    # the prefix's own one-row cache (kept by the job's prefix cache)

    @property
    def prompts(self) -> list[tuple[int, ...]]:
        return [r.prompt for r in self.rows]

    @property
    def width(self) -> int:
        return max(len(p) for p in self.prompts)

    def lengths(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def call(self, pad_id: int) -> Call:
        ids, mask = left_pad([p[self.prefix:] for p in self.prompts], pad_id)
        mask = torch.cat([mask.new_ones(len(self.rows), self.prefix), mask], dim=1)  # the prefix, then each row's own
        return Call(ids, mask, self.cache, logits_to_keep=1)

    def columns(self, skip: int = 0) -> torch.Tensor:
        """``[rows, width - skip]``: for each row, the cache columns of its real tokens after its first ``skip``,
        right-aligned (the rest of the prefix, then its own tokens after its padding); the columns before a
        shorter row's first are never read."""
        width, out = self.width, []
        for n in self.lengths():
            own = torch.arange(width - (n - self.prefix), width)
            out.append(torch.cat([torch.zeros(width - n, dtype=torch.long), torch.arange(skip, self.prefix), own]))
        return torch.stack(out)


def like_lengths(rows: list[R], split_tokens: int) -> list[list[R]]:
    """``rows`` sorted by prompt length (stable) and cut into groups, each prefilled as one left-padded forward: the
    cut that computes the fewest padded token rows, counting ``split_tokens`` for each forward."""
    rows = sorted(rows, key=lambda r: len(r.prompt))
    lengths = [len(r.prompt) for r in rows]
    best = [0] + [1 << 62] * len(rows)  # best[j]: the cost of the first j rows
    cut = [0] * (len(rows) + 1)
    for j in range(1, len(rows) + 1):
        for i in range(j):  # the last group is rows[i:j], padded to the longest, lengths[j - 1]
            cost = best[i] + (j - i) * lengths[j - 1] + split_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(rows)
    while j:
        groups.append(rows[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def left_pad(sequences: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, longest]`` ids right-aligned on ``pad_id``, and the mask of real tokens (1) against padding (0)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, longest - len(s):] = torch.tensor(s)
            mask[i, longest - len(s):] = 1
    return ids, mask
