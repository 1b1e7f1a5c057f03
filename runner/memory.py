"""Per-device byte accounting of the weights the runner holds, for real and simulated devices alike.

On simulated GPUs this is the only memory accounting there is, so the ledger enforces
their budgets: going over raises as a real GPU's allocator would.
"""
from __future__ import annotations

import resource
import threading

from runner.errors import SimulatedOutOfMemory
from runner.hardware import Hardware
from runner.sizes import format_bytes


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
