"""Stage 3: where every block goes. Pure: block sizes and device budgets in, a device map out.

Blocks are placed along the forward order, fastest memory first: GPUs by ascending id,
then the CPU, then disk. Each strategy only decides how much each GPU may take before
the next one starts; the fill itself is the same sequential walk for all of them, so
every device holds one contiguous run of blocks.

Blocks planned on disk are streamed into the main device (the first GPU, else the CPU)
when they run, so room for the biggest of them is reserved there, and only then.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runner.blocks import Block
from runner.errors import PlanError
from runner.hardware import Device, cap_override
from runner.sizes import format_bytes


@dataclass(frozen=True)
class Plan:
    device_map: dict[str, str]   # every block -> device, in forward order
    loads: dict[str, int]        # device -> bytes of weights resident there
    reserves: dict[str, int]     # device -> bytes held back to stream disk blocks in
    strategy: str


@dataclass(frozen=True)
class _Item:
    """Blocks that must share a device (tied weights), placed as one at the first one's position."""

    names: tuple[str, ...]
    nbytes: int
    pin: str | None


def plan_device_map(
    blocks: Sequence[Block],
    devices: Sequence[Device],
    strategy: str,
    pins: dict[str, str],
    main_device: str,
) -> Plan:
    """Place ``blocks`` on ``devices`` with ``strategy``, keeping the user's ``pins`` (block -> device).

    Raises:
        PlanError: a block fits no device, or the pins overfill one.
    """
    items = _items(blocks, pins)
    budgets = {d.name: d.budget for d in devices}
    _check_fits(items, devices, main_device)
    pinned = {name: 0 for name in budgets}
    for item in items:
        if item.pin:
            pinned[item.pin] += item.nbytes
    over = [f"{d}: pinned blocks need {format_bytes(n)}, its budget is {format_bytes(budgets[d])}"
            for d, n in pinned.items() if n > budgets[d]]
    if over:
        raise PlanError(*over)

    free = [item for item in items if not item.pin]
    reserve = 0
    while True:  # the reserve only grows, so this ends after at most len(items) rounds
        capacity = {d: budgets[d] - pinned[d] - (reserve if d == main_device else 0) for d in budgets}
        if capacity[main_device] < 0:
            raise PlanError(f"{main_device}: streaming the biggest disk block needs {format_bytes(reserve)} there, "
                            f"but only {format_bytes(budgets[main_device] - pinned[main_device])} is left; "
                            f"raise it ({cap_override(main_device)}) or pin fewer blocks there")
        gpu_caps = STRATEGIES[strategy](free, [(d.name, capacity[d.name]) for d in devices if d.kind == "gpu"])
        order = gpu_caps + [(d.name, capacity[d.name]) for d in devices if d.kind != "gpu"]
        placed = _fill(free, order, gpus=len(gpu_caps))
        on_disk = [item.nbytes for item in free if placed[item.names[0]] == "disk"]
        on_disk += [item.nbytes for item in items if item.pin == "disk"]
        if max(on_disk, default=0) <= reserve:
            break
        reserve = max(on_disk)

    device_map = {}
    for item in items:
        for name in item.names:
            device_map[name] = item.pin or placed[name]
    order_index = {b.name: i for i, b in enumerate(blocks)}
    device_map = dict(sorted(device_map.items(), key=lambda kv: order_index[kv[0]]))
    loads = {d: 0 for d in budgets}
    for item in items:
        loads[device_map[item.names[0]]] += item.nbytes
    return Plan(device_map, loads, {main_device: reserve} if reserve else {}, strategy)


# -- strategies: each turns the GPUs' capacities into per-GPU caps for the sequential fill ----------------------

GpuCaps = list[tuple[str, int]]


def _sequential(items: Sequence[_Item], gpus: GpuCaps) -> GpuCaps:
    return gpus


def _balanced(items: Sequence[_Item], gpus: GpuCaps) -> GpuCaps:
    """The smallest common cap under which everything still fits on the GPUs: the most even contiguous split."""
    if not gpus or not _fits(items, gpus):
        return gpus  # too little GPU memory: fill the GPUs, then CPU, then disk
    low, high = 0, max(cap for _, cap in gpus)
    while low < high:
        mid = (low + high) // 2
        if _fits(items, [(name, min(cap, mid)) for name, cap in gpus]):
            high = mid
        else:
            low = mid + 1
    return [(name, min(cap, low)) for name, cap in gpus]


def _balanced_low_0(items: Sequence[_Item], gpus: GpuCaps) -> GpuCaps:
    """Spread over GPUs 1..N-1; GPU 0 (which also receives the outputs) takes only the prefix that does not fit there."""
    if len(gpus) < 2 or not _fits(items, gpus):
        return gpus
    low, high = 0, len(items)  # the fewest leading items GPU 0 must take
    while low < high:
        mid = (low + high) // 2
        if _fits(items[mid:], gpus[1:]):
            high = mid
        else:
            low = mid + 1
    head = sum(item.nbytes for item in items[:low])
    return [(gpus[0][0], head)] + _balanced(items[low:], gpus[1:])


# auto: for now the most even contiguous split over the GPUs, as `balanced`.
STRATEGIES = {"sequential": _sequential, "balanced": _balanced, "balanced_low_0": _balanced_low_0, "auto": _balanced}


# -- the shared machinery --------------------------------------------------------------------------------------

def _fill(items: Sequence[_Item], order: GpuCaps, gpus: int = 0) -> dict[str, str]:
    """Walk the items in order; move to the next device when the current one cannot take the next item.

    The first ``gpus`` entries of ``order`` are GPUs, the rest offload tiers (CPU, disk). An item
    bigger than every GPU goes to an offload tier without using up the GPUs, so a huge embedding
    in front no longer pushes the whole model off the GPUs.
    """
    placed: dict[str, str] = {}
    used = dict.fromkeys((name for name, _ in order), 0)
    gpu, tier = 0, gpus  # cursors: the GPU being filled, the offload tier being filled

    def advance(cursor: int, item: _Item, stop: int) -> int:
        while cursor < stop and used[order[cursor][0]] + item.nbytes > order[cursor][1]:
            cursor += 1
        return cursor

    for item in items:
        too_big = all(item.nbytes > cap for _, cap in order[:gpus])
        if gpu < gpus and too_big and used[order[gpu][0]]:
            gpu += 1  # the GPU's run ends here, so that it stays contiguous
        if gpu < gpus and not too_big:
            gpu = advance(gpu, item, gpus)
        if gpu < gpus and not too_big:
            device = order[gpu][0]
        else:
            tier = advance(tier, item, len(order))
            if tier == len(order):
                _no_room(item, order)
            device = order[tier][0]
        used[device] += item.nbytes
        for name in item.names:
            placed[name] = device
    return placed


def _no_room(item: _Item, order: GpuCaps) -> None:
    raise PlanError(f"block {item.names[0]} ({format_bytes(item.nbytes)}) does not fit on any device "
                    f"left after the blocks before it; budgets: "
                    + ", ".join(f"{d} {format_bytes(c)}" for d, c in order)
                    + "; raise max_memory (disk included) or use a smaller dtype")


def _fits(items: Sequence[_Item], gpus: GpuCaps) -> bool:
    try:
        _fill(items, gpus)
    except PlanError:
        return False
    return True


def _items(blocks: Sequence[Block], pins: dict[str, str]) -> list[_Item]:
    """Group tied blocks at the first one's position; a group is pinned if any member is."""
    group_of: dict[str, int] = {}
    groups: list[list[Block]] = []
    for block in blocks:
        if block.tied_to in group_of:
            index = group_of[block.tied_to]
        else:
            index = len(groups)
            groups.append([])
        groups[index].append(block)
        group_of[block.name] = index
    items = []
    for members in groups:
        members_pins = {pins[b.name] for b in members if b.name in pins}
        if len(members_pins) > 1:
            raise PlanError(f"{', '.join(b.name for b in members)} share tied weights but are pinned to "
                            f"{', '.join(sorted(members_pins))}; pin them to one device")
        items.append(_Item(tuple(b.name for b in members), sum(b.nbytes for b in members),
                           members_pins.pop() if members_pins else None))
    return items


def _check_fits(items: Sequence[_Item], devices: Sequence[Device], main_device: str) -> None:
    """Every block must be computable somewhere: resident on a GPU or the CPU, or streamed into the main device."""
    compute = [d for d in devices if d.kind != "disk"]
    biggest = max(items, key=lambda item: item.nbytes, default=None)
    if biggest and all(biggest.nbytes > d.budget for d in compute):
        raise PlanError(f"block {' + '.join(biggest.names)} ({format_bytes(biggest.nbytes)}) cannot be split and "
                        "fits no device: " + ", ".join(f"{d.name} {format_bytes(d.budget)}" for d in compute)
                        + " (a block planned on disk must still fit the device it runs on); "
                        "raise max_memory, e.g. " + cap_override(compute[0].name) + ", or use a smaller dtype")
