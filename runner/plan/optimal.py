"""The ``auto`` strategy: the best contiguous partition under the budgets, found exactly.

Merit, in order: the fewest bytes off GPU, then the fewest bytes on disk (the CPU is
faster), then the fewest device hops, then the most even GPU load (the smallest largest load). Every device holds at most one contiguous run
of items; GPU runs appear in ascending id order; the CPU run and the disk run may sit
anywhere. Pure: sizes in, a device per item out.

Disk items run on the main device, which keeps room for their staging (see ``staging``).
That room is a function of which items end on disk, and what fits beside it a function of
the room, so the search runs once per staging room that some disk run needs, smallest
first: with the main device that much smaller, and only disk runs that need no more.

The search is a shortest path over states (items placed, next free GPU, CPU used, disk
used), costed (bytes off GPU, bytes on disk, runs). A GPU run always extends as far as it can: moving a
boundary into the next run never adds bytes off GPU or runs, so that one move is enough.
An offload run may end anywhere; its ends are generated lazily, cheapest first, so only
states that can still beat the best are ever opened. Evenness comes last: the smallest
per-GPU cap under which the best (bytes off GPU, runs) is still reached, by bisection,
within the staging room of the best map.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

State = tuple[int, int, int, int]  # items placed, next GPU, CPU used, disk used
Key = tuple[int, int, int]  # bytes off GPU, bytes on disk, runs


@dataclass(frozen=True)
class Problem:
    sizes: Sequence[int]          # bytes an item takes where it is resident (weights + its KV cache)
    weights: Sequence[int]        # bytes of its weights: what counts as "off GPU", and what disk holds
    kv: Sequence[int]             # its KV cache: on disk, it moves to the main device, so it costs as disk bytes
    pins: Sequence[str | None]    # device an item is pinned to, if any
    gpus: Sequence[tuple[str, int]]  # (name, capacity) in ascending id order
    cpu: int                      # CPU capacity
    disk: int                     # disk capacity; negative forbids disk (0 still takes items of no weight)
    main: str                     # where disk items run (a GPU's name or "cpu"): their staging room is kept there
    held: int = 1                 # disk items held there at once: the running one and those read ahead


def staging(weights: Iterable[int], kv: Iterable[int], held: int) -> int:
    """Room on the main device for disk items: the ``held`` biggest of their weights (the running one and
    those read ahead, the biggest to be safe), plus all their KV caches, which live there."""
    return sum(sorted(weights, reverse=True)[:held]) + sum(kv)


def best_partition(p: Problem) -> list[str] | None:
    """A device per item, or None if no contiguous partition fits.

    Tries each staging room a disk run may need, smallest first (``_staging_sizes``), and keeps
    the best map (the smaller room on a tie). Once one is found, the same search without the limit
    on the disk run bounds what this room and every bigger one can reach (a bigger room only leaves
    the main device less), so it stops as soon as that bound cannot beat the best.
    """
    room = dict(p.gpus, cpu=p.cpu)[p.main]
    free = [len(p.weights)] * (len(p.weights) + 1)  # disk run ends with no limit on the staging
    sizes = [0, *itertools.accumulate(p.sizes)]
    found: tuple[Key, list[str], list[int], int, list[int]] | None = None  # key, map, GPU caps, CPU cap, disk ends
    for reserve in _staging_sizes(p, room) if room >= 0 and p.disk >= 0 else [-1]:  # -1: no disk at all
        caps, cpu = _less_main(p, max(reserve, 0))
        ends = _disk_ends(p, reserve)
        resident = sum(max(cap, 0) for cap in caps) + max(cpu, 0)
        longest = max(sizes[end] - sizes[i] for i, end in enumerate(ends))  # what the biggest disk run frees
        result = _search(p, caps, cpu, ends) if sizes[-1] - longest <= resident else None  # else nothing fits
        if result is not None and (found is None or result[0] < found[0]):
            found = (result[0], result[1], caps, cpu, ends)
        if found is None:
            continue
        bound = result if ends == free else _search(p, caps, cpu, free)
        if bound is None or bound[0] >= found[0]:
            break
    if found is None:
        return None
    key, assignment, caps, cpu, ends = found
    gpu_names = {name for name, _ in p.gpus}
    if not any(d in gpu_names for d in assignment):
        return assignment
    low, high = 0, max(caps)
    while low < high:  # the smallest common cap that still reaches the best key
        mid = (low + high) // 2
        again = _search(p, [min(cap, mid) for cap in caps], cpu, ends)
        if again is not None and again[0] == key:
            high, assignment = mid, again[1]
        else:
            low = mid + 1
    return assignment


def _less_main(p: Problem, reserve: int) -> tuple[list[int], int]:
    """The GPU capacities and the CPU's, the main device's less ``reserve``."""
    return [cap - reserve * (name == p.main) for name, cap in p.gpus], p.cpu - reserve * (p.main == "cpu")


def _staging_sizes(p: Problem, room: int) -> Iterator[int]:
    """0, then every bigger staging room some disk run needs, ascending, up to ``room``.

    Lazy: a run's room grows with its end, so the runs from each start are merged in order, and a
    start is walked on only when a bigger room is asked for, from one item that changes its room
    (a KV cache, or a weight among the ``held`` biggest) straight to the next.
    """
    n = len(p.weights)
    above = _first_above(p.weights)
    has_kv = _next_where([k > 0 for k in p.kv])
    pinned_elsewhere = _next_foreign(p.pins, "disk")
    weights = [0, *itertools.accumulate(p.weights)]

    def from_start(i: int) -> Iterator[int]:
        held: list[int] = []  # the biggest weights of the run, ascending
        kv, j = 0, i
        while True:
            j = min(above(j, held[0] if len(held) == p.held else 0), has_kv[j])  # the next item that adds room
            if j >= pinned_elsewhere[i] or weights[j + 1] - weights[i] > p.disk:
                return
            bisect.insort(held, p.weights[j])
            del held[:-p.held]
            kv += p.kv[j]
            if sum(held) + kv > room:
                return
            yield sum(held) + kv
            j += 1

    last = -1
    for size in heapq.merge([0], *(from_start(i) for i in range(n))):
        if size > last:
            yield size
            last = size


def _disk_ends(p: Problem, limit: int) -> list[int]:
    """For each i, the furthest end of a disk run from i whose staging is at most ``limit``."""
    n = len(p.weights)
    ends, window, kv, j = [], [], 0, 0  # window: the weights of items i..j-1, ascending
    for i in range(n):
        j = max(j, i)
        while j < n:
            bisect.insort(window, p.weights[j])
            if sum(window[-p.held:]) + kv + p.kv[j] > limit:
                window.remove(p.weights[j])
                break
            kv += p.kv[j]
            j += 1
        ends.append(j)
        if j > i:
            window.remove(p.weights[i])
            kv -= p.kv[i]
    return ends + [n]


def _first_above(values: Sequence[int]) -> Callable[[int, int], int]:
    """``above(j, t)``: the first index at or after j whose value is over t (len(values) if none), in O(log n)."""
    n = len(values)
    table = [list(values)]  # table[level][k]: the biggest of values[k : k + 2**level]
    while 2 ** len(table) <= n:
        previous, half = table[-1], 2 ** (len(table) - 1)
        table.append([max(previous[k], previous[k + half]) for k in range(n - 2 * half + 1)])

    def above(j: int, t: int) -> int:
        for level in range(len(table) - 1, -1, -1):
            if j < len(table[level]) and table[level][j] <= t:
                j += 1 << level
        return j
    return above


def _search(p: Problem, caps: list[int], cpu: int, disk_end: list[int]) -> tuple[Key, list[str]] | None:
    """The best map with these GPU and CPU capacities; a disk run from i ends by ``disk_end[i]``."""
    n, gpus = len(p.sizes), len(caps)
    sizes = [0, *itertools.accumulate(p.sizes)]
    weights = [0, *itertools.accumulate(p.weights)]
    disk_cost = [0, *itertools.accumulate(w + k for w, k in zip(p.weights, p.kv))]
    devices = [name for name, _ in p.gpus] + ["cpu", "disk"]
    span = {d: (min(i for i, pin in enumerate(p.pins) if pin == d), max(i for i, pin in enumerate(p.pins) if pin == d))
            for d in set(p.pins) - {None}}
    foreign = {d: _next_foreign(p.pins, d) for d in devices}

    def end(i: int, device: str, cap: int) -> int:
        """The furthest end of a run from item i on ``device``; i if not even one item fits."""
        prefix = weights if device == "disk" else sizes
        j = bisect.bisect_right(prefix, prefix[i] + cap) - 1
        j = min(j, foreign[device][i])
        if device == "disk":
            j = min(j, disk_end[i])
        lo, hi = span.get(device, (n, -1))
        if lo < i <= hi or (hi >= 0 and j <= hi):  # the run must hold every item pinned to this device
            return i
        return max(j, i)

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
        for tier, used, cap in (("cpu", c, cpu), ("disk", d, p.disk)):
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
