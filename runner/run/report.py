"""Stage 7: what a run tells the user: the tables on screen and three schema-checked files.

``device_map.json`` (the map, compact and per block), ``predictions.jsonl`` (one completion per
prompt) and ``report.json`` (timings, bytes per device, checkpoint, versions and the
resolved config).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import platform
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import runner
from runner.plan.explain import compact_map, plan_document
from runner.infer.generate import GenerationStats
from runner.load.loaded import Loaded
from runner.load.offload import RoutedExperts
from runner.plan.planned import Planned
from runner.load.memory import peak_rss
from runner.plan.room import reserved
from runner.config.schema import schema_errors
from runner.config.sizes import format_bytes
from runner.data.writes import atomic_write

log = logging.getLogger(__name__)

PACKAGES = ("torch", "hydra-core", "omegaconf", "safetensors", "huggingface_hub", "jsonschema", "psutil")


def device_map_document(result: Loaded) -> dict:
    sizes = {b.name: b for b in result.layout.blocks}
    return {
        "model": result.config.model.name,
        "strategy": result.plan.strategy,
        "device_map": compact_map(result.check.block_devices, result.layout),
        "blocks": [{"name": name, "class": sizes[name].class_name, "device": device, "bytes": sizes[name].nbytes}
                   for name, device in result.check.block_devices.items()],
    }


# A measured peak this far above the plan's prediction is reported: the plan, or the runner, is wrong somewhere.
OVER_PREDICTION = 1.10


def device_documents(result: Loaded) -> list[dict]:
    """Each device's budget, plan and peaks. The CPU's prediction includes the process's resident bytes before the
    load (``baseline_bytes``: interpreter, torch, tokenizer), since its measured peak is the whole process's; a real
    GPU's leaves out the CUDA context, which its allocator does not see."""
    return [{
        "name": d.name, "kind": d.kind, "simulated": d.simulated, "budget": d.budget,
        "planned_bytes": result.check.loads[d.name], "reserve": reserved(result.plan.reserves, d.name),
        "reserves": result.plan.reserves.get(d.name, {}),
        "peak_bytes": result.ledger.peak[d.name], "resident_bytes": result.ledger.current[d.name],
        "baseline_bytes": result.baseline_rss if d.kind == "cpu" else 0,
        "predicted_peak_bytes": result.check.loads[d.name] + reserved(result.plan.reserves, d.name)
        + (result.baseline_rss if d.kind == "cpu" else 0)
        - (result.plan.reserves.get(d.name, {}).get("cuda_context", 0) if d.kind == "gpu" and not d.simulated else 0),
        **_measured_peak(d),
    } for d in result.hardware.devices]


def memory_warnings(devices: list[dict]) -> list[str]:
    """One line per device whose measured peak exceeds the prediction by more than 10%."""
    lines = []
    for d in devices:
        measured, predicted = d["measured_peak_bytes"], d["predicted_peak_bytes"]
        if measured is not None and measured > OVER_PREDICTION * max(predicted, 1):
            lines.append(f"{d['name']}: measured peak {format_bytes(measured)} ({d['measured_by']}) is "
                         f"{measured / max(predicted, 1):.2f}x the plan's prediction of {format_bytes(predicted)}; "
                         "memory outside the plan is in use, and a tighter budget may fail")
    return lines


def report_document(result: Loaded) -> dict:
    cfg = result.config
    devices = device_documents(result)
    return {
        "runner_version": runner.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": cfg.model.name, "target": cfg.model.arch["_target_"], "path": cfg.model.path,
                  "config": cfg.model.chosen_from, "bytes": result.layout.total_bytes,
                  "blocks": len(result.layout.blocks)},
        "dtype": str(result.dtype).removeprefix("torch."),
        "strategy": result.plan.strategy,
        "hardware": {"name": result.hardware.name, "main_device": result.hardware.main_device},
        "devices": devices,
        "checkpoint": _checkpoint_document(result),
        "warnings": [*result.check.warnings, *memory_warnings(devices)],
        **({"experts": experts_document(result.streams.experts)}
           if result.streams is not None and result.streams.experts is not None else {}),
        "timings": result.timings,
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "config": cfg.resolved,
    }


def experts_document(experts: RoutedExperts) -> dict:
    """Streamed experts so far: how many were read in and their bytes, and how often the cache spared a read."""
    routed = experts.hits + experts.misses
    return {"loads": experts.loads, "bytes_read": experts.loaded_bytes, "bytes_read_unused": experts.unused_bytes,
            "cache": {"bytes": experts.cache_bytes, "hits": experts.hits, "misses": experts.misses,
                      "hit_rate": round(experts.hits / routed, 4) if routed else 0.0}}


def _checkpoint_document(result: Loaded) -> dict:
    """The checkpoint's identity, the keys it skipped, and what each stored type was kept as."""
    out = {**result.checkpoint.fingerprint(), "ignored_keys": list(result.keys.ignored)}
    if "quantized" in out:
        out["quantized"] = {**out["quantized"], "kept": list(result.quantization.lines)}
    return out


def write_job_report(result: Loaded, run_dir: Path, job: dict, generation: GenerationStats | None,
                     parallel: dict | None = None) -> dict[str, Path]:
    """Write the map and the report, with the job's figures (and the generation's, for task=generate); a measured
    peak above the plan's prediction is also said on screen."""
    report = {**report_document(result), "job": job}
    if generation is not None:
        report["generation"] = generation_document(generation)
    if parallel is not None:  # data parallel: every rank's share, time and peak, and the tokens/s of them all
        report["parallel"] = parallel
    for line in memory_warnings(report["devices"]):
        log.warning(line)
    return write_documents(run_dir, {"device_map.json": (device_map_document(result), "device_map"),
                                     "report.json": (report, "report")})


def generation_document(stats: GenerationStats) -> dict:
    decode_tokens = stats.output_tokens - (stats.requests if stats.output_tokens else 0)  # the first is prefill's
    return {**asdict(stats),
            # groups of prompts prefilled after a prefix the job kept (None: the cache was never asked)
            "prefix_hit_rate": round(stats.prefix_hits / stats.prefix_lookups, 4) if stats.prefix_lookups else None,
            "tokens_per_s": round(stats.output_tokens / max(stats.prefill_s + stats.decode_s, 1e-9), 2),
            "decode_tokens_per_s": round(decode_tokens / max(stats.decode_s, 1e-9), 2)}


def write_plan(planned: Planned, run_dir: Path, throughput: dict | None = None) -> dict[str, Path]:
    """Write ``plan.json`` (mode=plan), with the predicted decode step when there is one."""
    document = plan_document(planned)
    if throughput is not None:
        document["throughput"] = throughput
    return write_documents(run_dir, {"plan.json": (document, "plan")})


def write_documents(run_dir: Path, documents: dict[str, tuple[dict, str]]) -> dict[str, Path]:
    """Each file is checked against its schema first: a mismatch is a bug, and nothing is written."""
    problems = [f"{name}: {e}" for name, (doc, schema) in documents.items() for e in schema_errors(doc, schema)]
    if problems:
        raise RuntimeError("output does not match its schema (a bug in the runner): " + "; ".join(problems))
    run_dir.mkdir(parents=True, exist_ok=True)
    return {name: _atomic_write(run_dir / name, json.dumps(doc, indent=2) + "\n") for name, (doc, _) in documents.items()}


def format_summary(result: Loaded) -> str:
    """The module table, the per-device table, then warnings: what the user reads first."""
    lines = [format_map(result), "", f"{'device':<8} {'blocks':>6} {'planned':>12} {'reserve':>12} {'peak':>12} {'budget':>12}"]
    counts: dict[str, int] = {}
    for device in result.check.block_devices.values():
        counts[device] = counts.get(device, 0) + 1
    for d in result.hardware.devices:
        name = d.name + ("*" if d.simulated else "")
        lines.append(f"{name:<8} {counts.get(d.name, 0):>6} {format_bytes(result.check.loads[d.name]):>12} "
                     f"{format_bytes(reserved(result.plan.reserves, d.name)):>12} "
                     f"{format_bytes(result.ledger.peak[d.name]):>12} {format_bytes(d.budget):>12}")
    if any(d.simulated for d in result.hardware.devices):
        lines.append("* simulated: backed by CPU memory, budget enforced by the runner")
    return "\n".join(lines)


def format_map(planned: Planned) -> str:
    """The compact map as a two-column table, numbered siblings on one device folded into one row."""
    rows = _numbered_runs(compact_map(planned.check.block_devices, planned.layout))
    width = max([len(m) for m, _ in rows] + [6])
    lines = [f"{'module':<{width}}  device", f"{'-' * width}  ------"]
    lines += [f"{module:<{width}}  {device}" for module, device in rows]
    return "\n".join(lines)


def _numbered_runs(compact: dict[str, str]) -> list[tuple[str, str]]:
    """``transformer.h.3 .. transformer.h.9`` on one device as one row, ``transformer.h.3-9``."""
    rows: list[tuple[str, str, int, int]] = []  # parent, device, first, last (-1: not numbered)
    for module, device in compact.items():
        parent, dot, last = module.rpartition(".")
        if last.isdigit() and rows and rows[-1][:2] == (parent + dot, device) and rows[-1][3] == int(last) - 1:
            rows[-1] = (rows[-1][0], device, rows[-1][2], int(last))
        elif last.isdigit():
            rows.append((parent + dot, device, int(last), int(last)))
        else:
            rows.append((module or "(model)", device, -1, -1))
    return [(name if first < 0 else f"{name}{first}" if first == last else f"{name}{first}-{last}", device)
            for name, device, first, last in rows]


def _atomic_write(path: Path, text: str) -> Path:
    return atomic_write(path, text, "hydra.run.dir")  # whole or absent; a full disk is one line


def _measured_peak(device) -> dict:
    """What the machine says: the process's peak RSS for the CPU, the allocator's peak for a real GPU,
    the runner's own ledger (``peak_bytes``) for simulated GPUs and disk."""
    if device.kind == "cpu":
        return {"measured_peak_bytes": peak_rss(),
                "measured_by": "process peak RSS since the load began (weights, runtime and interpreter)"}
    if device.kind == "gpu" and not device.simulated:
        import torch

        return {"measured_peak_bytes": torch.cuda.max_memory_allocated(device.name),
                "measured_by": "torch.cuda.max_memory_allocated"}
    return {"measured_peak_bytes": None, "measured_by": "the runner's ledger (peak_bytes)"}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
