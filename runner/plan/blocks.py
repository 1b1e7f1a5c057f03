"""What the planner and the validator know of a model: its blocks, in forward order, with their bytes.

A block is the unit that is placed, hooked and streamed as one. The module tree is
walked from the root and split until it reaches a ``no_split_module_classes`` module,
a leaf, or a module holding tensors of its own. Modules without any tensor are skipped:
they run wherever their input is.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from runner.errors import BuildError


@dataclass(frozen=True)
class Block:
    name: str                     # module path; "" is the whole model
    class_name: str
    nbytes: int                   # bytes it owns in the compute dtype (a tied tensor counts once, at its owner)
    tensors: tuple[str, ...]      # full names of every tensor slot under it, tied aliases included
    tied_to: str | None = None    # the block owning a tensor this one shares: both must sit on one device


@dataclass(frozen=True)
class ModelLayout:
    blocks: tuple[Block, ...]     # forward order
    modules: frozenset[str]       # every module name, "" included
    tensor_bytes: dict[str, int]  # every tensor slot -> bytes in the compute dtype
    ties: dict[str, str]          # alias slot -> the slot that owns the tensor
    non_persistent: frozenset[str]  # buffers no checkpoint carries

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def in_order(self, names: tuple[str, ...]) -> ModelLayout:
        """The same layout with its blocks in ``names``' order (the forward order)."""
        by_name = {b.name: b for b in self.blocks}
        return replace(self, blocks=tuple(by_name[n] for n in names))


def tensor_nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes ``t`` takes once loaded: floating tensors are cast to ``dtype``, the rest keep theirs."""
    itemsize = dtype.itemsize if t.is_floating_point() else t.dtype.itemsize
    return t.numel() * itemsize


def describe_model(model: nn.Module, no_split: tuple[str, ...], dtype: torch.dtype) -> ModelLayout:
    """Blocks, tensor sizes and ties of a (meta) model.

    Raises:
        BuildError: ``no_split`` names a class the model does not contain (a typo there
            would silently allow splitting residual blocks).
    """
    classes = {type(m).__name__ for m in model.modules()}
    unknown = [c for c in no_split if c not in classes]
    if unknown:
        raise BuildError(f"model.no_split_module_classes: the model has no module of class {', '.join(unknown)}; "
                         f"its classes are {', '.join(sorted(classes))}")

    owner: dict[int, str] = {}     # id(tensor) -> first slot that holds it
    ties: dict[str, str] = {}
    sizes: dict[str, int] = {}
    non_persistent: set[str] = set()
    for slot, module, attr, t in tensor_slots(model):
        if slot in sizes:
            continue
        sizes[slot] = tensor_nbytes(t, dtype)
        if attr in module._non_persistent_buffers_set:
            non_persistent.add(slot)
        if id(t) in owner:
            ties[slot] = owner[id(t)]
        else:
            owner[id(t)] = slot

    blocks = _split(model, "", set(no_split))
    slot_block = {slot: b.name for b in blocks for slot in b.tensors}
    result = []
    for b in blocks:
        own = sum(sizes[s] for s in b.tensors if s not in ties)
        tied = sorted({slot_block[ties[s]] for s in b.tensors if s in ties} - {b.name})
        result.append(Block(b.name, b.class_name, own, b.tensors, tied[0] if tied else None))
    modules = frozenset(name for name, _ in model.named_modules())
    return ModelLayout(tuple(result), modules, sizes, ties, frozenset(non_persistent))


def _split(module: nn.Module, name: str, no_split: set[str]) -> list[Block]:
    slots = tuple(_slots(module, name))
    if not slots:
        return []
    children = [(n, c) for n, c in module.named_children() if any(True for _ in _slots(c, ""))]
    has_own = any(t is not None for t in list(module._parameters.values()) + list(module._buffers.values()))
    if type(module).__name__ in no_split or not children or has_own:
        return [Block(name, type(module).__name__, 0, slots)]
    return [b for child_name, child in children for b in _split(child, f"{name}.{child_name}" if name else child_name, no_split)]


def _slots(module: nn.Module, prefix: str):
    return (slot for slot, *_ in tensor_slots(module, prefix))


def tensor_slots(model: nn.Module, prefix: str = ""):
    """``(slot name, owning module, attribute, tensor)`` for every parameter and buffer, tied aliases included."""
    for name, module in model.named_modules(prefix=prefix, remove_duplicate=False):
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                yield (f"{name}.{attr}" if name else attr), module, attr, t


def get_slot(model: nn.Module, slot: str) -> torch.Tensor:
    owner, _, attr = slot.rpartition(".")
    module = model.get_submodule(owner)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def set_slot(model: nn.Module, slot: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the slot's current one (a meta one, say), as a parameter or a buffer as before."""
    owner, _, attr = slot.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor
