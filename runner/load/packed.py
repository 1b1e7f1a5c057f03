"""Resident CPU linears packed once, so no matrix product repacks its weight.

A GEMM library first reorders the weight into the blocked layout its kernels read. ``F.linear`` does that on
every call, which at decode sizes (tens of rows) costs about as much as the product itself. Packed once, a SmolLM2
decode step at 64 rows runs its projections ~1.3x faster and its 49k-word head ~2x (2 AVX2 cores). Two forms:

- ``PanelLinear``: the runner's own panels (``runner/native/dense.c``), where its kernels compute the weight's
  dtype. As fast as oneDNN on these sizes, and the decode step's C form (``runner.zoo.native_layer``) reads them
  directly, so a whole step of every layer runs in one C call.
- ``PackedLinear``: oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``), elsewhere.

The packed weight is a second copy, so it is made only where it pays and the plan leaves room for it: generation
with at least ``PACK_ROWS`` rows in flight (one row's products are bound by reading the weight, packed or not),
blocks that compute on the CPU, resident (nothing streamed in per forward), in float32 or bf16, while the CPU's
free room after weights and reserves holds them. The original weight stays for everything else that reads it (a tied
embedding, scoring).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from runner.config.sizes import format_bytes
from runner.load.memory import MemoryLedger
from runner.native import Kernels, kernels
from runner.plan.blocks import ModelLayout

log = logging.getLogger(__name__)
PACK_ROWS = 16  # rows in flight from which packed products pay for their copy (SmolLM2, 2 AVX2 cores: ~1.3x at 64)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies against its oneDNN-packed weight (same parameters, same names). A bf16
    linear on a CPU without bf16 kernels is packed in float32: its products run at float32 speed instead of
    torch's emulated bf16 (~5x slower), from the same bf16 values, rounded back to bf16."""

    packed: torch.Tensor
    packed_bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or x.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if x.dtype == self.packed.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "none", [], "")
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.packed.dtype), self.packed, self.packed_bias, "none", [], "")
        return out.to(x.dtype)


class PanelLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies against its weight in the runner's panels (same parameters, same names):
    ``panels`` as ``Kernels.pack_dense`` holds them, ``panel_bias`` the bias in float32."""

    panels: torch.Tensor
    panel_bias: torch.Tensor | None
    native: Kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or x.device.type != "cpu" or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        if x.dtype == self.panels.dtype == torch.bfloat16 and self.panel_bias is None:
            out = self.native.dense_halves(rows.contiguous(), self.panels, self.out_features)
            return out.view(*x.shape[:-1], self.out_features)
        out = self.native.dense(rows.float().contiguous(), self.panels, self.out_features)
        if self.panel_bias is not None:
            out += self.panel_bias
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module, layout: ModelLayout, *, cpu_blocks: set[str], room: int, rows: int,
                 ledger: MemoryLedger) -> int:
    """Pack the float32 and bf16 linears of ``cpu_blocks`` (resident blocks that compute on the CPU), in forward
    order, while their packed copies fit in ``room`` bytes; each is booked on the ledger's CPU. The bytes packed."""
    if room <= 0 or rows < PACK_ROWS:
        return 0
    native = kernels()
    packed, counts = 0, {"the runner's panels": 0, "oneDNN": 0}
    for linear in _linears(model, layout, cpu_blocks):
        weight = linear.weight.detach()
        ours = native is not None and native.dense_bits(weight.dtype, weight.shape[1]) is not None
        if not ours and weight.dtype == torch.bfloat16 and not _bf16_kernels():
            weight = weight.float()
        size = native.dense_nbytes(weight) if ours else weight.numel() * weight.element_size()
        if packed + size > room:
            break
        if ours:
            _into_panels(linear, native)
        elif not _into_onednn(linear, weight, rows):
            break
        ledger.allocate("cpu", size, "a packed linear")
        packed += size
        counts["the runner's panels" if ours else "oneDNN"] += 1
    if packed:
        log.info("linear(s) packed (%s): %s more on the CPU",
                 ", ".join(f"{n} in {form}" for form, n in counts.items() if n), format_bytes(packed))
    return packed


def _into_panels(linear: nn.Linear, native: Kernels) -> None:
    linear.panels = native.pack_dense(linear.weight.detach())
    linear.panel_bias = linear.bias.detach().float().contiguous() if linear.bias is not None else None
    linear.native = native
    linear.__class__ = PanelLinear


def _into_onednn(linear: nn.Linear, weight: torch.Tensor, rows: int) -> bool:
    """Whether ``linear`` became a ``PackedLinear`` (False: this torch has no oneDNN packed linears)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        linear.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    except RuntimeError as e:  # a torch built without oneDNN's packed linears: plain products, as before
        log.info("Linears stay unpacked: %s", str(e).splitlines()[0])
        return False
    linear.packed_bias = linear.bias.detach().to(weight.dtype) if linear.bias is not None else None
    linear.__class__ = PackedLinear
    return True


def _linears(model: nn.Module, layout: ModelLayout, cpu_blocks: set[str]) -> Iterator[nn.Linear]:
    seen: set[int] = set()
    for block in layout.blocks:
        if block.name not in cpu_blocks:
            continue
        for m in model.get_submodule(block.name).modules():
            if type(m) is nn.Linear and id(m) not in seen and m.weight.device.type == "cpu" \
                    and m.weight.dtype in (torch.float32, torch.bfloat16):
                seen.add(id(m))
                yield m


@functools.cache
def _bf16_kernels() -> bool:
    """Whether oneDNN packs bf16 weights on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True
