"""The forward order of the blocks, and the activation sizes the memory model needs, found without running the model.

A model may declare its block order itself (a ``block_order()`` method returning module
names). Otherwise one forward pass on meta tensors (token ids, or what the model's
``trace_input(batch, tokens)`` returns) records which block runs first, and
the size per token of what flows into each block and out of the model. If that trace
fails (the model wants inputs we cannot guess), registration order is used, with a warning.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from runner.plan.blocks import ModelLayout, get_slot, set_slot

log = logging.getLogger(__name__)

TRACE_TOKENS = 8  # a short meta sequence: every size below is per token


@dataclass(frozen=True)
class ForwardTrace:
    order: tuple[str, ...]           # block names, in the order they first run
    input_elems: dict[str, int]      # block -> elements flowing into it, per token
    output_elems: int                # elements the model returns, per token (the logits' vocabulary)
    source: str                      # "declared", "trace" or "registration"


def forward_order(model: nn.Module, layout: ModelLayout) -> ForwardTrace:
    names = [b.name for b in layout.blocks]
    declared = getattr(model, "block_order", None)
    if callable(declared):
        order = [n for n in declared() if n in names]
        if sorted(order) == sorted(names):
            return ForwardTrace(tuple(order), {}, 0, "declared")
        log.warning("block_order() of %s does not list every block once; tracing instead", type(model).__name__)
    try:
        return _trace(model, layout)
    except Exception as e:  # noqa: BLE001 -- any failure of a user's forward on meta means "cannot trace"
        log.warning("could not trace the forward pass on meta (%s: %s); planning in registration order, "
                    "which may not be the order blocks run in", type(e).__name__, str(e).splitlines()[0][:200])
        return ForwardTrace(tuple(names), {}, 0, "registration")


def _trace(model: nn.Module, layout: ModelLayout) -> ForwardTrace:
    seen: list[str] = []
    sizes: dict[str, int] = {}
    handles = []
    for block in layout.blocks:
        def record(_module, args, kwargs, name=block.name):
            if name not in sizes:
                seen.append(name)
                sizes[name] = _elems(args) + _elems(kwargs)
        handles.append(model.get_submodule(block.name).register_forward_pre_hook(record, with_kwargs=True))
    # Buffers were built for real on the CPU; for the trace everything must be on meta.
    buffers = {slot: get_slot(model, slot) for block in layout.blocks for slot in block.tensors
               if not isinstance(get_slot(model, slot), nn.Parameter)}
    try:
        for slot, t in buffers.items():
            set_slot(model, slot, t.to("meta"))
        make_input = getattr(model, "trace_input", None)
        example = (make_input(1, TRACE_TOKENS) if callable(make_input)
                   else torch.zeros(1, TRACE_TOKENS, dtype=torch.long, device="meta"))  # token ids
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
        for slot, t in buffers.items():
            set_slot(model, slot, t)
    missing = [b.name for b in layout.blocks if b.name not in sizes]
    # Blocks that never ran (unused heads) keep their registration place at the end.
    return ForwardTrace(tuple(seen + missing), {n: s // TRACE_TOKENS for n, s in sizes.items()},
                        _elems(out) // TRACE_TOKENS, "trace")


def _elems(value) -> int:
    if isinstance(value, torch.Tensor):
        return math.prod(value.shape) if value.is_floating_point() or value.dtype == torch.long else 0
    if isinstance(value, (list, tuple)):
        return sum(_elems(v) for v in value)
    if isinstance(value, dict):
        return sum(_elems(v) for v in value.values())
    return 0
