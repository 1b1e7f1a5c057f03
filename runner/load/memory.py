"""Per-device byte accounting of the weights the runner holds, for real and simulated devices alike.

On simulated GPUs this is the only memory accounting there is, so the ledger enforces
their budgets: going over raises as a real GPU's allocator would.
"""
from __future__ import annotations

import contextlib
import errno
import re
import resource
import threading
from collections.abc import Iterator

import torch

from runner.errors import OutOfMemory, SimulatedOutOfMemory
from runner.plan.hardware import Hardware, cap_override
from runner.config.sizes import format_bytes

_UNITS = {"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_CUDA_ASK = re.compile(r"Tried to allocate ([\d.]+) (bytes|B|KiB|MiB|GiB|TiB)")  # torch's CUDA caching allocator
_CUDA_GPU = re.compile(r"GPU (\d+)")
_CPU_ASK = re.compile(r"tried to allocate (\d+) bytes")  # torch's DefaultCPUAllocator


class MemoryLedger:
    def __init__(self, hardware: Hardware):
        self.budgets = {d.name: d.budget for d in hardware.devices}
        self._enforced = {d.name for d in hardware.devices if d.simulated}
        self.current = dict.fromkeys(self.budgets, 0)
        self.peak = dict.fromkeys(self.budgets, 0)
        self._lock = threading.Lock()

    def allocate(self, device: str, nbytes: int, what: str) -> None:
        with self._lock:  # the prefetch thread allocates too
            self._allocate(device, nbytes, what)

    def _allocate(self, device: str, nbytes: int, what: str) -> None:
        self.current[device] += nbytes
        if device in self._enforced and self.current[device] > self.budgets[device]:
            self.current[device] -= nbytes
            raise SimulatedOutOfMemory(
                f"{device} (simulated) is out of memory: {what} needs {format_bytes(nbytes)}, "
                f"{format_bytes(self.budgets[device] - self.current[device])} of its "
                f"{format_bytes(self.budgets[device])} budget is free")
        self.peak[device] = max(self.peak[device], self.current[device])

    def release(self, device: str, nbytes: int) -> None:
        with self._lock:
            self.current[device] -= nbytes


@contextlib.contextmanager
def plan_held(hardware: Hardware, loads: dict[str, int], reserves: dict[str, dict[str, int]],
              doing: str) -> Iterator[None]:
    """A real allocation that fails although the plan fitted (CUDA out of memory, the CPU allocator refusing, a
    ``MemoryError``) becomes one line: the device, the bytes asked for, the plan's figure there, and what to lower.
    ``loads`` and ``reserves`` are the plan's bytes of weights and of reserves per device."""
    try:
        yield
    except (RuntimeError, MemoryError, OSError) as e:
        failed = failed_allocation(e, hardware)
        if failed is None:
            raise
        device, asked = failed
        planned = loads.get(device, 0) + sum(reserves.get(device, {}).values())
        budget = hardware.get(device).budget if device in hardware.names else 0
        what = f"an allocation of {format_bytes(asked)}" if asked is not None else "an allocation"
        raise OutOfMemory(f"{device}: out of memory {doing}: {what} failed, with {format_bytes(planned)} planned "
                          f"there ({format_bytes(loads.get(device, 0))} of weights and the rest reserved) within its "
                          f"budget of {format_bytes(budget)}; the device has less free than that budget: lower it "
                          f"({cap_override(device)}) or runtime.batch_size") from None


def failed_allocation(e: BaseException, hardware: Hardware) -> tuple[str, int | None] | None:
    """(device, bytes asked for, when the message says) of a failed real allocation; None for any other error."""
    message = str(e)
    if isinstance(e, torch.OutOfMemoryError) or "CUDA out of memory" in message:
        gpu = _CUDA_GPU.search(message)
        device = f"cuda:{gpu[1]}" if gpu else hardware.main_device
        ask = _CUDA_ASK.search(message)
        return device, int(float(ask[1]) * _UNITS[ask[2]]) if ask else None
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
        return "cpu", None
    if isinstance(e, RuntimeError) and ("DefaultCPUAllocator" in message or "can't allocate memory" in message):
        ask = _CPU_ASK.search(message)
        return "cpu", int(ask[1]) if ask else None
    return None


@contextlib.contextmanager
def transients_unmapped() -> Iterator[None]:
    """While loading, every allocation of 1 MiB or more gets its own mapping, given back to the system when freed:
    tensors read to be cast or quantized come and go between the weights that stay, and from glibc's heap they
    would leave holes it cannot return. Afterwards the threshold is glibc's own ceiling (32 MiB), so a decode
    step's buffers are reused as before. A no-op where there is no glibc."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        trim = _glibc("malloc_trim")
        if trim is not None:
            trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _glibc(name: str):
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS mark afresh (VmHWM := VmRSS), so a peak read later is the peak since now and
    not of whatever the process did before (a long-lived Python session, a test suite); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The process's peak resident bytes: since the last ``reset_peak_rss`` where the kernel says, else lifetime."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
