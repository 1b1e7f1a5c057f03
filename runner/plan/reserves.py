"""The memory model beyond weights: what each device must keep free for the run itself.

Every figure here is taken off a device's budget before planning and listed in the plan:

- ``cuda_context``: what the CUDA context takes at the first allocation (a profile setting);
- ``activations``: the hidden states of one forward, ``ACTIVATION_COPIES`` copies of the widest
  block input for ``batch_size x seq_len`` tokens (micro-batches run one at a time) (residual stream, norm output, q/k/v,
  attention output and the 4x-wide MLP hidden state live together at the peak);
- ``outputs``: the logits of one forward, on the main device, where outputs land: for generation one
  position per sequence, since it asks only for the last position's logits (``logits_to_keep=1``); for
  scoring every position, with their float32 log-probabilities; none for embedding, which stops at the
  hidden states;
- ``kv_cache``: keys and values of every unsplittable block for ``batch_size x micro_batches x seq_len``
  tokens in the compute dtype (every micro-batch keeps its own), counted with its block (see ``kv_bytes``), for models that keep them (see ``keeps_kv_cache``).

The staging room for streaming disk blocks in is added by the planner, and only when
something is on disk.
"""
from __future__ import annotations


from typing import Literal, Protocol, runtime_checkable

from torch import nn

from runner.plan.blocks import ModelLayout
from runner.config import RuntimeSpec
from runner.plan.hardware import Hardware
from runner.plan.order import ForwardTrace

ACTIVATION_COPIES = 10

Logits = Literal["last", "all", "none"]
LOGITS: dict[str, Logits] = {"generate": "last", "score": "all", "embed": "none"}  # what each task asks for


def device_reserves(hardware: Hardware, trace: ForwardTrace, shape: RuntimeSpec, itemsize: int,
                    cuda_context: int, logits: Logits = "last") -> dict[str, dict[str, int]]:
    """device -> reason -> bytes, for every device that computes (GPUs and the CPU)."""
    assert shape.seq_len is not None, "seq_len is derived before planning"
    tokens = shape.batch_size * shape.seq_len
    hidden = max(trace.input_elems.values(), default=0)
    reserves: dict[str, dict[str, int]] = {}
    for device in hardware.devices:
        if device.kind == "disk":
            continue
        r = {}
        if device.kind == "gpu" and cuda_context:
            r["cuda_context"] = cuda_context
        if hidden:
            r["activations"] = ACTIVATION_COPIES * tokens * hidden * itemsize
        if device.name == hardware.main_device and trace.output_elems and logits == "last":
            r["outputs"] = shape.rows_in_flight * trace.output_elems * itemsize  # every micro-batch's, at once
        elif device.name == hardware.main_device and trace.output_elems and logits == "all":
            r["outputs"] = tokens * trace.output_elems * (itemsize + 4)  # logits, then float32 log-probabilities
        reserves[device.name] = {k: v for k, v in r.items() if v}
    return reserves


def keeps_kv_cache(model: nn.Module) -> bool:
    """Whether a forward keeps keys and values: as the model class declares (``keeps_kv_cache``), as a
    transformers model's ``config.use_cache`` says, and otherwise yes, the safe side."""
    declared = getattr(model, "keeps_kv_cache", None)
    if isinstance(declared, bool):
        return declared
    return bool(getattr(getattr(model, "config", None), "use_cache", True))


@runtime_checkable
class CachesKeysAndValues(Protocol):
    """An attention module that says how many key channels it caches per token (as many for values)."""

    kv_width: int


def kv_bytes(model: nn.Module, layout: ModelLayout, trace: ForwardTrace, no_split: tuple[str, ...],
             shape: RuntimeSpec, itemsize: int) -> dict[str, int]:
    """Keys and values that generation holds for every unsplittable (attention) block: 2 x ``batch_size x
    micro_batches x seq_len`` tokens x the width its attention modules declare (``kv_width``: grouped-query
    attention caches fewer heads than it computes), or else its input width."""
    assert shape.seq_len is not None, "seq_len is derived before planning"
    tokens = shape.rows_in_flight * shape.seq_len
    out = {}
    for b in layout.blocks:
        if b.class_name not in no_split:
            continue
        widths = [m.kv_width for m in model.get_submodule(b.name).modules() if isinstance(m, CachesKeysAndValues)]
        out[b.name] = 2 * tokens * (sum(widths) if widths else trace.input_elems.get(b.name, 0)) * itemsize
    return out
