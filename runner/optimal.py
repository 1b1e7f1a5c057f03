"""The ``auto`` strategy: the best contiguous partition under the budgets, found exactly.

Merit, in order: the fewest bytes off GPU, then the fewest bytes on disk (the CPU is
faster), then the fewest device hops, then the most even GPU load (the smallest largest load). Every device holds at most one contiguous run
of items; GPU runs appear in ascending id order; the CPU run and the disk run may sit
anywhere. Pure: sizes in, a device per item out.

The search is a shortest path over states (items placed, next free GPU, CPU used, disk
used), costed (bytes off GPU, bytes on disk, runs). A GPU run always extends as far as it can: moving a
boundary into the next run never adds bytes off GPU or runs, so that one move is enough.
An offload run may end anywhere; its ends are generated lazily, cheapest first, so only
states that can still beat the best are ever opened. Evenness comes last: the smallest
per-GPU cap under which the best (bytes off GPU, runs) is still reached, by bisection.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

State = tuple[int, int, int, int]  # items placed, next GPU, CPU used, disk used


@dataclass(frozen=True)
class Problem:
    sizes: Sequence[int]          # bytes an item takes where it is resident (weights + its KV cache)
    weights: Sequence[int]        # bytes of its weights: what counts as "off GPU", and what disk holds
    kv: Sequence[int]             # its KV cache: on disk, it moves to the main device, so it costs as disk bytes
    pins: Sequence[str | None]    # device an item is pinned to, if any
    gpus: Sequence[tuple[str, int]]  # (name, capacity) in ascending id order
    cpu: int                      # CPU capacity
    disk: int                     # disk capacity; 0 forbids disk
    disk_item_limit: int          # the biggest item disk may hold (the staging room on the main device)


def best_partition(p: Problem) -> list[str] | None:
    """A device per item, or None if no contiguous partition fits."""
    first = _search(p, [cap for _, cap in p.gpus])
    if first is None:
        return None
    key, assignment = first
    caps = [cap for _, cap in p.gpus]
    gpu_names = {name for name, _ in p.gpus}
    if not any(d in gpu_names for d in assignment):
        return assignment
    low, high = 0, max(caps)
    while low < high:  # the smallest common cap that still reaches the best key
        mid = (low + high) // 2
        found = _search(p, [min(cap, mid) for cap in caps])
        if found is not None and found[0] == key:
            high, assignment = mid, found[1]
        else:
            low = mid + 1
    return assignment


def _search(p: Problem, caps: list[int]) -> tuple[tuple[int, int, int], list[str]] | None:
    n, gpus = len(p.sizes), len(caps)
    sizes = [0, *itertools.accumulate(p.sizes)]
    weights = [0, *itertools.accumulate(p.weights)]
    disk_cost = [0, *itertools.accumulate(w + k for w, k in zip(p.weights, p.kv))]
    devices = [name for name, _ in p.gpus] + ["cpu", "disk"]
    span = {d: (min(i for i, pin in enumerate(p.pins) if pin == d), max(i for i, pin in enumerate(p.pins) if pin == d))
            for d in set(p.pins) - {None}}
    foreign = {d: _next_foreign(p.pins, d) for d in devices}
    heavy = _next_where([w > p.disk_item_limit for w in p.weights])

    def end(i: int, device: str, cap: int) -> int:
        """The furthest end of a run from item i on ``device``; i if not even one item fits."""
        prefix = weights if device == "disk" else sizes
        j = bisect.bisect_right(prefix, prefix[i] + cap) - 1
        j = min(j, foreign[device][i])
        if device == "disk":
            j = min(j, heavy[i])
        lo, hi = span.get(device, (n, -1))
        if lo < i <= hi or (hi >= 0 and j <= hi):  # the run must hold every item pinned to this device
            return i
        return max(j, i)

    Key = tuple[int, int, int]  # bytes off GPU, bytes on disk, runs
    best: dict[State, Key] = {(0, 0, 0, 0): (0, 0, 0)}
    parent: dict[State, tuple[State, str | None, int, int]] = {}
    counter = itertools.count()
    heap: list = [((0, 0, 0), next(counter), (0, 0, 0, 0), None)]

    def relax(state: State, key: Key, via: tuple[State, str | None, int, int]) -> None:
        if key < best.get(state, (1 << 62, 0, 0)):
            best[state] = key
            parent[state] = via
            heapq.heappush(heap, (key, next(counter), state, None))

    def offload_key(key: Key, tier: str, i: int, j: int) -> Key:
        moved = weights[j] - weights[i]
        on_disk = disk_cost[j] - disk_cost[i] if tier == "disk" else 0
        return key[0] + moved, key[1] + on_disk, key[2] + 1

    while heap:
        key, _, state, lazy = heapq.heappop(heap)
        if lazy is not None:  # one end of an offload run from ``state`` (whose own key is ``base``)
            tier, j, last, base = lazy
            i, g, c, d = state
            relax((j, g, c or tier == "cpu", d or tier == "disk"), key, (state, tier, i, j))
            if j < last:  # the next end costs more, so it waits its turn in the heap
                heapq.heappush(heap, (offload_key(base, tier, i, j + 1), next(counter), state, (tier, j + 1, last, base)))
            continue
        if key > best[state]:
            continue
        i, g, c, d = state
        if i == n:
            return key, _unwind(state, parent, devices, n)
        if g < gpus:
            if devices[g] not in span:  # a GPU with pins cannot be skipped
                relax((i, g + 1, c, d), key, (state, None, i, i))
            j = end(i, devices[g], caps[g])
            if j > i:
                relax((j, g + 1, c, d), (key[0], key[1], key[2] + 1), (state, devices[g], i, j))
        for tier, used, cap in (("cpu", c, p.cpu), ("disk", d, p.disk)):
            last = end(i, tier, cap) if not used else i
            first_end = max(i + 1, span.get(tier, (0, -1))[1] + 1)
            if first_end <= last:
                heapq.heappush(heap, (offload_key(key, tier, i, first_end), next(counter), state,
                                      (tier, first_end, last, key)))
    return None


def _unwind(state: State, parent: dict, devices: list[str], n: int) -> list[str]:
    assignment: list[str] = [""] * n
    while state in parent:
        previous, device, i, j = parent[state]
        for k in range(i, j):
            assignment[k] = device
        state = previous
    return assignment


def _next_foreign(pins: Sequence[str | None], device: str) -> list[int]:
    """For each i, the first item at or after i that is pinned to another device (n if none)."""
    return _next_where([pin is not None and pin != device for pin in pins])


def _next_where(flags: list[bool]) -> list[int]:
    out = [len(flags)] * (len(flags) + 1)
    for i in range(len(flags) - 1, -1, -1):
        out[i] = i if flags[i] else out[i + 1]
    return out
