#!/usr/bin/env python
"""Cold-start load benchmark: the runner against plain PyTorch and Accelerate, on GPT-2 large checkpoints.

``--checkpoint`` picks the checkpoints, each benchmarked in turn with a table of its own (default: both
``synthetic`` and ``hf-gpt2``; ``tinyllama`` only when asked), all fp32, ~500 MB shards with an index,
under ``--cache`` (else ``RUNNER_CACHE``, else ``~/.cache/runner``):

- ``synthetic``: the runner's own for ``model=gpt2large`` (``nn.Linear`` layout, 3.1 GB), written once
  into ``<cache>/synthetic``; every side loads it into the runner's class, ``runner.zoo.gpt.GPT``;
- ``hf-gpt2``: transformers' ``GPT2LMHeadModel`` at gpt2-large's shape, written once by ``save_pretrained``
  into ``<cache>/hf/gpt2-large`` (``hf_checkpoint.py``; Conv1D weights ``[in, out]``). The runner loads it
  into its ``GPT`` (``model=gpt2large checkpoint=local``: the Conv1D weights are transposed views); the
  other sides into transformers' ``GPT2LMHeadModel``, its natural class;
- ``tinyllama``: the same for transformers' ``LlamaForCausalLM`` at TinyLlama-1.1B's shape (4.4 GB,
  ``model=llama`` on the runner's side).

All sides load on the CPU, then run one forward on a fixed ``[1, 128]`` batch:

- ``runner``: ``runner.infer.engine.Engine`` (``hardware=cpu``, the checkpoint as above), then the forward;
- ``runner-bf16``: the same with ``dtype=bfloat16``, from the same fp32 checkpoint;
- ``torch``: the class built on the CPU (``GPT(**arch)``, or transformers' class from ``config.json``),
  ``load_state_dict`` of every shard's ``safetensors.torch.load_file``;
- ``accelerate`` (when importable): ``init_empty_weights()`` (+ ``tie_weights()``) +
  ``load_checkpoint_and_dispatch(model, folder, device_map={"": "cpu"}, no_split_module_classes=[<block>])``.

Each side runs in a fresh subprocess, after every shard's pages are evicted from the page cache
(``fsync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)``; ``fincore`` reports what stayed resident).
Timings start after the imports (and, for the runner, after composing the Hydra config):

- *load*: from nothing to a model that can run; *1st fwd*: the first forward, which on a lazily
  mapped model also pages the weights in; *first logits* = load + 1st fwd; *2nd fwd*: a warm
  forward, the compute floor.
- RSS: *before* (after imports), *load peak* (the kernel's VmHWM, reset through
  ``/proc/self/clear_refs`` when the load starts), *sampled* (the max of a 10 ms sampler thread
  over the load phase), *after load* (anonymous + file-backed), *peak* (the whole process).
- GB/s: checkpoint bytes over time to first logits, against ``dd iflag=direct`` on the same files.

Run ``python bench/load_bench.py``: 3 cold runs per side and checkpoint, in rounds, the fastest reported (the
one least disturbed by other load on the machine); about 3 minutes a checkpoint on 2 cores, plus ~15-30 s to
write each checkpoint the first time. The logits of the fp32 sides are compared: the same argmax over the
last 8 positions, and values within a tolerance (different classes sum in different orders). ``--what-if``
adds the runner patched with candidate fixes (see ``WHAT_IF``).
The exit code is 0 whatever the verdict.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (which puts this checkout's runner first)
import hf_checkpoint  # noqa: E402
from common import (GB, MiB, ROOT, Sampler, compose_config, dd_rate, empty_gpt, evict, gb, importable,  # noqa: E402
                    quiet, ratio, reset_peak, status_bytes)

SEQ = 128
SIDES = ("runner", "runner-bf16", "torch", "accelerate")
# What-if variants of the runner (--what-if): the runner as shipped, patched in the bench process only, to
# measure fixes before they are made. "+willneed": posix_fadvise(WILLNEED) over every shard, 1 MiB at a time,
# from a thread started when the load starts, so the kernel reads the files in while the runner builds, plans
# and computes (one call for a whole file reads only its first readahead window, 8 MiB here); "+pread":
# safetensors' pread backend, tensors read into memory of their own instead of mapped from the files.
WHAT_IF = ("runner+willneed", "runner+pread", "runner-bf16+pread", "runner-bf16+pread+willneed")
WILLNEED_CHUNK = 1 << 20
COLD_SLACK = 64 << 20  # a run is cold if at most this much of the checkpoint is cached when it starts
MODEL_OVERRIDES = ["model=gpt2large", "hardware=cpu", "checkpoint.shard_size=500MB"]
CHECKPOINTS = ("synthetic", *hf_checkpoint.CHECKPOINTS)
DEFAULT_CHECKPOINTS = ["synthetic", "hf-gpt2"]
SAMPLE_EVERY = 64  # logits compared by value: every 64th of the last row's (786 of gpt2's 50257)


# -- one side, in a fresh process -----------------------------------------------------------------------------------

def runner_overrides(kind: str, folder: Path) -> list[str]:
    """The runner's model and checkpoint overrides for ``kind``'s checkpoint in ``folder``."""
    if kind == "synthetic":
        return MODEL_OVERRIDES
    return [*hf_checkpoint.runner_overrides(kind, folder), "hardware=cpu"]


def synthetic_arch() -> dict[str, Any]:
    return {k: v for k, v in compose_config(*MODEL_OVERRIDES).model.arch.items() if k != "_target_"}


def child_imports(side: str, kind: str) -> None:
    """Import what ``side`` loads with, so that the load's timer does not count it."""
    if side == "torch":
        import safetensors.torch  # noqa: F401
    if side == "accelerate":
        import accelerate  # noqa: F401
    if side in ("torch", "accelerate") and kind == "synthetic":
        import runner.zoo.gpt  # noqa: F401
    if side in ("torch", "accelerate") and kind != "synthetic":
        import transformers
        getattr(transformers, hf_checkpoint.CHECKPOINTS[kind].cls)  # a lazy module: import the class now


def load_torch(kind: str, folder: Path, shards: list[Path], arch: dict[str, Any] | None):
    """The plain way: the class built on the CPU (random init), then ``load_state_dict`` of every shard."""
    from safetensors.torch import load_file

    from runner.zoo.gpt import GPT
    model = GPT(**arch).eval() if kind == "synthetic" else hf_checkpoint.plain_model(kind, folder)
    state = {}
    for file in shards:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # a tied head is stored once
    del state
    gc.collect()
    return model


def load_accelerate(kind: str, folder: Path, arch: dict[str, Any] | None):
    """Accelerate's way: an empty model, then the checkpoint dispatched onto it, all on the CPU."""
    from accelerate import load_checkpoint_and_dispatch
    if kind == "synthetic":
        model, block = empty_gpt(arch), "Block"
    else:
        model, block = hf_checkpoint.empty_model(kind, folder), hf_checkpoint.CHECKPOINTS[kind].block
    return load_checkpoint_and_dispatch(model, checkpoint=str(folder), device_map={"": "cpu"},
                                        no_split_module_classes=[block]).eval()


def vocab_size(folder: Path, arch: dict[str, Any] | None) -> int:
    return arch["vocab_size"] if arch else hf_checkpoint.hf_config(folder)["vocab_size"]


def child(side: str, kind: str, folder: Path) -> None:
    """Load on one side, run one forward, print one ``RESULT {json}`` line (bytes, seconds)."""
    quiet()
    start_imports = time.perf_counter()
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = None
    side, *patches = side.split("+")
    if side.startswith("runner"):
        from runner.infer.engine import Engine
        if "pread" in patches:
            import functools

            import runner.load.checkpoint.files
            from safetensors import safe_open
            runner.load.checkpoint.files.safe_open = functools.partial(safe_open, backend="pread")
        dtype = ["dtype=bfloat16"] if side == "runner-bf16" else ["dtype=float32"]
        cfg = compose_config(*runner_overrides(kind, folder), *dtype, f"runtime.seq_len={SEQ}")
    child_imports(side, kind)
    arch = synthetic_arch() if kind == "synthetic" else None
    imports = time.perf_counter() - start_imports
    tokens = torch.randint(0, vocab_size(folder, arch), (1, SEQ), generator=torch.Generator().manual_seed(0))
    shards = sorted(folder.glob("*.safetensors"))

    sampler = Sampler()
    sampler.start()
    rss_before = status_bytes("VmRSS")["VmRSS"]
    hwm_imports = status_bytes("VmHWM")["VmHWM"]
    exact = reset_peak()
    extra: dict[str, Any] = {}
    sampler.phase = "load"
    t0 = time.perf_counter()
    if "willneed" in patches:
        threading.Thread(target=_will_need, args=(shards,), daemon=True).start()
    if cfg is not None:
        with tempfile.TemporaryDirectory(prefix="load-bench-") as run_dir:  # nothing is offloaded: it stays empty
            result = Engine(cfg, Path(run_dir)).loaded
        model = result.model
        extra["planned"] = result.layout.total_bytes
        extra["timings"] = dict(result.timings)
        assert Path(result.checkpoint.files[0]).parent == folder, (result.checkpoint.files[0], folder)
    elif side == "torch":
        model = load_torch(kind, folder, shards, arch)
    else:
        model = load_accelerate(kind, folder, arch)
    t_load = time.perf_counter() - t0
    sampler.phase = "after load"
    hwm_load = status_bytes("VmHWM")["VmHWM"]
    after_load = status_bytes("VmRSS", "RssAnon", "RssFile")
    exact = exact and reset_peak()
    sampler.phase = "forward"
    t1 = time.perf_counter()
    with torch.inference_mode():
        logits = model(tokens)
        logits = getattr(logits, "logits", logits)  # transformers' classes return an output object
    t_forward = time.perf_counter() - t1
    sampler.phase = "second forward"
    t2 = time.perf_counter()
    with torch.inference_mode():
        model(tokens)
    t_second = time.perf_counter() - t2
    sampler.stop()
    hwm_end = status_bytes("VmHWM")["VmHWM"]
    end = status_bytes("VmRSS", "RssAnon", "RssFile")
    if hasattr(model, "transformer"):  # GPT-2, either class: the head is the token embedding, stored once
        assert model.lm_head.weight is model.transformer.wte.weight
    last = logits[0, -1].float()
    print("RESULT " + json.dumps({
        "side": "+".join([side, *patches]), "imports": imports, "load": t_load, "forward": t_forward,
        "second": t_second,
        "first_logits": t_load + t_forward, "rss_before": rss_before,
        "load_peak": hwm_load if exact else None, "load_sampled": sampler.peaks.get("load", 0),
        "forward_peak": hwm_end if exact else None,
        "after_load": after_load, "end": end,
        "peak": max(hwm_imports, hwm_load, hwm_end, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "samples": sampler.count, "exact": exact,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "logits": {"argmax": logits[0, -8:].float().argmax(-1).tolist(), "sum": float(last.sum()),
                   "first": last[:4].tolist(), "sample": last[::SAMPLE_EVERY].tolist()}, **extra}), flush=True)


def _will_need(files: list[Path]) -> None:
    """Ask the kernel to read every shard in, asynchronously, in forward order (the synthetic checkpoint is
    written in module order). Linux caps one WILLNEED at the readahead window, hence the chunks."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            for offset in range(0, os.fstat(fd).st_size, WILLNEED_CHUNK):
                os.posix_fadvise(fd, offset, WILLNEED_CHUNK, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


# -- the parent: checkpoint, eviction, dd, children, report -----------------------------------------------------------

def ensure_checkpoint(kind: str) -> Path:
    """``kind``'s checkpoint, written if not cached (in a subprocess): the synthetic one by the runner itself,
    the others by transformers."""
    if kind != "synthetic":
        try:
            return hf_checkpoint.ensure(kind)
        except RuntimeError as e:
            sys.exit(str(e))
    code = ("import sys, logging; sys.path.insert(0, %r); logging.basicConfig(level=logging.INFO);"
            "from common import synthetic_folder; print('FOLDER', synthetic_folder(*%r))"
            % (str(Path(__file__).resolve().parent), MODEL_OVERRIDES))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"cannot write the synthetic checkpoint:\n{proc.stderr}")
    return Path(next(line for line in proc.stdout.splitlines() if line.startswith("FOLDER ")).split(" ", 1)[1])


def run_side(side: str, kind: str, folder: Path, files: list[Path]) -> dict[str, Any]:
    resident = evict(*files, tries=5, slack=COLD_SLACK)  # mapped pages: a few tries, a second apart
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side, kind, str(folder)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"side": side, "error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return {**json.loads(lines[-1][len("RESULT "):]), "resident_at_start": resident}


def fastest_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the shortest time to first logits, the one least disturbed by other load on the machine
    (all its figures from that one run)."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["first_logits"])
    if not ok:
        return runs[-1]
    cold = [r for r in ok if 0 <= r["resident_at_start"] <= COLD_SLACK]
    ok = cold or ok  # a run that found the files cached (mapped by another process) is not a cold start
    chosen = dict(ok[0])
    chosen["all_first_logits"] = [r["first_logits"] for r in runs if "error" not in r]
    return chosen


def same_logits(r: dict[str, Any], ref: dict[str, Any]) -> tuple[bool, float]:
    """Whether a side's logits are the reference's: the same argmax over the last positions, and every sampled
    value of the last row within 1e-3 of the largest (the classes may differ: sums run in other orders)."""
    a, b = r["logits"], ref["logits"]
    diff = max((abs(x - y) for x, y in zip(a["sample"], b["sample"])), default=float("inf"))
    scale = max(1.0, max((abs(y) for y in b["sample"]), default=0.0))
    return a["argmax"] == b["argmax"] and diff <= 1e-3 * scale, diff


def describe(kind: str) -> str:
    if kind == "synthetic":
        return "the runner's synthetic checkpoint (nn.Linear layout); every side loads runner.zoo.gpt.GPT"
    spec = hf_checkpoint.CHECKPOINTS[kind]
    return (f"written by transformers' save_pretrained ({spec.cls}); the runner loads it with "
            f"{' '.join(spec.runner)} checkpoint=local, the torch and accelerate sides into {spec.cls}")


def report(kind: str, results: dict[str, dict[str, Any]], checkpoint_bytes: int, largest_shard: int,
           dd: float | None, dd_note: str) -> None:
    print(f"\n== checkpoint {kind}: {describe(kind)} ==")
    print(f"All figures: GB = 1e9 bytes, seconds; RSS from /proc/self/status. Checkpoint {gb(checkpoint_bytes)} GB, "
          f"largest shard {gb(largest_shard)} GB.")
    head = (f"{'side':12} {'imports':>7} {'load':>6} {'1st fwd':>7} {'first logits':>12} {'2nd fwd':>7} "
            f"{'RSS before':>10} {'load peak':>9} {'sampled':>7} {'after load (anon+file)':>22} "
            f"{'peak':>5} {'GB/s':>5}")
    print(head)
    print("-" * len(head))
    for side, r in results.items():
        if "error" in r:
            print(f"{side:12} error: {r['error']}")
            continue
        al = r["after_load"]
        print(f"{side:12} {r['imports']:7.2f} {r['load']:6.2f} {r['forward']:7.2f} {r['first_logits']:12.2f} "
              f"{r['second']:7.2f} {gb(r['rss_before']):>10} {gb(r['load_peak']):>9} {gb(r['load_sampled']):>7} "
              f"{gb(al['VmRSS']) + ' (' + gb(al['RssAnon']) + '+' + gb(al['RssFile']) + ')':>22} "
              f"{gb(r['peak']):>5} {checkpoint_bytes / r['first_logits'] / GB:5.2f}")
    print(f"dd iflag=direct, same files: {'-' if dd is None else f'{dd:.2f} GB/s'} ({dd_note})")
    runs = {s: r.get("all_first_logits") for s, r in results.items() if r.get("all_first_logits")}
    if any(len(v) > 1 for v in runs.values()):
        print("first logits per run (the fastest run is shown): "
              + "; ".join(f"{s}: {', '.join(f'{t:.2f}' for t in v)}" for s, v in runs.items()))
    for side, r in results.items():
        if "error" not in r and r.get("resident_at_start", 0) > COLD_SLACK:
            print(f"note: {side}'s run shown started with {r['resident_at_start'] / MiB:.0f} MiB of the checkpoint "
                  "cached: another process had the files mapped")
    ours = results.get("runner", {})
    if not ours or "error" in ours:
        print("no runner result: no ratios")
        return
    if ours.get("timings"):
        print("runner stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in ours["timings"].items()))

    print("\nRatios, runner / reference (lower is better):")
    for ref in ("accelerate", "torch"):
        r = results.get(ref)
        if not r or "error" in r:
            print(f"  vs {ref:10}: not measured" + (f" ({r['error']})" if r else ""))
            continue
        print(f"  vs {ref:10}: first logits {ratio(ours['first_logits'], r['first_logits'])}, "
              f"peak RSS {ratio(ours['peak'], r['peak'])}, RSS after load "
              f"{ratio(ours['after_load']['VmRSS'], r['after_load']['VmRSS'])}, load-phase peak "
              f"{ratio(ours['load_peak'] or ours['load_sampled'], r['load_peak'] or r['load_sampled'])}")
    others = {s: same_logits(r, ours) for s, r in results.items()
              if "error" not in r and r["dtype"] == "float32" and s != "runner"}
    print("  fp32 sides with the runner's logits (same argmax over the last 8 positions, the last row's values "
          "within 1e-3 of the largest): "
          + (", ".join(f"{s} {'yes' if ok else 'NO'} (max diff {diff:.1e})" for s, (ok, diff) in others.items())
             or "none measured"))

    print(f"\nTargets ({kind} checkpoint), for each runner row "
          "(what-if rows are the runner patched in the bench only):")
    acc = results.get("accelerate")
    has_acc = bool(acc) and "error" not in acc
    if not has_acc:
        print("  [----] time to first logits and peak RSS against Accelerate: Accelerate not measured")
    fp32 = results["runner"]
    for side, r in results.items():
        if not side.startswith("runner") or "error" in r:
            continue
        checks = []
        if has_acc:
            limit = 0.8 * acc["first_logits"]
            checks.append((r["first_logits"] <= limit, f"first logits {r['first_logits']:.2f} s <= 0.8 x "
                                                       f"Accelerate's {acc['first_logits']:.2f} s = {limit:.2f} s"))
            diff = (r["peak"] - acc["peak"]) / MiB
            checks.append((r["peak"] <= acc["peak"] or ("TIE" if diff <= 0.01 * acc["peak"] / MiB else False),
                           f"peak RSS {gb(r['peak'])} <= Accelerate's {gb(acc['peak'])} GB ({diff:+.0f} MiB)"))
        during = r["load_peak"] or r["load_sampled"]
        bound = r["rss_before"] + r["planned"] + largest_shard
        checks.append((during <= bound, f"RSS during load {gb(during)} GB (sampled {gb(r['load_sampled'])}) <= "
                                        f"before {gb(r['rss_before'])} + planned {gb(r['planned'])} + one shard "
                                        f"{gb(largest_shard)} = {gb(bound)} GB"))
        if r["dtype"] == "bfloat16":
            net = (r["peak"] - r["rss_before"]) / max(1, fp32["peak"] - fp32["rss_before"])
            checks.append((net <= 0.6, f"bf16 peak RSS about half of fp32's: {gb(r['peak'])} vs {gb(fp32['peak'])} GB "
                                       f"= {r['peak'] / fp32['peak']:.2f}x ({net:.2f}x above the post-import RSS)"))
        print(f"  {side}:")
        for ok, text in checks:  # TIE: above the reference by less than 1%, within run-to-run noise
            print(f"    [{ok if isinstance(ok, str) else 'PASS' if ok else 'MISS'}] {text}")
        al = r["after_load"]
        print(f"    [info] after load {gb(al['VmRSS'])} GB = {gb(al['RssAnon'])} anonymous + {gb(al['RssFile'])} "
              f"file-backed (pages of the mapped shards); at the end {gb(r['end']['RssAnon'])} + "
              f"{gb(r['end']['RssFile'])}")
    if dd:
        print(f"  [info] the runner reads at {checkpoint_bytes / fp32['first_logits'] / GB:.2f} GB/s to first logits, "
              f"{checkpoint_bytes / fp32['first_logits'] / GB / dd:.0%} of dd's {dd:.2f} GB/s")


def missing_package(side: str, kind: str) -> str | None:
    """What ``side`` needs on ``kind``'s checkpoint and cannot import, if anything."""
    needs = (["accelerate"] if side == "accelerate" else []) + (
        ["transformers"] if kind != "synthetic" and side in ("torch", "accelerate") else [])
    missing = [n for n in needs if not importable(n)]
    return f"{', '.join(missing)} not importable (pip install -c constraints.txt -e .[bench])" if missing else None


def bench_checkpoint(kind: str, sides: list[str], args: argparse.Namespace, start: float) -> dict[str, list]:
    """Every side's cold runs on ``kind``'s checkpoint, in rounds, then its report; the raw runs."""
    if kind != "synthetic" and not importable("transformers"):
        print(f"\n== checkpoint {kind}: skipped, transformers is not importable (it writes the checkpoint) ==")
        return {}
    folder = ensure_checkpoint(kind)
    files = sorted(folder.glob("*.safetensors"))
    sizes = [f.stat().st_size for f in files]
    print(f"\ncheckpoint {kind}: {folder} ({len(files)} shards, {sum(sizes) / GB:.2f} GB), ready after "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    dd, dd_note = (None, "skipped") if args.no_dd else dd_rate(files)
    skipped = {side: missing_package(side, kind) for side in sides if missing_package(side, kind)}
    live = [side for side in sides if side not in skipped]
    raw: dict[str, list[dict[str, Any]]] = {side: [] for side in live}
    for i in range(args.repeats):  # rounds over all sides, so a busy spell on the machine hits every side alike
        for side in live:
            r = run_side(side, kind, folder, files)
            raw[side].append(r)
            print(f"  [{kind} {i + 1}/{args.repeats}] {side}: " + (
                f"error: {r['error']}" if "error" in r else
                f"first logits {r['first_logits']:.2f} s, peak RSS {gb(r['peak'])} GB"
                + (f" (NOT cold: {r['resident_at_start'] / MiB:.0f} MiB were cached)"
                   if r["resident_at_start"] > COLD_SLACK else "")), flush=True)
    results = {side: fastest_run(runs) for side, runs in raw.items()}
    results.update({side: {"side": side, "error": why} for side, why in skipped.items()})
    report(kind, results, sum(sizes), max(sizes), dd, dd_note)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="runner cache (default: RUNNER_CACHE, else ~/.cache/runner)")
    parser.add_argument("--checkpoint", nargs="+", choices=CHECKPOINTS, default=DEFAULT_CHECKPOINTS,
                        help="checkpoints to benchmark, one after the other, one table each (default: "
                             f"{' '.join(DEFAULT_CHECKPOINTS)}; tinyllama writes 4.4 GB more)")
    parser.add_argument("--sides", nargs="+", choices=SIDES + WHAT_IF, default=list(SIDES))
    parser.add_argument("--what-if", action="store_true",
                        help=f"also run the runner patched with candidate fixes: {', '.join(WHAT_IF)}")
    parser.add_argument("--repeats", type=int, default=3,
                        help="cold runs per side, in rounds over the sides; the fastest is reported")
    parser.add_argument("--no-dd", action="store_true", help="skip the dd reference")
    parser.add_argument("--json", type=Path, help="also write every run's raw figures here, by checkpoint")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "CHECKPOINT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache:
        os.environ["RUNNER_CACHE"] = str(args.cache.expanduser().resolve())
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]))
        return

    start = time.perf_counter()
    print(f"cache: {os.environ.get('RUNNER_CACHE', '~/.cache/runner (default)')}; cpus: {os.cpu_count()}; "
          f"python {sys.version.split()[0]}; checkpoints: {' '.join(args.checkpoint)}", flush=True)
    sides = list(args.sides) + [s for s in WHAT_IF if args.what_if and s not in args.sides]
    raw = {kind: bench_checkpoint(kind, sides, args, start) for kind in dict.fromkeys(args.checkpoint)}
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    print(f"\nbench took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
