"""Which floating-point type a run computes in when the config says ``dtype: auto``, and why.

bfloat16 halves the bytes of every weight and activation; where the hardware multiplies it natively (CPUs with
AMX or AVX-512 BF16, GPUs from Ampere on) it also runs matmuls about twice as fast as float32, and ``auto``
picks it for a float32 checkpoint, as vLLM does. Elsewhere bf16 is emulated: on an AVX2 CPU torch's bf16 matmuls
run ~5x slower than float32, so ``auto`` keeps float32 there, and a checkpoint stored in float16 or bfloat16
computes in its own type.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from runner.plan.hardware import Hardware

EMULATED_SLOWDOWN = 5  # bf16 matmuls against float32 on an AVX2 CPU (2 cores, torch 2.13: ~19 against ~110 GFLOPS)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux); none elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def native_bf16(hardware: Hardware) -> tuple[bool, str]:
    """Whether the main device multiplies bf16 natively, and the evidence, in words."""
    main = hardware.get(hardware.main_device)
    if main.kind == "gpu" and not main.simulated:
        index = int(hardware.main_device.split(":")[1])
        major, minor = torch.cuda.get_device_capability(index)
        return major >= 8, f"{hardware.main_device} is compute capability {major}.{minor}"
    told = os.environ.get("RUNNER_NATIVE_BF16")
    if told in ("0", "1"):  # as on another CPU: a replay's, or a test suite's that must not depend on this one
        return told == "1", f"RUNNER_NATIVE_BF16={told}"
    flags = cpu_flags()
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    return False, "this CPU has neither AMX nor AVX-512 BF16"


def auto_dtype(stored: torch.dtype, hardware: Hardware) -> tuple[torch.dtype, str]:
    """``dtype: auto`` for a checkpoint stored in ``stored``: the type, and why."""
    native, evidence = native_bf16(hardware)
    if stored == torch.float32 and native:
        return torch.bfloat16, f"auto: bfloat16, native here ({evidence})"
    if stored == torch.float32:
        return stored, f"auto: float32, as stored; bf16 would be emulated here ({evidence})"
    return stored, f"auto: the checkpoint's own {str(stored).removeprefix('torch.')}"


def emulated_bf16_warning(dtype: torch.dtype, hardware: Hardware) -> str | None:
    """A line for a run set to bf16 where the hardware only emulates it; None where it does not apply."""
    if dtype != torch.bfloat16:
        return None
    native, evidence = native_bf16(hardware)
    if native:
        return None
    return (f"dtype=bfloat16 on hardware that emulates it ({evidence}): expect matmuls ~{EMULATED_SLOWDOWN}x slower "
            "than float32; dtype=auto or float32 runs faster where the memory allows")
