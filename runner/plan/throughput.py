"""What a decode step costs under a plan, and so the tokens per second to expect.

Each decode step runs every sequence in flight (``batch_size x micro_batches``) through every block once. Three
resources work side by side (the prefetcher overlaps reads with compute), so the slowest bounds the step:

- **disk**: the bytes of every disk block, read once per step for all micro-batches (``O_DIRECT``, cold);
- **host-to-device**: the bytes of every block streamed into a GPU (CPU- or disk-stored, computed there);
- **compute**: two FLOPs per weight per row (embedding lookups read a row, not the table), plus attention over
  the cache (on average half the planned length), on the device each block computes on.

The rates are measured on this machine: disk read GB/s once per disk (cached in the runner's cache, since it takes
a quarter of a second and does not change), host-to-device GB/s once per GPU (cached), and the compute rate at the
step's own shape (one micro-batch's rows against a weight of the model's width: a step runs that matmul once per
micro-batch) for each plan, since it depends on both.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from runner.plan.blocks import Block
from runner.plan.compute import LOOKUPS
from runner.plan.experts import disk_read_per_step, expert_layers
from runner.plan.planned import Planned
from runner.config.sizes import format_bytes
from runner.data.writes import reclaim, temp_path
from runner.quant.formats import FORMATS, WeightFormat
from runner.quant.modules import QuantLinear

PROBE_BYTES = 256 << 20   # read to time a disk: past its caches, short of a second
PROBE_CHUNK = 16 << 20    # in pieces this big,
PROBE_READERS = 4         # this many at once
DISK_KEY = f"disk-{PROBE_READERS}x{PROBE_CHUNK >> 20}MiB"  # the figure's name in rates.json (one per way of timing)
PROBE_WIDTH = 4096        # the widest weight the compute probe multiplies by (bigger models: same rate per FLOP)


@dataclass(frozen=True)
class Rates:
    disk: float | None     # bytes/s read from the disk holding the streamed blocks; None: nothing to time
    host_to_device: float | None  # bytes/s from pinned CPU memory to the main GPU; None: no real GPU
    flops: dict[str, float]       # compute device -> FLOP/s at the step's shape


@dataclass(frozen=True)
class StepCost:
    rows: int                  # sequences in flight: one token each per step
    disk_bytes: int
    host_to_device_bytes: int
    flops: dict[str, int]      # per compute device
    seconds: dict[str, float]  # per resource: disk, host_to_device, compute
    bound: str                 # the resource that takes longest
    tokens_per_s: float
    advice: list[str]

    def document(self, rates: Rates) -> dict:
        return {**asdict(self), "rates": asdict(rates)}


def step_cost(planned: Planned, rates: Rates) -> StepCost:
    """The predicted decode step of this plan at these rates."""
    layout, devices, compute = planned.layout, planned.check.block_devices, planned.compute
    runtime, itemsize = planned.config.runtime, planned.dtype.itemsize
    rows = runtime.rows_in_flight
    owners = {b.name: b for b in layout.blocks}
    # Disk experts are read only when a row routes to one (runner.plan.experts); every other disk block, always.
    disk = (sum(b.nbytes for b in layout.blocks if devices[b.name] == "disk" and not b.expert)
            + disk_read_per_step(expert_layers(layout, devices), rows))
    to_gpu = sum(_streamed_bytes(b, owners) for b in layout.blocks
                 if compute[b.name].streamed and compute[b.name].device.startswith("cuda:")
                 and planned.hardware.get(compute[b.name].device).simulated is False)
    flops: dict[str, int] = {}
    for b in layout.blocks:
        weights = 0 if b.class_name in LOOKUPS else _weights(planned, b, owners)
        attention = planned.request.kv_bytes.get(b.name, 0) // itemsize // 2  # half the planned length, on average
        tokens = rows * b.share if b.expert else rows  # an expert computes only the tokens routed to it
        flops[compute[b.name].device] = (flops.get(compute[b.name].device, 0) + round(2 * tokens * weights)
                                         + 2 * attention)
    seconds = {
        "disk": disk / rates.disk if disk and rates.disk else 0.0,
        "host_to_device": to_gpu / rates.host_to_device if to_gpu and rates.host_to_device else 0.0,
        "compute": sum(n / rates.flops[d] for d, n in flops.items() if n and rates.flops.get(d)),
    }
    bound = max(seconds, key=lambda k: seconds[k])
    step = max(seconds.values()) or math.inf
    return StepCost(rows, disk, to_gpu, flops, {k: round(v, 6) for k, v in seconds.items()}, bound,
                    round(rows / step, 3), _advice(planned, seconds, bound, disk))


def _streamed_bytes(block, owners) -> int:
    """What running the block moves or multiplies: its own bytes, or its owner's when it only borrows them (a tied
    head computes with the embedding's table)."""
    if block.nbytes == 0 and block.tied_to is not None:
        return owners[block.tied_to].nbytes
    return block.nbytes


def _advice(planned: Planned, seconds: dict[str, float], bound: str, disk: int) -> list[str]:
    runtime = planned.config.runtime
    compute = seconds["compute"]
    if bound == "compute" or not compute:
        return ["compute bounds the step: more micro-batches add rows at the compute rate; reads are hidden"]
    io = seconds[bound]
    more = max(runtime.micro_batches + 1, math.ceil(runtime.micro_batches * io / compute))
    out = [f"{bound.replace('_', '-')} bounds the step ({io:.3f} s against {compute:.3f} s of compute): "
           f"runtime.micro_batches={more} would let each read serve about {io / compute:.1f}x the rows at little "
           "more time per step, if its KV cache fits"]
    if bound == "disk":
        out.append(f"{format_bytes(disk)} more for max_memory.cpu would keep the disk blocks resident: no reads")
    if planned.dtype.itemsize > 2:
        out.append("dtype=bfloat16 would halve the bytes streamed per step")
    return out


def _weights(planned: Planned, block: Block, owners: dict[str, Block]) -> int:
    """The weights a block multiplies by per row: its bytes in the compute dtype, where a quantized linear counts
    by its shape (its packed bytes are a fraction of a weight each)."""
    weights = _streamed_bytes(block, owners) // planned.dtype.itemsize
    for m in planned.model.get_submodule(block.name).modules():
        if isinstance(m, QuantLinear):
            packed = sum(getattr(m, p).numel() * getattr(m, p).element_size() for p in m.parts)
            weights += m.in_features * m.out_features - packed // planned.dtype.itemsize
    return weights


def measure_rates(planned: Planned, cache: Path) -> Rates:
    """This machine's rates for the plan: disk and host-to-device from ``cache`` (measured and kept there the first
    time), compute measured now at the step's shape."""
    layout, devices = planned.layout, planned.check.block_devices
    reclaim(cache)  # a probe or rates file of a run killed while measuring
    disk = None
    if any(devices[b.name] == "disk" for b in layout.blocks):
        files = [f for f in planned.checkpoint.files if f.is_file()] if planned.checkpoint is not None else []
        if files:  # the blocks are read from the checkpoint: time a read of its biggest file
            biggest = max(files, key=lambda f: f.stat().st_size)
            disk = _cached(cache, f"{DISK_KEY}:{os.stat(biggest).st_dev}", lambda: _disk_rate(biggest))
        else:  # written later (synthetic weights): time the disk they will be written to
            folder = _nearest_folder(cache)
            disk = _cached(cache, f"{DISK_KEY}:{os.stat(folder).st_dev}", lambda: _probe_rate(folder))
    main = planned.hardware.main_device
    to_gpu = None
    if main.startswith("cuda:") and not planned.hardware.get(main).simulated:
        to_gpu = _cached(cache, f"h2d:{torch.cuda.get_device_name(main)}", lambda: _h2d_rate(torch.device(main)))
    width = min(max(planned.trace.input_elems.values(), default=1024), PROBE_WIDTH)
    # Weights kept quantized multiply at their kernel's rate, not fp32's: the form most weights are kept in.
    forms = Counter(k.form for k in planned.quantization.kept.values())
    form = FORMATS[forms.most_common(1)[0][0]] if forms else None
    flops = {}
    for device in {c.device for c in planned.compute.values()}:
        real = device.startswith("cuda:") and not planned.hardware.get(device).simulated
        # One micro-batch's rows at a time: that is the matmul a step runs (K times over).
        flops[device] = _flop_rate(torch.device(device if real else "cpu"), planned.dtype,
                                   planned.config.runtime.batch_size, width, form if not real else None)
    return Rates(disk, to_gpu, flops)


def _cached(cache: Path, key: str, measure) -> float | None:
    """A figure measured once per machine and kept in ``cache/rates.json`` (None: it could not be measured)."""
    path = cache / "rates.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or not isinstance(known.get(key), (int, float)):
        known = known if isinstance(known, dict) else {}
        figure = measure()
        if figure is None:
            return None
        known[key] = figure
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(path)
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # measured again next time
    return float(known[key])


def _disk_rate(file: Path) -> float:
    """Bytes/s of a cold read of up to ``PROBE_BYTES`` of ``file``, past the page cache where the disk allows: in
    ``PROBE_CHUNK`` pieces, ``PROBE_READERS`` at once, as streamed blocks and experts are read (a big block's one
    read is split into many requests in flight; experts are read several at once)."""
    from runner.load.checkpoint.reads import ALIGN, aligned_buffer, pread_full

    size = min(file.stat().st_size // ALIGN * ALIGN, PROBE_BYTES)
    chunk = min(PROBE_CHUNK, max(size, ALIGN))
    buffers = [memoryview(aligned_buffer(chunk).numpy()) for _ in range(PROBE_READERS)]
    offsets = list(range(0, max(size, ALIGN), chunk))
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(file, flags)
    except OSError:
        fd = os.open(file, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)

        def timed_reads(fd: int) -> float:
            start = time.perf_counter()
            with ThreadPoolExecutor(PROBE_READERS) as pool:
                got = sum(pool.map(lambda i: pread_full(fd, buffers[i % PROBE_READERS],
                                                        offsets[i], min(chunk, size - offsets[i])),
                                   range(len(offsets))))
            return got / max(time.perf_counter() - start, 1e-6)

        try:
            return timed_reads(fd)
        except OSError:  # O_DIRECT refused at read time: time a buffered read instead
            os.close(fd)
            fd = os.open(file, os.O_RDONLY)
            return timed_reads(fd)
    finally:
        os.close(fd)


def _nearest_folder(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _probe_rate(folder: Path) -> float | None:
    """``_disk_rate`` of a probe file written into ``folder`` and removed after; None if it cannot be written."""
    probe = temp_path(folder / "rate-probe")
    try:
        with open(probe, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(PROBE_BYTES >> 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        return _disk_rate(probe)
    except OSError:
        return None
    finally:
        probe.unlink(missing_ok=True)


def _h2d_rate(device: torch.device) -> float:
    source = torch.empty(PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=device)
    target.copy_(source, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(3):
        target.copy_(source, non_blocking=True)
    torch.cuda.synchronize(device)
    return 3 * PROBE_BYTES / (time.perf_counter() - start)


@torch.inference_mode()
def _flop_rate(device: torch.device, dtype: torch.dtype, rows: int, width: int,
               form: WeightFormat | None = None) -> float:
    """FLOP/s of ``[rows, width] @ [width, 4 width]`` over weights that together outgrow the caches
    (``PROBE_BYTES``): a decode step's matmul, which at few rows is bound by reading its weight from memory, as the
    step itself is; with ``form``, the weights are kept in it and multiplied by its kernel. The median of timed
    passes, so a busy spell on the machine does not set the figure."""
    x = torch.full((rows, width), 0.01, dtype=dtype, device=device)  # the values do not matter, only the shapes
    if form is None:
        one = {"weight": torch.full((width, 4 * width), 0.01, dtype=dtype, device=device)}
        multiply = lambda w: x @ w["weight"]  # noqa: E731
    else:
        one = form.quantize(torch.rand(4 * width, width))  # its parts
        multiply = lambda w: form.linear(x, w, 4 * width)  # noqa: E731
    copies = max(1, min(16, PROBE_BYTES // sum(t.nbytes for t in one.values())))
    weights = [one] + [{k: t.clone() for k, t in one.items()} for _ in range(copies - 1)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    for w in weights:  # warm-up: first touch, kernel choice
        multiply(w)
    sync(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for w in weights:
            multiply(w)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * rows * width * 4 * width * len(weights) / sorted(times)[len(times) // 2]


def format_step(cost: StepCost, rates: Rates) -> list[str]:
    """The prediction as the plan shows it."""
    def rate(r: float | None, unit: str) -> str:
        return f"{r / 1e9:.2f} {unit}" if r else "n/a"

    lines = [f"{cost.tokens_per_s:.1f} tokens/s predicted for {cost.rows} sequences in flight, bound by "
             f"{cost.bound.replace('_', '-')}",
             f"per decode step: disk {format_bytes(cost.disk_bytes)} at {rate(rates.disk, 'GB/s')} = "
             f"{cost.seconds['disk']:.3f} s; host-to-device {format_bytes(cost.host_to_device_bytes)} at "
             f"{rate(rates.host_to_device, 'GB/s')} = {cost.seconds['host_to_device']:.3f} s; compute "
             + ", ".join(f"{n / 1e9:.2f} GFLOP on {d} at {rate(rates.flops.get(d), 'GFLOP/s')}"
                         for d, n in cost.flops.items() if n)
             + f" = {cost.seconds['compute']:.3f} s"]
    return lines + cost.advice
