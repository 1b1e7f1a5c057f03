"""Stage 5: stream the weights to their devices and hook the blocks so the model runs across them.

Each tensor is read from the checkpoint once, cast to the compute dtype, and assigned
straight to its final device: no full state dict, no second copy. Tied tensors are
loaded once and every slot that shares them is pointed at the same tensor.

Hooks sit on block boundaries only. A block's pre-forward hook moves its inputs to the
device it computes on; blocks planned on disk are streamed in before they run and
dropped right after (see ``runner.load.offload``). A model held wholly in memory and
computing on the CPU needs neither, so its blocks get no hook at all.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner.plan.blocks import Block, Experts, get_slot, set_slot
from runner.load.checkpoint import Checkpoint
from runner.load.checkpoint.reads import SpanReader, aligned_buffer, plan_reads
from runner.plan.experts import experts_ahead
from runner.plan.hardware import Hardware
from runner.load.memory import MemoryLedger
from runner.load.offload import DiskBlock, LoadPlan, Prefetcher, RoutedExperts, streamed_blocks

log = logging.getLogger(__name__)


def torch_device(name: str, hardware: Hardware) -> torch.device:
    """The torch device behind a logical one: simulated GPUs are backed by the CPU."""
    if name.startswith("cuda:") and not hardware.get(name).simulated:
        return torch.device(name)
    return torch.device("cpu")


def dispatch(plan: LoadPlan, checkpoint: Checkpoint, ledger: MemoryLedger, *, offload_folder: Path,
             prefetch: int = 1, direct_io: bool = True, expert_cache: int = 0) -> Prefetcher:
    """Load every resident block of ``plan.model`` onto its device, prepare streamed blocks, and install the hooks;
    the prefetcher that streams blocks in (``Prefetcher.shared_by`` lets micro-batches share each load).

    Disk blocks that need converting are written to ``offload_folder``. Streamed blocks are read ``prefetch`` ahead
    of the one running, with ``O_DIRECT`` when ``direct_io`` and their bytes are not in the page cache already.
    Streamed experts read in stay in up to ``expert_cache`` bytes of the main device, for when they are routed to
    again.
    """
    model, layout, hardware = plan.model, plan.layout, plan.hardware
    main = hardware.main_device
    streamed = streamed_blocks(plan, checkpoint, ledger, folder=offload_folder, device=torch_device(main, hardware))
    experts = layout.expert_names
    prefetcher = Prefetcher([d for d in streamed if d.name not in experts], prefetch, ledger, main, direct_io)
    by_name = {d.name: d for d in streamed}
    if any(d.name in experts for d in streamed):
        prefetcher.experts = RoutedExperts([d for d in streamed if d.name in experts], experts_ahead(prefetch),
                                           ledger, main, direct_io, cache_bytes=expert_cache)
        _route_streamed_experts(model, by_name, prefetcher.experts)
    resident = [s for b in layout.blocks if b.name not in by_name for s in b.tensors
                if s not in layout.ties and s not in layout.non_persistent]
    private = any(d.name in experts and plan.check.block_devices[d.name] == "disk" for d in streamed)
    if not private:
        checkpoint.read_ahead(resident)  # page the resident weights in while this thread works
    # Every block resident and computing on the CPU (simulated GPUs included): activations never move, and no block
    # needs a hook, which would cost a walk over its arguments per call and keep its decode step out of runner.zoo's
    # one-call C form (NativeStack runs unhooked layers only). Where anything streams, every block keeps its hook, as
    # before: the stack is for models held wholly in memory, and the streaming paths stay as they were tested.
    bare = not streamed and {torch_device(c.device, hardware) for c in plan.compute.values()} == {torch.device("cpu")}
    for block in layout.blocks:
        target = torch_device(plan.compute[block.name].device, hardware)
        if block.name not in by_name:
            _load_block(plan, block, checkpoint, ledger, target, private)
        if block.name not in by_name and (bare or block.expert and target == torch_device(
                plan.compute[block.within].device, hardware)):
            continue  # resident where its inputs are already: no hook to pay per call
        streams = prefetcher.experts if block.expert and block.name in by_name else prefetcher
        _install_hooks(model.get_submodule(block.name), target, by_name.get(block.name), streams)
    for alias, owner in layout.ties.items():  # the owner is loaded by now, wherever it lives
        set_slot(model, alias, get_slot(model, owner))
    return prefetcher


def _route_streamed_experts(model: nn.Module, streamed: dict[str, DiskBlock], experts: RoutedExperts) -> None:
    """Each ``Experts`` list holding streamed experts tells ``experts`` which of them a forward routes to, in the
    order it runs them, so they are read ahead of their turn; and when it is done, so that the next list's are
    read while the layers between run."""
    lists = []
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            own = {i: streamed[f"{name}.{i}"] for i in range(len(module)) if f"{name}.{i}" in streamed}
            if own:
                lists.append((module, own))
    for (module, own), (_, upcoming) in zip(lists, [*lists[1:], (None, {})]):
        module.on_route = lambda routed, own=own: experts.route([own[i] for i in routed if i in own],
                                                               share=sum(i in own for i in routed) / len(own))
        module.on_done = lambda own=own, upcoming=upcoming: experts.layer_done(list(own.values()),
                                                                               list(upcoming.values()))


def _load_block(plan: LoadPlan, block: Block, checkpoint: Checkpoint, ledger: MemoryLedger,
                device: torch.device, private: bool = False) -> None:
    """The block's tensors onto ``device``, counted against the device its weights are stored on; with ``private``,
    read into memory of their own rather than mapped (``_read_direct``)."""
    layout, stored = plan.layout, plan.check.block_devices[block.name]
    direct = _read_direct(plan, block, checkpoint) if private and device.type == "cpu" else {}
    for slot in block.tensors:
        if slot in layout.ties:
            continue
        if slot in layout.non_persistent:  # built for real on the CPU by the builder
            tensor = get_slot(plan.model, slot).to(device)
        elif slot in direct:
            tensor = direct[slot]
        else:
            entry = checkpoint.entries[slot]
            cast = entry.dtype.is_floating_point and entry.dtype != plan.dtype
            # A tensor that is cast or copied to a GPU is read into a private buffer, not through the file's
            # memory map, whose pages would otherwise stay counted in RSS next to the result.
            read = checkpoint.read_uncached if cast or device.type == "cuda" else checkpoint.read
            tensor = cast_and_move(read(slot), plan.dtype, device)
        ledger.allocate(stored, layout.tensor_bytes[slot], slot)
        set_slot(plan.model, slot, tensor)


def _read_direct(plan: LoadPlan, block: Block, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """A resident block's tensors stored in the compute dtype, read with ``O_DIRECT`` into memory of its own; {}
    where they are not plain safetensors bytes in that dtype (they load the ordinary way).

    For a mixture with experts on disk: a mapped tensor's faults make the kernel read ahead past it (8 MiB is
    common), into its neighbours in the file, which are experts, some planned on disk. Their cached pages crowd
    a memory limit, which then evicts the mapped weights only to fault them in again, every step."""
    keys = [s for s in block.tensors if s not in plan.layout.ties and s not in plan.layout.non_persistent]
    located = checkpoint.locate(keys)
    if located is None or any(loc.dtype != plan.dtype for loc in located.values()):
        return {}
    reads = plan_reads(located)
    if reads is None:
        return {}
    reader = SpanReader(direct=True)
    try:
        return reader.read(reads, aligned_buffer(reads.nbytes))
    finally:
        reader.close()


def cast_and_move(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cast floating tensors to the compute dtype and move: one copy at most, never an fp32 detour. A cast copies
    anyway, so its result is contiguous: a transposed view (a Conv1D weight) becomes a plain ``[out, in]`` weight,
    which CPU kernels in half precision run an order of magnitude faster."""
    if tensor.is_floating_point() and tensor.dtype != dtype:
        # Cast on the smaller side of the move, so no transient copy is bigger than the result.
        if dtype.itemsize < tensor.dtype.itemsize:
            return tensor.to(dtype, memory_format=torch.contiguous_format).to(device)
        return tensor.to(device).to(dtype, memory_format=torch.contiguous_format)
    return tensor.to(device)


def _install_hooks(module: nn.Module, device: torch.device, disk: DiskBlock | None, prefetcher: Prefetcher) -> None:
    """One hook pair per block: move the inputs to where it computes; stream a disk block in and out."""
    def pre_forward(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if disk is not None:
            prefetcher.before(disk)
        return _to(args, device), _to(kwargs, device)

    module.register_forward_pre_hook(pre_forward, with_kwargs=True)
    if disk is not None:
        module.register_forward_hook(lambda *_: prefetcher.after(disk))


def _to(value: Any, device: torch.device) -> Any:
    """Activations (tensors, and lists, tuples and dicts of them) moved to ``device``. Anything else passes as it
    is: a KV cache object above all, whose tensors stay where each block computes (``runner.infer.kv_cache``)."""
    if isinstance(value, torch.Tensor):
        # non_blocking only towards CUDA: a GPU -> CPU copy would return before the data is there.
        return value.to(device, non_blocking=device.type == "cuda") if value.device != device else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value

