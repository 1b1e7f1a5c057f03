"""Planning, top to bottom: build on meta -> read checkpoint headers -> plan -> validate. Allocates no weight memory.

Takes a typed ``RunConfig`` and a run folder; knows nothing of Hydra. Each stage lives in its own module; this
one orders and times them. Loading the weights is ``runner.load.loaded``; the ``Engine`` (``runner.infer.engine``)
does both, and is the way in for everything that runs a model.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from runner.config import CheckpointSpec, RunConfig, RuntimeSpec
from runner.config.sizes import format_bytes
from runner.errors import CheckpointError, ConfigError, OffloadError, PlanError
from runner.infer.model import context_length
from runner.load.build import build_skeleton, model_class, no_split_classes, resolve_arch
from runner.load.architecture import choose_model
from runner.load.checkpoint import Checkpoint, KeyReport, check_keys, open_stored, seen_as
from runner.load.checkpoint.synthetic import synthetic_checkpoint
from runner.plan.arithmetic import auto_dtype, emulated_bf16_warning
from runner.plan.blocks import ModelLayout, describe_model
from runner.plan.compute import Compute, compute_plan, kv_where_computed
from runner.plan.hardware import Hardware, detect_hardware, offload_folder_problem
from runner.plan.order import ForwardTrace, forward_order
from runner.plan.planner import Plan, PlanRequest, plan_device_map
from runner.plan.reserves import LOGITS, device_reserves, keeps_kv_cache, kv_bytes
from runner.plan.room import reserved, room_left
from runner.plan.split import PipelineError, keep_stage, layer_costs, split
from runner.plan.validate import MapCheck, check_map, load_map_file, resolve_pins
from runner.quant import Quantization, quantize_model
from runner.run import launch as collective
from runner.run.launch import Launch

log = logging.getLogger(__name__)
PREFIX_AUTO = 4096  # positions of prompt prefixes kept across a job when runtime.prefix_cache is null


@dataclass
class Planned:
    """Everything known before a weight is read: the model on meta, the hardware, the plan and its check."""

    config: RunConfig
    model: nn.Module
    dtype: torch.dtype
    hardware: Hardware
    layout: ModelLayout
    trace: ForwardTrace
    request: PlanRequest
    plan: Plan
    check: MapCheck
    compute: dict[str, Compute]        # where each block runs, and why
    checkpoint: Checkpoint | None
    keys: KeyReport | None
    timings: dict[str, float] = field(default_factory=dict)
    quantization: Quantization = Quantization(None)  # which weights are kept quantized, and as what
    dtype_why: str = ""  # how the compute dtype was chosen (runner.plan.arithmetic)
    prefixes: PrefixRoom | None = None  # generation's prefix cache, in the room the plan leaves free


def open_source(cfg: RunConfig) -> tuple[RunConfig, Checkpoint | None]:
    """The checkpoint's headers under the model's names, no tensor read, and the config with its model made
    concrete (``model=auto``: the class the checkpoint's own config names). None for synthetic weights, which are
    written after the map is validated, when we know they are needed."""
    if cfg.checkpoint.source == "synthetic":
        if cfg.model.auto:
            raise ConfigError("model=auto: synthetic weights carry no config to read the architecture from; "
                              "pick a model config (model=gpt2tiny, model=seq100b, ...) or a real checkpoint")
        return cfg, None
    stored = open_stored(cfg.checkpoint)
    model = choose_model(cfg.model, stored, checkpoint_name(cfg.checkpoint)) if cfg.model.auto else cfg.model
    return replace(cfg, model=model), seen_as(stored, model_class(model))


def checkpoint_name(spec: CheckpointSpec) -> str:
    """What a model chosen from its checkpoint is called in logs and reports: the Hub repo, the folder, the file."""
    if spec.source == "hub":
        return str(spec.repo_id)
    assert spec.path is not None  # local and gguf sources have one
    path = spec.path.expanduser()
    return path.stem if path.is_file() and spec.source == "gguf" else (path if path.is_dir() else path.parent).name


def plan(cfg: RunConfig, run_dir: Path, checkpoint: Checkpoint | None = None, launch: Launch | None = None
         ) -> Planned:
    """Build on meta, read checkpoint headers (if any), plan and validate. Allocates no weight memory.

    ``checkpoint``: headers already opened with ``open_source`` (else they are opened here). ``launch``: this
    rank's place under torchrun, or the rank a cluster is sized for: its stage, its GPUs, its share of RAM.
    """
    timings: dict[str, float] = {}
    if checkpoint is None:
        with timed(timings, "checkpoint"):
            cfg, checkpoint = open_source(cfg)
    with timed(timings, "build"):
        arch = resolve_arch(cfg.model, checkpoint.config() if checkpoint else None, cfg.checkpoint.source)
        model_spec = replace(cfg.model, arch=arch)
        model = build_skeleton(model_spec)
    cfg = replace(cfg, model=model_spec)
    if cfg.parallel.mode == "pipeline":  # this rank's stage only, from here on
        cfg, model, checkpoint = _pipeline_stage(cfg, model, checkpoint, launch)
    cfg = _within_context(cfg, context_length(model))
    hardware = detect_hardware(cfg.hardware, cfg.placement.max_memory, offload_folder(cfg, run_dir), launch)
    dtype, dtype_why = _compute_dtype(cfg, checkpoint, hardware)
    emulated = emulated_bf16_warning(dtype, hardware)
    if emulated:
        log.warning(emulated)
    with timed(timings, "build"):
        quantization = quantize_model(model, checkpoint, cfg.quantize, keep_gguf=cfg.dtype == "auto", dtype=dtype)
        checkpoint = quantization.wrap(checkpoint) if checkpoint is not None else None
    with timed(timings, "plan"):
        cfg = replace(cfg, model=replace(cfg.model, no_split_module_classes=no_split_classes(cfg.model, model)))
        layout = describe_model(model, cfg.model.no_split_module_classes, dtype, cfg.placement.experts_apart)
        trace = forward_order(model, layout)
        layout = layout.in_order(trace.order)
        pins = resolve_pins(cfg.placement.device_map, layout, hardware)

        def request_for(shape: RuntimeSpec) -> PlanRequest:
            return PlanRequest(
                blocks=layout.blocks, devices=hardware.devices, strategy=cfg.placement.strategy,
                main_device=hardware.main_device, pins=pins,
                reserves=device_reserves(hardware, trace, shape, dtype.itemsize, cfg.hardware.cuda_context_reserve,
                                         logits=LOGITS[cfg.task.name]),
                # Only generation keeps keys and values between forwards; scoring and embedding run one forward.
                kv_bytes=kv_bytes(model, layout, trace, cfg.model.no_split_module_classes, shape, dtype.itemsize)
                if cfg.task.decodes and keeps_kv_cache(model) else {},
                allow_disk=cfg.placement.allow_disk, prefetch=cfg.placement.prefetch, micro_batches=shape.micro_batches)

        request = request_for(cfg.runtime)
        activation_bytes = {name: n * dtype.itemsize for name, n in trace.input_elems.items()}
        if cfg.mode == "check":  # the map comes from a file, to be validated as it is
            assert cfg.map_file is not None  # load_config requires it in this mode
            check = check_map(load_map_file(cfg.map_file), layout, hardware, request.reserves, activation_bytes,
                              request.kv_bytes, request.prefetch, request.micro_batches)
            the_plan = Plan(check.block_devices, _weights_per_device(layout, check.block_devices, hardware),
                            check.reserves, "check")
        else:
            log.info("Planning %s over %s with strategy %s", cfg.model.name, ", ".join(hardware.names),
                     cfg.placement.strategy)
            the_plan = _plan_or_blame(request, cfg, offload_folder(cfg, run_dir), request_for)
    with timed(timings, "validate"):
        check = check_map(the_plan.device_map, layout, hardware, the_plan.reserves, activation_bytes)
        if cfg.mode != "check" and len(pins) == len(layout.blocks):  # the strategy had nothing left to place
            check = replace(check, warnings=(*check.warnings, f"placement.strategy: {cfg.placement.strategy} was not "
                                             "used: device_map pins every block, so the map is the one given"))
        for warning in check.warnings:
            log.warning(warning)
        keys = _keys_of(cfg, checkpoint, model, layout) if checkpoint else None
        main = hardware.main_device
        room = room_left(hardware.get(main), check.loads[main], the_plan.reserves)
        # Generation's forwards are its decode steps: one token per sequence in flight, every micro-batch sharing
        # each block's copy. Scoring and embedding run whole sequences.
        tokens = cfg.runtime.rows_in_flight if cfg.task.decodes else cfg.runtime.batch_size * cfg.runtime.seq_len
        compute = compute_plan(layout.blocks, check.block_devices, main, activation_bytes, tokens, room,
                               cfg.placement.prefetch, dtype.itemsize, request.kv_bytes)
        the_plan = replace(the_plan, reserves=kv_where_computed(the_plan.reserves, compute, check.block_devices,
                                                                request.kv_bytes))
        if quantization.kept:
            _check_quantized_on_cpu(compute, hardware, cfg.quantize)
        prefixes = _prefix_positions(cfg, request, hardware, check.loads, the_plan.reserves)
    return Planned(cfg, model, dtype, hardware, layout, trace, request, the_plan, check, compute, checkpoint, keys,
                   timings, quantization, dtype_why, prefixes)


def _prefix_positions(cfg: RunConfig, request: PlanRequest, hardware: Hardware, loads: dict[str, int],
                      reserves: dict[str, dict[str, int]]) -> PrefixRoom:
    """The positions of prompt prefixes generation keeps across the job (``runtime.prefix_cache``), in the room the
    plan leaves free on the devices that compute: as set, or (null) what half that room holds, up to
    ``PREFIX_AUTO``.

    Raises:
        PlanError: a set size whose keys and values do not fit that room.
    """
    runtime = cfg.runtime
    assert runtime.seq_len is not None  # derived before planning
    if not cfg.task.decodes or not request.kv_bytes or runtime.prefix_cache == 0:
        return PrefixRoom(0, 0)
    per_position = sum(request.kv_bytes.values()) / (runtime.rows_in_flight * runtime.seq_len)
    free = sum(max(room_left(d, loads.get(d.name, 0), reserves), 0) for d in hardware.devices if d.kind != "disk")
    fits = int(free // per_position)
    if runtime.prefix_cache is None:
        positions = min(PREFIX_AUTO, fits // 2)
    elif runtime.prefix_cache > fits:
        raise PlanError(f"runtime.prefix_cache: {runtime.prefix_cache} positions of prefix keys and values need "
                        f"{format_bytes(runtime.prefix_cache * per_position)}, and the plan leaves "
                        f"{format_bytes(free)} free beside weights and reserves ({fits} positions); lower "
                        "runtime.prefix_cache (0: none kept), or raise max_memory")
    else:
        positions = runtime.prefix_cache
    return PrefixRoom(positions, int(positions * per_position))


@dataclass(frozen=True)
class PrefixRoom:
    """The job's prefix cache: positions, and the bytes of keys and values they take at most."""

    positions: int
    nbytes: int


def _check_quantized_on_cpu(compute: dict[str, Compute], hardware: Hardware, setting: str | None) -> None:
    """Quantized weights compute with torch's CPU kernels (simulated GPUs are CPU tensors, so they qualify).

    Raises:
        PlanError: a block would compute on a real GPU, naming the setting that kept weights quantized.
    """
    gpus = sorted({c.device for c in compute.values()
                   if c.device.startswith("cuda:") and not hardware.get(c.device).simulated})
    if gpus:
        key = f"quantize={setting}" if setting else "dtype=auto on a quantized GGUF"
        raise PlanError(f"{key}: quantized weights compute on the CPU only, and this plan computes on {gpus[0]}; "
                        "set dtype=float16 or bfloat16 to dequantize them for the GPU (and quantize=null)")


def _keys_of(cfg: RunConfig, checkpoint: Checkpoint, model: nn.Module, layout: ModelLayout) -> KeyReport:
    """The key check; where ``model=auto`` chose the class, a mismatch says the config may not be these weights'."""
    try:
        return check_keys(checkpoint, model, layout)
    except CheckpointError as e:
        if cfg.model.chosen_from is None:
            raise
        raise CheckpointError(f"{cfg.model.chosen_from} does not describe these weights (it reads as "
                              f"{cfg.model.arch['_target_']}); the config and the weights disagree:", *e.lines) from e


def _pipeline_stage(cfg: RunConfig, model: nn.Module, checkpoint: Checkpoint | None, launch: Launch | None
                    ) -> tuple[RunConfig, nn.Module, Checkpoint | None]:
    """This rank's stage of the model (``runner.plan.split``), and the checkpoint it reads its part from: synthetic
    weights are written once, whole, by rank 0, and read by every stage as a local checkpoint."""
    if launch is None:
        raise PipelineError("parallel.mode=pipeline: this process was not started by torchrun; run torchrun "
                            "--nproc-per-node=N -m runner parallel.mode=pipeline ...")
    if checkpoint is None and cfg.mode == "run":  # (a plan reads no weights: a synthetic model's are not written)
        folder = collective.agree_or_raise(lambda: str(synthetic_checkpoint(cfg.checkpoint, cfg.model, model)))
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, source="local", path=Path(folder)))
        cfg, checkpoint = open_source(cfg)
    costs, _, head = layer_costs(model, 1)
    stages = split(costs, first_extra=0, last_extra=head, ranks=launch.world_size)
    log.info("Pipeline stages: %s", stages.describe())
    return cfg, keep_stage(model, stages.parts[launch.rank]), checkpoint


def _weights_per_device(layout: ModelLayout, block_devices: dict[str, str], hardware: Hardware) -> dict[str, int]:
    loads = dict.fromkeys(hardware.names, 0)
    for block in layout.blocks:
        loads[block_devices[block.name]] += block.nbytes
    return loads


def _within_context(cfg: RunConfig, context: int | None) -> RunConfig:
    """No sequence outgrows the model's context, so neither does the cache planned for it. Unset (rows from a
    file, not read ahead), the length is the model's context: any row that fits the model fits the plan."""
    if cfg.runtime.seq_len is None:
        if context is None:
            raise ConfigError(f"runtime.seq_len: {cfg.model.name} does not say how long a sequence it takes; "
                              "set runtime.seq_len to the longest row plus new tokens")
        log.info("runtime.seq_len: planning for the model's context of %d tokens (set runtime.seq_len to the "
                 "longest row plus new tokens to plan for less)", context)
        return replace(cfg, runtime=replace(cfg.runtime, seq_len=context))
    if context is None or cfg.runtime.seq_len <= context:
        return cfg
    log.info("runtime.seq_len %d is past the model's context of %d tokens: planning for %d",
             cfg.runtime.seq_len, context, context)
    return replace(cfg, runtime=replace(cfg.runtime, seq_len=context))


def offload_folder(cfg: RunConfig, run_dir: Path) -> Path:
    return cfg.placement.offload_folder or run_dir / "offload"


def _plan_or_blame(request: PlanRequest, cfg: RunConfig, folder: Path,
                   request_for: Callable[[RuntimeSpec], PlanRequest]) -> Plan:
    """The plan. When there is none, and the culprit is a setting the planner cannot see, that setting is named:
    a batch shape whose activations and KV caches take the room the weights would fit in, micro-batches whose KV
    caches do, or an unusable offload folder that took the disk away."""
    try:
        return plan_device_map(request)
    except PlanError as e:
        runtime = cfg.runtime

        def fits(shape: RuntimeSpec) -> bool:
            try:
                plan_device_map(request_for(shape))
            except PlanError:
                return False
            return True

        if runtime.micro_batches > 1 and request.kv_bytes and fits(replace(runtime, micro_batches=1)):
            # one batch fits: the other micro-batches' caches and outputs do not
            kv = sum(request.kv_bytes.values())
            room = sum(max(d.budget - reserved(request.reserves, d.name), 0) for d in request.devices
                       if d.kind != "disk")
            raise PlanError(f"runtime.micro_batches: {runtime.micro_batches} micro-batches of {runtime.batch_size} "
                            f"rows keep a KV cache of {format_bytes(kv)} ({runtime.rows_in_flight} rows x "
                            f"{runtime.seq_len} tokens), and the devices that compute have {format_bytes(room)} "
                            "for weights and cache after reserves; lower runtime.micro_batches, or raise "
                            "max_memory") from None
        blame = _shape_to_blame(request, runtime, fits)
        if blame:
            raise PlanError(blame) from None
        problem = None if "disk" in cfg.placement.max_memory else offload_folder_problem(folder)
        if problem and request.allow_disk:
            raise OffloadError(f"offload.folder: {folder} {problem}, so nothing can be offloaded to disk, and the "
                               "model does not fit in memory; point offload.folder at a writable folder on a disk"
                               ) from None
        raise e


def _shape_to_blame(request: PlanRequest, runtime: RuntimeSpec, fits: Callable[[RuntimeSpec], bool]) -> str | None:
    """Why the batch shape, not a budget, is what does not fit: the weights fit with one row of one token, and the
    key whose value is too big for the room (batch_size, seq_len, or both); None when the weights alone do not."""
    assert runtime.seq_len is not None  # derived before planning
    if not fits(replace(runtime, batch_size=1, micro_batches=1, seq_len=1)):
        return None
    if runtime.rows_in_flight > 1 and fits(replace(runtime, batch_size=1, micro_batches=1)):
        key = "runtime.batch_size" if runtime.batch_size > 1 else "runtime.micro_batches"
        fix = f"lower {key}"
    elif runtime.seq_len > 1 and fits(replace(runtime, seq_len=1)):
        key, fix = "runtime.seq_len", "lower runtime.seq_len (null: the longest row plus new tokens)"
    else:
        key, fix = "runtime.batch_size, runtime.seq_len", "lower both"
    compute = [d for d in request.devices if d.kind != "disk"]
    main = request.main_device
    shape = sum(v for k, v in request.reserves.get(main, {}).items() if k != "cuda_context")
    shape += sum(request.kv_bytes.values())
    return (f"{key}: {runtime.rows_in_flight} row(s) x {runtime.seq_len} tokens need {format_bytes(shape)} for "
            f"activations, outputs and KV cache beside the weights, and the devices that compute have "
            f"{format_bytes(sum(d.budget for d in compute))} in all; {fix}")


def _compute_dtype(cfg: RunConfig, checkpoint: Checkpoint | None, hardware: Hardware) -> tuple[torch.dtype, str]:
    """The compute dtype and why: as set, or for ``dtype: auto`` from the checkpoint's own (a synthetic one's is in
    its spec) and the hardware (``runner.plan.arithmetic``)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype), f"set: dtype={cfg.dtype}"
    dtype = checkpoint.dtype if checkpoint else getattr(torch, cfg.checkpoint.dtype)
    if checkpoint is not None and any(checkpoint.stored_type(key) for key in checkpoint.entries):
        # a GGUF's blocks stay quantized, and their kernels compute in float32: bf16 would only round more
        return torch.float32, "auto: float32, as the kernels of the weights kept quantized compute"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CheckpointError(f"dtype: auto would compute in the checkpoint's {str(dtype).removeprefix('torch.')}, "
                              "which the runner does not run; set dtype=float32, float16 or bfloat16")
    return auto_dtype(dtype, hardware)


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:  # a stage may run in two parts (checkpoint headers, then weights): add them up
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 4)

