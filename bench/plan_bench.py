#!/usr/bin/env python
"""Our planner against Accelerate's ``infer_auto_device_map``, at equal budgets, in one process.

Every model is built once on meta. Our side runs what ``runner.plan.planned.plan`` runs from a
meta model to a device map (``describe_model`` + ``forward_order`` + ``plan_device_map``),
with no runtime reserves and no KV cache, so each device's budget is exactly the number
Accelerate gets in ``max_memory``. Accelerate's side is one ``infer_auto_device_map`` call.

Both maps are scored by the same code:

- off GPU: bytes of the model's parameters (fp32, a tied tensor counted once) whose module
  the map sends to cpu or disk; "on disk" is the disk part of it;
- hops: device changes along *our* forward order, at tensor granularity (a block that
  Accelerate splits over two devices counts its inner change too);
- time: the median of ``--repeats`` wall-clock runs (time.perf_counter), in this process;
- RSS: one fresh subprocess per case and side builds the model and plans once. It reports
  the growth during planning (the kernel's peak RSS, VmHWM, is reset through
  /proc/self/clear_refs right before planning and read right after, less the RSS just
  before) and the whole process's peak RSS (imports and build included).

Run ``python bench/plan_bench.py`` (about a minute on 2 cores); ``--help`` for options.
The exit code is 0 whatever the verdict.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py
from common import ROOT, GiB, MiB, package_version, quiet, reset_peak, status_bytes  # noqa: E402
DISK = 10**15            # "huge": neither side is ever short of disk
DTYPE = torch.float32    # both sides plan in fp32


# -- the uneven model: an embedding no GPU can hold, then small blocks --------------------------------------------

class MLPBlock(nn.Module):
    """A residual MLP block: never split (no_split_module_classes)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class UnevenLM(nn.Module):
    """A 2M-row embedding (8.2 GB in fp32, bigger than any GPU here) in front of 24 small blocks (34 MB each)."""

    def __init__(self, vocab_size: int = 2_000_000, width: int = 1024, n_blocks: int = 24, hidden: int = 4096,
                 n_out: int = 32000):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList(MLPBlock(width, hidden) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_out, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# -- cases ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    about: str
    build: Callable[[], nn.Module]
    no_split: tuple[str, ...]
    gpus: tuple[int, ...]        # budgets of cuda:0, cuda:1, ...
    cpu: int
    strict: bool = False         # ours must put strictly fewer bytes off GPU than Accelerate


def zoo(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from omegaconf import OmegaConf

        from runner.load.build import build_skeleton
        from runner.config import ModelSpec
        conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"), resolve=True)
        return build_skeleton(ModelSpec(conf["name"], dict(conf["arch"]), tuple(conf["no_split_module_classes"])))
    return build


def tinyllama() -> nn.Module:
    """TinyLlama-1.1B's shape (fp32: 4.1 GiB), untied head, built under Accelerate's init_empty_weights."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, torch_dtype=DTYPE)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    return model.to(DTYPE).eval()


def uneven() -> nn.Module:
    from runner.load.build import meta_parameters
    with meta_parameters():
        return UnevenLM().eval()


def seq100b() -> nn.Module:
    from runner.load.build import build_skeleton
    from runner.config import ModelSpec
    return build_skeleton(ModelSpec("seq100b", {"_target_": "runner.zoo.stack.LinearStack", "n_layers": 1000,
                                                "width": 10000}, ()))


CASES = [
    # GPT-2 sizes: split over two GPUs, some on the CPU; the budgets sum to ~85-105% of the model.
    Case("gpt2", "GPT-2 124M (475 MiB), 2x160 MiB + cpu 128 MiB", zoo("gpt2"), ("Block",), (160 * MiB,) * 2, 128 * MiB),
    Case("gpt2medium", "GPT-2 355M (1.32 GiB), 2x512 MiB + cpu 384 MiB", zoo("gpt2medium"), ("Block",),
         (512 * MiB,) * 2, 384 * MiB),
    Case("gpt2large", "GPT-2 774M (2.88 GiB), 2x1 GiB + cpu 1 GiB", zoo("gpt2large"), ("Block",), (GiB,) * 2, GiB),
    Case("gpt2xl", "GPT-2 1.56B (5.80 GiB), 2x2 GiB + cpu 2 GiB", zoo("gpt2xl"), ("Block",), (2 * GiB,) * 2, 2 * GiB),
    Case("tinyllama", "Llama 1.1B, TinyLlama shape (4.10 GiB), 2x1.5 GiB + cpu 1 GiB", tinyllama,
         ("LlamaDecoderLayer",), (3 * GiB // 2,) * 2, GiB),
    Case("uneven", "8.2 GB embedding + 24 x 34 MB blocks, 2x4 GiB + cpu 16 GiB", uneven, ("MLPBlock",),
         (4 * GiB,) * 2, 16 * GiB, strict=True),
    Case("seq100b", "LinearStack(1000, 10000) (400 GB), 8x80 GiB + cpu 256 GiB", seq100b, (), (80 * GiB,) * 8,
         256 * GiB),
]
BY_NAME = {c.name: c for c in CASES}


# -- the two planners -------------------------------------------------------------------------------------------------

def plan_ours(model: nn.Module, case: Case, strategy: str) -> tuple[dict[str, str], Any, str, float]:
    """(device map, layout in forward order, where the order came from, seconds of plan_device_map alone)."""
    from runner.plan.blocks import describe_model
    from runner.plan.hardware import Device
    from runner.plan.order import forward_order
    from runner.plan.planner import PlanRequest, plan_device_map

    layout = describe_model(model, case.no_split, DTYPE)
    trace = forward_order(model, layout)
    layout = layout.in_order(trace.order)
    devices = tuple(Device(f"cuda:{i}", "gpu", b, simulated=True) for i, b in enumerate(case.gpus))
    devices += (Device("cpu", "cpu", case.cpu), Device("disk", "disk", DISK))
    start = time.perf_counter()
    plan = plan_device_map(PlanRequest(blocks=layout.blocks, devices=devices, strategy=strategy,
                                       main_device="cuda:0" if case.gpus else "cpu", reserves={}, kv_bytes={}))
    return plan.device_map, layout, trace.source, time.perf_counter() - start


def plan_accelerate(model: nn.Module, case: Case) -> dict[str, str]:
    from accelerate.utils import infer_auto_device_map

    max_memory: dict[int | str, int] = {i: b for i, b in enumerate(case.gpus)}
    max_memory.update(cpu=case.cpu, disk=DISK)  # a fresh dict: Accelerate rewrites it in place
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=list(case.no_split),
                                       dtype=DTYPE)
    return {name: f"cuda:{d}" if isinstance(d, int) else str(d) for name, d in device_map.items()}


# -- scoring: one code path for both maps -----------------------------------------------------------------------------

def resolve(device_map: dict[str, str], name: str) -> str:
    """The device of a module or tensor: its longest prefix in the map ("" is the whole model)."""
    probe = name
    while True:
        if probe in device_map:
            return device_map[probe]
        if not probe:
            raise KeyError(f"{name} is in no entry of the map")
        probe = probe.rpartition(".")[0]


@dataclass
class Score:
    off_gpu: int
    on_disk: int
    hops: int
    loads: dict[str, int]
    runs: list[tuple[str, list[str]]]   # (device, blocks) along the forward order; device "split:a+b" if split


def score(model: nn.Module, layout, device_map: dict[str, str]) -> Score:
    from runner.plan.blocks import tensor_nbytes

    loads: dict[str, int] = {}
    for name, p in model.named_parameters():  # a tied tensor once, at its first name
        device = resolve(device_map, name)
        loads[device] = loads.get(device, 0) + tensor_nbytes(p, DTYPE)
    off = sum(n for d, n in loads.items() if not d.startswith("cuda:"))
    path: list[str] = []
    runs: list[tuple[str, list[str]]] = []
    for block in layout.blocks:
        devices = [resolve(device_map, slot) for slot in block.tensors] or [resolve(device_map, block.name)]
        for d in devices:
            if not path or path[-1] != d:
                path.append(d)
        label = devices[0] if len(set(devices)) == 1 else "split:" + "+".join(dict.fromkeys(devices))
        if runs and runs[-1][0] == label:
            runs[-1][1].append(block.name)
        else:
            runs.append((label, [block.name]))
    return Score(off, loads.get("disk", 0), len(path) - 1, loads, runs)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(the last result, the median wall time)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


# -- peak RSS, in a fresh subprocess per case and side ----------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    n = status_bytes(field).get(field)
    return None if n is None else n // 1024


def child(case_name: str, side: str) -> None:
    """Build the case's model, plan it once on one side, print one JSON line with the RSS figures (bytes)."""
    quiet()
    case = BY_NAME[case_name]
    if side == "accelerate":
        from accelerate.utils import infer_auto_device_map  # noqa: F401 -- imported before the measurement
    else:
        import runner.plan.order  # noqa: F401
        import runner.plan.planner  # noqa: F401
    model = case.build()
    rss_before = _status_kib("VmRSS")
    peak_before = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = rss_before is not None and reset_peak()
    if side == "accelerate":
        plan_accelerate(model, case)
    else:
        plan_ours(model, case, "auto")
    peak_after = (_status_kib("VmHWM") if exact else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_before = rss_before or 0
    print(json.dumps({"growth": (peak_after - rss_before) * 1024, "peak": max(peak_before, peak_after) * 1024,
                      "exact": exact}))


def measure_rss(case: Case, side: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", case.name, side],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the report -------------------------------------------------------------------------------------------------------

def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB" if n else "0"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if b == 0:
        return "=" if a == 0 else "inf"
    return f"{a / b:.2f}"


def describe_runs(runs: list[tuple[str, list[str]]], sizes: dict[str, int]) -> str:
    parts = []
    for device, names in runs:
        label = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        parts.append(f"{device}[{label} {len(names)}b {fmt_bytes(sum(sizes[n] for n in names))}]")
    return " -> ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(BY_NAME), default=list(BY_NAME))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (the median is reported)")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-side subprocesses that measure RSS")
    parser.add_argument("--maps", action="store_true", help="also print the balanced maps")
    parser.add_argument("--json", type=Path, help="also write each case's bytes off GPU and on disk, both sides")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    quiet()
    started = time.perf_counter()
    rows, details, verdict_never_more, verdict_strict, worse, failed = [], [], True, None, [], []
    print(f"torch {torch.__version__}, accelerate {package_version('accelerate')}, transformers {package_version('transformers')}; "
          f"fp32; budgets equal on both sides, no runtime reserves on ours; times: median of {args.repeats}; "
          f"RSS: one subprocess per case and side\n")
    for case in (BY_NAME[n] for n in args.cases):
        try:
            t0 = time.perf_counter()
            model = case.build()
            build_s = time.perf_counter() - t0
            results: dict[str, dict[str, Any]] = {}
            for side in ("auto", "balanced", "accelerate"):
                if side == "accelerate":
                    device_map, seconds = timed(lambda: plan_accelerate(model, case), args.repeats)
                    plan_only = None
                else:
                    (device_map, layout, source, _), seconds = timed(lambda s=side: plan_ours(model, case, s),
                                                                     args.repeats)
                    plan_only = statistics.median(plan_ours(model, case, side)[3] for _ in range(args.repeats))
                results[side] = {"map": device_map, "time": seconds, "plan_only": plan_only}
            for side, r in results.items():
                r["score"] = score(model, layout, r["map"])
            for side in ("auto", "accelerate"):
                results[side]["rss"] = {} if args.no_rss else measure_rss(case, "ours" if side == "auto" else side)
            ours, theirs = results["auto"]["score"], results["accelerate"]["score"]
            verdict_never_more &= ours.off_gpu <= theirs.off_gpu
            if case.strict:
                verdict_strict = ours.off_gpu < theirs.off_gpu
            ms = lambda t: f"{t * 1e3:.1f} ms"  # noqa: E731
            for metric, a, b, fmt in (
                    ("bytes off GPU", ours.off_gpu, theirs.off_gpu, fmt_bytes),
                    ("bytes on disk", ours.on_disk, theirs.on_disk, fmt_bytes),
                    ("hops", ours.hops, theirs.hops, str),
                    ("planning time", results["auto"]["time"], results["accelerate"]["time"], ms),
                    ("RSS growth", results["auto"]["rss"].get("growth"), results["accelerate"]["rss"].get("growth"),
                     fmt_bytes),
                    ("process peak RSS", results["auto"]["rss"].get("peak"), results["accelerate"]["rss"].get("peak"),
                     fmt_bytes)):
                if a is not None and b is not None and a > b:
                    worse.append(f"{case.name}: more {metric}: {fmt(a)} vs {fmt(b)}")
            budgets = {**{f"cuda:{i}": b for i, b in enumerate(case.gpus)}, "cpu": case.cpu, "disk": DISK}
            for side, r in results.items():
                over = [f"{d} {fmt_bytes(n)} > {fmt_bytes(budgets[d])}" for d, n in r["score"].loads.items()
                        if n > budgets[d]]
                if over:
                    worse.append(f"{case.name}: {side} map exceeds a budget: {', '.join(over)}")
            rows.append((case, results, source, build_s))
            sizes = {b.name: b.nbytes for b in layout.blocks}
            details.append(f"{case.name}: {case.about}; {len(layout.blocks)} blocks, order from {source}; "
                           f"built on meta in {build_s:.2f}s")
            for side in ("auto", "balanced", "accelerate") if args.maps else ("auto", "accelerate"):
                sc = results[side]["score"]
                details.append(f"  {side:<10} off GPU {sc.off_gpu:,} B, on disk {sc.on_disk:,} B, {sc.hops} hops: "
                               f"{describe_runs(sc.runs, sizes)}")
        except Exception as e:  # noqa: BLE001 -- one broken case must not hide the others
            failed.append(f"{case.name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            print(f"  [{case.name} FAILED: {failed[-1]}]", file=sys.stderr, flush=True)
            continue
        print(f"  [{case.name} done, {time.perf_counter() - started:.0f}s]", file=sys.stderr, flush=True)

    head = (f"{'case':<11} {'side':<13} {'off GPU':>10} {'on disk':>10} {'hops':>5} {'time ms':>9} "
            f"{'(plan_device_map)':>17} {'RSS growth':>11} {'proc. peak':>11}")
    print(head)
    print("-" * len(head))
    for case, results, source, _ in rows:
        for side, label in (("auto", "ours auto"), ("balanced", "ours balanced"), ("accelerate", "accelerate")):
            r, s = results[side], results[side]["score"]
            rss = r.get("rss", {})
            growth = rss.get("growth")
            mark = "" if rss.get("exact", True) else "<="
            print(f"{case.name if side == 'auto' else '':<11} {label:<13} {fmt_bytes(s.off_gpu):>10} "
                  f"{fmt_bytes(s.on_disk):>10} {s.hops:>5} {r['time'] * 1e3:>9.1f} "
                  f"{'' if r['plan_only'] is None else format(r['plan_only'] * 1e3, '.1f'):>17} "
                  f"{mark + fmt_bytes(growth) if growth is not None else rss.get('error', '')[:11]:>11} "
                  f"{fmt_bytes(rss.get('peak')) if 'peak' in rss else '':>11}")
        a, b = results["auto"], results["accelerate"]
        print(f"{'':<11} {'ours/acc.':<13} {fmt_ratio(a['score'].off_gpu, b['score'].off_gpu):>10} "
              f"{fmt_ratio(a['score'].on_disk, b['score'].on_disk):>10} "
              f"{fmt_ratio(a['score'].hops, b['score'].hops):>5} {fmt_ratio(a['time'], b['time']):>9} {'':>17} "
              f"{fmt_ratio(a['rss'].get('growth'), b['rss'].get('growth')):>11} "
              f"{fmt_ratio(a['rss'].get('peak'), b['rss'].get('peak')):>11}")
    print("\n'time ms' is the whole planning step from a meta model (ours: describe_model + forward_order + "
          "plan_device_map; Accelerate: infer_auto_device_map); '(plan_device_map)' is our placement alone.")
    print("\nMaps along our forward order (device[first..last, blocks, bytes]):")
    print("\n".join(details))
    if worse:
        print("\nWhere ours (auto) is worse than Accelerate (or a map breaks a budget):")
        print("\n".join(f"  {w}" for w in worse))
    if failed:
        print("\nCases that failed (left out of the verdict):")
        print("\n".join(f"  {f}" for f in failed))
    strict = "n/a" if verdict_strict is None else ("yes" if verdict_strict else "no")
    print(f"\nnever more bytes off GPU than Accelerate: {'yes' if verdict_never_more and not failed else 'no'}; "
          f"strictly fewer on the uneven case: {strict}")
    if args.json:
        args.json.write_text(json.dumps({
            "cases": {case.name: {side: {"off_gpu": r[side]["score"].off_gpu, "on_disk": r[side]["score"].on_disk,
                                         "hops": r[side]["score"].hops, "time": r[side]["time"]}
                                  for side in ("auto", "accelerate")} | {"strict": case.strict}
                      for case, r, _, _ in rows},
            "failed": failed}, indent=1))
    print(f"(bench wall time {time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
