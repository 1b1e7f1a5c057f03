#!/usr/bin/env python
"""Disk-offload benchmark: the runner's offload engine against Accelerate's ``load_checkpoint_and_dispatch``.

``--checkpoint`` picks the checkpoints, each benchmarked in turn with a report of its own (default: both
``synthetic`` and ``hf-gpt2``; ``tinyllama`` only when asked), all fp32, ~500 MB shards with an index, under
``--cache`` (else ``RUNNER_CACHE``, else ``/tmp/offload-bench-cache``):

- ``synthetic``: the runner's own for ``model=gpt2large`` (``nn.Linear`` layout, 3.1 GB), written once by the
  runner into ``<cache>/synthetic``; both sides dispatch the runner's class, ``runner.zoo.gpt.GPT``;
- ``hf-gpt2``: transformers' ``GPT2LMHeadModel`` at gpt2-large's shape, written once by ``save_pretrained``
  into ``<cache>/hf/gpt2-large`` (``hf_checkpoint.py``; Conv1D weights ``[in, out]``). The runner loads it
  into its ``GPT`` (``model=gpt2large checkpoint=local``: transposed views, streamed from the shards as they
  are); Accelerate dispatches transformers' ``GPT2LMHeadModel``, its natural class (blocks: ``GPT2Block``);
- ``tinyllama``: the same for ``LlamaForCausalLM`` at TinyLlama-1.1B's shape (``model=llama``).

Both sides run on the CPU with a 1 GiB CPU budget and the rest on disk, on a fixed ``[4, 128]`` batch:

- ``runner``: ``runner.infer.engine.Engine`` with ``hardware=cpu max_memory.cpu=1GiB runtime.batch_size=4
  runtime.seq_len=128 offload.folder=<dir>`` (its planner places the blocks; disk blocks are read
  straight from the checkpoint's shards, a few aligned spans per block into reused buffers, from the page
  cache when the bytes are there and with ``O_DIRECT`` otherwise (``offload.direct_io``), prefetched
  ``offload.prefetch`` blocks ahead). The bytes it writes into ``<dir>`` are counted (files new or
  changed): none are expected for an fp32 checkpoint, and none at all on a second run;
- ``accelerate``: ``init_empty_weights()`` + the class (head tied), the map from Accelerate's own
  ``infer_auto_device_map(max_memory={"cpu": 1GiB}, no_split_module_classes=[<block>])``, then
  ``load_checkpoint_and_dispatch(model, <checkpoint folder>, device_map, offload_folder=<dir>)``
  (whatever Accelerate does with the disk part, here writing ``.dat`` files, is part of what is compared).

Each side is its own subprocess; both are started together and the parent alternates their forwards,
so a busy spell on the machine (other jobs) hits both alike. Accelerate reads its own copy of the
checkpoint (same bytes): pages one process maps for its resident blocks can't be evicted and would
be cache hits for the other's disk reads. Before a side's load and before each of its evicted forwards,
every file of its checkpoint and offload folder is fsynced and dropped from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)``; ``fincore`` reports what stayed). Per side: load time; one
warm-up forward, ``--repeats`` evicted forwards (median reported), ``--warm`` warm forwards (no eviction);
peak RSS (``ru_maxrss``) and RSS sampled every 10 ms during the forwards; bytes read from the device
(``/proc/self/io``). The runner's disk reads are also timed (the bench wraps ``SpanReader.read``, the
``read_uncached`` fallback and the prefetcher's ``before``, in its own process only): the read rate while
reading, the CPU the reads cost (``getrusage(RUSAGE_THREAD)``), the time the forward stalled waiting for a
block, and the spans the prefetcher's reader took from the page cache, read with ``O_DIRECT`` or read
through the page cache (``SpanReader.counts``); next to them, ``dd iflag=direct bs=16M`` on the same shards.

A third subprocess holds four models at once and runs them in interleaved, warm rounds: the runner's
all-resident map (``max_memory.cpu=16GiB``), the runner's class without the runner (plain) with
``load_state_dict`` of the same weights (its own copy: the hook-overhead target), the plain model on the
runner's very tensors (a diagnostic: hooks alone; on ``hf-gpt2`` also transposed views against contiguous
copies), and the runner's 1 GiB disk map (the warm-cache target, and the runner's second run on its offload
folder). The first round is a warm-up. Each round runs every model once, back to back, so a busy spell on the
machine (other jobs) hits a round's forwards alike: these two targets judge the median over rounds of the
ratio within a round (fastest and median walls and process CPU time are printed next to it; "busy" = process
CPU time / (threads x wall)).

**The model truly does not fit.** Each disk-map side runs in a fresh cgroup v1 memory group
(``common.MemoryGroup``) whose limit counts the page cache: the budget plus the runtime, the issue's RSS bound,
1 GiB + the checkpoint's two largest blocks + 600 MB (1.83 GB on gpt2-large), the same for every side and printed
with each side's peak usage and how often it hit the limit. Without it the page cache holds what the 1 GiB budget
should not (Accelerate's ``.dat`` files; a side's evicted files are refilled by its own reads). Where no group can
be made (not root, no cgroup v1) a warning says the figures do not count. The warm rounds (the all-resident
reference) run without a limit. At this limit Accelerate is OOM-killed in its first forward on ``hf-gpt2``
(2026-12-06: it loads, then the kernel finds nothing left to reclaim); ``--cgroup-gb`` sets another size.

``--buffered`` sets the runner's ``O_DIRECT`` path against the page-cache one: a third disk-map side,
``runner+buffered`` (the runner with ``offload.direct_io=false``, on its own copy of the checkpoint), and a
fifth model in the rounds (the runner's 1 GiB disk map with ``offload.direct_io=false``).

``--quick`` (``bench/all.py``'s size): ``hf-gpt2`` only, 1 evicted and no warm forward per side, 1 round, no dd.

Run ``python bench/offload_bench.py``: ~4 minutes a checkpoint on 2 idle cores (a forward is ~4.5 s there;
other jobs can make it 2-3x longer), plus ~25-45 s to write each checkpoint and its copy the first time.
The exit code is 0 whatever the verdict.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (which puts this checkout's runner first)
import hf_checkpoint  # noqa: E402
from common import (GB, MiB, ROOT, RUNTIME_ALLOWANCE, MemoryGroup, Sampler, bytes_written,  # noqa: E402
                    compose_config, dd_rate, empty_gpt, evict, files_under, folder_state, gb, importable,
                    package_version, quiet, ratio, synthetic_folder)

BATCH, SEQ = 4, 128
CPU_BUDGET = "1GiB"
RUNTIME = ["hardware=cpu", "dtype=float32", f"runtime.batch_size={BATCH}", f"runtime.seq_len={SEQ}"]
MODEL_OVERRIDES = ["model=gpt2large", "checkpoint.shard_size=500MB", *RUNTIME]
TARGETS = {"load": 0.25, "evicted": 0.7, "warm": 1.05, "hooks": 1.03}
RSS_SLACK = RUNTIME_ALLOWANCE  # the "+ 600 MB" of runtime above the budget and two blocks
BUFFERED = ["offload.direct_io=false"]  # --buffered: disk blocks read through the page cache, not with O_DIRECT
CHECKPOINTS = ("synthetic", *hf_checkpoint.CHECKPOINTS)
DEFAULT_CHECKPOINTS = ["synthetic", "hf-gpt2"]
SAMPLE_EVERY = 64  # logits compared by value: every 64th of each row's last position


# -- probes -------------------------------------------------------------------------------------------------------

def largest_blocks(folder: Path, count: int = 2) -> int:
    """Bytes of the ``count`` largest blocks (``...h.N.`` / ``...layers.N.`` tensors) of the checkpoint in ``folder``,
    from the safetensors headers alone: the staging room a disk map needs, known before any side loads."""
    blocks: dict[str, int] = {}
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            match = re.search(r"\.(?:h|layers)\.\d+\.", name)
            if match and name != "__metadata__":
                start, end = info["data_offsets"]
                blocks[name[:match.end()]] = blocks.get(name[:match.end()], 0) + end - start
    return sum(sorted(blocks.values(), reverse=True)[:count])


def read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (all threads), from /proc/self/io."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


SPANS = ("mapped", "cached", "direct", "buffered")  # how a span was read: mapped in place or copied from the page cache, O_DIRECT, through the cache


class ReadStats:
    """The runner's disk reads, counted in the bench process only, on any thread: ``SpanReader.read`` calls (a
    disk block's spans read into its reused buffer: bytes = the spans' ``need``) and ``read_uncached`` calls (the
    fallback, one tensor, for a block with no span plan), with their seconds and the reading thread's CPU; the
    spans every prefetcher's reader read each way (``SpanReader.counts``); and the time the forward's thread spent
    in the prefetcher's ``before`` (a stall: waiting for a block's reads, or reading it itself)."""

    FIELDS = ("bytes", "calls", "read_s", "stall_s", "user_s", "sys_s", *SPANS)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = self.calls = 0
        self.read_s = self.stall_s = self.user_s = self.sys_s = 0.0
        self.readers: list[Any] = []  # each Prefetcher's SpanReader in this process

    def install(self) -> None:
        from runner.load.checkpoint.files import SafetensorsCheckpoint
        from runner.load.checkpoint.reads import SpanReader
        from runner.load.offload import Prefetcher
        stats, uncached, spans = self, SafetensorsCheckpoint.read_uncached, SpanReader.read
        init, before = Prefetcher.__init__, Prefetcher.before

        def timed_uncached(checkpoint, key):
            r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
            tensor = uncached(checkpoint, key)
            stats.record(tensor.numel() * tensor.element_size(), t0, r0)
            return tensor

        def timed_spans(reader, reads, buffer, *args, **kwargs):
            r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
            tensors = spans(reader, reads, buffer, *args, **kwargs)
            stats.record(sum(span.need for span in reads.spans), t0, r0)
            return tensors

        def seen_init(prefetcher, *args, **kwargs):
            init(prefetcher, *args, **kwargs)
            with stats.lock:
                stats.readers.append(prefetcher.reader)

        def timed_before(prefetcher, block):
            t0 = time.perf_counter()
            before(prefetcher, block)
            stats.stall_s += time.perf_counter() - t0

        SafetensorsCheckpoint.read_uncached, SpanReader.read = timed_uncached, timed_spans
        Prefetcher.__init__, Prefetcher.before = seen_init, timed_before

    def record(self, nbytes: int, t0: float, r0) -> None:
        """One read of ``nbytes`` that started at ``t0`` (perf_counter) with this thread's rusage ``r0``."""
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_THREAD)
        with self.lock:
            self.bytes += nbytes
            self.calls += 1
            self.read_s += dt
            self.user_s += r1.ru_utime - r0.ru_utime
            self.sys_s += r1.ru_stime - r0.ru_stime

    def spans(self) -> dict[str, int]:
        """Spans read so far, by how, over every reader."""
        return {how: sum(reader.counts[how] for reader in self.readers) for how in SPANS}

    def snapshot(self) -> tuple[float, ...]:
        with self.lock:
            spans = self.spans()
            return tuple(spans[f] if f in spans else getattr(self, f) for f in self.FIELDS)


# -- the children: one side each, in a fresh process --------------------------------------------------------------

def _tokens(vocab: int):
    import torch
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def _logits_summary(logits) -> dict[str, Any]:
    logits = getattr(logits, "logits", logits)  # transformers' classes return an output object
    last = logits[:, -1].float()
    return {"argmax": logits[:, -4:].float().argmax(-1).flatten().tolist(), "sum": float(last.sum()),
            "abs": float(last.abs().sum()), "sample": last[:, ::SAMPLE_EVERY].flatten().tolist()}


def _arch() -> dict[str, Any]:
    return {k: v for k, v in compose_config(*MODEL_OVERRIDES).model.arch.items() if k != "_target_"}


def runner_overrides(kind: str, folder: Path, side: str = "runner") -> list[str]:
    """The runner's model and checkpoint overrides for ``kind``'s checkpoint in ``folder`` (a side's copy for
    runner+buffered: a local checkpoint, same bytes)."""
    if kind != "synthetic":
        local = [*hf_checkpoint.runner_overrides(kind, folder), *RUNTIME]
    elif side == "runner":
        return MODEL_OVERRIDES
    else:
        local = [*(o for o in MODEL_OVERRIDES if not o.startswith("checkpoint.")), "checkpoint=local",
                 f"checkpoint.path={folder}"]
    return local + (BUFFERED if side == "runner+buffered" else [])


def vocab_size(kind: str, folder: Path) -> int:
    return _arch()["vocab_size"] if kind == "synthetic" else hf_checkpoint.hf_config(folder)["vocab_size"]


def child_write(kind: str) -> None:
    """Find ``kind``'s checkpoint, or have it written (the synthetic one by the runner); print its folder."""
    quiet()
    folder = synthetic_folder(*MODEL_OVERRIDES) if kind == "synthetic" else hf_checkpoint.write(kind)
    print("STEP " + json.dumps({"folder": str(folder)}), flush=True)


def empty_reference(kind: str, folder: Path):
    """Accelerate's side before dispatch: an empty model (head tied) and the block class it must not split."""
    if kind == "synthetic":
        return empty_gpt(_arch()), "Block"
    return hf_checkpoint.empty_model(kind, folder), hf_checkpoint.CHECKPOINTS[kind].block


def child_side(side: str, kind: str, work: Path, folder: Path) -> None:
    """One side with the disk map, as a server: the parent says ``load``, ``forward <kind>`` and ``done`` on
    stdin (having evicted the side's files when the step asks for it), and gets one ``STEP {json}`` line back."""
    quiet()
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    offload = work / f"{slug(side)}-offload"
    extra: dict[str, Any] = {}
    stats = None
    if side.startswith("runner"):
        from runner.infer.engine import Engine
        stats = ReadStats()
        stats.install()
        cfg = compose_config(*runner_overrides(kind, folder, side), f"max_memory.cpu={CPU_BUDGET}",
                             f"offload.folder={offload}")
        extra["prefetch"] = cfg.placement.prefetch
        extra["direct_io"] = cfg.placement.direct_io
    else:
        from accelerate import load_checkpoint_and_dispatch
        from accelerate.utils import infer_auto_device_map
        if kind != "synthetic":
            import transformers
            getattr(transformers, hf_checkpoint.CHECKPOINTS[kind].cls)  # a lazy module: import the class now
        shutil.rmtree(offload, ignore_errors=True)  # Accelerate rewrites it anyway; no stale files to evict
    tokens = _tokens(vocab_size(kind, folder))
    threads = torch.get_num_threads()
    sampler = Sampler()
    sampler.start()
    model, logits, forwards = None, None, []

    def step(payload: dict[str, Any]) -> None:
        print("STEP " + json.dumps(payload), flush=True)

    print("READY", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command == ["load"]:
            io0 = read_bytes()
            sampler.phase = "load"
            t0 = time.perf_counter()
            if side.startswith("runner"):
                extra["offload_state"] = folder_state(offload)  # what the runner writes there: nothing, for fp32
                result = Engine(cfg, work / f"{slug(side)}-run").loaded
                extra["offload_written_load"] = bytes_written(extra["offload_state"], folder_state(offload))
                model = result.model
                devices = result.check.block_devices
                disk = [b for b in result.layout.blocks if devices[b.name] == "disk"]
                extra["timings"] = dict(result.timings)
                extra["streamed"] = sum(b.nbytes for b in disk)
                extra["largest_disk_block"] = max((b.nbytes for b in disk), default=0)
                extra["map"] = _summarize({b.name: devices[b.name] for b in result.layout.blocks})
                extra["planned_cpu"] = sum(b.nbytes for b in result.layout.blocks if devices[b.name] == "cpu")
                extra["reserves"] = result.plan.reserves
                assert Path(result.checkpoint.files[0]).parent == folder, (result.checkpoint.files[0], folder)
            else:
                model, block = empty_reference(kind, folder)
                sizes = _module_bytes(model)
                device_map = infer_auto_device_map(model, max_memory={"cpu": _size(CPU_BUDGET)},
                                                   no_split_module_classes=[block])
                model = load_checkpoint_and_dispatch(model, checkpoint=str(folder), device_map=device_map,
                                                     offload_folder=str(offload), no_split_module_classes=[block])
                model.eval()
                extra["map"] = _summarize({k: str(v) for k, v in device_map.items()})
                extra["streamed"] = sum(sizes.get(k, 0) for k, v in device_map.items() if v == "disk")
                extra["planned_cpu"] = sum(sizes.get(k, 0) for k, v in device_map.items() if v == "cpu")
                dat = files_under(offload)
                extra["offload_files"] = {"count": len(dat), "bytes": sum(f.stat().st_size for f in dat),
                                          "kinds": sorted({f.suffix for f in dat})}
            load = time.perf_counter() - t0
            sampler.phase = "after load"
            extra["load_read_bytes"] = read_bytes() - io0
            step({"load": load})
        elif command[:1] == ["forward"]:
            i = len(forwards)
            sampler.phase = f"forward {i}"
            before = stats.snapshot() if stats else None
            io, c0, t = read_bytes(), time.process_time(), time.perf_counter()
            with torch.inference_mode():
                logits = model(tokens)
            wall, cpu, io = time.perf_counter() - t, time.process_time() - c0, read_bytes() - io
            sampler.phase = "between"
            row = {"kind": command[1], "wall": wall, "cpu": cpu, "busy": cpu / threads / wall, "read_bytes": io,
                   "rss": sampler.peaks.get(f"forward {i}", 0), "loadavg": os.getloadavg()[0]}
            if stats:
                after = stats.snapshot()
                row.update(zip(ReadStats.FIELDS, (a - b for a, b in zip(after, before))))
            forwards.append(row)
            print(f"  > {side} forward {i} ({command[1]}): {wall:.2f} s wall, {cpu:.2f} s cpu, "
                  f"{io / GB:.2f} GB read from the device", file=sys.stderr, flush=True)
            step(row)
        elif command == ["done"]:
            sampler.stop()
            if stats:
                extra["spans"] = stats.spans()
            if "offload_state" in extra:
                extra["offload_written"] = bytes_written(extra.pop("offload_state"), folder_state(offload))
            step({"forwards": forwards, "logits": _logits_summary(logits) if logits is not None else None,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_load": sampler.peaks.get("load", 0),
                  "rss_forwards": max((r["rss"] for r in forwards), default=0), **extra})
            return


def _plain_copy(runner_model, arch: dict[str, Any], assign: bool):
    """The runner's model class without the runner: built on meta, then its own copy of the runner's weights
    (``assign``: the runner's very tensors, no copy, no hooks). Its head is tied again where the runner's is:
    ``to_empty`` and ``assign`` give each name its own Parameter. Buffers no state dict carries (Llama's
    rotary ``inv_freq``) are the runner's too: on meta they would be empty."""
    import torch
    from torch import nn
    with torch.device("meta"):
        model = type(runner_model)(**arch).eval()
    if not assign:
        model = model.to_empty(device="cpu")
    state = runner_model.state_dict()
    missing, unexpected = model.load_state_dict(state, assign=assign)
    assert not missing and not unexpected, (missing, unexpected)
    for name, buffer in runner_model.named_buffers():
        if name not in state:  # non-persistent: computed by the constructor, never loaded
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, buffer if assign else buffer.clone(), persistent=False)
    head = runner_model.lm_head.weight
    tied = [n for n, m in runner_model.named_modules() if isinstance(m, nn.Embedding) and m.weight is head]
    if tied:
        model.lm_head.weight = model.get_submodule(tied[0]).weight
    return model


def child_compare(kind: str, work: Path, folder: Path, rounds: int, buffered: bool) -> None:
    """Warm, interleaved: the runner's all-resident map, the plain model, the runner's disk map (and, with
    ``buffered``, a second disk-map model with ``offload.direct_io=false``). The disk map's offload folder is
    the runner side's: this is its second run there, which must write nothing."""
    quiet()
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    from runner.infer.engine import Engine
    overrides = runner_overrides(kind, folder)
    tokens = _tokens(vocab_size(kind, folder))
    timings = {}
    t0 = time.perf_counter()
    resident = Engine(compose_config(*overrides, "max_memory.cpu=16GiB"), work / "resident-run").loaded
    timings["resident load"] = time.perf_counter() - t0
    assert set(resident.check.block_devices.values()) == {"cpu"}, resident.check.block_devices
    arch = {k: v for k, v in resident.config.model.arch.items() if k != "_target_"}  # resolved from config.json too
    t0 = time.perf_counter()
    plain = _plain_copy(resident.model, arch, assign=False)  # a copy: the plain model's own memory
    timings["plain load_state_dict"] = time.perf_counter() - t0
    shared = _plain_copy(resident.model, arch, assign=True)  # a diagnostic: hooks alone
    offload_folder = work / "runner-offload"
    before = folder_state(offload_folder)
    t0 = time.perf_counter()
    offload = Engine(compose_config(*overrides, f"max_memory.cpu={CPU_BUDGET}", f"offload.folder={offload_folder}"),
                      work / "runner-run").loaded
    timings["disk-map load"] = time.perf_counter() - t0
    written = {"load": bytes_written(before, folder_state(offload_folder))}
    models = {"resident": resident.model, "plain": plain, "plain, runner's tensors": shared,
              "disk map (warm)": offload.model}
    if buffered:
        t0 = time.perf_counter()
        through_cache = Engine(compose_config(*overrides, f"max_memory.cpu={CPU_BUDGET}",
                                               f"offload.folder={offload_folder}", *BUFFERED),
                                work / "runner-run").loaded
        timings["buffered disk-map load"] = time.perf_counter() - t0
        models["disk map (warm, buffered)"] = through_cache.model
    threads = torch.get_num_threads()
    width = arch.get("n_embd") or arch["hidden_size"]
    hook_s, hooks = _hook_cost(resident.model, torch.zeros(BATCH, SEQ, width))
    times: dict[str, list[float]] = {k: [] for k in models}
    cpus: dict[str, list[float]] = {k: [] for k in models}
    io: dict[str, int] = dict.fromkeys(models, 0)
    logits = {}
    names = list(models)
    for r in range(rounds + 1):  # round 0 is every model's warm-up
        order = names[r % len(names):] + names[:r % len(names)]  # rotate, so no model always goes first
        for name in order:
            b, c, t = read_bytes(), time.process_time(), time.perf_counter()
            with torch.inference_mode():
                out = models[name](tokens)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            if r:
                times[name].append(wall)
                cpus[name].append(cpu)
                io[name] += read_bytes() - b
            logits[name] = _logits_summary(out)
            print(f"  > compare round {r} {name}: {wall:.2f} s wall, {cpu:.2f} s cpu", file=sys.stderr, flush=True)
    written["total"] = bytes_written(before, folder_state(offload_folder))
    print("STEP " + json.dumps({"times": times, "cpu": cpus, "threads": threads, "read_bytes": io, "logits": logits,
                                "timings": timings, "hook_s": hook_s, "hooks": hooks,
                                "offload_written": written}), flush=True)


def _hook_cost(model, x, repeats: int = 200) -> tuple[float, int]:
    """Seconds the model's forward hooks take per forward, called directly on an activation-sized input (their
    own cost, free of the forward-to-forward noise), and how many there are."""
    calls = []
    for module in model.modules():
        for key, hook in module._forward_pre_hooks.items():
            with_kwargs = key in module._forward_pre_hooks_with_kwargs
            calls.append((hook, module, with_kwargs))
    t0 = time.perf_counter()
    for _ in range(repeats):
        for hook, module, with_kwargs in calls:
            hook(module, (x,), {}) if with_kwargs else hook(module, (x,))
    return (time.perf_counter() - t0) / repeats, len(calls)


def slug(side: str) -> str:
    return side.replace("+", "-")


def _size(text: str) -> int:
    from runner.config.sizes import parse_size
    return parse_size(text)


def _module_bytes(model) -> dict[str, int]:
    """Bytes of each module name Accelerate's map may use, from the empty model before dispatch; a tied
    tensor counts once, in the module that names it first (the embedding, not the head)."""
    params = [(name, p.numel() * p.element_size()) for name, p in model.named_parameters()]
    return {m: sum(n for name, n in params if name.startswith(m + ".")) for m, _ in model.named_modules() if m}


def _summarize(device_map: dict[str, str]) -> str:
    """'cpu[wte..h.3 6] -> disk[h.4..ln_f 33] -> cpu[lm_head 1]'."""
    runs: list[tuple[str, list[str]]] = []
    for name, device in device_map.items():
        short = name.removeprefix("transformer.")
        if runs and runs[-1][0] == device:
            runs[-1][1].append(short)
        else:
            runs.append((device, [short]))
    return " -> ".join(f"{d}[{n[0]}{'..' + n[-1] if len(n) > 1 else ''} {len(n)}]" for d, n in runs)


# -- the parent -----------------------------------------------------------------------------------------------------

class Child:
    """A bench subprocess: commands on its stdin, one ``STEP {json}`` line back per command (``READY`` first);
    its ``  > `` progress lines are passed through, the rest of its stderr (tqdm bars, warnings) kept for errors."""

    def __init__(self, *args: str, limit: int | None = None):
        """``limit``: run the child in a fresh memory cgroup of that many bytes (page cache counted)."""
        self.group = MemoryGroup(f"offload-{slug(args[0])}", limit) if limit else None
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
        if self.group:
            self.group.__enter__()
            if self.group.warning:
                print(self.group.warning, flush=True)
            cmd = self.group.wrap(cmd)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(("STEP ", "READY")):
                self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            if line.startswith("  > "):
                print(line.rstrip("\n"), file=sys.stderr, flush=True)
            self.stderr.append(line)

    def ask(self, command: str | None, timeout: float) -> dict[str, Any]:
        """Send ``command`` (None: just wait) and return its STEP payload, or ``{"error": ...}``."""
        try:
            if command is not None:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except (BrokenPipeError, OSError):
            line = None
        except queue.Empty:
            self.proc.kill()
            return {"error": f"no answer to {command!r} within {timeout:.0f} s"}
        if line is None:
            self.proc.wait()
            time.sleep(0.2)  # let the stderr pump finish
            tail = [x.strip() for x in "".join(self.stderr).replace("\r", "\n").splitlines() if x.strip()]
            return {"error": (tail or [f"exit code {self.proc.returncode}"])[-1][:400]}
        return json.loads(line[5:]) if line.startswith("STEP ") else {"ready": True}

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.group:
            self.group.__exit__(None, None, None)


def med(values: list[float]) -> float | None:
    """The median, or None when nothing was measured (e.g. reads the instrumentation does not see)."""
    return statistics.median(values) if values else None


def verdict(ok: bool | None, text: str) -> str:
    return f"[{'n/a ' if ok is None else 'PASS' if ok else 'MISS'}] {text}"


BUSY_OK = 0.9  # a forward that got less than this share of the cores ran on a busy machine (other jobs)


def describe(checkpoint: str) -> str:
    if checkpoint == "synthetic":
        return "the runner's synthetic checkpoint (nn.Linear layout); both sides dispatch runner.zoo.gpt.GPT"
    spec = hf_checkpoint.CHECKPOINTS[checkpoint]
    return (f"written by transformers' save_pretrained ({spec.cls}); the runner loads it with "
            f"{' '.join(spec.runner)} checkpoint=local, Accelerate dispatches {spec.cls}")


def same_logits(v: dict[str, Any], ref: dict[str, Any]) -> tuple[bool, float]:
    """The same argmax over the last positions, and every sampled value of the last positions within 1e-3 of
    the largest (the classes may differ: sums run in other orders); and the largest difference."""
    diff = max((abs(x - y) for x, y in zip(v["sample"], ref["sample"])), default=float("inf"))
    scale = max(1.0, max((abs(y) for y in ref["sample"]), default=0.0))
    return v["argmax"] == ref["argmax"] and diff <= 1e-3 * scale, diff


def written_lines(sides: dict[str, dict[str, Any]], compare: dict[str, Any], folder: Path) -> list[str]:
    """What the runner's runs wrote into its offload folder (files new or changed, in bytes), and the verdict:
    the second run (the warm rounds' disk map, after the runner side's run) writes nothing."""
    runs = []
    for side, r in sides.items():
        if "offload_written" in r:
            runs.append(f"{side}: load {r['offload_written_load']:,} B, whole run {r['offload_written']:,} B")
    second = compare.get("offload_written") if "error" not in compare else None
    if second:
        runs.append(f"warm rounds' disk map (second run): load {second['load']:,} B, whole run {second['total']:,} B")
    where = f"{folder}" + ("" if folder.exists() else " (never created: nothing to convert)")
    lines = [f"[info] bytes written to the offload folder {where}: " + ("; ".join(runs) or "not measured")]
    if not any("offload_written" in r for r in sides.values()):
        lines[0] += " (no runner side ran before the warm rounds here: theirs may be a first run)"
    if second is None:
        lines.append(verdict(None, "zero bytes written to the offload folder on the second run: not measured"))
    else:
        lines.append(verdict(second["total"] == 0, f"zero bytes written to the offload folder on the second run: "
                                                   f"{second['total']:,} B"))
    return lines


def report(checkpoint: str, sides: dict[str, dict[str, Any]], compare: dict[str, Any], dd: float | None,
           dd_note: str, total: int, offload_folder: Path) -> None:
    acc = sides.get("accelerate", {})
    print(f"\n== checkpoint {checkpoint}: {describe(checkpoint)} ==")
    print(f"All figures: GB = 1e9 bytes, seconds. Checkpoint {gb(total)} GB fp32; batch {BATCH} x {SEQ} tokens; "
          f"max_memory.cpu={CPU_BUDGET}, the rest on disk. 'busy' = process CPU time / (torch threads x wall): "
          f"~1 when the forward had the cores to itself, lower when other jobs took them.")
    for side, r in sides.items():
        if "error" in r:
            print(f"{side}: error: {r['error']}")
    ok = {s: r for s, r in sides.items() if "error" not in r}
    def kinds(r: dict[str, Any], kind: str) -> list[dict[str, Any]]:
        return [f for f in r["forwards"] if f["kind"] == kind]

    def spans_text(counts: dict[str, float | None]) -> str:
        """SpanReader.counts: spans mapped in place or copied from the page cache, read with O_DIRECT, or through the cache."""
        return ", ".join(f"{'-' if counts.get(how) is None else f'{counts[how]:.0f}'} {how}" for how in SPANS)

    def span_medians(rows: list[dict[str, Any]]) -> str:
        return spans_text({how: med([f[how] for f in rows if how in f]) for how in SPANS})

    if ok:
        print("\nDisk-map runs (one subprocess per side, forwards alternating between the sides; evicted: medians):")
        head = (f"{'side':15} {'load':>6} {'evicted fwd':>11} {'cpu s':>6} {'busy':>4} {'stall':>5} {'warm fwd':>8} "
                f"{'streamed/fwd':>12} {'device read/fwd':>15} {'peak RSS':>8} {'RSS fwds':>8} {'RSS load':>8}")
        print(head)
        print("-" * len(head))
        for side, r in ok.items():
            ev, wm = kinds(r, "evicted"), kinds(r, "warm")
            stall = f"{med([f['stall_s'] for f in ev]):5.2f}" if "stall_s" in ev[0] else f"{'-':>5}"
            print(f"{side:15} {r['load']:6.2f} {med([f['wall'] for f in ev]):11.2f} {med([f['cpu'] for f in ev]):6.2f} "
                  f"{med([f['busy'] for f in ev]):4.2f} {stall} "
                  f"{med([f['wall'] for f in wm]) if wm else float('nan'):8.2f} {gb(r['streamed']):>12} "
                  f"{gb(med([f['read_bytes'] for f in ev])):>15} {gb(r['peak']):>8} {gb(r['rss_forwards']):>8} "
                  f"{gb(r['rss_load']):>8}")
        for side, r in ok.items():
            print(f"  {side}: map {r['map']}; CPU-planned weights {gb(r['planned_cpu'])} GB")
            print("    forwards (wall s/busy): " + ", ".join(f"{f['kind']} {f['wall']:.2f}/{f['busy']:.2f}"
                                                    for f in r["forwards"]))
            print(f"    bytes of its files still cached after each eviction: before the load "
                  f"{r['cached_before_load'] / MiB:.0f} MiB, before forwards at most {max(r['cached']) / MiB:.0f} MiB "
                  f"(mapped pages of resident weights stay); read from the device by the load: "
                  f"{gb(r['load_read_bytes'])} GB")
            if side.startswith("runner"):
                print(f"    prefetch depth {r['prefetch']}, offload.direct_io={str(r['direct_io']).lower()}; "
                      f"spans read over the whole run: {spans_text(r['spans'])}")
                print("    stages (s): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
                      + "; reserves: " + ", ".join(f"{d}: " + ", ".join(f"{k} {gb(v)}" for k, v in x.items())
                                                   for d, x in r["reserves"].items()) + " GB")
            if "offload_files" in r:
                f = r["offload_files"]
                print(f"    offload folder after the load: {f['count']} files, {gb(f['bytes'])} GB "
                      f"({', '.join(f['kinds'])})")

    print("\nDisk reads during an evicted forward (medians over the evicted forwards):")
    for side, r in ok.items():
        ev, wm = kinds(r, "evicted"), kinds(r, "warm")
        wall = med([f["wall"] for f in ev])
        if "bytes" not in ev[0]:
            print(f"  {side}: {gb(med([f['read_bytes'] for f in ev]))} GB from the device, "
                  f"{gb(med([f['read_bytes'] for f in ev]) / wall)} GB/s over the forward")
            continue
        print(f"  {side}: {gb(med([f['bytes'] for f in ev]))} GB streamed in {med([f['calls'] for f in ev]):.0f} "
              f"reads: {gb(med([f['bytes'] for f in ev]) / wall)} GB/s over the forward, "
              f"{gb(med([f['bytes'] / f['read_s'] for f in ev if f['read_s']]))} GB/s while reading (bytes / seconds "
              f"inside the reads); the forward waited {med([f['stall_s'] for f in ev]):.2f} s of {wall:.2f} s "
              f"for blocks; the reads cost {med([f['sys_s'] for f in ev]):.2f} s system + "
              f"{med([f['user_s'] for f in ev]):.2f} s user CPU (getrusage of the reading thread); "
              f"spans: {span_medians(ev)}")
        if wm:
            print(f"    warm: {gb(med([f['bytes'] / f['read_s'] for f in wm if f['read_s']]))} GB/s while reading, "
                  f"{gb(med([f['read_bytes'] for f in wm]))} GB from the device; the reads cost "
                  f"{med([f['sys_s'] for f in wm]):.2f} s system + {med([f['user_s'] for f in wm]):.2f} s user CPU; "
                  f"spans: {span_medians(wm)}")
    print(f"  dd iflag=direct bs=16M, same shards: {'-' if dd is None else f'{dd:.2f} GB/s'} ({dd_note})")

    cmp_ok = bool(compare) and "error" not in compare
    busy: dict[str, list[float]] = {}
    if cmp_ok:
        threads = compare["threads"]
        busy = {n: [c / threads / w for c, w in zip(compare["cpu"][n], t)] for n, t in compare["times"].items()}
        print(f"\nWarm, interleaved in one subprocess ({len(compare['times']['resident'])} rounds after a warm-up "
              f"round): wall s fastest, median; process CPU s median; each round's wall/busy")
        for name, t in compare["times"].items():
            print(f"  {name:25} {min(t):6.2f} {med(t):6.2f} {med(compare['cpu'][name]):6.2f}   "
                  + ", ".join(f"{x:.2f}/{b:.2f}" for x, b in zip(t, busy[name]))
                  + f"   (device reads {gb(compare['read_bytes'][name])} GB)")
        print("  loads (s): " + ", ".join(f"{k} {v:.2f}" for k, v in compare["timings"].items()))
    elif compare:
        print(f"\ncompare: error: {compare['error']}")

    ref = compare.get("logits", {}).get("plain") if cmp_ok else None
    if ref:
        rows = {**{f"compare {k}": v for k, v in compare["logits"].items()},
                **{s: r["logits"] for s, r in ok.items()}}
        checks = {n: same_logits(v, ref) for n, v in rows.items()}
        print("\nLogits against the plain model's (the same argmax over the last 4 positions of every row, the last "
              "positions' values within 1e-3 of the largest): "
              + ", ".join(f"{n} {'same' if ok else 'DIFFERENT'} (max diff {diff:.1e})"
                          for n, (ok, diff) in checks.items()))

    def interleaved(key: str, name: str, base: str, label: str) -> str:
        if not cmp_ok or name not in compare["times"]:
            return verdict(None, f"{label}: not measured")
        # Each round runs every model once, back to back: a busy spell on the machine hits a round's forwards
        # alike, so the ratio within a round is what is compared, and the median over rounds is judged.
        t, c = compare["times"], compare["cpu"]
        paired = med([a / b for a, b in zip(t[name], t[base])])
        quiet = sum(busy[name][i] >= BUSY_OK and busy[base][i] >= BUSY_OK for i in range(len(t[name])))
        wall_ratio, cpu_ratio = min(t[name]) / min(t[base]), med(c[name]) / med(c[base])
        return verdict(paired <= TARGETS[key], f"{label}: {paired:.3f}x <= {TARGETS[key]} (median over rounds of the "
                                               f"ratio within a round; {quiet} of {len(t[name])} rounds had the cores; "
                                               f"fastest wall {min(t[name]):.2f} vs {min(t[base]):.2f} s = "
                                               f"{wall_ratio:.3f}x, median wall {med(t[name]) / med(t[base]):.3f}x, "
                                               f"median CPU {cpu_ratio:.3f}x)")

    has_acc = bool(acc) and "error" not in acc
    for side, warm_model, tag in (("runner", "disk map (warm)", ""),
                                  ("runner+buffered", "disk map (warm, buffered)", "[runner+buffered] ")):
        if side not in sides:
            continue
        r = sides[side]
        has = "error" not in r
        print(f"\n{tag}the same targets reading through the page cache (offload.direct_io=false):" if tag
              else f"\nTargets ({checkpoint} checkpoint):")
        lines = []
        if has and has_acc:
            a, b = r["load"], acc["load"]
            lines.append(verdict(a <= TARGETS["load"] * b, f"load {a:.2f} s <= {TARGETS['load']} x Accelerate's "
                                                           f"{b:.2f} s = {TARGETS['load'] * b:.2f} s ({a / b:.2f}x)"))
            ev_a, ev_b = kinds(r, "evicted"), kinds(acc, "evicted")
            a, b = med([f["wall"] for f in ev_a]), med([f["wall"] for f in ev_b])
            lines.append(verdict(a <= TARGETS["evicted"] * b,
                                 f"evicted forward {a:.2f} s <= {TARGETS['evicted']} x Accelerate's {b:.2f} s = "
                                 f"{TARGETS['evicted'] * b:.2f} s ({a / b:.2f}x; busy "
                                 f"{med([f['busy'] for f in ev_a]):.2f} vs {med([f['busy'] for f in ev_b]):.2f})"))
        else:
            lines += [verdict(None, "load vs Accelerate: not measured"),
                      verdict(None, "evicted forward vs Accelerate: not measured")]
        lines.append(interleaved("warm", warm_model, "resident", "warm forward, disk map vs the runner's all-resident"))
        if has:
            bound = _size(CPU_BUDGET) + 2 * r["largest_disk_block"] + RSS_SLACK
            lines.append(verdict(r["peak"] <= bound,
                                 f"peak RSS {gb(r['peak'])} GB <= 1 GiB + two blocks ({gb(2 * r['largest_disk_block'])}"
                                 f") + 600 MB = {gb(bound)} GB" + (f" (Accelerate {gb(acc['peak'])} GB: "
                                                                   f"{r['peak'] / acc['peak']:.2f}x)" if has_acc else "")))
        else:
            lines.append(verdict(None, "peak RSS: not measured"))
        if not tag:
            lines += written_lines(sides, compare, offload_folder)
            lines.append(interleaved("hooks", "resident", "plain", "hook overhead, all-resident runner vs plain model"))
            if cmp_ok:
                t, c, sh = compare["times"], compare["cpu"], "plain, runner's tensors"
                lines.append(f"[info] the same split on the same tensors: all-resident runner vs the plain model on "
                             f"the runner's tensors (hooks alone) {min(t['resident']) / min(t[sh]):.3f}x fastest wall, "
                             f"{med(c['resident']) / med(c[sh]):.3f}x CPU; plain on the runner's tensors vs plain on "
                             f"its own copy (mapped checkpoint pages vs anonymous memory) "
                             f"{min(t[sh]) / min(t['plain']):.3f}x, {med(c[sh]) / med(c['plain']):.3f}x CPU")
                lines.append(f"[info] the hooks' own code, timed directly: {compare['hooks']} pre-forward hooks, "
                             f"{compare['hook_s'] * 1e6:.0f} us per forward = "
                             f"{compare['hook_s'] / min(t['resident']):.4%} of the all-resident forward")
        if has and has_acc and kinds(r, "warm") and kinds(acc, "warm"):
            wa, wb = kinds(r, "warm"), kinds(acc, "warm")
            lines.append(f"[info] warm forward vs Accelerate's warm forward: "
                         f"{ratio(med([f['wall'] for f in wa]), med([f['wall'] for f in wb]))} (busy "
                         f"{med([f['busy'] for f in wa]):.2f} vs {med([f['busy'] for f in wb]):.2f}; "
                         f"CPU {ratio(med([f['cpu'] for f in wa]), med([f['cpu'] for f in wb]))})")
        print("\n".join(f"  {line}" for line in lines))


def copy_checkpoint(folder: Path, to: Path) -> Path:
    """A side's own copy of the checkpoint (same bytes: Accelerate's, runner+buffered's), so that the live sides
    share no page cache: pages one side maps for its resident blocks would otherwise be cache hits for another's
    disk reads."""
    to.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        if file.is_file() and not ((to / file.name).is_file() and (to / file.name).stat().st_size == file.stat().st_size):
            shutil.copyfile(file, to / file.name)
    return to


def work_of(cache: Path, kind: str) -> Path:
    """The bench's folder for ``kind``: checkpoint copies, offload folders, run folders."""
    work = cache / "offload-bench"
    return work if kind == "synthetic" else work / kind


def bench_checkpoint(kind: str, args: argparse.Namespace, cache: Path, start: float) -> dict[str, Any]:
    """The disk-map sides and the warm rounds on ``kind``'s checkpoint, then its report; the raw figures."""
    if kind != "synthetic" and not importable("transformers"):
        print(f"\n== checkpoint {kind}: skipped, transformers is not importable (it writes the checkpoint) ==")
        return {}
    work = work_of(cache, kind)
    work.mkdir(parents=True, exist_ok=True)
    writer = Child("write", kind)
    written = writer.ask(None, timeout=900)
    writer.close()
    if "error" in written:
        print(f"cannot write the {kind} checkpoint: {written['error']}")
        return {}
    folder = Path(written["folder"])
    shards = sorted(folder.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in shards)
    names = [s for s in ("runner", "accelerate") if s in args.sides]
    if "accelerate" in names and not importable("accelerate"):
        names.remove("accelerate")
    if args.buffered and "runner" in names:
        names.append("runner+buffered")
    folders = {"runner": folder}
    for side in names[1:]:  # each live side its own copy: no shared page cache, no shared mapped pages
        folders[side] = copy_checkpoint(folder, work / f"{slug(side)}-checkpoint")
    print(f"\ncheckpoint {kind}: {folder} ({len(shards)} shards, {gb(total)} GB; copies for "
          + (", ".join(f"{s} in {folders[s]}" for s in names[1:]) or "-")
          + f"), ready after {time.perf_counter() - start:.0f} s", flush=True)
    dd, dd_note = (None, "skipped") if args.no_dd else dd_rate(shards)
    roots = {side: (folders[side], work / f"{slug(side)}-offload") for side in names}
    sides = run_sides(kind, names, folders, roots, args)
    print(f"[{kind}: disk-map sides done after {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)

    compare: dict[str, Any] = {}
    if "compare" in args.sides:
        child = Child("compare", kind, str(folder), str(args.rounds), "1" if args.buffered else "0")
        compare = child.ask(None, timeout=1200)
        child.close()
        print(f"[{kind}: compare done after {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    report(kind, sides, compare, dd, dd_note, total, work / "runner-offload")
    return {"sides": sides, "compare": compare, "dd": dd}


def run_sides(kind: str, names: list[str], folders: dict[str, Path], roots: dict[str, tuple[Path, Path]],
              args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The disk-map sides, live together; one load at a time, then their forwards alternating."""
    sides: dict[str, dict[str, Any]] = {}
    children: dict[str, Child] = {}
    limit = _size(CPU_BUDGET) + largest_blocks(folders["runner"]) + RSS_SLACK  # the budget plus the runtime
    rule = f"{CPU_BUDGET} + two blocks {gb(largest_blocks(folders['runner']))} GB + {gb(RSS_SLACK)} GB"
    if args.cgroup_gb:  # another size, asked for: say it is not the rule's
        limit, rule = int(args.cgroup_gb * GB), f"--cgroup-gb, not the rule's {gb(limit)} GB = {rule}"
    print(f"  each disk-map side in a memory cgroup of {gb(limit)} GB (page cache counted; {rule})", flush=True)
    for side in names:  # started together, idle until asked: the parent alternates their forwards
        children[side] = Child(side, kind, str(folders[side]), limit=limit)
        sides[side] = {"cached": []}
    for side in names:
        got = children[side].ask(None, timeout=300)
        if "error" in got:
            sides[side] = got
    live = [s for s in names if "error" not in sides[s]]
    for side in live:  # one load at a time, the other side idle
        sides[side]["cached_before_load"] = evict(*roots[side])
        got = children[side].ask("load", timeout=600)
        sides[side].update(got)
        print(f"  > {side} load: " + (got["error"] if "error" in got else f"{got['load']:.2f} s"), file=sys.stderr,
              flush=True)
    plan = ["warm-up"] + ["evicted"] * args.repeats + ["warm"] * args.warm
    for i, step in enumerate(plan):
        live = [s for s in names if "error" not in sides[s]]
        if not live:  # --sides compare alone, or every side failed
            break
        for side in live[i % len(live):] + live[:i % len(live)]:  # rotate who goes first
            if step != "warm":  # only this side's files: the other side's cache stays as it left it
                sides[side]["cached"].append(evict(*roots[side]))
            got = children[side].ask(f"forward {step}", timeout=600)
            if "error" in got:
                sides[side]["error"] = got["error"]
    for side in names:
        if "error" not in sides[side]:
            got = children[side].ask("done", timeout=120)
            sides[side].update(got)
        children[side].close()
        group = children[side].group
        sides[side]["cgroup"] = group.record()
        if group.usage and group.usage.oom_kills and "error" in sides[side]:
            sides[side]["error"] += " (OOM-killed in its memory cgroup)"
        print(f"  {side}: {group.describe()}", flush=True)
    return sides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="runner cache (default: RUNNER_CACHE, else /tmp/offload-bench-cache)")
    parser.add_argument("--checkpoint", nargs="+", choices=CHECKPOINTS, default=DEFAULT_CHECKPOINTS,
                        help="checkpoints to benchmark, one after the other, one report each (default: "
                             f"{' '.join(DEFAULT_CHECKPOINTS)}; tinyllama writes 4.4 GB more)")
    parser.add_argument("--repeats", type=int, default=3, help="evicted forwards per side, after one warm-up")
    parser.add_argument("--warm", type=int, default=1, help="warm forwards per side after the evicted ones")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved warm rounds (resident, plain, disk map) after a warm-up round")
    parser.add_argument("--sides", nargs="+", choices=("runner", "accelerate", "compare"),
                        default=["runner", "accelerate", "compare"])
    parser.add_argument("--no-dd", action="store_true", help="skip the dd reference")
    parser.add_argument("--buffered", action="store_true",
                        help="also run the runner with offload.direct_io=false (disk blocks read through the page "
                             "cache, not with O_DIRECT): a third disk-map side, runner+buffered, and a fifth model "
                             "in the warm rounds")
    parser.add_argument("--json", type=Path, help="also write the raw figures here, by checkpoint")
    parser.add_argument("--cgroup-gb", type=float,
                        help="the disk-map sides' memory cgroup in GB (default: 1 GiB + two blocks + 600 MB)")
    parser.add_argument("--quick", action="store_true",
                        help="bench/all.py's size: hf-gpt2 only, 1 evicted and no warm forward, 1 round, no dd")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.checkpoint, args.repeats, args.warm, args.rounds, args.no_dd = ["hf-gpt2"], 1, 0, 1, True
    cache = (args.cache or Path(os.environ.get("RUNNER_CACHE") or "/tmp/offload-bench-cache")).expanduser().resolve()
    os.environ["RUNNER_CACHE"] = str(cache)  # the checkpoints' folders follow it
    if args.child:  # write KIND | compare KIND FOLDER ROUNDS BUFFERED | SIDE KIND FOLDER
        role, kind, rest = args.child[0], args.child[1], args.child[2:]
        if role == "write":
            child_write(kind)
        elif role == "compare":
            child_compare(kind, work_of(cache, kind), Path(rest[0]), int(rest[1]), rest[2] == "1")
        else:
            child_side(role, kind, work_of(cache, kind), Path(rest[0]))
        return 0

    start = time.perf_counter()
    print(f"torch {package_version('torch')}, accelerate {package_version('accelerate')}, transformers "
          f"{package_version('transformers')}; {os.cpu_count()} cpus (torch threads {os.cpu_count()}); cache {cache}; "
          f"checkpoints: {' '.join(args.checkpoint)}", flush=True)
    print(f"plan, per checkpoint: each side 1 warm-up + {args.repeats} evicted + {args.warm} warm forwards, the sides "
          f"alternating; then 1 warm-up + {args.rounds} interleaved rounds of " + ("5" if args.buffered else "4")
          + " models", flush=True)
    raw = {kind: bench_checkpoint(kind, args, cache, start) for kind in dict.fromkeys(args.checkpoint)}
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    print(f"\n(bench wall time {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
