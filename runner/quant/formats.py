"""The forms a weight is kept in when it stays quantized, and the matmul each is computed by.

- ``int4``: 4-bit values in groups of 32 along the input dimension, each group with a scale and an offset
  (``w = (q - 8) * scale + offset``): GGUF's Q4_0, Q4_1 and Q4_K hold exactly this shape of number, and
  ``quantize=int4`` rounds to it. Packed once, on load, into the layout of torch's CPU kernel
  ``_weight_int4pack_mm_for_cpu``.
- ``int8``: 8-bit values with one scale per output row (``w = q * scale``), computed by ``_weight_int8pack_mm``;
  ``quantize=int8``, and embeddings (a row is read by its token id, which the packed int4 layout cannot do).
- ``int8g``: GGUF's stored values held exactly, int8 in groups of 32 with an fp32 scale and low each: Q8_0, GGUF
  embeddings, and Q4 weights the int4 kernel cannot take; computed group by group by the int8 kernel.

Both kernels take bf16 activations (their fp32 paths are 5-20x slower on this class of CPU), so a quantized
matmul rounds its input to bf16 and returns the compute dtype. Scales and offsets are bf16, as the kernels take
them, but held as their raw 16 bits in an int16 tensor: every part of a quantized weight is an integer tensor, so
nothing that casts floating weights to the compute dtype (loading, the offload store, streaming) touches them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

GROUP = 32  # int4's group along the input dimension: GGUF's Q4 blocks (and Q4_K's sub-blocks)


@dataclass(frozen=True)
class Part:
    """One stored tensor of a quantized weight: its name after the module's (``<module>.<name>``), dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    row_dim: int = 0  # the dimension that runs over the weight's output rows (a weight is packed in row chunks)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def bf16_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16, its bits as int16 (how scales are stored)."""
    return t.to(torch.bfloat16).contiguous().view(torch.int16)


def from_bits(bits: torch.Tensor) -> torch.Tensor:
    """The bf16 values int16 ``bits`` hold (a view, no copy)."""
    return bits.view(torch.bfloat16)


class Int4:
    """4-bit values in groups of 32 along K, a bf16 scale and offset per group; the CPU int4 kernel computes it."""

    name = "int4"
    describe = "int4, groups of 32"

    @staticmethod
    def fits(rows: int, columns: int) -> bool:
        """The kernel's limits: whole groups along K, and output rows in multiples of 16."""
        return columns % GROUP == 0 and rows % 16 == 0 and rows > 0

    @staticmethod
    def parts(rows: int, columns: int) -> tuple[Part, ...]:
        return (Part("qweight", torch.uint8, (rows, columns // 2)),
                Part("scales", torch.int16, (columns // GROUP, rows, 2), row_dim=1))

    @staticmethod
    def pack(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> dict[str, torch.Tensor]:
        """Values ``q`` (0..15, ``[N, K]``) meaning ``q * scale + low`` per group (``scale``, ``low``: ``[N, K/32]``),
        in the kernel's packed form. Its offset is the value of ``q = 8``: ``low + 8 * scale``."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        scales = torch.stack([scale.t(), (low + 8 * scale).t()], -1)
        return {"qweight": packed, "scales": bf16_bits(scales)}

    @staticmethod
    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A floating ``[N, K]`` weight rounded to 4 bits per group's range (min to max, 16 steps)."""
        rows, columns = w.shape
        groups = w.float().reshape(rows, columns // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        # Rounded to the bf16 the kernel will use before the values are chosen against them. Not widened: weights
        # already on a 16-level grid (a dequantized Q4 checkpoint) keep it exactly, which a wider grid would shift.
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).bfloat16().float()
        offset = (low + 8 * scale).bfloat16().float()
        q = torch.clamp(torch.round((groups - offset[..., None]) / scale[..., None]) + 8, 0, 15)
        return Int4.pack(q.reshape(rows, columns).to(torch.uint8), scale, offset - 8 * scale)

    @staticmethod
    def linear(x: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, parts["qweight"], GROUP, from_bits(parts["scales"]))
        return out.to(x.dtype).reshape(*x.shape[:-1], rows)


class Int8:
    """8-bit values with a bf16 scale per output row; ``_weight_int8pack_mm`` computes it, and a row is read alone
    (an embedding's)."""

    name = "int8"
    describe = "int8, a scale per row"

    @staticmethod
    def fits(rows: int, columns: int) -> bool:
        return rows > 0 and columns > 0

    @staticmethod
    def parts(rows: int, columns: int) -> tuple[Part, ...]:
        return Part("qweight", torch.int8, (rows, columns)), Part("scales", torch.int16, (rows,))

    @staticmethod
    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A floating ``[N, K]`` weight rounded per row to 255 steps symmetric about zero."""
        w = w.float()
        scale = (w.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).bfloat16().float()
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        return {"qweight": q, "scales": bf16_bits(scale)}

    @staticmethod
    def linear(x: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(flat, parts["qweight"], from_bits(parts["scales"]))
        return out.to(x.dtype).reshape(*x.shape[:-1], rows)

    @staticmethod
    def rows(ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The weight's rows ``ids`` (an embedding lookup), dequantized to ``dtype``."""
        q, scale = parts["qweight"][ids], from_bits(parts["scales"])[ids]
        return (q.to(dtype) * scale.to(dtype).unsqueeze(-1))


def f32_bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


class Int8Groups:
    """Values of up to 8 bits in groups of 32 along K, each group with an fp32 scale and low (``w = q * scale +
    low``): GGUF's Q8_0, and any Q4 block a row is read from (an embedding) or the int4 kernel cannot take, held
    exactly. Computed group by group by the int8 kernel (bf16 scales), plus each group's low times the sum of its
    inputs; a row (an embedding's) is read exactly."""

    name = "int8g"
    describe = "int8, groups of 32"

    @staticmethod
    def fits(rows: int, columns: int) -> bool:
        return columns % GROUP == 0 and rows > 0

    @staticmethod
    def parts(rows: int, columns: int) -> tuple[Part, ...]:
        groups = columns // GROUP
        return tuple(Part(name, dtype, shape, row_dim=1) for name, dtype, shape in (
            ("qweight", torch.int8, (groups, rows, GROUP)), ("scales", torch.int32, (groups, rows)),
            ("lows", torch.int32, (groups, rows)), ("kernel_scales", torch.int16, (groups, rows))))

    @staticmethod
    def pack(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> dict[str, torch.Tensor]:
        """Values ``q`` (``[N, K]``, each fitting int8) meaning ``q * scale + low`` per group of 32."""
        rows, columns = q.shape
        grouped = q.to(torch.int8).reshape(rows, columns // GROUP, GROUP).transpose(0, 1).contiguous()
        return {"qweight": grouped, "scales": f32_bits(scale.t()), "lows": f32_bits(low.t()),
                "kernel_scales": bf16_bits(scale.t())}

    @staticmethod
    def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
        rows, columns = w.shape
        groups = w.float().reshape(rows, columns // GROUP, GROUP)
        scale = (groups.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.clamp(torch.round(groups / scale[..., None]), -127, 127).reshape(rows, columns)
        return Int8Groups.pack(q, scale, torch.zeros_like(scale))

    @staticmethod
    def linear(x: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        grouped = flat.to(torch.bfloat16).reshape(flat.shape[0], -1, GROUP)
        q, scales = parts["qweight"], from_bits(parts["kernel_scales"])
        out = flat.new_zeros(flat.shape[0], rows, dtype=torch.float32)
        for g in range(q.shape[0]):
            out += torch._weight_int8pack_mm(grouped[:, g].contiguous(), q[g], scales[g])
        lows = parts["lows"].view(torch.float32)
        if lows.any():
            out += flat.float().reshape(flat.shape[0], -1, GROUP).sum(-1) @ lows
        return out.to(x.dtype).reshape(*x.shape[:-1], rows)

    @staticmethod
    def rows(ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q = parts["qweight"][:, ids]                                    # [G, *ids, 32]
        scale, low = parts["scales"].view(torch.float32)[:, ids], parts["lows"].view(torch.float32)[:, ids]
        w = q.float() * scale.unsqueeze(-1) + low.unsqueeze(-1)
        return w.movedim(0, -2).flatten(-2).to(dtype)


class WeightFormat(Protocol):
    """What a quantized linear layer needs of its weight's form."""

    name: str       # as ``quantize`` and the plan name it
    describe: str   # for the plan

    def fits(self, rows: int, columns: int) -> bool: ...
    def parts(self, rows: int, columns: int) -> tuple[Part, ...]: ...
    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> torch.Tensor: ...


class RowFormat(WeightFormat, Protocol):
    """A form whose rows are read by index (an embedding's table)."""

    def rows(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor: ...


FORMATS: dict[str, WeightFormat] = {"int4": Int4(), "int8": Int8(), "int8g": Int8Groups()}
