"""The devices a run may place weights on, each with the byte budget the planner may fill.

Real GPUs are detected through torch; simulated ones are declared in the profile and
backed by CPU tensors, but carry the same names (``cuda:N``) and budgets, so the
planner, the hooks and the byte accounting cannot tell them apart.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
import torch

from runner.run.launch import Launch, owned_gpus
from runner.config import HardwareSpec
from runner.errors import HardwareError
from runner.config.sizes import format_bytes

log = logging.getLogger(__name__)

DeviceKind = Literal["gpu", "cpu", "disk"]


@dataclass(frozen=True)
class Device:
    name: str           # "cuda:0", "cpu" or "disk"
    kind: DeviceKind
    budget: int         # bytes of weights the planner may put here
    simulated: bool = False

    @property
    def sort_key(self) -> int:
        """GPUs by id, then cpu, then disk: fastest memory first."""
        return int(self.name.split(":")[1]) if self.kind == "gpu" else {"cpu": 10**6, "disk": 10**6 + 1}[self.kind]


@dataclass(frozen=True)
class Hardware:
    name: str
    devices: tuple[Device, ...]  # GPUs by ascending id, then cpu, then disk

    @property
    def gpus(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.kind == "gpu")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    @property
    def main_device(self) -> str:
        """Where disk-offloaded blocks compute and where outputs land: the first GPU, else the CPU."""
        return self.gpus[0].name if self.gpus else "cpu"

    def get(self, name: str) -> Device:
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)


def cap_override(device: str) -> str:
    """How a user raises a device's budget on the command line (a key cannot hold a colon there)."""
    return f"+max_memory.{device.split(':')[1]}=<size>" if device.startswith("cuda:") else f"max_memory.{device}=<size>"


def detect_hardware(spec: HardwareSpec, max_memory: dict[str, int], offload_folder: Path,
                    launch: Launch | None = None) -> Hardware:
    """Budgets from the profile (or the machine), each replaced by its ``max_memory`` cap when one is set; under
    torchrun (``launch``), this rank's share of the node: its own GPUs and its part of the RAM.

    Raises:
        HardwareError: a GPU the profile names is not on this machine, or ``max_memory``
            names a device the profile lacks.
    """
    gpus = _gpu_budgets(spec)
    ranks_here = launch.local_world_size if launch is not None else 1
    node_cpu = spec.cpu if spec.cpu is not None else max(psutil.virtual_memory().available - spec.cpu_reserve, 0)
    cpu = node_cpu // ranks_here
    if launch is not None:
        count = len(gpus) if spec.simulated else torch.cuda.device_count()
        owned = {f"cuda:{i}" for i in owned_gpus(launch, count)}
        gpus = {name: budget for name, budget in gpus.items() if name in owned}
    devices = [Device(name, "gpu", budget, spec.simulated) for name, budget in gpus.items()]
    devices.sort(key=lambda d: d.sort_key)
    devices += [Device("cpu", "cpu", cpu), Device("disk", "disk", _free_disk(offload_folder))]
    names = [d.name for d in devices]
    unknown = [name for name in max_memory if name not in names]
    if unknown:
        raise HardwareError(*(f"max_memory: hardware={spec.name} has no device {name}; "
                              f"its devices are {', '.join(names)}" for name in unknown))
    for name, cap in max_memory.items():
        real = _real_size(spec, name, offload_folder)
        if real is not None and cap > real:
            log.warning("max_memory.%s: %s is more than this machine has (%s); a plan that fills it will fail "
                        "when it runs. Lower it, or leave it out to use what is there", name, format_bytes(cap),
                        format_bytes(real))
    devices = [Device(d.name, d.kind, max_memory.get(d.name, d.budget), d.simulated) for d in devices]
    for d in devices:
        log.debug("device %s: budget %s%s", d.name, format_bytes(d.budget), " (simulated)" if d.simulated else "")
    return Hardware(spec.name, tuple(devices))


def _gpu_budgets(spec: HardwareSpec) -> dict[str, int]:
    if spec.simulated:
        return dict(spec.gpus or {})
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec.gpus is None:  # detect: the free memory (the planner keeps the CUDA context's share free)
        return {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(count)}
    missing = [name for name in spec.gpus if int(name.split(":")[1]) >= count]
    if missing:
        raise HardwareError(f"hardware.gpus: {', '.join(missing)} not found; this machine has {count} CUDA GPU(s). "
                            "Use hardware=auto, or a simulated profile such as hardware=sim_2gpu")
    return dict(spec.gpus)


def _real_size(spec: HardwareSpec, name: str, offload_folder: Path) -> int | None:
    """What this machine really has for a device whose figure was detected (None: declared by the profile, or
    simulated, so there is nothing here to compare with): all the RAM, the disk's free space, a GPU's memory."""
    if name == "cpu":
        return psutil.virtual_memory().total if spec.cpu is None else None
    if name == "disk":
        return _free_disk(offload_folder)
    if spec.simulated or spec.gpus is not None:
        return None
    return torch.cuda.mem_get_info(int(name.split(":")[1]))[1]


def _free_disk(folder: Path) -> int:
    probe = _nearest_existing(folder)
    try:
        return shutil.disk_usage(probe if probe.is_dir() else probe.parent).free
    except OSError:
        return 0


def _nearest_existing(folder: Path) -> Path:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def offload_folder_problem(folder: Path) -> str | None:
    """Why disk blocks could not be kept in ``folder``, in a few words; None if it looks usable."""
    probe = _nearest_existing(folder)
    if not probe.is_dir():
        return f"cannot be a folder: {probe} is a file"
    try:
        if shutil.disk_usage(probe).total == 0:
            return f"is on a filesystem with no storage ({probe} is in a virtual filesystem such as /proc)"
    except OSError as e:
        return f"cannot be used ({e.strerror or e})"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"is not writable ({probe} is read-only to this user)"
    return None
