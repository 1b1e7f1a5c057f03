"""The whole run, top to bottom: build -> checkpoint -> plan -> validate -> load -> generate.

Takes a typed ``RunConfig`` and a run folder; knows nothing of Hydra. Each stage lives in
its own module; this file only orders them and times them.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from runner.blocks import ModelLayout, describe_model
from runner.build import build_skeleton
from runner.checkpoint import Checkpoint, KeyReport, check_keys, open_checkpoint
from runner.config import RunConfig
from runner.dispatch import dispatch
from runner.errors import BuildError
from runner.hardware import Hardware, detect_hardware
from runner.infer import Prediction, greedy_generate
from runner.memory import MemoryLedger
from runner.planner import Plan, plan_device_map
from runner.tokenizer import ByteTokenizer
from runner.validate import MapCheck, check_map, resolve_pins

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Everything the report needs; also what tests inspect."""

    config: RunConfig
    dtype: torch.dtype
    hardware: Hardware
    layout: ModelLayout
    plan: Plan
    check: MapCheck
    checkpoint: Checkpoint
    keys: KeyReport
    ledger: MemoryLedger
    model: nn.Module
    predictions: list[Prediction] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def prepare(cfg: RunConfig, run_dir: Path) -> RunResult:
    """Every stage up to a dispatched model, ready to run."""
    timings: dict[str, float] = {}
    with _timed(timings, "build"):
        model = build_skeleton(cfg.model)
    # Headers only; synthetic weights are written after the map is validated, when we know they are needed.
    checkpoint = None if cfg.checkpoint.source == "synthetic" else open_checkpoint(cfg.checkpoint, cfg.model, model)
    dtype = _compute_dtype(cfg, checkpoint)
    offload_folder = cfg.placement.offload_folder or run_dir / "offload"
    with _timed(timings, "plan"):
        layout = describe_model(model, cfg.model.no_split_module_classes, dtype)
        hardware = detect_hardware(cfg.hardware, cfg.placement.max_memory, offload_folder)
        pins = resolve_pins(cfg.placement.device_map, layout, hardware)
        log.info("Planning %s over %s with strategy %s", cfg.model.name, ", ".join(hardware.names),
                 cfg.placement.strategy)
        plan = plan_device_map(layout.blocks, hardware.devices, cfg.placement.strategy, pins, hardware.main_device)
    with _timed(timings, "validate"):
        check = check_map(plan.device_map, layout, hardware, plan.reserves)
        for warning in check.warnings:
            log.warning(warning)
    with _timed(timings, "checkpoint"):
        checkpoint = checkpoint or open_checkpoint(cfg.checkpoint, cfg.model, model)
        keys = check_keys(checkpoint, model, layout)
        if keys.ignored:
            log.info("Ignoring checkpoint tensors the model does not load: %s", ", ".join(keys.ignored))
    ledger = MemoryLedger(hardware)
    with _timed(timings, "load"):
        dispatch(model, layout, check.block_devices, hardware, checkpoint, dtype, offload_folder, ledger)
    return RunResult(cfg, dtype, hardware, layout, plan, check, checkpoint, keys, ledger, model, timings=timings)


def run(cfg: RunConfig, run_dir: Path) -> RunResult:
    """Prepare, then generate for every prompt."""
    torch.manual_seed(cfg.seed)
    result = prepare(cfg, run_dir)
    vocab = cfg.model.arch.get("vocab_size")
    if not isinstance(vocab, int):
        raise BuildError("model.arch.vocab_size: the byte tokenizer needs the model's vocabulary size")
    context = getattr(result.model, "block_size", 1 << 30)
    with _timed(result.timings, "generate"):
        result.predictions = greedy_generate(result.model, ByteTokenizer(vocab), cfg.generation.prompts,
                                             cfg.generation.max_new_tokens, context)
    return result


def _compute_dtype(cfg: RunConfig, checkpoint: Checkpoint | None) -> torch.dtype:
    """``dtype: auto`` is the checkpoint's own (a synthetic one's is in its spec)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return checkpoint.dtype if checkpoint else getattr(torch, cfg.checkpoint.dtype)


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 4)
