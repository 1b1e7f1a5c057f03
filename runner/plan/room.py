"""Room on a device: its budget, less the weights placed on it and what it keeps free for the run (reserves).

Pure arithmetic, the one place the planner, the map check, the explanation and the report take it from.
"""
from __future__ import annotations

from runner.plan.hardware import Device


def reserved(reserves: dict[str, dict[str, int]], device: str) -> int:
    """Bytes ``device`` keeps free beyond weights: the sum of its reserves (device -> reason -> bytes)."""
    return sum(reserves.get(device, {}).values())


def room_left(device: Device, weights: int, reserves: dict[str, dict[str, int]]) -> int:
    """What is left of ``device``'s budget after ``weights`` bytes of weights and its reserves; negative when over."""
    return device.budget - weights - reserved(reserves, device.name)
