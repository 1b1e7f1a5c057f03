#!/usr/bin/env python
"""Weight-only quantized matmuls on this CPU: which kernel a quantized weight should be computed by.

Groundwork for keeping GGUF weights quantized (issue 22): the same ``[rows, K] x [N, K]^T`` product, timed per
kernel, for the layer shapes of SmolLM2-135M and of a 7B Llama, at 1, 16 and 64 rows (decode steps of that many
sequences):

- ``fp32``: ``F.linear`` on fp32 weights (what a dequantized GGUF runs today);
- ``bf16``: ``F.linear`` on bf16 weights and activations;
- ``int8``: ``torch._weight_int8pack_mm``: int8 weights with one scale per output row, bf16 activations;
- ``int4``: ``aten._weight_int4pack_mm_for_cpu``: 4-bit weights packed once by
  ``_convert_weight_to_int4pack_for_cpu``, a scale and an offset per group of 32 along K (Q4_0's and Q4_1's
  block), bf16 activations. Its weight is ``(q - 8) * scale + offset``: Q4_1's ``q * d + m`` is scale ``d``,
  offset ``m + 8d``; Q4_0's ``(q - 8) * d`` is offset 0.
- ``runner int8`` and ``runner int4``: the runner's own kernels (``runner/native/qmm.c``) on the same values, kept
  in its panels (``int8``: a scale per row; ``int4h``: groups of 32, fp16 scales as Q4_0/Q4_1 store them), fp32
  activations. What the runner computes kept weights with; the two above are what it measured before choosing.

Each kernel's output is checked against ``F.linear`` in fp32 on the weights it represents (the error is bf16
rounding of the activations and of the scales). Times are medians; the figure after each is fp32's time over the
kernel's (above 1: faster than fp32).

Run ``python bench/quant_kernels_bench.py`` (~1 min); ``--threads N`` (default 2).
"""
from __future__ import annotations

import argparse
import time

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py puts this checkout's runner first
import common  # noqa: E402,F401
from runner.quant.formats import FORMATS  # noqa: E402

GROUP = 32  # Q4_0 and Q4_1 blocks
SHAPES = {  # name: (N, K)
    "smollm2 q_proj": (576, 576), "smollm2 gate_proj": (1536, 576), "smollm2 down_proj": (576, 1536),
    "smollm2 head": (49152, 576), "7b q_proj": (4096, 4096), "7b gate_proj": (11008, 4096),
}


def median_ms(f, rounds: int) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[rounds // 2] * 1e3


def int4_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` as 4-bit groups of 32 with a scale and minimum each (Q4_1's layout): packed, scales-and-offsets in the
    kernel's form, and the fp32 weight they stand for."""
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, 15)
    represented = (q * scale[..., None] + low[..., None]).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(n, k), 1)
    scales_and_offsets = torch.stack([scale.t(), (low + 8 * scale).t()], -1).contiguous().bfloat16()
    return packed, scales_and_offsets, represented


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
    q = torch.round(w / scale[:, None]).to(torch.int8)
    return q, scale.bfloat16(), q.float() * scale[:, None]


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference).abs().max() / reference.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s); ms per product (fp32 / kernel in brackets), max error relative to the output range")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        packed, scales, w4 = int4_weights(w)
        q8, s8, w8 = int8_weights(w)
        w16 = w.bfloat16()
        kept = {form: FORMATS[form].quantize(w) for form in ("int8", "int4h")}
        held = {form: FORMATS[form].dequantize(parts, n, k) for form, parts in kept.items()}
        rounds = 10 if n * k > 10**7 else 50
        for rows in args.rows:
            x = torch.randn(rows, k)
            xb = x.bfloat16()
            sides = {
                "fp32": (lambda: F.linear(x, w), F.linear(x, w)),
                "bf16": (lambda: F.linear(xb, w16), F.linear(x, w)),
                "int8": (lambda: torch._weight_int8pack_mm(xb, q8, s8), F.linear(x, w8)),
                "int4": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, GROUP, scales), F.linear(x, w4)),
                **{f"runner {form[:4]}": ((lambda form=form: FORMATS[form].linear(x, kept[form], n)),
                                          F.linear(x, held[form])) for form in kept},
            }
            times = {side: median_ms(f, rounds) for side, (f, _) in sides.items()}
            errors = {side: relative_error(f(), reference) for side, (f, reference) in sides.items()}
            cells = [f"{side} {t:8.3f} ({times['fp32'] / t:4.2f}x, err {errors[side]:.0e})" for side, t in times.items()]
            print(f"{name:18} {n:>5}x{k:<5} rows {rows:>3}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
