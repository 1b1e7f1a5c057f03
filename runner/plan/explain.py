"""What a plan means, in words: the plan table, one line per placement decision, and the must-notices.

Used by ``mode=plan`` (``plan.json`` and the screen) and by the run report.
"""
from __future__ import annotations

from runner.plan.planned import Planned
from runner.plan.arithmetic import emulated_bf16_warning
from runner.plan.blocks import ModelLayout
from runner.plan.experts import expert_layers, expert_lines, experts_document
from runner.plan.room import room_left
from runner.config.sizes import format_bytes
from runner.plan.validate import ancestors

# Nominal speeds for the offload-cost estimate; stated in the notice, so a reader can rescale.
DISK_GBPS = 2.0    # a PCIe 4.0 NVMe drive, sequential reads
PCIE_GBPS = 25.0   # PCIe 4.0 x16 with pinned memory


def compact_map(block_devices: dict[str, str], layout: ModelLayout) -> dict[str, str]:
    """The shortest map with the same meaning: a module whose tensors all share a device stands for them. A layer
    whose experts sit elsewhere is named with its own device, and its experts apart (the more specific key wins).

    Linear in the tensors: each adds its block's device to every module above it (a 100B model has thousands)."""
    order = {b.name: i for i, b in enumerate(layout.blocks)}
    devices_under: dict[str, set[str]] = {}
    first: dict[str, int] = {}
    for block in layout.blocks:
        device = block_devices[block.name]
        for slot in block.tensors:
            for module in ancestors(slot)[1:]:
                devices_under.setdefault(module, set()).add(device)
                first[module] = min(first.get(module, order[block.name]), order[block.name])
    chosen: dict[str, str] = {}
    for module in sorted(layout.modules | set(block_devices), key=lambda m: (m.count(".") + bool(m), m)):
        under = devices_under.get(module, set())
        outer = next((a for a in ancestors(module)[1:] if a in chosen), None)
        if not under or outer is not None and under == {chosen[outer]}:
            continue
        if len(under) == 1:
            chosen[module] = next(iter(under))
        elif module in block_devices:  # a layer whose experts are placed apart
            chosen[module] = block_devices[module]
    return dict(sorted(chosen.items(), key=lambda kv: first[kv[0]]))


def runs(planned: Planned) -> list[tuple[str, list[str]]]:
    """Consecutive blocks on one device, in forward order: (device, block names)."""
    out: list[tuple[str, list[str]]] = []
    experts = planned.layout.expert_names  # shown per layer apart (``runner.plan.experts``)
    for name, device in planned.check.block_devices.items():
        if name in experts:
            continue
        if out and out[-1][0] == device:
            out[-1][1].append(name)
        else:
            out.append((device, [name]))
    return out


def hops(planned: Planned) -> list[dict]:
    """Every device change along the forward order, with the activation bytes per token that cross it."""
    out, previous = [], None
    experts = planned.layout.expert_names  # their outputs return to their layer: no hop along the order
    for name, device in planned.check.block_devices.items():
        if name in experts:
            continue
        if previous and device != previous[1]:
            per_token = planned.trace.input_elems.get(name, 0) * planned.dtype.itemsize
            out.append({"from": previous[1], "to": device, "after": previous[0], "before": name,
                        "bytes_per_token": per_token})
        previous = (name, device)
    return out


def device_rows(planned: Planned) -> list[dict]:
    rows = []
    counts: dict[str, int] = {}
    for device in planned.check.block_devices.values():
        counts[device] = counts.get(device, 0) + 1
    for d in planned.hardware.devices:
        rows.append({"name": d.name, "kind": d.kind, "simulated": d.simulated, "blocks": counts.get(d.name, 0),
                     "weights": planned.plan.loads[d.name], "reserves": planned.plan.reserves.get(d.name, {}),
                     "budget": d.budget, "free": room_left(d, planned.plan.loads[d.name], planned.plan.reserves)})
    return rows


def explanation(planned: Planned) -> list[str]:
    """One line per run of blocks: where it went and why."""
    request, plan = planned.request, planned.plan
    sizes = {b.name: b.nbytes for b in planned.layout.blocks}
    rooms = {d.name: room_left(d, 0, plan.reserves) for d in planned.hardware.devices}
    gpus = [d.name for d in planned.hardware.gpus]
    biggest_gpu_room = max((rooms[g] for g in gpus), default=0)
    lines = []
    for device, names in runs(planned):
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        total = sum(sizes[n] for n in names)
        head = f"{label} -> {device}: {len(names)} block(s), {format_bytes(total)}"
        pinned = [n for n in names if n in request.pins]
        tied = [b for b in planned.layout.blocks if b.name in names and b.tied_to]
        if pinned and len(pinned) == len(names):
            why = "pinned by device_map"
        elif len(tied) == len(names):
            why = f"shares its weights with {tied[0].tied_to}, so it sits with it"
        elif device in gpus:
            why = {"sequential": "filled in order", "balanced": "the most even split over the GPUs",
                   "balanced_low_0": "spread over GPUs 1..N-1; GPU 0 takes only what does not fit there",
                   "auto": "part of the best contiguous map (fewest bytes off GPU, then hops, then evenness)",
                   "check": "as the map file says"}[plan.strategy] + f"; {device} has {format_bytes(rooms[device])} for weights after reserves"
        elif device == "cpu" and gpus and planned.compute[names[0]].reason != "resident":
            why = planned.compute[names[0]].reason
        elif device == "cpu" and not gpus:
            why = f"no GPU: resident in RAM ({format_bytes(rooms['cpu'])} after reserves), computes on the CPU"
        elif gpus and any(sizes[n] > biggest_gpu_room for n in names):
            why = f"bigger than any GPU's room after reserves ({format_bytes(biggest_gpu_room)})"
        elif device == "cpu":
            why = "does not fit the room left on the GPUs; computes on the CPU"
        else:
            why = (f"{'the GPUs and ' if gpus else ''}the CPU ({format_bytes(rooms.get('cpu', 0))} after reserves) "
                   f"{'are' if gpus else 'is'} full; "
                   f"streamed into {request.main_device} for each forward")
        lines.append(f"{head}: {why}")
    return lines


def notices(planned: Planned) -> list[str]:
    """The must-notices that apply to this plan."""
    layout, plan, devices = planned.layout, planned.plan, planned.check.block_devices
    out = [f"dtype: {str(planned.dtype).removeprefix('torch.')} ({planned.dtype_why})"] if planned.dtype_why else []
    emulated = emulated_bf16_warning(planned.dtype, planned.hardware)
    if emulated:
        out.append(emulated)
    for block in layout.blocks:
        if block.tied_to:
            out.append(f"tied weights: {block.name} shares its weight with {block.tied_to}; both on "
                       f"{devices[block.name]}, loaded once")
    whole = [b for b in layout.blocks if b.class_name in planned.config.model.no_split_module_classes]
    if whole:
        classes = ", ".join(sorted({b.class_name for b in whole}))
        apart = " (their experts placed apart)" if layout.has_experts else ""
        out.append(f"kept whole: {len(whole)} {classes} block(s) (no_split_module_classes), never split across "
                   f"devices{apart}")
    gpus = planned.hardware.gpus
    if plan.strategy == "balanced_low_0" and len(gpus) > 1:
        g0 = gpus[0].name
        outputs = plan.reserves.get(g0, {}).get("outputs", 0)
        out.append(f"{g0} kept light: {format_bytes(plan.loads[g0])} of weights against "
                   f"{format_bytes(max(plan.loads[g.name] for g in gpus))} on the fullest GPU; it receives the "
                   f"outputs ({format_bytes(outputs)} of logits per forward) and generate() needs headroom there")
    on_disk = sum(b.nbytes for b in layout.blocks if devices[b.name] == "disk" and not b.expert)
    on_cpu = sum(b.nbytes for b in layout.blocks if devices[b.name] == "cpu")
    experts = expert_layers(layout, devices)
    if experts:
        out.append(f"experts placed apart: {sum(e.experts for e in experts)} experts in {len(experts)} layers, after "
                   "the dense parts; those on disk are read only when a token is routed to them")
    if on_disk:
        out.append(f"offload cost: each forward streams {format_bytes(on_disk)} from disk into "
                   f"{planned.request.main_device}: at least {on_disk / DISK_GBPS / 1e9:.2f} s at {DISK_GBPS:g} GB/s")
    streamed_cpu = sum(b.nbytes for b in layout.blocks
                       if devices[b.name] == "cpu" and planned.compute[b.name].streamed)
    if streamed_cpu:
        out.append(f"offload cost: each forward copies {format_bytes(streamed_cpu)} of CPU-resident weights into "
                   f"{planned.request.main_device}: at least {streamed_cpu / PCIE_GBPS / 1e9:.3f} s at "
                   f"{PCIE_GBPS:g} GB/s (cheaper than moving their activations)")
    if on_cpu - streamed_cpu:
        out.append(f"offload cost: {format_bytes(on_cpu - streamed_cpu)} of weights compute on the CPU, "
                   "where moving their activations costs less than moving them")
    if not on_disk and not on_cpu and not any("disk" in e.tiers for e in experts):
        out.append("nothing offloaded: no streaming cost per forward")
    quantized = planned.quantization
    if quantized.kept:
        dtype = str(planned.dtype).removeprefix("torch.")
        out.append(f"kept quantized: {len(quantized.kept)} weights take {format_bytes(quantized.kept_bytes)} instead of "
                   f"{format_bytes(quantized.dense_bytes)} in {dtype}; their kernels compute in bf16 on the CPU")
        rows = planned.config.runtime.rows_in_flight if planned.config.task.decodes else 0
        if rows >= 16:
            undo = "quantize=null" if quantized.setting else f"dtype={dtype}"
            out.append(f"kept quantized at {rows} rows in flight: torch's quantized kernels are slower than {dtype} "
                       f"matmuls from about 16 rows; where RAM allows, {undo} keeps the weights in {dtype} and "
                       "computes faster")
    if planned.trace.source == "registration":
        out.append("forward order unknown (the meta trace failed): planned in registration order")
    return out


def plan_document(planned: Planned) -> dict:
    return {
        "model": planned.config.model.name,
        "model_path": planned.config.model.path,
        "strategy": planned.plan.strategy,
        "dtype": str(planned.dtype).removeprefix("torch."),
        "hardware": planned.hardware.name,
        "main_device": planned.hardware.main_device,
        "order_source": planned.trace.source,
        "runtime": {"batch_size": planned.config.runtime.batch_size, "seq_len": planned.config.runtime.seq_len,
                    "micro_batches": planned.config.runtime.micro_batches},
        "devices": device_rows(planned),
        "device_map": compact_map(planned.check.block_devices, planned.layout),
        "blocks": [{"name": b.name, "class": b.class_name, "device": planned.check.block_devices[b.name],
                    "bytes": b.nbytes, "kv_bytes": planned.request.kv_bytes.get(b.name, 0),
                    "compute": planned.compute[b.name].device, "streamed": planned.compute[b.name].streamed,
                    "why": planned.compute[b.name].reason}
                   for b in planned.layout.blocks],
        "hops": hops(planned),
        "explanation": explanation(planned),
        "notices": notices(planned),
        "weights": list(planned.quantization.lines),
        **({"experts": experts_document(experts, rows_per_step(planned))}
           if (experts := expert_layers(planned.layout, planned.check.block_devices)) else {}),
        "warnings": list(planned.check.warnings),
        "timings": planned.timings,
    }


def rows_per_step(planned: Planned) -> int:
    """Tokens one forward runs: a decode step's rows in flight, or a scoring batch's whole sequences."""
    runtime = planned.config.runtime
    return runtime.rows_in_flight if planned.config.task.decodes else runtime.batch_size * runtime.seq_len


def model_line(planned: Planned) -> str:
    """Which implementation runs the model, and where its architecture was read (``model=auto``)."""
    spec = planned.config.model
    path = {"zoo": "the zoo's fast path", "transformers": "transformers' own class"}.get(spec.path, "the class the "
                                                                                         "config names")
    read = f", read from {spec.chosen_from}" if spec.chosen_from else ""
    return f"model: {spec.name} on {path} ({spec.arch['_target_']}){read}"


def format_plan(planned: Planned) -> str:
    rows = device_rows(planned)
    lines = [model_line(planned), "", f"{'device':<8} {'blocks':>6} {'weights':>12} {'reserves':>12} {'budget':>12} {'free':>12}  reserved for"]
    for r in rows:
        name = r["name"] + ("*" if r["simulated"] else "")
        why = ", ".join(f"{k} {format_bytes(v)}" for k, v in r["reserves"].items())
        lines.append(f"{name:<8} {r['blocks']:>6} {format_bytes(r['weights']):>12} "
                     f"{format_bytes(sum(r['reserves'].values())):>12} {format_bytes(r['budget']):>12} "
                     f"{format_bytes(r['free']):>12}  {why}")
    if planned.quantization.lines:  # what each stored type is kept as
        lines += ["", "weights:"] + [f"  {line}" for line in planned.quantization.lines]
    experts = expert_layers(planned.layout, planned.check.block_devices)
    if experts:
        lines += ["", "experts:"] + [f"  {line}" for line in expert_lines(experts, rows_per_step(planned))]
    hop_list = hops(planned)
    lines += ["", f"hops: {len(hop_list)}"]
    lines += [f"  {h['from']} -> {h['to']} before {h['before']}: "
              + (f"{format_bytes(h['bytes_per_token'])} per token" if h["bytes_per_token"] else "size not traced")
              for h in hop_list]
    lines += ["", "why:"] + [f"  {line}" for line in explanation(planned)]
    lines += ["", "notices:"] + [f"  {line}" for line in notices(planned)]
    return "\n".join(lines)
