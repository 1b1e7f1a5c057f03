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
import bisect
import itertools
import logging
from dataclasses import dataclass, field, replace

from runner.plan.blocks import Block
from runner.errors import PlanError
from runner.plan.hardware import Device, cap_override
from runner.plan.experts import experts_ahead
from runner.plan.optimal import Problem, best_partition, staging
from runner.plan.room import room_left
from runner.config.sizes import format_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanRequest:
    blocks: tuple[Block, ...]             # forward order
    devices: tuple[Device, ...]           # GPUs by id, then cpu, then disk
    strategy: str
    main_device: str                      # where disk blocks are streamed in to run
    pins: dict[str, str] = field(default_factory=dict)             # block -> device, kept as given
    reserves: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> reason -> bytes kept free
    kv_bytes: dict[str, int] = field(default_factory=dict)         # block -> KV cache it keeps where it computes
    allow_disk: bool = True
    prefetch: int = 0                     # disk blocks held ahead of the running one: each needs staging room
    micro_batches: int = 1                # K > 1: a layer's disk experts stay in for all K (runner.load.offload)


@dataclass(frozen=True)
class Plan:
    device_map: dict[str, str]             # every block -> device, in forward order
    loads: dict[str, int]                  # device -> bytes of weights resident there
    reserves: dict[str, dict[str, int]]    # device -> reason -> bytes kept free: runtime, KV cache, disk staging
    strategy: str


@dataclass(frozen=True)
class _Item:
    """Blocks that must share a device (tied weights), placed as one at the first one's position."""

    names: tuple[str, ...]
    weight: int   # bytes of weights: what disk holds and what "off GPU" counts
    kv: int       # KV cache bytes, resident with the block (on the main device when the block is on disk)
    pin: str | None

    @property
    def size(self) -> int:
        """Bytes the item takes on a GPU or the CPU."""
        return self.weight + self.kv


def plan_device_map(request: PlanRequest) -> Plan:
    """Place every block with the request's strategy, keeping its pins; a mixture's dense parts first, then its
    experts in the room left (``_dense_then_experts``).

    Raises:
        PlanError: a block fits no device, the pins overfill one, or the plan needs disk when disk is not allowed.
    """
    if any(b.expert for b in request.blocks):
        return _dense_then_experts(request)
    return _plan_blocks(request)


def _plan_blocks(request: PlanRequest) -> Plan:
    items = _items(request.blocks, request.pins, request.kv_bytes)
    budgets = {d.name: room_left(d, 0, request.reserves) for d in request.devices}
    _check_fits(items, request.devices, budgets)
    pinned = dict.fromkeys(budgets, 0)
    for item in items:
        if item.pin:
            pinned[item.pin] += item.weight if item.pin == "disk" else item.size
    over = [f"{d}: pinned blocks need {format_bytes(n)}, {format_bytes(max(budgets[d], 0))} is left of its budget "
            "after reserves" for d, n in pinned.items() if d in set(request.pins.values()) and n > budgets[d]]
    if over:
        raise PlanError(*over)
    if not request.allow_disk and pinned_to_disk(request.pins):
        raise PlanError(f"device_map pins {', '.join(pinned_to_disk(request.pins))} to disk, but offload.allow_disk "
                        "is false; pin them to another device or set offload.allow_disk=true")

    if request.allow_disk:
        placed = _place(request, items, budgets, pinned)
    else:
        try:
            placed = _place(request, items, {**budgets, "disk": -1}, pinned)  # not even a zero-byte block
        except PlanError:
            with_disk = _place(request, items, budgets, pinned)  # what would have gone to disk
            on_disk = sum(item.size for item in items if with_disk[item.names[0]] == "disk")  # weights and KV
            raise PlanError(f"the model needs {format_bytes(on_disk)} more than the GPUs and the CPU can hold "
                            f"(offload.allow_disk is false); raise max_memory, use a smaller dtype, or set "
                            "offload.allow_disk=true") from None
    order_index = {b.name: i for i, b in enumerate(request.blocks)}
    device_map = dict(sorted(placed.items(), key=lambda kv: order_index[kv[0]]))
    loads = dict.fromkeys(budgets, 0)
    for item in items:
        loads[device_map[item.names[0]]] += item.weight
    reserves = merge_reserves(request.reserves,
                              map_reserves(device_map, request.blocks, request.kv_bytes, request.main_device,
                                           request.prefetch))
    # Nothing runs on a device without blocks (disk blocks run on the main device): it keeps no reserve.
    used = set(device_map.values()) | ({request.main_device} if "disk" in device_map.values() else set())
    return Plan(device_map, loads, {d: r for d, r in reserves.items() if d in used}, request.strategy)


def _dense_then_experts(request: PlanRequest) -> Plan:
    """Dense parts (attention, norms, routers, shared experts: every token runs them) are planned first, with the
    request's strategy, fastest device first. Experts then fill the room left, fastest tier first: GPUs by id, the
    CPU, disk. They are dealt out across layers in turn, so every layer holds a like share of each tier and no layer
    waits on the disk more than another. Experts on disk are read in only when a token is routed to them, into room
    kept on the main device for ``1 + prefetch`` of them; the dense parts are re-planned around that room if needed.
    """
    dense = tuple(b for b in request.blocks if not b.expert)
    experts = [b for b in request.blocks if b.expert]
    names = {b.name for b in experts}
    held = 0  # the expert staging room on the main device
    while True:
        with_room = merge_reserves(request.reserves, {request.main_device: {EXPERT_STAGING: held}} if held else {})
        plan = _plan_blocks(replace(request, blocks=dense, reserves=with_room,
                                    pins={n: d for n, d in request.pins.items() if n not in names}))
        _check_first_layer_resident(request, dense, plan.device_map, experts[0].within)
        placed = _place_experts(request, experts, plan.loads, merge_reserves(with_room, plan.reserves))
        needed = _expert_staging(experts, placed, request.prefetch, request.micro_batches)
        if needed <= held:
            break
        held = needed
    order_index = {b.name: i for i, b in enumerate(request.blocks)}
    device_map = dict(sorted({**plan.device_map, **placed}.items(), key=lambda kv: order_index[kv[0]]))
    loads = dict(plan.loads)
    for block in experts:
        loads[placed[block.name]] += block.nbytes
    reserves = merge_reserves(request.reserves, map_reserves(device_map, request.blocks, request.kv_bytes,
                                                             request.main_device, request.prefetch,
                                                             request.micro_batches))
    main = next(d for d in request.devices if d.name == request.main_device)
    if held and room_left(main, loads[main.name], reserves) < 0:
        left = room_left(main, loads[main.name], reserves) + held
        raise PlanError(f"{main.name}: reading experts in from disk needs {format_bytes(held)} there (the running one "
                        f"and {experts_ahead(request.prefetch)} read ahead), and {format_bytes(max(left, 0))} is left "
                        f"after its reserves; raise it ({cap_override(main.name)}) or lower offload.prefetch")
    used = set(device_map.values()) | ({request.main_device} if "disk" in device_map.values() else set())
    return Plan(device_map, loads, {d: r for d, r in reserves.items() if d in used}, request.strategy)


def _check_first_layer_resident(request: PlanRequest, dense: tuple[Block, ...], placed: dict[str, str],
                                layer: str | None) -> None:
    """The dense parts run for every token: a budget that leaves even the first mixture layer's on disk is too small.

    Raises:
        PlanError: one line with the bytes the dense parts need off disk.
    """
    if layer is None or placed[layer] != "disk" or layer in request.pins:
        return
    on_disk = sum(b.nbytes for b in dense if placed[b.name] == "disk")
    size = next(b.nbytes for b in dense if b.name == layer)
    where = "the GPUs and the CPU" if any(d.kind == "gpu" for d in request.devices) else "the CPU"
    raise PlanError(f"the dense parts of {layer} ({format_bytes(size)}: attention, norms, router) fit nowhere but "
                    f"disk: the dense parts of every layer need {format_bytes(on_disk)} more room on {where} to stay "
                    f"resident while experts are offloaded; raise max_memory.cpu by that much (or pin {layer}=disk "
                    "to stream whole layers)")


def _place_experts(request: PlanRequest, experts: list[Block], loads: dict[str, int],
                   reserves: dict[str, dict[str, int]]) -> dict[str, str]:
    """expert -> device: pinned ones as pinned, the rest dealt out over the room the dense parts (``loads``) and
    the ``reserves`` leave.

    Raises:
        PlanError: an expert fits nowhere, or would need disk when disk is not allowed.
    """
    room = {d.name: room_left(d, loads.get(d.name, 0), reserves) for d in request.devices}
    placed = {}
    for block in experts:
        if block.name in request.pins:
            placed[block.name] = request.pins[block.name]
            room[placed[block.name]] -= block.nbytes
    over = [d for d, left in room.items() if left < 0 and d in set(placed.values())]
    if over:
        raise PlanError(f"{over[0]}: the experts pinned there need {format_bytes(-room[over[0]])} more than the room "
                        f"the dense parts leave; pin fewer experts there or raise it ({cap_override(over[0])})")
    # Expert 0 of every layer, then expert 1 of every layer, ...: each layer gets its share of every tier.
    position = {}
    for block in experts:
        position.setdefault(block.within, len(position))
    turn = sorted((b for b in experts if b.name not in placed),
                  key=lambda b: (int(b.name.rpartition(".")[2]), position[b.within]))
    tiers = [d.name for d in request.devices if d.name != "disk" or request.allow_disk]
    tier = 0
    for block in turn:
        while tier < len(tiers) and room[tiers[tier]] < block.nbytes:
            tier += 1
        if tier == len(tiers):
            if not request.allow_disk:
                left = sum(b.nbytes for b in turn if b.name not in placed)
                raise PlanError(f"the experts need {format_bytes(left)} more than the GPUs and the CPU hold after "
                                "the dense parts (offload.allow_disk is false); raise max_memory, use a smaller "
                                "dtype or quantize=int8, or set offload.allow_disk=true")
            raise PlanError(f"expert {block.name} ({format_bytes(block.nbytes)}) fits no device after the dense "
                            "parts; room left: " + ", ".join(f"{d} {format_bytes(max(room[d], 0))}" for d in room)
                            + "; raise max_memory (disk included)")
        placed[block.name] = tiers[tier]
        room[tiers[tier]] -= block.nbytes
    return placed


EXPERT_STAGING = "expert_staging"


def _expert_staging(experts: Sequence[Block], placed: dict[str, str], prefetch: int, micro_batches: int = 1) -> int:
    """Room on the main device for the disk experts being read: the running one and those read ahead
    (``experts_ahead``); with micro-batches, every disk expert of the layer running (kept for all of them) and
    those read ahead."""
    on_disk = [b for b in experts if placed[b.name] == "disk"]
    ahead = experts_ahead(prefetch)
    if micro_batches == 1 or not on_disk:
        return staging((b.nbytes for b in on_disk), (), 1 + ahead)
    per_layer: dict[str | None, int] = {}
    for b in on_disk:
        per_layer[b.within] = per_layer.get(b.within, 0) + 1
    return min(len(on_disk), max(per_layer.values()) + ahead) * max(b.nbytes for b in on_disk)


def pinned_to_disk(pins: dict[str, str]) -> list[str]:
    return sorted(name for name, device in pins.items() if device == "disk")


def map_reserves(device_map: dict[str, str], blocks: Sequence[Block], kv_bytes: dict[str, int],
                 main_device: str, prefetch: int = 0, micro_batches: int = 1) -> dict[str, dict[str, int]]:
    """What a map itself needs kept free: each device's KV cache, and staging room for disk blocks.

    A disk block's KV cache lives on the main device, where it runs, so it is part of the staging room. Experts on
    disk have room of their own there, as they are read on demand, apart from the layers' order.
    """
    out: dict[str, dict[str, int]] = {}
    experts = [b for b in blocks if b.expert]
    if experts:
        blocks = [b for b in blocks if not b.expert]
        if held := _expert_staging(experts, device_map, prefetch, micro_batches):
            out[main_device] = {EXPERT_STAGING: held}
    for block, nbytes in kv_bytes.items():
        device = device_map.get(block)
        if nbytes and device not in (None, "disk"):
            out.setdefault(device, {})["kv_cache"] = out.get(device, {}).get("kv_cache", 0) + nbytes
    staging = _staging(_items(blocks, {}, kv_bytes), device_map, prefetch)
    if staging:
        out.setdefault(main_device, {})["offload_staging"] = staging
    return out


def merge_reserves(*parts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for device, reasons in part.items():
            if reasons:
                out.setdefault(device, {}).update(reasons)
    return out


def _place(request: PlanRequest, items: list[_Item], budgets: dict[str, int],
           pinned: dict[str, int]) -> dict[str, str]:
    """block -> device.

    Disk blocks are streamed into the main device when they run, and their KV cache lives
    there, so room is reserved there for the biggest one plus every disk block's KV cache,
    and only when something is on disk. ``auto`` tries every size of that room (runner/plan/optimal.py);
    a fill raises it until it covers what it made, and falls back to ``auto`` if that fails.
    """
    if request.strategy == "auto":
        return _place_auto(request, items, budgets, pinned)
    try:
        return _place_by_fill(request, items, budgets, pinned)
    except PlanError:
        # The fill walks forward only: an early offload run, once closed, can leave a later block nowhere
        # but disk, and its staging nowhere to go. The exact search finds a map whenever one exists.
        log.warning("strategy %s found no map under these budgets; using placement=auto's map", request.strategy)
        return _place_auto(request, items, budgets, pinned)


def _place_by_fill(request: PlanRequest, items: list[_Item], budgets: dict[str, int],
                   pinned: dict[str, int]) -> dict[str, str]:
    main = request.main_device
    free = [item for item in items if not item.pin]
    staging = 0
    while True:
        capacity = {d: budgets[d] - pinned[d] - (staging if d == main else 0) for d in budgets}
        if capacity[main] < 0:
            raise PlanError(f"{main}: streaming disk blocks in needs {format_bytes(staging)} there, but only "
                            f"{format_bytes(max(budgets[main] - pinned[main], 0))} is left; raise it "
                            f"({cap_override(main)}) or pin fewer blocks there")
        gpus = [(d.name, capacity[d.name]) for d in request.devices if d.kind == "gpu"]
        order = STRATEGIES[request.strategy](free, gpus) + [(d.name, capacity[d.name]) for d in request.devices
                                                           if d.kind != "gpu"]
        placed = _fill(free, order, gpus=len(gpus))
        for item in items:
            for name in item.names:
                placed[name] = item.pin or placed[name]
        needed = _staging(items, placed, request.prefetch)
        if needed <= staging:
            return placed
        staging = needed


def _place_auto(request: PlanRequest, items: list[_Item], budgets: dict[str, int],
                pinned: dict[str, int]) -> dict[str, str]:
    """The exact search (runner/plan/optimal.py), which also sizes the staging room on the main device."""
    gpus = [d.name for d in request.devices if d.kind == "gpu"]
    problem = Problem([i.size for i in items], [i.weight for i in items], [i.kv for i in items],
                      [i.pin for i in items], [(g, budgets[g]) for g in gpus], budgets["cpu"], budgets["disk"],
                      request.main_device, 1 + request.prefetch)
    assignment = best_partition(problem)
    if assignment is None:
        if any(i.pin for i in items):  # pins may rule out every contiguous map: keep them, fill around them
            log.warning("the pinned blocks leave no map with one contiguous run per device; "
                        "filling around them in order instead")
            return _place_by_fill(replace(request, strategy="sequential"), items, budgets, pinned)
        _no_room(max(items, key=lambda i: i.size), [(d, budgets[d]) for d in budgets])
    return {name: device for item, device in zip(items, assignment) for name in item.names}


def _staging(items: list[_Item], placed: dict[str, str], prefetch: int) -> int:
    """Room on the main device for the running disk block and ``prefetch`` read ahead, plus every disk
    block's KV cache, which lives there."""
    on_disk = [item for item in items if placed[item.names[0]] == "disk"]
    return staging((i.weight for i in on_disk), (i.kv for i in on_disk), 1 + prefetch)


# -- strategies: each turns the GPUs' capacities into per-GPU caps for the sequential fill ----------------------

GpuCaps = list[tuple[str, int]]


def _sequential(items: Sequence[_Item], gpus: GpuCaps) -> GpuCaps:
    return gpus


def _balanced(items: Sequence[_Item], gpus: GpuCaps) -> GpuCaps:
    """The most even contiguous split: the smallest common cap under which everything still fits on the
    GPUs, then each GPU's cut as close to an equal share of what is left as that cap allows."""
    if not gpus or not _fits(items, gpus):
        return gpus  # too little GPU memory: fill the GPUs, then CPU, then disk
    low, high = 0, max(cap for _, cap in gpus)
    while low < high:
        mid = (low + high) // 2
        if _fits(items, [(name, min(cap, mid)) for name, cap in gpus]):
            high = mid
        else:
            low = mid + 1
    capped = [(name, min(cap, low)) for name, cap in gpus]
    prefix = [0, *itertools.accumulate(item.size for item in items)]
    caps, start = [], 0
    for k, (name, cap) in enumerate(capped):
        last = max(start, bisect.bisect_right(prefix, prefix[start] + cap) - 1)  # the furthest cut it can hold
        lo, hi = start, last  # the nearest cut that leaves the rest placeable on the GPUs after this one
        while lo < hi:
            mid = (lo + hi) // 2
            if _fits(items[mid:], capped[k + 1:]):
                hi = mid
            else:
                lo = mid + 1
        share = prefix[start] + (prefix[-1] - prefix[start]) / (len(capped) - k)
        cut = min(range(lo, last + 1), key=lambda j: (abs(prefix[j] - share), -j))
        caps.append((name, prefix[cut] - prefix[start]))
        start = cut
    return caps


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
    head = sum(item.size for item in items[:low])
    return [(gpus[0][0], head)] + _balanced(items[low:], gpus[1:])


# `auto` is not a cap rule: it is the exact search in runner/plan/optimal.py.
STRATEGIES = {"sequential": _sequential, "balanced": _balanced, "balanced_low_0": _balanced_low_0}


# -- the shared machinery --------------------------------------------------------------------------------------

def _fill(items: Sequence[_Item], order: GpuCaps, gpus: int = 0) -> dict[str, str]:
    """Walk the items in order; move to the next device when the current one cannot take the next item.

    The first ``gpus`` entries of ``order`` are GPUs, the rest offload tiers (CPU, disk). An item
    bigger than every GPU goes to an offload tier without using up the GPUs, so a huge embedding
    in front no longer pushes the whole model off the GPUs. No device is visited twice: a run,
    once left, is closed.
    """
    placed: dict[str, str] = {}
    used = dict.fromkeys((name for name, _ in order), 0)
    occupied: set[str] = set()  # devices holding an item, even a zero-byte one
    gpu, tier = 0, gpus  # cursors: the GPU being filled, the offload tier being filled

    def fits(cursor: int, item: _Item) -> bool:
        name, cap = order[cursor]
        return used[name] + (item.weight if name == "disk" else item.size) <= cap

    for item in items:
        too_big = all(item.size > cap for _, cap in order[:gpus])
        if gpu < gpus and (too_big and order[gpu][0] in occupied or not too_big and not fits(gpu, item)):
            gpu += 1  # this GPU's run ends here
            while gpu < gpus and not too_big and not fits(gpu, item):
                gpu += 1
        if gpu < gpus and not too_big:
            device = order[gpu][0]
            if tier < len(order) and order[tier][0] in occupied:
                tier += 1  # the offload run before this GPU run is closed
        else:
            while tier < len(order) and not fits(tier, item):
                tier += 1
            if tier == len(order):
                _no_room(item, order)
            device = order[tier][0]
        used[device] += item.weight if device == "disk" else item.size
        occupied.add(device)
        for name in item.names:
            placed[name] = device
    return placed


def _no_room(item: _Item, order: GpuCaps) -> None:
    raise PlanError(f"block {item.names[0]} ({format_bytes(item.size)}) does not fit on any device "
                    f"left after the blocks before it; room after reserves: "
                    + ", ".join(f"{d} {format_bytes(max(c, 0))}" for d, c in order)
                    + "; raise max_memory (disk included) or use a smaller dtype")


def _fits(items: Sequence[_Item], gpus: GpuCaps) -> bool:
    try:
        _fill(items, gpus)
    except PlanError:
        return False
    return True


def _items(blocks: Sequence[Block], pins: dict[str, str], kv: dict[str, int]) -> list[_Item]:
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
                           sum(kv.get(b.name, 0) for b in members), members_pins.pop() if members_pins else None))
    return items


def _check_fits(items: Sequence[_Item], devices: Sequence[Device], budgets: dict[str, int]) -> None:
    """Every block must be computable somewhere: resident on a GPU or the CPU, or streamed into the main device."""
    compute = [d.name for d in devices if d.kind != "disk"]
    biggest = max(items, key=lambda item: item.size, default=None)
    if biggest and all(biggest.size > budgets[d] for d in compute):
        raise PlanError(f"block {' + '.join(biggest.names)} ({format_bytes(biggest.size)}) cannot be split and "
                        "fits no device: " + ", ".join(f"{d} {format_bytes(max(budgets[d], 0))}" for d in compute)
                        + " after reserves; disk " + format_bytes(budgets.get("disk", 0))
                        + " (a block planned on disk must still fit the device it runs on); "
                        "raise max_memory, e.g. " + cap_override(compute[0]) + ", or use a smaller dtype")
