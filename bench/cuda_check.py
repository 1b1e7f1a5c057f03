#!/usr/bin/env python
"""CUDA checks of the offload engine, for anyone with a GPU: ``python bench/cuda_check.py [--out DIR]``.

The checkpoint is a transformers-written GPT-2 XL (``GPT2LMHeadModel`` with its random init, float16,
``save_pretrained``), written once into ``--cache`` (default ``/tmp/cuda-check``). Half of its blocks
(``transformer.h.24`` to ``h.47``) are placed on the CPU and the rest on ``cuda:0``, the same split for both sides:

1. **tokens/s against Accelerate + transformers' ``generate``**: 64 prompts of 28-36 random token ids, 32 new
   tokens each, greedy, one batch, after both sides ran once on two short prompts (CUDA loads its kernels
   on first use: whoever ran first would pay for both). The runner loads the checkpoint into its zoo GPT-2
   (``model=gpt2xl checkpoint=local``) with that split as a partial ``device_map``; Accelerate's side is
   ``GPT2LMHeadModel.from_pretrained(device_map=<the split>)`` and ``model.generate``. Both are timed from the
   start of the load to the last token, and generation alone. The runner also runs 128 sequences in flight as
   ``runtime.micro_batches=2`` of 64 rows.
2. **host-to-device GB/s of the prefetcher** (the CPU blocks' pinned copies, moved on its copy stream) against
   one plain pinned ``copy_`` of the same number of bytes.
3. **``torch.cuda.max_memory_allocated`` against the plan's predicted peak** on ``cuda:0``.
4. **the plan's predicted decode tokens/s** (``runner.plan.throughput``) against the measured one.
5. The pipeline over GPU stages (micro-batches staggered by a stage) needs two GPUs: not measured on one.

``--smoke`` runs the same code on a tiny GPT-2 on the CPU (no CUDA figures), to check the script itself.
Results are printed and written as JSON to ``--out`` (default: the cache folder).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's runner

XL = dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)
TINY = dict(n_layer=4, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)
PROMPTS, NEW_TOKENS = 64, 32


class Ids:
    """The tokenizer the runner's generate needs, for token ids only."""

    eos_ids: frozenset = frozenset()
    pad_id = 0

    def decode(self, ids):
        return ""


def write_checkpoint(folder: Path, arch: dict) -> Path:
    """A transformers-written GPT-2 in float16, once (reused when it is there), with a stand-in tokenizer.json: the
    check feeds token ids, but a local checkpoint must carry a tokenizer."""
    if folder.is_dir():
        return folder
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**arch)).to(torch.float16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="1GB", safe_serialization=True)
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tmp / "tokenizer.json"))
    tmp.rename(folder)
    return folder


def prompts(vocab: int, n: int = PROMPTS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (int(torch.randint(28, 37, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def split(arch: dict, gpu: str) -> dict[str, str]:
    """The second half of the blocks on the CPU, the rest on the GPU."""
    half = arch["n_layer"] // 2
    return {f"transformer.h.{i}": ("cpu" if i >= half else gpu) for i in range(arch["n_layer"])}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def runner_side(folder: Path, arch: dict, ids: list[list[int]], cuda: bool, micro_batches: int) -> dict:
    from runner.infer.engine import Engine
    from runner.infer.generate import GenerationStats, Request, generate
    from runner.infer.sampling import SamplingParams
    from runner.run.report import report_document
    from runner.config.resources import runner_cache
    from runner.plan.throughput import measure_rates, step_cost

    pins = [f"+device_map.{k}={v}" for k, v in split(arch, "cuda:0" if cuda else "cpu").items() if v == "cpu"]
    overrides = ["model=gpt2xl", *(f"model.arch.{k}={v}" for k, v in _zoo_arch(arch).items()), "checkpoint=local",
                 f"checkpoint.path={folder}", "dtype=float16" if cuda else "dtype=float32",
                 "hardware=auto" if cuda else "hardware=cpu", f"runtime.batch_size={len(ids)}",
                 f"runtime.micro_batches={micro_batches}", f"runtime.seq_len={max(map(len, ids)) + NEW_TOKENS}",
                 f"task.max_new_tokens={NEW_TOKENS}", *(pins if cuda else [])]
    baseline = 0
    if cuda:  # what earlier sides left (nothing, once collected) is not this side's
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = Engine.from_overrides(overrides)
    sync()
    loaded = time.perf_counter() - start
    requests = [Request(i, "", tuple(p)) for i, p in enumerate(ids * micro_batches)]
    stats = GenerationStats()
    begin = time.perf_counter()
    out = generate(engine.lm, Ids(), requests, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                   batch_size=len(ids), micro_batches=micro_batches, seed=0, stats=stats, streams=engine.streams)
    sync()
    generating = time.perf_counter() - begin
    tokens = sum(len(c.output_tokens) for c in out)
    devices = {d["name"]: d for d in report_document(engine.loaded)["devices"]}
    rates = measure_rates(engine.loaded, runner_cache())
    cost = step_cost(engine.loaded, rates)
    result = {
        "sequences": len(requests), "load_s": round(loaded, 3), "generate_s": round(generating, 3),
        "tokens": tokens, "tokens_per_s_end_to_end": round(tokens / (loaded + generating), 2),
        "tokens_per_s_generating": round(tokens / generating, 2),
        "decode_tokens_per_s": round(stats.decode_rows / max(stats.decode_s, 1e-9), 2),
        "predicted_decode_tokens_per_s": cost.tokens_per_s, "predicted_bound": cost.bound,
        "predicted_step_s": cost.seconds, "rates": {"disk": rates.disk, "host_to_device": rates.host_to_device,
                                                    "flops": rates.flops},
        "block_loads": engine.streams.loads if engine.streams else 0,
        "first_tokens": [c.output_tokens[:8] for c in out[:2]],
    }
    main = devices.get("cuda:0")
    if main is not None:
        result["cuda0"] = {k: main[k] for k in ("budget", "planned_bytes", "reserve", "predicted_peak_bytes",
                                                "measured_peak_bytes", "measured_by")}
        result["cuda0"]["allocated_before"] = baseline
        result["cuda0"]["measured_over_predicted"] = round(
            (main["measured_peak_bytes"] - baseline) / main["predicted_peak_bytes"], 3)
    if cuda and engine.streams is not None:
        result["prefetcher_h2d"] = prefetcher_rate(engine.streams)
    return result


def _zoo_arch(arch: dict) -> dict:
    return {"n_layer": arch["n_layer"], "n_embd": arch["n_embd"], "n_head": arch["n_head"],
            "vocab_size": arch["vocab_size"], "block_size": arch["n_positions"]}


def prefetcher_rate(streams) -> dict:
    """GB/s of the prefetcher's own fetch of every CPU-resident streamed block, against a plain pinned copy."""
    blocks = [b for b in streams.blocks if b.reads is None]
    if not blocks:
        return {"blocks": 0}
    total = sum(b.nbytes for b in blocks)
    for b in blocks[:2]:  # warm-up
        b.fetch(streams.reader, None, streams.stream)[1].synchronize()
    start = time.perf_counter()
    for b in blocks:
        _, event = b.fetch(streams.reader, None, streams.stream)
    event.synchronize()
    ours = total / (time.perf_counter() - start)
    source = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(total, dtype=torch.uint8, device="cuda")
    target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    plain = total / (time.perf_counter() - start)
    return {"blocks": len(blocks), "bytes": total, "prefetcher_gbps": round(ours / 1e9, 2),
            "plain_pinned_copy_gbps": round(plain / 1e9, 2), "ratio": round(ours / plain, 3)}


def accelerate_side(folder: Path, arch: dict, ids: list[list[int]], cuda: bool) -> dict:
    from transformers import GPT2LMHeadModel

    device_map = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.ln_f": 0, "lm_head": 0,
                  **{k: (v if v == "cpu" else 0) for k, v in split(arch, "cuda:0").items()}} if cuda else {"": "cpu"}
    start = time.perf_counter()
    model = GPT2LMHeadModel.from_pretrained(folder, device_map=device_map,
                                            dtype=torch.float16 if cuda else torch.float32).eval()
    sync()
    loaded = time.perf_counter() - start
    from runner.infer.slots import left_pad

    input_ids, mask = left_pad([tuple(p) for p in ids], 0)  # as the runner pads: the same rows on both sides
    longest = input_ids.shape[1]
    device = "cuda:0" if cuda else "cpu"
    begin = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    sync()
    generating = time.perf_counter() - begin
    tokens = (out.shape[1] - longest) * len(ids)
    return {"sequences": len(ids), "load_s": round(loaded, 3), "generate_s": round(generating, 3), "tokens": tokens,
            "tokens_per_s_end_to_end": round(tokens / (loaded + generating), 2),
            "tokens_per_s_generating": round(tokens / generating, 2),
            "first_tokens": [out[i, longest:longest + 8].tolist() for i in range(2)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cuda-check"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="a tiny GPT-2 on the CPU: checks the script only")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    arch = TINY if args.smoke else XL
    args.cache.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    if cuda:  # the CUDA context and cuBLAS are set up before any side's clock starts, so neither pays for them
        x = torch.ones(64, 64, device="cuda", dtype=torch.float16)
        (x @ x).sum().item()
    start = time.perf_counter()
    folder = write_checkpoint(args.cache / ("gpt2-tiny" if args.smoke else "gpt2-xl"), arch)
    results["checkpoint_write_s"] = round(time.perf_counter() - start, 1)
    ids = prompts(arch["vocab_size"], 8 if args.smoke else PROMPTS)
    if cuda:  # both sides once on two short prompts first: CUDA's kernels are loaded lazily, on first use
        runner_side(folder, arch, ids[:2], cuda, 1)
        accelerate_side(folder, arch, ids[:2], cuda)
        gc.collect()
    sides = [("runner", lambda: runner_side(folder, arch, ids, cuda, 1)),
             ("accelerate", lambda: accelerate_side(folder, arch, ids, cuda)),
             ("runner_micro_batches_2", lambda: runner_side(folder, arch, ids, cuda, 2))]
    for name, side in sides:
        try:
            results[name] = side()
        except Exception:  # one side failing still reports the others
            results[name] = {"error": traceback.format_exc(limit=4)}
        print(name, json.dumps(results[name], indent=1), flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    r, a = results.get("runner", {}), results.get("accelerate", {})
    if "tokens_per_s_end_to_end" in r and "tokens_per_s_end_to_end" in a:
        results["ratio_end_to_end"] = round(r["tokens_per_s_end_to_end"] / a["tokens_per_s_end_to_end"], 2)
        results["ratio_generating"] = round(r["tokens_per_s_generating"] / a["tokens_per_s_generating"], 2)
        results["same_greedy_tokens"] = r["first_tokens"] == a["first_tokens"]
    results["two_stage_gpu_pipeline"] = "not measured: it needs two GPUs (tests run its schedule on simulated ones)"
    summary = {k: v for k, v in results.items() if not isinstance(v, dict)}
    print(json.dumps(summary, indent=1))
    out = args.out or args.cache
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
