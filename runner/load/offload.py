"""Blocks planned on disk: streamed in just before they run, dropped right after, prefetched ahead.

- Weights stored in the compute dtype are read straight from the checkpoint's safetensors
  files, a few large reads per block into ``depth + 1`` page-aligned buffers reused from
  forward to forward (``runner.load.checkpoint.reads``): no memory map, so nothing piles up in
  resident memory; no allocation or page faults per forward; ``O_DIRECT`` unless the bytes
  are already in the page cache, where a CPU block maps and uses them in place for the one
  forward. Descriptors and header offsets stay open for the run.
- Weights that need converting (another dtype, GGUF, pickle) are written once into a folder
  of ``offload.folder`` (by default in the runner's cache) keyed by the checkpoint's
  fingerprint and the dtype, one safetensors file per block, each written atomically, the
  manifest last. Any later run of that checkpoint and dtype reuses every block already
  there, whatever its budget; a missing, stale or cut-short file is written again
  (``runner.load.conversions``).
- While block *i* computes, a background thread reads the next ``depth`` disk blocks (wrapping
  around to the next forward's first). On CUDA each block goes in one copy from pinned memory
  into one of ``depth + 1`` reused staging buffers, on a separate stream, so copies overlap
  compute and nothing is allocated per forward (``Staging``).
- Micro-batches share each load: within ``Prefetcher.shared_by(K)`` a block is dropped after its
  K-th use (``runner.infer.column``).
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from runner.plan.blocks import Block, ModelLayout, get_slot, set_slot
from runner.load.checkpoint import Checkpoint
from runner.load.checkpoint.reads import BlockReads, SpanReader, aligned_buffer, plan_reads
from runner.plan.compute import Compute
from runner.load.conversions import cast, converted, converted_tensor
from runner.errors import CheckpointError
from runner.plan.hardware import Hardware
from runner.load.memory import MemoryLedger
from runner.plan.validate import MapCheck

log = logging.getLogger(__name__)

class LoadPlan(Protocol):
    """What loading takes from a plan (``runner.plan.planned.Planned`` is one)."""

    model: nn.Module             # the skeleton on meta, filled in place
    layout: ModelLayout
    hardware: Hardware
    dtype: torch.dtype           # the compute dtype
    check: MapCheck              # its block_devices: where each block's weights are stored
    compute: dict[str, Compute]  # where each block runs (``runner.plan.compute.compute_plan``)


class DiskBlock:
    """One streamed block: where each of its tensors is read from, and how to put them in place and take them out."""

    def __init__(self, module: nn.Module, block: Block, slots: dict[str, str], read, dtype: torch.dtype,
                 device: torch.device, nbytes: int, reads: BlockReads | None = None, in_ram: bool = False,
                 arena: torch.Tensor | None = None):
        self.module, self.name = module, block.name
        self.slots = slots          # slot (relative to the block) -> key it is read from
        self.read = read            # key -> CPU tensor: the fallback, and CPU blocks' resident copies
        self.reads = reads          # the block's spans in the checkpoint, read into a reused buffer
        self.in_ram = in_ram        # a CPU block's resident (pinned) copy: fetching it reads no file
        self.arena = arena          # the pinned bytes all its resident tensors view, for a real GPU
        self.dtype, self.device, self.nbytes = dtype, device, nbytes
        self._meta = {slot: get_slot(module, slot) for slot in slots}

    @property
    def host_bytes(self) -> int:
        """The pinned bytes a GPU copies in one go: the read buffer's span, or the resident arena; 0 if neither."""
        if self.in_ram:
            return self.arena.numel() if self.arena is not None else 0
        return self.reads.nbytes if self.reads is not None else 0

    def fetch(self, reader: SpanReader, buffer: torch.Tensor | None = None, stream: torch.cuda.Stream | None = None,
              staging: Staging | None = None) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """Read every tensor once and move it to the compute device. Safe to run on a worker thread.

        With a ``buffer`` (reused from forward to forward: no allocation, no page faults) the block's spans
        are read into it and, on the CPU, the tensors are used in place. On CUDA the copies go on ``stream``,
        so they overlap the compute stream; with a ``staging`` buffer on the GPU, the block's pinned bytes go in
        one copy into it and its tensors are views there (no allocation per forward, memory bounded by the pool).
        """
        host = None
        if buffer is not None and self.reads is not None:
            try:
                # On the CPU, bytes in the page cache are used in place; a GPU copies from the pinned buffer.
                read = reader.read(self.reads, buffer, map_cached=self.device.type == "cpu")
                host = buffer
            except OSError as e:
                raise CheckpointError(f"{e.filename or self.reads.spans[0].file}: cannot read disk block "
                                      f"{self.name or '(model)'} ({e.strerror or e}); the file may be truncated "
                                      "or replaced since the run began") from e
        else:
            read = {key: self.read(key) for key in dict.fromkeys(self.slots.values())}
            host = self.arena
        if stream is not None and staging is not None and host is not None and self.host_bytes <= staging.nbytes \
                and all(t.dtype == self.dtype or not t.is_floating_point() for t in read.values()):
            return staging.fill(read, host, self.host_bytes, stream)
        tensors: dict[str, torch.Tensor] = {}
        event = None
        for key, t in read.items():
            if t.is_floating_point() and t.dtype != self.dtype:
                t = t.to(self.dtype)
            if stream is not None:  # pinned memory, and a copy that overlaps the compute stream
                with torch.cuda.stream(stream):
                    t = (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
            tensors[key] = t
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        return tensors, event

    def attach(self, tensors: dict[str, torch.Tensor]) -> None:
        for slot, key in self.slots.items():
            set_slot(self.module, slot, tensors[key])

    def detach(self) -> None:
        for slot, meta in self._meta.items():
            set_slot(self.module, slot, meta)


class Staging:
    """A GPU buffer a streamed block's pinned bytes are copied into, reused from block to block: what the running
    block and those read ahead occupy on the GPU is the pool's fixed size, not a fresh allocation per forward."""

    def __init__(self, nbytes: int, device: torch.device):
        self.nbytes = -(-nbytes // 8) * 8  # whole 8-byte words, so it views as any dtype
        self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        self.free_after: torch.cuda.Event | None = None  # the compute stream is done with the last block here

    def fill(self, read: dict[str, torch.Tensor], host: torch.Tensor, nbytes: int, stream: torch.cuda.Stream
             ) -> tuple[dict[str, torch.Tensor], torch.cuda.Event]:
        """One copy of ``host``'s first ``nbytes`` in, on ``stream`` once the last block here is done with, and the
        tensors of ``read`` (views of ``host``) as the same views of this buffer."""
        with torch.cuda.stream(stream):
            if self.free_after is not None:
                stream.wait_event(self.free_after)
            self.buffer[:nbytes].copy_(host[:nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        base = host.data_ptr()
        tensors = {}
        for key, t in read.items():
            typed = self.buffer.view(t.dtype)
            tensors[key] = typed.as_strided(t.shape, t.stride(), (t.data_ptr() - base) // t.element_size())
        return tensors, event


class Prefetcher:
    """Loads streamed blocks in forward order, ``depth`` blocks ahead of the one running (0: on demand only).

    Reading ahead wraps around: while the last blocks of one forward run, the first of the next is read,
    so a model called again and again (generation) never waits for its first disk block.
    """

    def __init__(self, blocks: list[DiskBlock], depth: int, ledger: MemoryLedger, compute: str, direct: bool = True,
                 *, readers: int = 1, use_cache: bool = True):
        """``readers``: threads reading ahead; ``use_cache``: use bytes already in the page cache (``SpanReader``)."""
        self.blocks, self.depth, self.ledger, self.compute = blocks, depth, ledger, compute
        self.reader = SpanReader(direct, use_cache)
        cuda = next((b.device for b in blocks if b.device.type == "cuda"), None)
        self.stream = torch.cuda.Stream(cuda) if cuda is not None else None  # host-to-device copies, off the compute
        self.index = {b.name: i for i, b in enumerate(blocks)}
        self.pending: dict[str, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="prefetch") if depth else None
        # depth + 1 read buffers, the size of the biggest block, made on first use and reused: pinned for CUDA.
        self.buffer_bytes = max((b.reads.nbytes for b in blocks if b.reads), default=0)
        self.free_buffers: list[torch.Tensor] = []
        self.made_buffers = 0
        self.extra_buffers = 0  # beyond depth + 1: experts kept for a column's micro-batches (RoutedExperts)
        self.held: dict[str, tuple[torch.Tensor | None, torch.cuda.Event | None, Staging | None]] = {}
        # On a real GPU: depth + 1 staging buffers the size of the biggest block, made on first use and reused.
        self.staging_bytes = max((b.host_bytes for b in blocks if b.device.type == "cuda"), default=0)
        self.free_staging: list[Staging] = []
        self.made_staging = 0
        self.sharing = 1                # micro-batches that use each block once it is in (``shared_by``)
        self.uses: dict[str, int] = {}  # uses of each held block so far
        self.loads = 0                  # blocks brought in, all forwards together
        self.loaded_bytes = 0           # and their bytes
        self.experts: RoutedExperts | None = None  # experts streamed on demand, apart from the forward order

    @property
    def streaming(self) -> bool:
        """Whether a forward brings weights in at all (nothing does when every block is resident)."""
        return bool(self.blocks) or self.experts is not None

    @contextlib.contextmanager
    def shared_by(self, micro_batches: int) -> Iterator[None]:
        """Within this block, each streamed block brought in serves ``micro_batches`` forwards before it is dropped:
        the caller runs that many micro-batches through every block in turn (``runner.infer.column``), so weight
        traffic per token falls by that factor. Whatever is still held at the end (a forward that raised) goes."""
        every = (self, self.experts) if self.experts is not None else (self,)
        for streams in every:
            streams.sharing = micro_batches
        try:
            yield
        finally:
            for streams in every:
                streams.sharing = 1
                for block in [b for b in streams.blocks if b.name in streams.held]:
                    streams.after(block, last=True)
            if self.experts is not None:
                self.experts.layer_runs.clear()

    def before(self, block: DiskBlock) -> None:
        """Put the block's weights in place (waiting for a prefetch, or reading now), then read ahead."""
        if block.name in self.held:
            if self.uses[block.name] < self.sharing:  # another micro-batch of the same column: it is in place
                return
            self.after(block, last=True)  # the last forward raised before this block was dropped: drop it now
        self.loads += 1
        self.uses[block.name] = 0
        future = self.pending.pop(block.name, None)
        if future is None:
            self.ledger.allocate(self.compute, block.nbytes, f"disk block {block.name or '(model)'}")
            buffer, staging = self._buffer(block), self._staging(block)
            tensors, event = block.fetch(self.reader, buffer, self.stream, staging)
        else:
            buffer, staging, (tensors, event) = future.result()
        if event is not None:
            compute = torch.cuda.current_stream(block.device)
            compute.wait_event(event)
            if staging is None:
                for t in tensors.values():  # made on the copy stream, used on this one: not reused before it is done
                    t.record_stream(compute)
        self.held[block.name] = (buffer, event, staging)
        self.loaded_bytes += block.nbytes
        block.attach(tensors)
        self._read_ahead(self._ahead(block))

    def _ahead(self, block: DiskBlock) -> list[DiskBlock]:
        """The blocks to read while ``block`` runs: the next ``depth`` in forward order, wrapping around."""
        position = self.index[block.name]
        return [self.blocks[(position + step) % len(self.blocks)] for step in range(1, self.depth + 1)]

    def _read_ahead(self, blocks: list[DiskBlock]) -> None:
        if self.pool is None:
            return
        for ahead in blocks:
            if ahead.name in self.pending or ahead.name in self.held:  # one copy of a block at a time, as planned
                continue
            self.ledger.allocate(self.compute, ahead.nbytes, f"prefetch of disk block {ahead.name or '(model)'}")
            ahead_buffer, ahead_staging = self._buffer(ahead), self._staging(ahead)
            if ahead.in_ram and self.stream is not None:
                # Pinned RAM to a GPU: the copies are queued on the copy stream and return at once. Queued from
                # here, not from the reading thread, whose every hand-over of the GIL would cost the compute
                # thread a switch interval (5 ms), many times per step.
                done: Future = Future()
                done.set_result((ahead_buffer, ahead_staging,
                                 ahead.fetch(self.reader, ahead_buffer, self.stream, ahead_staging)))
                self.pending[ahead.name] = done
                continue
            self.pending[ahead.name] = self.pool.submit(
                lambda b=ahead, buf=ahead_buffer, st=ahead_staging: (buf, st, b.fetch(self.reader, buf, self.stream,
                                                                                      st)))

    def after(self, block: DiskBlock, last: bool = False) -> None:
        """The block has run for one micro-batch: dropped once every micro-batch sharing it has (or ``last``)."""
        self.uses[block.name] = self.uses.get(block.name, 0) + 1
        if not last and self.uses[block.name] < self.sharing:
            return
        block.detach()
        buffer, event, staging = self.held.pop(block.name, (None, None, None))
        if buffer is not None:
            if event is not None:
                event.synchronize()  # the copy out of the buffer is done before it is reused
            self.free_buffers.append(buffer)
        if staging is not None:  # free for the next block once the compute stream is past this one
            staging.free_after = torch.cuda.Event()
            staging.free_after.record(torch.cuda.current_stream(block.device))
            self.free_staging.append(staging)
        self.ledger.release(self.compute, block.nbytes)

    def _staging(self, block: DiskBlock) -> Staging | None:
        if block.device.type != "cuda" or not block.host_bytes:
            return None
        if self.free_staging:
            return self.free_staging.pop(0)  # the longest free: its last block is the likeliest done
        if self.made_staging > self.depth:  # all in use (cannot happen in forward order): copy without one
            return None
        self.made_staging += 1
        return Staging(self.staging_bytes, block.device)

    def _buffer(self, block: DiskBlock) -> torch.Tensor | None:
        if block.reads is None:
            return None
        if self.free_buffers:
            return self.free_buffers.pop()
        if self.made_buffers > self.depth + self.extra_buffers:  # all in use (not in forward order): read without one
            return None
        self.made_buffers += 1
        return aligned_buffer(self.buffer_bytes, pin=block.device.type == "cuda")


GUESS_ALL = 0.9  # a layer that routed to this share of its streamed experts has the next read ahead before routing


class RoutedExperts(Prefetcher):
    """Experts streamed from disk: read only when a token is routed to them. The layer names its routed experts
    before it runs them (``route``), and the next ``depth`` of those are read while one computes. Alone, each is
    dropped right after it runs. Within ``shared_by(K)`` the experts read for a layer stay until the layer has run
    for all K micro-batches (``layer_done``): each is read once per step for every micro-batch routing to it.

    With ``cache_bytes`` (room the plan left free on the main device), dropped experts stay in memory, least
    recently used first to go, and an expert routed to again is not read again (CPU compute only)."""

    def __init__(self, blocks: list[DiskBlock], depth: int, ledger: MemoryLedger, compute: str, direct: bool = True,
                 cache_bytes: int = 0):
        # Small reads: several at once keep the device's queue full (runner.plan.experts). Read from the device even
        # when cached: an expert's neighbours in the file are experts too, and using cached pages sets off readahead
        # into them, which grows the page cache expert by expert under a memory limit that then evicts resident
        # weights.
        super().__init__(blocks, depth, ledger, compute, direct, readers=max(depth, 1), use_cache=False)
        on_cpu = all(b.device.type == "cpu" for b in blocks)
        self.cache_bytes = cache_bytes if on_cpu else 0
        self.cached: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # name -> its tensors, oldest first
        self.cached_buffers: dict[str, torch.Tensor | None] = {}
        self.cached_total = 0
        self.hits = self.misses = 0
        self.routed_share = 0.0  # of the last layer's streamed experts, the share it routed to
        self.unused_bytes = 0    # read ahead for a layer on a guess, and not routed to
        self.queue: list[DiskBlock] = []
        self.layer_runs: dict[str, int] = {}  # a layer's first expert -> forwards through the layer in this column
        per_layer: dict[str, int] = {}
        for b in blocks:
            layer = b.name.rpartition(".")[0]
            per_layer[layer] = per_layer.get(layer, 0) + 1
        # Within a column a layer's disk experts may all be in at once, each in a buffer of its own: one read
        # path for every expert, so an expert computes the same whichever micro-batch brought it in. Experts kept
        # in the cache keep theirs.
        self.extra_buffers = max(per_layer.values(), default=1) - 1 + self.cache_bytes // max(self.buffer_bytes, 1)

    def route(self, blocks: list[DiskBlock], share: float = 0.0) -> None:
        """These experts run next, in this order (``share``: of the layer's streamed experts): start reading the
        first of them. Reads guessed ahead for this layer that it does not route to are let go."""
        wanted = {b.name for b in blocks}
        for name in [n for n in self.pending if n not in wanted]:
            self._let_go(name)
        self.queue, self.routed_share = blocks, share
        self._read_ahead(blocks[:self.depth])

    def _let_go(self, name: str) -> None:
        """A read guessed ahead and not wanted: finished, and its buffer and bytes given back."""
        buffer, _, _ = self.pending.pop(name).result()
        if buffer is not None:
            self.free_buffers.append(buffer)
        nbytes = self.blocks[self.index[name]].nbytes
        self.ledger.release(self.compute, nbytes)
        self.unused_bytes += nbytes

    def before(self, block: DiskBlock) -> None:
        if block.name in self.held or block.name not in self.cached:
            if block.name not in self.held:
                self.misses += 1
            super().before(block)
            return
        self.hits += 1  # in memory still: attached again, its bytes still counted
        tensors = self.cached.pop(block.name)
        self.cached_total -= block.nbytes
        self.held[block.name] = (self.cached_buffers.pop(block.name), None, None)
        self.uses[block.name] = 0
        block.attach(tensors)
        self._read_ahead(self._ahead(block))

    def _read_ahead(self, blocks: list[DiskBlock]) -> None:
        super()._read_ahead([b for b in blocks if b.name not in self.cached])

    def _ahead(self, block: DiskBlock) -> list[DiskBlock]:
        if block not in self.queue:
            return []
        position = self.queue.index(block)
        return self.queue[position + 1:position + 1 + self.depth]

    def after(self, block: DiskBlock, last: bool = False) -> None:
        if last or self.sharing == 1:
            self._drop(block)

    def _drop(self, block: DiskBlock) -> None:
        """Into the cache if it has room for the block, else out."""
        if block.nbytes > self.cache_bytes or block.name not in self.held:
            super().after(block, last=True)
            return
        tensors = {key: get_slot(block.module, slot) for slot, key in block.slots.items()}
        block.detach()
        self.cached_buffers[block.name] = self.held.pop(block.name)[0]
        self.cached[block.name] = tensors
        self.cached_total += block.nbytes
        while self.cached_total > self.cache_bytes:  # the least recently used go
            name, _ = self.cached.popitem(last=False)
            nbytes = self.blocks[self.index[name]].nbytes
            self.cached_total -= nbytes
            buffer = self.cached_buffers.pop(name)
            if buffer is not None:
                self.free_buffers.append(buffer)
            self.ledger.release(self.compute, nbytes)

    def layer_done(self, experts: list[DiskBlock], upcoming: list[DiskBlock]) -> None:
        """The layer holding ``experts`` has run once more: after its K-th run in a column, its experts go. Then,
        when it routed to nearly all of them (many rows in flight), the next layer will too: the first of its
        streamed experts (``upcoming``) are read while the layers between run."""
        if self.sharing > 1:
            key = experts[0].name
            self.layer_runs[key] = self.layer_runs.get(key, 0) + 1
            if self.layer_runs[key] < self.sharing:
                return
            del self.layer_runs[key]
            for block in experts:
                if block.name in self.held:
                    self._drop(block)
        if self.routed_share >= GUESS_ALL:
            self._read_ahead(upcoming[:self.depth])


def streamed_blocks(plan: LoadPlan, checkpoint: Checkpoint, ledger: MemoryLedger, *, folder: Path,
                    device: torch.device) -> list[DiskBlock]:
    """Every block whose weights are copied in for each forward, in forward order: disk blocks (conversions
    written to or reused from ``folder`` first) and CPU blocks that are cheaper to move than their activations.
    They compute on the main device, ``device`` in torch.

    Non-persistent buffers stay resident on the compute device: no checkpoint has them.
    """
    model, layout, dtype = plan.model, plan.layout, plan.dtype
    block_devices, main = plan.check.block_devices, plan.hardware.main_device
    on_disk = [b for b in layout.blocks if plan.compute[b.name].streamed]
    plans: list[tuple[nn.Module, Block, dict[str, str], list[str]]] = []
    convert: dict[str, list[str]] = {}  # block -> the keys converted into its file, each key in one file only
    converts: set[str] = set()          # blocks read from the offload folder (a tied key may sit in another's file)
    for block in on_disk:
        module = model.get_submodule(block.name)
        cut = len(block.name) + 1 if block.name else 0
        slots: dict[str, str] = {}
        for slot in block.tensors:
            if slot in layout.non_persistent:
                ledger.allocate(main, layout.tensor_bytes[slot], slot)
                set_slot(module, slot[cut:], get_slot(module, slot[cut:]).to(device))
            else:
                slots[slot[cut:]] = layout.ties.get(slot, slot)
        keys = sorted(set(slots.values()))
        if block_devices[block.name] == "disk" and _needs_conversion(checkpoint, keys, dtype):
            converts.add(block.name)
            written = {k for ks in convert.values() for k in ks}
            if own := [k for k in keys if k not in written]:
                convert[block.name] = own
        plans.append((module, block, slots, keys))
    folder_blocks = converted(checkpoint, convert, dtype, folder) if convert else None
    out = []
    for module, block, slots, keys in plans:
        reads = None
        arena = None
        if block_devices[block.name] == "cpu":
            resident, arena = _resident_on_cpu(checkpoint, keys, dtype, device, ledger, layout)
            read = resident.__getitem__
        else:
            source = folder_blocks if block.name in converts else checkpoint
            read = source.read_uncached
            located = source.locate(keys)
            reads = plan_reads(located) if located else None
        out.append(DiskBlock(module, block, slots, read, dtype, device, sum(layout.tensor_bytes[k] for k in keys),
                             reads, in_ram=block_devices[block.name] == "cpu", arena=arena))
    return out


def _resident_on_cpu(checkpoint, keys: list[str], dtype: torch.dtype, device: torch.device, ledger: MemoryLedger,
                     layout: ModelLayout) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A CPU block's weights, kept in RAM to be copied in per forward. For a real GPU they are pinned, in one
    allocation per block (pinning is slow per call), each tensor in its stored layout (a transposed view stays one)."""
    arena = None
    if device.type != "cuda":
        store = {key: converted_tensor(checkpoint, key, dtype) for key in keys}
    else:
        stored = {key: cast(checkpoint.read(key), dtype) for key in keys}
        arena = torch.empty(sum(_aligned(t.nbytes) for t in stored.values()), dtype=torch.uint8, pin_memory=True)
        store, at = {}, 0
        for key, t in stored.items():
            # The same strides as read: a Conv1D weight stays a transposed view, of pinned bytes now.
            size = _aligned(t.nbytes)
            base = arena[at: at + t.nbytes].view(t.dtype)
            store[key] = base.as_strided(t.shape, t.stride()).copy_(t) if t.numel() else base.view(t.shape)
            at += size
    for key in keys:
        ledger.allocate("cpu", layout.tensor_bytes[key], key)
    return store, arena


def _aligned(nbytes: int, to: int = 64) -> int:
    return -(-nbytes // to) * to


def _needs_conversion(checkpoint: Checkpoint, keys: list[str], dtype: torch.dtype) -> bool:
    """Anything but safetensors bytes in the compute dtype is converted once, not on every forward."""
    located = checkpoint.locate(keys)
    if located is None:
        return True  # GGUF (quantized) or pickle: no safetensors bytes to read in place
    return any(loc.dtype.is_floating_point and loc.dtype != dtype for loc in located.values())
