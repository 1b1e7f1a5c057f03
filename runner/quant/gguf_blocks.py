"""GGUF's 4-, 5-, 6- and 8-bit blocks read as values, scales and lows, with no float detour.

Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and Q8_0 all hold, per group of 32 weights (Q6_K: 16), values ``q`` meaning
``q * scale + low``:

- Q4_0 (18 bytes per 32): an fp16 ``d``; ``scale = d``, ``low = -8 d``;
- Q4_1 (20 bytes per 32): fp16 ``d`` and ``m``; ``scale = d``, ``low = m``;
- Q4_K (144 bytes per 256): fp16 ``d`` and ``dmin``, and per sub-block of 32 a 6-bit ``sc`` and ``m`` packed in
  12 bytes; ``scale = d * sc``, ``low = -dmin * m``;
- Q5_K (176 bytes per 256): Q4_K's numbers, and a fifth bit per value in 32 bytes (``q`` 0..31);
- Q6_K (210 bytes per 256): 6-bit values (``q - 32``: -32..31) as 4 low bits and 2 high bits, an int8 ``sc`` per
  sub-block of 16 and an fp16 ``d``; ``scale = d * sc``, ``low = 0``;
- Q8_0 (34 bytes per 32): an fp16 ``d`` and 32 signed bytes; ``scale = d``, ``low = 0``.

In the 4- and 5-bit types a 16-byte run of values holds 32 weights: the low nibbles are the first 16 (the K types:
the first 32 of a 64-weight chunk, over 32 bytes), the high nibbles the rest. The layouts are llama.cpp's
``ggml-common.h``.
"""
from __future__ import annotations

import torch

FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
KEPT = (*FOUR_BIT, "Q5_K", "Q6_K", "Q8_0")  # the types whose values are read here
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_0": 34}



def _fp16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 number at byte ``start`` of every block, as float32 ``[..., 1]``."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bytes -> ``[..., 2n]`` values: the low nibbles, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def block_values(kind: str, blocks: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q [N, K] int16, scale [N, K/g], low [N, K/g])`` of a ``[N, bytes]`` tensor of ``kind`` blocks, ``g`` its
    group: 16 for Q6_K, else 32.

    Raises:
        ValueError: the bytes per row are not a whole number of ``kind`` blocks covering ``columns``.
    """
    rows = blocks.shape[0]
    size = _BLOCK_BYTES[kind]
    per_block = 256 if kind.endswith("_K") else 32
    if columns % per_block or blocks.shape[1] != columns // per_block * size:
        raise ValueError(f"{blocks.shape[1]} bytes per row are not {columns // per_block} {kind} blocks")
    b = blocks.reshape(rows, columns // per_block, size)
    if kind == "Q8_0":
        d = _fp16(b, 0)
        q, scale, low = b[..., 2:].contiguous().view(torch.int8), d, torch.zeros_like(d)
    elif kind == "Q4_0":
        d = _fp16(b, 0)
        q, scale, low = _nibbles(b[..., 2:]), d, -8 * d
    elif kind == "Q4_1":
        d = _fp16(b, 0)
        q, scale, low = _nibbles(b[..., 4:]), d, _fp16(b, 2)
    elif kind == "Q6_K":
        ql = b[..., 0:128].reshape(rows, -1, 2, 64)                    # two halves of 128 weights
        qh = b[..., 128:192].reshape(rows, -1, 2, 32)
        low4, high4 = ql & 0x0F, ql >> 4
        parts = [low4[..., :32], low4[..., 32:], high4[..., :32], high4[..., 32:]]  # weights 0-31, 32-63, ...
        q = torch.stack([p.to(torch.int16) | (((qh >> (2 * i)) & 3).to(torch.int16) << 4)
                         for i, p in enumerate(parts)], dim=-2) - 32   # [N, S, 2, 4, 32]
        scale = _fp16(b, 208) * b[..., 192:208].contiguous().view(torch.int8).float()  # [N, S, 16]
        low = torch.zeros_like(scale)
    else:  # Q4_K, Q5_K
        sc, m = _k_scales(b[..., 4:16])                                # [N, S, 8] each
        scale, low = _fp16(b, 0) * sc, -_fp16(b, 2) * m
        start = 48 if kind == "Q5_K" else 16
        qs = b[..., start:start + 128].reshape(rows, -1, 4, 32)        # 4 chunks of 64 weights per super-block
        q = _nibbles(qs).reshape(rows, -1, 8, 32)                      # [N, S, 8 sub-blocks, 32]
        if kind == "Q5_K":  # sub-block j's fifth bits: bit j of the 32 bytes after the scales
            fifth = (b[..., 16:48].unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1
            q = q.to(torch.int16) + 16 * fifth.to(torch.int16)
    return q.reshape(rows, columns).to(torch.int16), scale.reshape(rows, -1), low.reshape(rows, -1)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes -> eight 6-bit scales and eight 6-bit minimums per super-block, as float32.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the minimums;
    bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of minimums 4-7 (high nibble)."""
    d, m, low4 = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat([d & 0x3F, (low4 & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (low4 >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales.float(), mins.float()
