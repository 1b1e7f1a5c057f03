"""Stage 4: check a device map against the model on meta and the hardware, before any weight is read.

Errors (all found, then raised once): unknown or overlapping names, devices the hardware
lacks, tensors left uncovered, unsplittable blocks split, tied weights apart, budgets
exceeded. Warnings: GPU hops that go back along the forward order.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from runner.plan.blocks import ModelLayout
from runner.errors import MapError
from runner.plan.hardware import Hardware, cap_override
from runner.plan.planner import map_reserves, merge_reserves
from runner.plan.room import room_left
from runner.config.sizes import format_bytes


@dataclass(frozen=True)
class MapCheck:
    block_devices: dict[str, str]   # every block -> device, forward order
    loads: dict[str, int]           # device -> resident bytes
    warnings: tuple[str, ...]
    reserves: dict[str, dict[str, int]]  # what was counted against the budgets besides weights


def resolve_pins(pins: dict[str, str], layout: ModelLayout, hardware: Hardware) -> dict[str, str]:
    """A partial map (module -> device) as block -> device. A pin on a module covers every block under it; a more
    specific pin wins (``model.layers.0=cpu`` with ``model.layers.0.mlp.experts=disk``). A ``*`` in a key stands for
    one part of a module name: ``model.layers.*.mlp.experts`` pins every layer's experts.

    Raises:
        MapError: an unknown module or device, a pattern matching nothing, overlapping pins, or a pin inside an
            unsplittable block (or inside one expert).
    """
    pins, errors = expand_patterns(pins, layout)
    errors += _name_errors(pins, layout, hardware)
    blocks: dict[str, str] = {}
    for key, device in sorted(pins.items(), key=lambda kv: len(ancestors(kv[0]))):  # outer pins first
        under = [b.name for b in layout.blocks if covers(key, b.name)]
        inside = max((b for b in layout.blocks if b.name != key and covers(b.name, key)), key=lambda b: len(b.name),
                     default=None)
        if inside is not None and not (under and placed_apart(key, layout)):
            what = f"expert {inside.name}" if inside.expert else f"block {inside.name} ({inside.class_name})"
            errors.append(f"device_map.{_shown(key)}: it is inside {what}, which cannot be split across devices; "
                          f"pin {inside.name or '(the whole model)'} instead")
        for name in under:
            blocks[name] = device
    if errors:
        raise MapError(*errors)
    return blocks


def expand_patterns(pins: dict[str, str], layout: ModelLayout) -> tuple[dict[str, str], list[str]]:
    """Pins with every ``*`` key replaced by the module names it matches (``*``: one dotted part); the errors."""
    out, errors = {}, []
    names = sorted(layout.modules)
    for key, device in pins.items():
        if "*" not in key:
            out[key] = device
            continue
        pattern = re.compile(r"[^.]+".join(re.escape(part) for part in key.split("*")) + r"\Z")
        matched = [n for n in names if pattern.match(n)]
        if not matched:
            errors.append(f"device_map.{_shown(key)}: the pattern matches no module of the model ('*' stands for "
                          "one part of a dotted name, as in model.layers.*.mlp.experts)")
        for name in matched:
            out.setdefault(name, device)
    return out, errors


def placed_apart(key: str, layout: ModelLayout) -> bool:
    """Whether a map key names experts only: one expert, or a list of them (``model.layers.3.mlp.experts``), which a
    key for the layer around them may also cover."""
    experts = layout.expert_names
    return any(a in experts for a in ancestors(key)) or key in layout.expert_lists


def check_map(device_map: dict[str, str], layout: ModelLayout, hardware: Hardware,
              reserves: dict[str, dict[str, int]] | None = None,
              activation_bytes: dict[str, int] | None = None, kv_bytes: dict[str, int] | None = None,
              prefetch: int = 0, micro_batches: int = 1) -> MapCheck:
    """Validate a full map (module or tensor names -> device) for this model and hardware.

    ``reserves`` (device -> reason -> bytes) count against the budgets; a map that did not come from
    the planner also passes the blocks' ``kv_bytes``, so its own KV cache and disk staging count too;
    ``activation_bytes`` (block -> bytes per token flowing into it) sizes the hop warnings.

    Raises:
        MapError: one line per problem found.
    """
    errors = _name_errors(device_map, layout, hardware)
    slot_device: dict[str, str] = {}
    for slot in layout.tensor_bytes:
        key = next((k for k in ancestors(slot) if k in device_map), None)  # the most specific key covers it
        if key is not None:
            slot_device[slot] = device_map[key]

    block_devices: dict[str, str] = {}
    for block in layout.blocks:
        devices = sorted({slot_device[s] for s in block.tensors if s in slot_device})
        uncovered = [s for s in block.tensors if s not in slot_device]
        target = block.name or 'the key ""'
        if uncovered:
            errors.append(f"device_map: {block.name or 'the model'} ({block.class_name}) is not covered: "
                          f"{', '.join(uncovered[:3])}{' ...' if len(uncovered) > 3 else ''} have no device; "
                          f"add {target} to the map")
        elif len(devices) > 1:
            errors.append(f"device_map: block {block.name} ({block.class_name}) is split across "
                          f"{' and '.join(map(_shown, devices))}; it cannot be split, map it whole to one device")
        else:
            block_devices[block.name] = devices[0]

    for alias, owner in layout.ties.items():
        a, o = slot_device.get(alias), slot_device.get(owner)
        if a and o and a != o:
            errors.append(f"device_map: {alias} is tied to {owner} but they are on {a} and {o}; "
                          "tied weights must sit on one device")

    if kv_bytes is not None and not errors:
        reserves = merge_reserves(reserves or {}, map_reserves(block_devices, layout.blocks, kv_bytes,
                                                                hardware.main_device, prefetch, micro_batches))
    loads = {name: 0 for name in hardware.names}
    for slot, nbytes in layout.tensor_bytes.items():
        if slot not in layout.ties and slot in slot_device and slot_device[slot] in loads:
            loads[slot_device[slot]] += nbytes
    for name, load in loads.items():
        device = hardware.get(name)
        room = room_left(device, load, reserves or {})
        if room < 0:
            errors.append(f"device_map: {name} holds {format_bytes(device.budget - room)} but its budget is "
                          f"{format_bytes(device.budget)} ({format_bytes(-room)} over); move blocks off it or raise "
                          f"it ({cap_override(name)})")
    if errors:
        raise MapError(*errors)
    hops = _hop_warnings(block_devices, layout, activation_bytes or {}, hardware.main_device)
    return MapCheck(block_devices, loads, tuple(hops),
                    reserves or {})


def _hop_warnings(block_devices: dict[str, str], layout: ModelLayout, activation_bytes: dict[str, int],
                  main_device: str) -> list[str]:
    """A hop back to a GPU already left, or to a lower GPU id, moves the activations one extra time.

    Disk blocks count where they compute: on the main device.
    """
    warnings, visited = [], []
    previous = None
    for block in layout.blocks:
        if block.expert:  # its output returns to its layer's device: no hop along the forward order
            continue
        device = main_device if block_devices[block.name] == "disk" else block_devices[block.name]
        if not device.startswith("cuda:"):
            continue
        if previous and device != previous[1]:
            if device in visited or int(device[5:]) < int(previous[1][5:]):
                why = f" (it shares weights with {block.tied_to})" if block.tied_to else ""
                size = activation_bytes.get(block.name)
                cost = f" ({format_bytes(size)} per token)" if size else ""
                warnings.append(f"non-sequential GPU hop {previous[1]} -> {device} between {previous[0]} and "
                                f"{block.name}{why}: the activations make an extra trip{cost}")
        if device not in visited:
            visited.append(device)
        previous = (block.name, device)
    return warnings


def _name_errors(device_map: dict[str, str], layout: ModelLayout, hardware: Hardware) -> list[str]:
    errors = []
    names = layout.modules | set(layout.tensor_bytes)
    for key, device in device_map.items():
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "module names are dotted paths such as transformer.h.0"
            errors.append(f"device_map.{_shown(key)}: the model has no module or tensor named {key!r}; {hint}")
        if device not in hardware.names:
            errors.append(f"device_map.{_shown(key)}: device {device!r} is not in hardware={hardware.name}; "
                          f"expected one of {', '.join(hardware.names)}")
    for key in sorted(device_map):
        for outer in ancestors(key)[1:]:
            if outer in device_map and not placed_apart(key, layout):
                errors.append(f"device_map: {_shown(outer)} and {_shown(key)} overlap; map each module once")
    return errors


def _shown(key: str) -> str:
    """A map key as a message names it: as typed, or quoted where it holds a newline or another unprintable
    character, so that each finding stays one line."""
    return key if key and key.isprintable() else repr(key)


def ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``[a.b.c, a.b, a, ""]``: every map key that could cover it, most specific first."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def covers(key: str, name: str) -> bool:
    """Whether map key ``key`` covers module or tensor ``name`` ("" covers everything)."""
    return key == "" or name == key or name.startswith(key + ".")


def load_map_file(path: Path) -> dict[str, str]:
    """A map to check: ``device_map.json`` or ``plan.json`` (their ``device_map``), or a plain {module: device}.

    Raises:
        MapError: the file is missing, not JSON, or not a mapping of names to device strings.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MapError(f"map_file: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                       "expected a device_map.json, a plan.json or a JSON object of module -> device") from e
    if isinstance(data, dict) and isinstance(data.get("device_map"), dict):
        data = data["device_map"]
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise MapError(f"map_file: {path} is not a map; expected a JSON object of module -> device "
                       "(cpu, disk, cuda:N), or a file with such a 'device_map'")
    return data
