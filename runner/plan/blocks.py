"""What the planner and the validator know of a model: its blocks, in forward order, with their bytes.

A block is the unit that is placed, hooked and streamed as one. The module tree is
walked from the root and split until it reaches a ``no_split_module_classes`` module,
a leaf, or a module holding tensors of its own. Modules without any tensor are skipped:
they run wherever their input is.

Experts are the one exception to "never split": each member of an ``Experts`` list is a block of its own, placed
apart from the unsplittable layer that holds it (its ``within``), which keeps the rest (attention, norms, router,
shared expert). A token runs through a few experts only, and the layer brings back what each computed.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from runner.errors import BuildError


class Experts(nn.ModuleList):
    """A mixture's experts: each is placed, loaded and streamed as a block of its own, and runs only on the tokens
    routed to it. The layer calling them moves each one's output back to where the layer computes, and says which
    it is about to run (``route``), so that a loader can read streamed ones ahead of their turn."""

    def __init__(self, modules, per_token: int):
        super().__init__(modules)
        self.per_token = per_token  # experts each token runs through (top-k)
        self.on_route: Callable[[list[int]], None] | None = None  # set by the loader (runner.load.dispatch)
        self.on_done: Callable[[], None] | None = None

    def route(self, routed: list[int]) -> None:
        """The experts this forward runs, in the order it runs them."""
        if self.on_route is not None:
            self.on_route(routed)

    def done(self) -> None:
        """This forward has run every expert it routed to."""
        if self.on_done is not None:
            self.on_done()


@dataclass(frozen=True)
class Block:
    name: str                     # module path; "" is the whole model
    class_name: str
    nbytes: int                   # bytes it owns in the compute dtype (a tied tensor counts once, at its owner)
    tensors: tuple[str, ...]      # full names of every tensor slot under it, tied aliases included
    tied_to: str | None = None    # the block owning a tensor this one shares: both must sit on one device
    within: str | None = None     # an expert: the block of the layer that routes tokens to it
    share: float = 0.0            # an expert: the share of tokens routed to it, when routing is even (top-k / n)

    @property
    def expert(self) -> bool:
        return self.within is not None


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

    @property
    def has_experts(self) -> bool:
        return bool(self.expert_names)

    @functools.cached_property
    def expert_names(self) -> frozenset[str]:
        return frozenset(b.name for b in self.blocks if b.expert)

    @functools.cached_property
    def expert_lists(self) -> frozenset[str]:
        """The ``Experts`` lists' names (``model.layers.3.mlp.experts``)."""
        return frozenset(name.rpartition(".")[0] for name in self.expert_names)

    def in_order(self, names: tuple[str, ...]) -> ModelLayout:
        """The same layout with its blocks in ``names``' order (the forward order)."""
        by_name = {b.name: b for b in self.blocks}
        return replace(self, blocks=tuple(by_name[n] for n in names))


def tensor_nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes ``t`` takes once loaded: floating tensors are cast to ``dtype``, the rest keep theirs."""
    itemsize = dtype.itemsize if t.is_floating_point() else t.dtype.itemsize
    return t.numel() * itemsize


def describe_model(model: nn.Module, no_split: tuple[str, ...], dtype: torch.dtype,
                   experts_apart: bool = True) -> ModelLayout:
    """Blocks, tensor sizes and ties of a (meta) model; with ``experts_apart``, each expert a block of its own.

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

    blocks = _split(model, "", set(no_split), experts_apart)
    slot_block = {slot: b.name for b in blocks for slot in b.tensors}
    result = []
    for b in blocks:
        own = sum(sizes[s] for s in b.tensors if s not in ties)
        tied = sorted({slot_block[ties[s]] for s in b.tensors if s in ties} - {b.name})
        result.append(replace(b, nbytes=own, tied_to=tied[0] if tied else None))
    modules = frozenset(name for name, _ in model.named_modules())
    return ModelLayout(tuple(result), modules, sizes, ties, frozenset(non_persistent))


def _split(module: nn.Module, name: str, no_split: set[str], experts_apart: bool) -> list[Block]:
    slots = tuple(_slots(module, name))
    if not slots:
        return []
    children = [(n, c) for n, c in module.named_children() if any(True for _ in _slots(c, ""))]
    has_own = any(t is not None for t in list(module._parameters.values()) + list(module._buffers.values()))
    if type(module).__name__ in no_split or not children or has_own:
        return _apart_from_experts(module, name, slots) if experts_apart else [Block(name, type(module).__name__, 0,
                                                                                     slots)]
    return [b for child_name, child in children
            for b in _split(child, f"{name}.{child_name}" if name else child_name, no_split, experts_apart)]


def _apart_from_experts(module: nn.Module, name: str, slots: tuple[str, ...]) -> list[Block]:
    """An unsplittable module as one block, less the members of its ``Experts`` lists: a block each, after it."""
    prefix = f"{name}." if name else ""
    experts = [Block(f"{prefix}{path}.{i}", type(member).__name__, 0, tuple(_slots(member, f"{prefix}{path}.{i}")),
                     within=name, share=m.per_token / len(m))
               for path, m in module.named_modules() if isinstance(m, Experts) and path for i, member in enumerate(m)]
    if not experts:
        return [Block(name, type(module).__name__, 0, slots)]
    apart = {slot for expert in experts for slot in expert.tensors}
    return [Block(name, type(module).__name__, 0, tuple(s for s in slots if s not in apart)), *experts]


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
