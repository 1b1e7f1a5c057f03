"""Blocks planned on disk: their weights stay out of memory between uses.

The simplest correct way: a disk block's tensors are read just before it runs, straight
from the checkpoint's safetensors files when they are stored in the compute dtype, else
from a copy converted once into the offload folder, and dropped as soon as it is done.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from runner.blocks import Block, ModelLayout, get_slot, set_slot
from runner.checkpoint import Checkpoint
from runner.errors import OffloadError
from runner.memory import MemoryLedger

log = logging.getLogger(__name__)


class DiskBlock:
    """Streams one block's weights in for a forward and drops them after."""

    def __init__(self, module: nn.Module, prefix: str, slots: dict[str, str], read, device: torch.device,
                 ledger: MemoryLedger, compute: str, sizes: dict[str, int]):
        self.module, self.prefix = module, prefix
        self.slots = slots          # slot (relative to the block) -> key it is read from
        self.read = read            # key -> CPU tensor in the compute dtype
        self.device, self.ledger, self.compute = device, ledger, compute
        self.nbytes = sum(sizes[key] for key in set(slots.values()))
        self._meta = {slot: get_slot(module, slot) for slot in slots}

    def load(self) -> None:
        self.ledger.allocate(self.compute, self.nbytes, f"disk block {self.prefix or '(model)'}")
        loaded: dict[str, torch.Tensor] = {}
        for slot, key in self.slots.items():
            if key not in loaded:
                loaded[key] = self.read(key).to(self.device)
            set_slot(self.module, slot, loaded[key])

    def unload(self) -> None:
        for slot, meta in self._meta.items():
            set_slot(self.module, slot, meta)
        self.ledger.release(self.compute, self.nbytes)


def prepare_disk_block(module: nn.Module, block: Block, layout: ModelLayout, checkpoint: Checkpoint,
                       dtype: torch.dtype, offload_folder: Path, device: torch.device, ledger: MemoryLedger,
                       compute: str) -> DiskBlock:
    """Keep the block's non-persistent buffers resident; arrange for the rest to be read per forward."""
    cut = len(block.name) + 1 if block.name else 0
    slots: dict[str, str] = {}
    for slot in block.tensors:
        if slot in layout.non_persistent:
            ledger.allocate(compute, layout.tensor_bytes[slot], slot)
            set_slot(module, slot[cut:], get_slot(module, slot[cut:]).to(device))
        else:
            slots[slot[cut:]] = layout.ties.get(slot, slot)
    keys = sorted(set(slots.values()))
    convert = [k for k in keys if checkpoint.entries[k].dtype.is_floating_point and checkpoint.entries[k].dtype != dtype]
    read = checkpoint.read
    if convert:
        read = _converted_reader(checkpoint, convert, dtype, offload_folder / f"{block.name or 'model'}.safetensors")
    return DiskBlock(module, block.name, slots, read, device, ledger, compute,
                     {k: layout.tensor_bytes[k] for k in keys})


def _converted_reader(checkpoint: Checkpoint, keys: list[str], dtype: torch.dtype, file: Path):
    """Write the block's tensors in the compute dtype once, then read them from there."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        save_file({k: checkpoint.read(k).to(dtype) for k in keys}, str(tmp))
        tmp.replace(file)  # atomic: a half-written file never carries the final name
    except OSError as e:
        raise OffloadError(f"offload_folder: cannot write {file} ({e.strerror or e}); "
                           "set offload_folder to a writable folder with room for the disk blocks") from e
    handle = safe_open(str(file), framework="pt", device="cpu")
    original = checkpoint.read
    converted = set(keys)
    return lambda key: handle.get_tensor(key) if key in converted else original(key)

