"""The forms a weight is kept in when it stays quantized, and how each is multiplied.

Every form is one layout, panels of 16 output rows (``runner/native/qmm.c`` describes the bytes), with a
scale and a low per row and group of k's: a value ``q`` means ``q * scale + low``.

- ``int4h``: 4-bit values (0..15) in groups of 32 along K, fp16 scales and lows: GGUF's Q4_0 and Q4_1, whose
  scales and lows are fp16 numbers, held exactly in the file's own 0.625 bytes a weight.
- ``int4``: the same with fp32 scales and lows: Q4_K (its scales are products of two stored numbers) and
  ``quantize=int4``.
- ``int8``: 8-bit values with one fp32 scale per row and no low (``quantize=int8``, and its embeddings).
- ``int8g``: 8-bit values in groups of 32, an fp16 scale each and no low: GGUF's Q8_0, held exactly.
- ``q5k`` and ``q6k``: GGUF's Q5_K (5-bit values, groups of 32 with a scale and a low) and Q6_K (6-bit values,
  groups of 16 with a scale) held exactly in 8 bits, fp32 scales: 1.25 bytes a weight against the file's 0.69
  and 0.82, a third of fp32's. Q4_K_M files mix Q4_K with Q6_K, so they are held whole.

The runner's C kernels (``runner.native``) multiply them: from 4 rows up in fp32 against a dequantized panel, the
logits of the dequantized fp32 run to fp32 rounding; at 1 to 3 rows against activations rounded to int16 per 16
values (``qmm.c``), within ~1e-4 of the logits' range. Without a C
compiler, a weight is dequantized for each product instead. Scales are stored as the bits of their values in an
integer tensor: every part of a quantized weight is an integer tensor, so nothing that casts floating weights to
the compute dtype (loading, the offload store, streaming) touches them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional as F

from runner.native import HALF, LOWS, kernels

PANEL = 16  # output rows per panel
GROUP = 32  # k's per group of the grouped forms: GGUF's blocks (and Q4_K's sub-blocks)


@dataclass(frozen=True)
class Part:
    """One stored tensor of a quantized weight: its name after the module's (``<module>.<name>``), dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    rows_per_index: int = 1  # output rows per index of dimension 0 (a weight is made in chunks of rows)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def panels(rows: int) -> int:
    return -(-rows // PANEL)


@dataclass(frozen=True)
class Panels:
    """Values of ``bits`` bits in panels of 16 rows, a scale and a low per row and group of ``group`` k's
    (``group=None``: one group spanning the row); scales in fp16 (``half``) or fp32; ``lows=False``: all zero, not
    stored."""

    name: str
    describe: str
    bits: int
    group: int | None
    half: bool = False
    lows: bool = True

    def _group(self, columns: int) -> int:
        return self.group or columns

    @property
    def _scale_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """(the scales' values, the integer tensor holding their bits)"""
        return (torch.float16, torch.int16) if self.half else (torch.float32, torch.int32)

    @property
    def flags(self) -> int:
        return (HALF if self.half else 0) | (LOWS if self.lows else 0)

    def fits(self, rows: int, columns: int) -> bool:
        return rows > 0 and columns > 0 and columns % self._group(columns) == 0

    def parts(self, rows: int, columns: int) -> tuple[Part, ...]:
        p, groups = panels(rows), columns // self._group(columns)
        return (Part("qweight", torch.uint8, (p, columns * PANEL * self.bits // 8), PANEL),
                Part("scales", self._scale_dtypes[1], (p, groups * PANEL * (2 if self.lows else 1)), PANEL))

    def pack(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> dict[str, torch.Tensor]:
        """Values ``q`` (``[N, K]``: 0..15 for 4 bits, int8's range for 8) meaning ``q * scale + low`` per group
        (``scale``, ``low``: ``[N, K / group]``; ``low`` is dropped in a form without lows), in panels; a last
        panel short of 16 rows is padded with zeros."""
        rows, columns = q.shape
        pad = panels(rows) * PANEL - rows
        q, scale, low = (F.pad(t, (0, 0, 0, pad)) for t in (q.to(torch.int16), scale.float(), low.float()))
        lanes = q.view(-1, PANEL, columns).transpose(1, 2)                       # [P, K, 16]
        if self.bits == 4:
            packed = (lanes[..., :8] | (lanes[..., 8:] << 4)).to(torch.uint8)   # row j low nibble, j + 8 high
        else:
            packed = lanes.to(torch.int8).view(torch.uint8)
        held = [scale, low] if self.lows else [scale]
        by_group = torch.stack([t.view(-1, PANEL, t.shape[1]).transpose(1, 2) for t in held], dim=2)  # [P, G, ., 16]
        values, bits = self._scale_dtypes
        return {"qweight": packed.reshape(len(packed), -1).contiguous(),
                "scales": by_group.to(values).reshape(len(by_group), -1).contiguous().view(bits)}

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """A floating ``[N, K]`` weight rounded per group: 4 bits over the group's range (min to max, 16 levels),
        8 bits symmetric about zero (255 levels)."""
        rows, columns = w.shape
        groups = w.float().reshape(rows, -1, self._group(columns))
        values = self._scale_dtypes[0]
        tiny = torch.finfo(values).tiny
        if self.bits == 4:
            low, high = groups.amin(-1).to(values).float(), groups.amax(-1)
            scale = ((high - low) / 15).clamp(min=tiny).to(values).float()  # values chosen against the held scale
            q = torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, 15)
        else:
            scale = (groups.abs().amax(-1) / 127).clamp(min=tiny).to(values).float()
            low = torch.zeros_like(scale)
            q = torch.clamp(torch.round(groups / scale[..., None]), -127, 127)
        return self.pack(q.reshape(rows, columns), scale, low)

    def values(self, parts: dict[str, torch.Tensor], panel: torch.Tensor, lane: torch.Tensor,
               columns: int) -> torch.Tensor:
        """The fp32 weights of the rows at ``panel`` and ``lane`` (equal shapes ``S``) -> ``[*S, K]``."""
        by_k = parts["qweight"].view(len(parts["qweight"]), columns, -1)          # [P, K, bytes per k]
        k = torch.arange(columns)
        if self.bits == 4:
            byte = by_k[panel[..., None], k, (lane % 8)[..., None]].to(torch.int16)
            q = (byte >> (4 * (lane // 8))[..., None]) & 0x0F
        else:
            q = by_k[panel[..., None], k, lane[..., None]].view(torch.int8)
        group = self._group(columns)
        held = parts["scales"].view(self._scale_dtypes[0]).view(len(by_k), columns // group, -1, PANEL)
        scale, low = (held[panel[..., None], torch.arange(columns // group), i, lane[..., None]].float()
                      for i in ((0, 1) if self.lows else (0, 0)))
        w = q.float() * scale.repeat_interleave(group, -1)
        return w + low.repeat_interleave(group, -1) if self.lows else w

    def dequantize(self, parts: dict[str, torch.Tensor], rows: int, columns: int) -> torch.Tensor:
        """The whole ``[N, K]`` weight in fp32."""
        index = torch.arange(rows)
        return self.values(parts, index // PANEL, index % PANEL, columns)

    def rows(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The weight's rows ``ids`` (an embedding lookup), dequantized to ``dtype``."""
        columns = parts["qweight"].shape[1] * 8 // (PANEL * self.bits)
        return self.values(parts, ids // PANEL, ids % PANEL, columns).to(dtype)

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        columns = x.shape[-1]
        flat = x.reshape(-1, columns)
        if flat.dtype != torch.float32 or flat.stride(-1) != 1:
            flat = flat.float().contiguous()
        native = kernels()
        if native is None:
            out = F.linear(flat, self.dequantize(parts, rows, columns))
        else:
            out = native.qmm(flat, parts["qweight"], parts["scales"], rows=rows, bits=self.bits,
                             group=self._group(columns), flags=self.flags)
        return out.to(x.dtype).reshape(*x.shape[:-1], rows)


class WeightFormat(Protocol):
    """What a quantized linear layer needs of its weight's form."""

    name: str       # as ``quantize`` and the plan name it
    describe: str   # for the plan

    def fits(self, rows: int, columns: int) -> bool: ...
    def parts(self, rows: int, columns: int) -> tuple[Part, ...]: ...
    def pack(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], rows: int) -> torch.Tensor: ...
    def dequantize(self, parts: dict[str, torch.Tensor], rows: int, columns: int) -> torch.Tensor: ...


class RowFormat(WeightFormat, Protocol):
    """A form whose rows are read by index (an embedding's table)."""

    def rows(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor: ...


FORMATS: dict[str, Panels] = {
    "int4h": Panels("int4h", "int4, groups of 32, fp16 scales", bits=4, group=GROUP, half=True),
    "int4": Panels("int4", "int4, groups of 32", bits=4, group=GROUP),
    "int8": Panels("int8", "int8, a scale per row", bits=8, group=None, lows=False),
    "int8g": Panels("int8g", "int8, groups of 32", bits=8, group=GROUP, half=True, lows=False),
    "q5k": Panels("q5k", "5-bit values in int8, groups of 32", bits=8, group=GROUP),
    "q6k": Panels("q6k", "6-bit values in int8, groups of 16", bits=8, group=16, lows=False),
}
