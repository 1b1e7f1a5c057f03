"""Where each block computes, given where its weights live. Pure: sizes in, a device and a reason out.

- A block on a GPU computes there; a block on disk is streamed into the main device.
- A block on the CPU either computes on the CPU, sending its activations there and back, or has
  its weights copied to the main GPU for each forward: whichever takes less time for the tokens of
  one forward (``HOST_TO_DEVICE`` for every byte moved, ``CPU_FLOPS`` for the CPU's work; the GPU's
  own work is negligible beside both), as long as the GPU has room for the copy. Only a forward of
  a handful of tokens computes on the CPU. An embedding lookup always computes where its table
  sits: it reads a few rows, not the table.
"""
from __future__ import annotations

from dataclasses import dataclass

from runner.plan.blocks import Block
from runner.config.sizes import format_bytes

LOOKUPS = ("Embedding", "EmbeddingBag", "QuantEmbedding")  # blocks that read rows of their table
HOST_TO_DEVICE = 25e9  # bytes/s over PCIe 4.0 x16 from pinned memory, as measured on common machines
CPU_FLOPS = 200e9      # FLOP/s of a many-core server CPU on a matmul; a GPU is two or three orders faster


@dataclass(frozen=True)
class Compute:
    device: str
    streamed: bool   # weights copied in for each forward (disk blocks, and CPU blocks cheaper to move)
    reason: str


def compute_plan(blocks: tuple[Block, ...], block_devices: dict[str, str], main_device: str,
                 activation_bytes: dict[str, int], tokens: int, room: int, prefetch: int = 0,
                 itemsize: int = 4, kv_bytes: dict[str, int] | None = None) -> dict[str, Compute]:
    """block -> where it computes. ``activation_bytes``: per token flowing into each block; ``tokens``: of one
    forward; ``room``: bytes the main device can spare for weights copied in (what is left of its budget after the
    plan); up to ``1 + prefetch`` copies are held there at once; ``itemsize``: of a weight. A CPU block copied in
    keeps its KV cache (``kv_bytes``) on the main device for the whole run: that takes from the room for good."""
    kv_bytes = kv_bytes or {}
    out = {}
    for block in blocks:
        stored = block_devices[block.name]
        if stored == "disk":
            out[block.name] = Compute(main_device, True, f"streamed from disk into {main_device}")
        elif stored != "cpu" or not main_device.startswith("cuda:"):
            out[block.name] = Compute(stored, False, "resident")
        elif block.class_name in LOOKUPS:
            out[block.name] = Compute("cpu", False, "an embedding lookup computes where its table sits")
        elif block.tied_to is not None:  # its bytes are counted with the owner: a copy would move them unplanned
            out[block.name] = Compute("cpu", False, f"shares its weights with {block.tied_to}, which stays in place")
        else:
            # An expert sees only the tokens routed to it (Fiddler's case: few tokens, and it computes in place).
            routed = max(1, round(tokens * block.share)) if block.expert else tokens
            moved = 2 * routed * activation_bytes.get(block.name, 0)  # there and back
            on_cpu = moved / HOST_TO_DEVICE + 2 * routed * (block.nbytes // itemsize) / CPU_FLOPS
            copied = block.nbytes / HOST_TO_DEVICE
            kv = kv_bytes.get(block.name, 0)
            if copied < on_cpu and (1 + prefetch) * block.nbytes + kv <= room:
                room -= kv
                out[block.name] = Compute(main_device, True, f"copying its {format_bytes(block.nbytes)} of weights to "
                                          f"{main_device} (~{copied * 1e3:.3g} ms) costs less than computing {routed} "
                                          f"tokens on the CPU (~{on_cpu * 1e3:.3g} ms with their activations)")
            else:
                why = (f"{routed} tokens there, with their {format_bytes(moved)} of activations (~{on_cpu * 1e3:.3g} "
                       f"ms), cost less than copying its {format_bytes(block.nbytes)} of weights (~{copied * 1e3:.3g} "
                       "ms)" if copied >= on_cpu else f"{main_device} has no room to copy it in")
                out[block.name] = Compute("cpu", False, f"computes on the CPU: {why}")
    return out


def kv_where_computed(reserves: dict[str, dict[str, int]], compute: dict[str, Compute], block_devices: dict[str, str],
                      kv_bytes: dict[str, int]) -> dict[str, dict[str, int]]:
    """The plan's reserves with each CPU block's KV cache counted where the block computes: a block copied into the
    main GPU fills its cache there, not in RAM."""
    moved: dict[str, int] = {}
    for name, where in compute.items():
        if block_devices[name] == "cpu" and where.device != "cpu" and kv_bytes.get(name):
            moved[where.device] = moved.get(where.device, 0) + kv_bytes[name]
    if not moved:
        return reserves
    out = {device: dict(reasons) for device, reasons in reserves.items()}
    out["cpu"]["kv_cache"] -= sum(moved.values())
    if not out["cpu"]["kv_cache"]:
        del out["cpu"]["kv_cache"]
    for device, nbytes in moved.items():
        out.setdefault(device, {})["kv_cache"] = out.get(device, {}).get("kv_cache", 0) + nbytes
    return out


def pipeline_stagger(blocks: tuple[Block, ...], compute: dict[str, Compute]) -> int:
    """How many blocks apart micro-batches run (``runner.infer.column``): the longest run of blocks computing on one
    GPU, when the blocks compute on two GPUs or more and none is streamed (a streamed block is shared by all
    micro-batches at once, which a pipeline would hold in for the whole step); else 0."""
    if any(c.streamed for c in compute.values()):
        return 0
    runs: list[tuple[str, int]] = []  # (device, blocks in a row)
    for block in blocks:
        device = compute[block.name].device
        if runs and runs[-1][0] == device:
            runs[-1] = (device, runs[-1][1] + 1)
        else:
            runs.append((device, 1))
    gpus = {device for device, _ in runs if device.startswith("cuda:")}
    return max(n for device, n in runs if device.startswith("cuda:")) if len(gpus) > 1 else 0
