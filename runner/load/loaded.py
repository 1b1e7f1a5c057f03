"""Loading, once a plan is validated: open the weights (writing synthetic ones if needed), check their keys, and
stream each tensor to the device its block was planned on. The ``Engine`` (``runner.infer.engine``) calls it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from runner.errors import CheckpointError, OffloadError
from runner.load.checkpoint import Checkpoint, check_keys, open_checkpoint
from runner.load.build import build_skeleton
from runner.load.dispatch import dispatch
from runner.load.memory import MemoryLedger, plan_held, reset_peak_rss, transients_unmapped
from runner.load.offload import Prefetcher
from runner.load.packed import pack_linears
from runner.plan.blocks import ModelLayout
from runner.plan.planned import Planned, offload_folder, timed
from runner.plan.room import room_left

log = logging.getLogger(__name__)


@dataclass
class Loaded(Planned):
    """A planned run, loaded."""

    ledger: MemoryLedger | None = None
    baseline_rss: int = 0  # the process's resident bytes just before the weights were loaded (interpreter, torch)
    streams: Prefetcher | None = None  # brings streamed blocks in; micro-batches share its loads


def load(planned: Planned, run_dir: Path) -> Loaded:
    """Open the weights (writing synthetic ones if needed), check their keys, and dispatch them as planned."""
    cfg = planned.config
    timings = planned.timings
    with timed(timings, "checkpoint"):
        checkpoint = planned.checkpoint or _synthetic(planned)
        keys = planned.keys or check_keys(checkpoint, planned.model, planned.layout)
        if keys.ignored:
            log.info("Ignoring checkpoint tensors the model does not load: %s", ", ".join(keys.ignored))
    if cfg.checkpoint.check_finite:
        with timed(timings, "check_finite"):
            _check_finite(checkpoint, planned.layout)
    if "disk" in planned.check.block_devices.values():
        _check_offload_folder(offload_folder(cfg, run_dir), checkpoint)
    ledger = MemoryLedger(planned.hardware)
    reset_peak_rss()  # the CPU's measured peak is then this run's, not the process's whole life's
    baseline = psutil.Process().memory_info().rss
    with timed(timings, "load"), plan_held(planned.hardware, planned.check.loads, planned.plan.reserves,
                                            "loading the weights"):
        with transients_unmapped():
            main = planned.hardware.main_device
            spare = room_left(planned.hardware.get(main), planned.check.loads[main], planned.plan.reserves)
            streams = dispatch(planned, checkpoint, ledger, offload_folder=offload_folder(cfg, run_dir),
                               prefetch=cfg.placement.prefetch, direct_io=cfg.placement.direct_io,
                               expert_cache=max(spare, 0))  # the room the plan left free
        if cfg.task.decodes and not streams.streaming and "cpu" in planned.hardware.names:  # nor the experts' room
            cpu = planned.hardware.get("cpu")
            blocks = {b for b, c in planned.compute.items()
                      if c.device == "cpu" and planned.check.block_devices.get(b) == "cpu"}
            room = room_left(cpu, planned.check.loads.get("cpu", 0), planned.plan.reserves)
            room -= planned.prefixes.nbytes if planned.prefixes else 0  # the prefix cache's, first
            pack_linears(planned.model, planned.layout, cpu_blocks=blocks, room=room, ledger=ledger,
                         rows=cfg.runtime.rows_in_flight)
    fields = {k: getattr(planned, k) for k in Planned.__dataclass_fields__}
    return Loaded(**{**fields, "checkpoint": checkpoint, "keys": keys}, ledger=ledger, baseline_rss=baseline,
                     streams=streams)


def _synthetic(planned: Planned) -> Checkpoint:
    """Synthetic weights, drawn in full precision (from a skeleton of their own where some are kept quantized)."""
    cfg = planned.config
    drawn_from = build_skeleton(cfg.model) if planned.quantization.kept else planned.model
    return planned.quantization.wrap(open_checkpoint(cfg.checkpoint, cfg.model, type(planned.model), drawn_from))


def _check_finite(checkpoint: Checkpoint, layout: ModelLayout) -> None:
    """``checkpoint.check_finite``: every weight the model loads, read once and checked for NaN and Inf.

    Raises:
        CheckpointError: one line per tensor that holds any, with their count and its file.
    """
    bad = []
    for key in layout.tensor_bytes:
        if key in layout.ties or key in layout.non_persistent or key not in checkpoint.entries:
            continue
        tensor = checkpoint.read_uncached(key)
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{checkpoint.entries[key].file}: tensor {key} holds {count} NaN or Inf value(s) of "
                           f"{tensor.numel()}; the checkpoint is corrupt: re-download or re-export it")
    if bad:
        raise CheckpointError(*bad)


def _check_offload_folder(folder: Path, checkpoint: Checkpoint) -> None:
    """Converted blocks never land beside the user's weights, where the next run would read them as the checkpoint's.

    Raises:
        OffloadError: ``folder`` is, or lies inside, a folder holding the checkpoint's files.
    """
    target = folder.expanduser().resolve()
    for home in sorted({f.resolve().parent for f in checkpoint.files}):
        if target == home or home in target.parents:
            raise OffloadError(f"offload.folder: {folder} lies inside the checkpoint's folder {home}; converted "
                               "blocks would be written beside its weights. Point offload.folder elsewhere")

