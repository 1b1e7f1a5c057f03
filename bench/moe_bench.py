#!/usr/bin/env python
"""A mixture of experts that does not fit: experts placed and read one by one, against whole layers and Accelerate.

The checkpoint is Qwen3-MoE-shaped and written by transformers (``bench/hf_checkpoint.py qwen3moe``:
``Qwen3MoeForCausalLM``, random weights, ``save_pretrained``, 2.4 GB in fp32): 10 layers of 32 experts of 6.3 MB,
4 routed per token. The budget for weights holds the dense parts (attention, norms, routers, embeddings, head:
367 MB) and a quarter of the experts (503 MB); the rest must come from disk.

Sides, each a fresh process after the checkpoint's pages (and any offload files) leave the page cache, each in a
memory cgroup v1 group of the same size (the runner's ``max_memory.cpu`` for this shape + 0.6 GB, page cache
counted), with torch on ``--threads`` threads; 64 prompts of ~32 random tokens, 32 new tokens each, greedy, one
batch of 64:

- **experts apart** (the default): dense parts resident, a quarter of the experts in RAM, the rest read from disk
  when a row routes to one;
- **whole layers** (``offload.experts_apart=false``, the runner before experts were placement units): as many whole
  layers as the budget holds, the others streamed whole;
- **Accelerate**: transformers' ``from_pretrained(device_map="auto", max_memory={"cpu": budget})`` (the way
  transformers 5 loads its fused expert tensors from per-expert files) and ``generate``.

Targets (issue 24): tokens/s end to end >= 3x Accelerate and >= 1.5x whole layers; the plan's predicted decode
tokens/s within 30% of the measured one. ``--sim-gpus`` runs the two runner sides again on ``sim_2gpu`` with the
budget split over two simulated GPUs and the CPU. The exit code is 0 whatever the verdict; ``--json`` keeps every
figure.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (which puts this checkout's runner first)
import hf_checkpoint  # noqa: E402
import throughput_bench as tb  # noqa: E402
from common import GB, evict, quiet, run_child  # noqa: E402

NAME = "qwen3moe"
VOCAB = 32000
MB = 1 << 20


def budget(folder: Path) -> tuple[int, int, int]:
    """(weights budget, dense bytes, expert bytes) of the checkpoint in fp32: the dense parts and a quarter of the
    experts."""
    from safetensors import safe_open

    dense = experts = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                n = 4 * math.prod(f.get_slice(key).get_shape())  # fp32
                if ".experts." in key:
                    experts += n
                else:
                    dense += n
    return dense + experts // 4, dense, experts


def overrides(args: dict, ids: list[list[int]]) -> list[str]:
    hardware = (["hardware=sim_2gpu", f"+max_memory.0={args['gpu_bytes']}B", f"+max_memory.1={args['gpu_bytes']}B"]
                if args.get("gpu_bytes") else ["hardware=cpu"])
    return ["checkpoint=local", f"checkpoint.path={args['folder']}", *hardware, "dtype=float32",
            f"runtime.batch_size={args['batch']}", f"runtime.seq_len={max(map(len, ids)) + args['new_tokens']}",
            f"task.max_new_tokens={args['new_tokens']}", f"offload.folder={args['offload']}",
            f"offload.experts_apart={str(args['apart']).lower()}", *args.get("extra", [])]


def runner_cap(args: dict) -> int:
    """``max_memory.cpu``: the weights' share of the CPU + what the plan reserves there for this shape."""
    from common import compose_config
    from runner.plan.planned import plan
    from runner.plan.room import reserved

    ids = tb.prompts(args["rows"], args["prompt_tokens"], VOCAB)
    roomy = plan(compose_config(*overrides(args, ids), "max_memory.cpu=64GiB"), Path(args["work"]))
    return args["cpu_weights"] + reserved(roomy.plan.reserves, "cpu")


def runner_side(args: dict) -> dict:
    import torch

    from common import compose_config
    from runner.infer.engine import Engine
    from runner.infer.generate import GenerationStats, Request, generate
    from runner.infer.sampling import SamplingParams
    from runner.plan.experts import disk_read_per_step, expert_layers
    from runner.config.resources import runner_cache
    from runner.plan.throughput import measure_rates, step_cost

    torch.set_num_threads(args["threads"])
    ids = tb.prompts(args["rows"], args["prompt_tokens"], VOCAB)
    start = time.perf_counter()
    loaded = Engine(compose_config(*overrides(args, ids), f"max_memory.cpu={args['cap']}B"),
                    Path(args["work"])).loaded
    load_s = time.perf_counter() - start
    stats = GenerationStats()
    begin = time.perf_counter()
    out = generate(loaded.model, tb._Ids(), [Request(i, "", tuple(p)) for i, p in enumerate(ids)],
                   SamplingParams(max_new_tokens=args["new_tokens"], ignore_eos=True), batch_size=args["batch"],
                   seed=0, stats=stats, streams=loaded.streams)
    generate_s = time.perf_counter() - begin
    cost = step_cost(loaded, measure_rates(loaded, runner_cache()))
    layout, devices = loaded.layout, loaded.check.block_devices
    streams = loaded.streams
    tokens = sum(len(c.output_tokens) for c in out)
    tiers: dict[str, int] = {}
    for b in layout.blocks:
        tiers[devices[b.name]] = tiers.get(devices[b.name], 0) + b.nbytes
    return {"load_s": load_s, "generate_s": generate_s, "tokens": tokens,
            "tokens_per_s": tokens / (load_s + generate_s),
            "decode_tokens_per_s": stats.decode_rows / stats.decode_s, "predicted": cost.tokens_per_s,
            "bound": cost.bound, "tiers": tiers,
            "expert_bytes_read": streams.experts.loaded_bytes if streams and streams.experts else 0,
            "expert_bytes_unused": streams.experts.unused_bytes if streams and streams.experts else 0,
            "layer_bytes_read": streams.loaded_bytes if streams else 0, "forwards": stats.steps + 1,
            "reads": {"layers": dict(streams.reader.counts) if streams else {},
                      "experts": dict(streams.experts.reader.counts) if streams and streams.experts else {}},
            "planned_disk_per_step": disk_read_per_step(expert_layers(layout, devices), stats.decode_rows
                                                        // max(stats.steps, 1)),
            "peak_rss": tb.peak_rss(), "first": [c.output_tokens[:6] for c in out[:2]]}


def accelerate_side(args: dict) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args["threads"])
    ids = tb.prompts(args["rows"], args["prompt_tokens"], VOCAB)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args["folder"], dtype=torch.float32, device_map="auto", max_memory={"cpu": args["cpu_weights"]},
        offload_folder=args["offload"]).eval()
    load_s = time.perf_counter() - start
    from runner.infer.slots import left_pad

    begin = time.perf_counter()
    tokens, first = 0, []
    for start in range(0, len(ids), args["batch"]):  # the runner's rows in flight, batch by batch
        input_ids, mask = left_pad([tuple(p) for p in ids[start:start + args["batch"]]], 0)
        longest = input_ids.shape[1]
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=args["new_tokens"],
                                 min_new_tokens=args["new_tokens"], do_sample=False, pad_token_id=0)
        tokens += (out.shape[1] - longest) * out.shape[0]
        first += [out[i, longest:longest + 6].tolist() for i in range(out.shape[0])]
    generate_s = time.perf_counter() - begin
    placed = getattr(model, "hf_device_map", {})
    return {"load_s": load_s, "generate_s": generate_s, "tokens": tokens,
            "tokens_per_s": tokens / (load_s + generate_s), "peak_rss": tb.peak_rss(),
            "on_disk": sum(1 for d in placed.values() if d == "disk"), "first": first[:2]}


def child(side: str, args: dict) -> None:
    quiet()
    sides = {"runner": runner_side, "accelerate": accelerate_side, "cap": lambda a: {"cap": runner_cap(a)}}
    print("RESULT " + json.dumps(sides[side](args)), flush=True)


def run(side: str, args: dict, limit: int | None) -> dict:
    """One side in a fresh process, in a memory group of ``limit`` bytes when given; its RESULT."""
    Path(args["work"]).mkdir(parents=True, exist_ok=True)
    evict(Path(args["folder"]), Path(args["work"]))
    return run_child(__file__, side, args, f"moe-{side}", limit, tail=1500)


def verdict(ok: bool, text: str) -> str:
    return f"[{'PASS' if ok else 'MISS'}] {text}"


def compare(results: dict, label: str) -> list[str]:
    lines = []
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{label} {name}: {r['error'][-400:]}")
            continue
        group = r.get("cgroup", {})
        limit = f", cgroup {group['limit'] / GB:.2f} GB (peak {group.get('max_usage', 0) / GB:.2f})" \
            if "limit" in group else ", no cgroup: does not count"
        extra = ""
        if "predicted" in r:
            extra = (f"; decode {r['decode_tokens_per_s']:.2f} tokens/s, predicted {r['predicted']:.2f} "
                     f"({r['bound']}-bound); read per forward: experts "
                     f"{r['expert_bytes_read'] / r['forwards'] / MB:.0f} MiB, whole blocks {r['layer_bytes_read'] / r['forwards'] / MB:.0f} MiB; on disk "
                     f"{r['tiers'].get('disk', 0) / MB:.0f} MiB")
        lines.append(f"{label} {name}: {r['tokens_per_s']:.2f} tokens/s end to end (load {r['load_s']:.1f} s, "
                     f"generate {r['generate_s']:.1f} s){extra}{limit}")
    apart, whole, acc = (results.get(k, {}) for k in ("experts apart", "whole layers", "accelerate"))
    if "tokens_per_s" in apart and "tokens_per_s" in acc:
        q = apart["tokens_per_s"] / acc["tokens_per_s"]
        lines.append("  " + verdict(q >= 3, f"experts apart / Accelerate = {q:.2f}x (target >= 3x); same greedy "
                                            f"tokens: {apart['first'] == acc['first']}"))
    if "tokens_per_s" in apart and "tokens_per_s" in whole:
        q = apart["tokens_per_s"] / whole["tokens_per_s"]
        lines.append("  " + verdict(q >= 1.5, f"experts apart / whole layers = {q:.2f}x (target >= 1.5x); same "
                                              f"greedy tokens: {apart['first'] == whole['first']}"))
    if "predicted" in apart:
        error = apart["predicted"] / apart["decode_tokens_per_s"] - 1
        lines.append("  " + verdict(abs(error) <= 0.3, f"plan's prediction {error:+.0%} off the measured decode "
                                                       "tokens/s (target within 30%)"))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, help="rows in flight (default: every prompt in one batch)")
    parser.add_argument("--skip-accelerate", action="store_true")
    parser.add_argument("--experts-prefetch", type=int, help="offload.prefetch for the experts-apart side")
    parser.add_argument("--only", choices=["experts apart", "whole layers"], help="one runner side")
    parser.add_argument("--cgroup-gb", type=float, help="every side's memory cgroup in GB (default: the runner's "
                                                        "max_memory.cpu for this shape + 0.6 GB)")
    parser.add_argument("--sim-gpus", action="store_true", help="also both runner sides over sim_2gpu and the CPU")
    parser.add_argument("--sim-only", action="store_true", help="with --sim-gpus: only those")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moe-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return 0
    folder = hf_checkpoint.ensure(NAME)
    weights, dense, experts = budget(folder)
    print(f"Qwen3-MoE-shaped checkpoint (transformers-written): dense {dense / MB:.0f} MiB, experts "
          f"{experts / MB:.0f} MiB; budget for weights {weights / MB:.0f} MiB (dense + a quarter of the experts); "
          f"{args.prompts} prompts x {args.new_tokens} new tokens, batches of {args.batch or args.prompts}", flush=True)
    shape = dict(folder=str(folder), rows=args.prompts, batch=args.batch or args.prompts, prompt_tokens=args.prompt_tokens,
                 new_tokens=args.new_tokens, threads=args.threads)
    out: dict = {}
    lines: list[str] = []
    # sim_2gpu: each GPU holds half the dense parts and a sixteenth of the experts, beside its reserves (activations
    # of the batch's prefill, logits, expert staging: ~260 MiB at 64 x 32); the CPU an eighth of the experts.
    sim = ("sim_2gpu", dense // 2 + experts // 16 + 260 * MB)
    for label, gpu_bytes in ([("cpu", 0)] if not args.sim_only else []) + ([sim] if args.sim_gpus else []):
        results: dict = {}
        cpu_weights = weights if not gpu_bytes else experts // 8
        for name, apart in (("experts apart", True), ("whole layers", False)):
            if args.only and name != args.only:
                continue
            side = {**shape, "work": str(args.work / label / name.replace(" ", "-")), "apart": apart,
                    "offload": str(args.work / label / name.replace(" ", "-") / "offload"),
                    "cpu_weights": cpu_weights, "gpu_bytes": gpu_bytes,
                    "extra": [f"offload.prefetch={args.experts_prefetch}"] if apart and args.experts_prefetch else []}
            cap = run("cap", side, None)
            if "error" in cap:
                results[name] = cap
                continue
            side["cap"] = cap["cap"]
            # Simulated GPUs are the process's own memory: their budgets count in the group too.
            limit = int(args.cgroup_gb * GB) if args.cgroup_gb else cap["cap"] + 2 * gpu_bytes + tb.SLACK
            results[name] = run("runner", side, limit)
            if label == "cpu" and name == "experts apart":
                out["cgroup_limit"] = limit
            print(f"{label} {name}: {tb._brief(results[name])}", flush=True)
        if label == "cpu" and not args.skip_accelerate and not args.only and "cgroup_limit" in out:
            side = {**shape, "work": str(args.work / "accelerate"), "offload": str(args.work / "accelerate" / "off"),
                    "cpu_weights": cpu_weights}
            results["accelerate"] = run("accelerate", side, out["cgroup_limit"])
            print(f"accelerate: {tb._brief(results['accelerate'])}", flush=True)
        out[label] = results
        lines += compare(results, label)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
