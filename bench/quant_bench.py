#!/usr/bin/env python
"""Quantized weights kept quantized: speed and memory against llama.cpp on the same file, offload traffic against
the fp32 run and Accelerate, and what rounding costs in perplexity.

1. **SmolLM2-135M-Instruct Q4_1** (the default GGUF; Q4_1 blocks and a Q8_0 token table), 64 chat prompts
   (``generate_prompts.py``) x ``--new-tokens`` (64), greedy, end-of-sequence ignored, load excluded, each side a
   fresh process on ``--threads`` (2) threads:
   - ``kept``: the runner as it runs the file by default (Q4_1 as int4, Q8_0 as int8 groups);
   - ``fp32``: the runner with ``dtype=float32`` (every tensor dequantized: the path before this issue);
   - ``llama.cpp``: ``llama-cpp-python`` on the same file (``bench/llamacpp_side.py``, run by ``--llamacpp``'s
     Python; build it with ``../shared/peers/install_llamacpp.sh``), fed the runner's chat-templated token ids.
   At 1 sequence at once (the first 8 prompts), 16 and 64. Targets: kept >= 1.0x llama.cpp at 1; >= 1.2x
   llama.cpp and >= 1.0x fp32 at 16 and 64. **Memory:** the kept run's peak RSS over its import baseline (the
   process after ``import runner`` and torch, before the weights) <= 1.3x the file's size.
2. **Offload** (``--offload``): transformers-written gpt2-large (fp32, ``bench/hf_checkpoint.py hf-gpt2``) at
   ``max_memory.cpu=1GiB``, 64 prompts x 32 tokens, end to end (load included), through ``throughput_bench.py``'s
   sides and memory cgroups: the runner fp32, the runner with ``quantize=int8`` (its offload store written by a
   first, untimed run: later runs reuse it), and Accelerate. Targets: disk bytes per decode step <= 0.3x fp32's;
   tokens/s >= 2x fp32's and >= 3x Accelerate's.
3. **Quality** (``--quality``): SmolLM2 in fp32 safetensors (the GGUF dequantized by transformers and saved with
   ``save_pretrained``), perplexity over 128 fixed texts (``score_bench.make_texts``) through ``Engine.score``, as
   ``task=score`` runs it: fp32, ``quantize=int8``, ``quantize=int4``. Targets: int8 within 1% of fp32, int4 within 5%.

Run ``python bench/quant_bench.py --llamacpp /path/to/venv/bin/python`` (~6 min), ``--offload`` (~15 min more),
``--quality`` (~3 min more). The exit code is 0 whatever the verdict. ``--json`` keeps every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (which puts this checkout's runner first)
from common import GB, quiet  # noqa: E402
from generate_prompts import PROMPTS  # noqa: E402

HERE = Path(__file__).resolve().parent
SIDES = {"kept": [], "fp32": ["dtype=float32"]}


def verdict(ok: bool | None, text: str) -> str:
    return f"[{'PASS' if ok else 'MISS' if ok is not None else 'n/a'}] {text}"


# -- 1. SmolLM2 against llama.cpp -------------------------------------------------------------------------------

def runner_side(args: dict) -> dict:
    """The runner on the default GGUF, ``args['overrides']`` added: chat prompts in, tokens/s, and peak RSS over
    the process's baseline before the weights."""
    import torch

    from common import compose_config
    from runner.infer.engine import Engine
    from runner.infer.sampling import SamplingParams
    from runner.load.memory import peak_rss
    from runner.infer.tokenizer import apply_chat_template

    torch.set_num_threads(args["threads"])
    prompts = PROMPTS[:args["prompts"]]
    engine = Engine(compose_config("hardware=cpu", f"runtime.batch_size={args['sequences']}",
                                   f"runtime.seq_len={args['new_tokens'] + 96}",  # the prompts are up to ~80 tokens
                                   *args["overrides"]), Path(args["work"]),
                    # the tokenizer before the weights, as `python -m runner` reads it (to size the run from its
                    # prompts, or to check a job's first rows): a cost of the vocabulary, not of the weights
                    before_load=lambda e: e.tokenizer)
    params = SamplingParams(max_new_tokens=args["new_tokens"], ignore_eos=True)
    engine.generate(prompts[:args["sequences"]], SamplingParams(max_new_tokens=4, ignore_eos=True), chat=True)
    start = time.perf_counter()
    done = engine.generate(prompts, params, chat=True)
    seconds = time.perf_counter() - start
    tok = engine.tokenizer
    ids = [tok.encode(apply_chat_template(tok, p), add_special_tokens=False) for p in prompts]
    tokens = sum(len(c.output_tokens) for c in done)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "ids": ids,
            "first": [c.output_tokens[:8] for c in done[:2]], "peak_rss": peak_rss(),
            "baseline_rss": engine.loaded.baseline_rss, "file": engine.loaded.checkpoint.files[0].stat().st_size,
            "weights": engine.loaded.layout.total_bytes}


def llamacpp_side(python: str, model: Path, ids: list[list[int]], args: dict) -> dict:
    job = {"model": str(model), "prompts": ids, "new_tokens": args["new_tokens"], "sequences": args["sequences"],
           "threads": args["threads"], "context": 320}
    proc = subprocess.run([python, str(HERE / "llamacpp_side.py")], input=json.dumps(job), capture_output=True,
                          text=True)
    return _result(proc)


def smollm2(args: argparse.Namespace, out: dict) -> list[str]:
    lines = []
    shapes = [(1, 8), (16, 64), (64, 64)]
    for sequences, prompts in shapes:
        row: dict = {}
        shape = {"sequences": sequences, "prompts": prompts, "new_tokens": args.new_tokens, "threads": args.threads,
                 "work": str(args.work)}
        for name, overrides in SIDES.items():
            row[name] = child("runner", {**shape, "overrides": overrides})
        if args.llamacpp and "ids" in row["kept"]:
            row["llama.cpp"] = llamacpp_side(args.llamacpp, _default_gguf(), row["kept"]["ids"], shape)
        for side in row.values():
            side.pop("ids", None)
        out[f"smollm2 x{sequences}"] = row
        rates = {k: v.get("tokens_per_s") for k, v in row.items()}
        shown = ", ".join(f"{k} {v:.1f}" if v else f"{k} {row[k].get('error', 'n/a')}" for k, v in rates.items())
        lines.append(f"SmolLM2 Q4_1, {sequences} sequence(s) at once, {prompts} prompts x {args.new_tokens} tokens: "
                     f"tokens/s {shown}")
        kept, lcpp, fp32 = rates.get("kept"), rates.get("llama.cpp"), rates.get("fp32")
        want = 1.0 if sequences == 1 else 1.2
        if kept and lcpp:
            lines.append("  " + verdict(kept / lcpp >= want, f"kept / llama.cpp = {kept / lcpp:.2f}x (target >= "
                                                             f"{want}x)"))
        if kept and fp32:
            lines.append("  " + verdict(kept / fp32 >= 1.0 if sequences > 1 else None,
                                        f"kept / fp32 = {kept / fp32:.2f}x" + (" (target >= 1.0x)" if sequences > 1
                                                                               else "")))
        if sequences == 1 and "peak_rss" in row["kept"]:
            k = row["kept"]
            over = k["peak_rss"] - k["baseline_rss"]
            lines.append("  " + verdict(over <= 1.3 * k["file"],
                                        f"memory: peak RSS {over / 2**20:.0f} MiB over the import baseline, "
                                        f"{over / k['file']:.2f}x the file's {k['file'] / 2**20:.0f} MiB "
                                        f"(target <= 1.3x); weights planned {k['weights'] / 2**20:.0f} MiB; "
                                        f"fp32: {(row['fp32']['peak_rss'] - row['fp32']['baseline_rss']) / 2**20:.0f}"
                                        " MiB over its baseline"))
    return lines


def _default_gguf() -> Path:
    from common import compose_config

    return Path(compose_config().checkpoint.path)


# -- 2. offload: gpt2-large int8 against fp32 and Accelerate ----------------------------------------------------

def offload(args: argparse.Namespace, out: dict) -> list[str]:
    import hf_checkpoint
    import throughput_bench as tb

    folder = hf_checkpoint.ensure("hf-gpt2")
    shape = dict(rows=64, prompt_tokens=32, new_tokens=32, batch=64, threads=args.threads,
                 **({"cgroup_bytes": int(args.cgroup_gb * GB)} if args.cgroup_gb else {}))
    work = args.work / "offload"
    tb.run("runner", folder, work / "int8", quantize="int8", **shape)  # writes the int8 offload store, untimed
    sides = {"fp32": tb.run("runner", folder, work / "fp32", **shape),
             "int8": tb.run("runner", folder, work / "int8", quantize="int8", **shape),
             "accelerate": tb.run("accelerate", folder, work / "accelerate", **shape)}
    out["offload"] = sides
    lines = []
    for name, r in sides.items():
        group = r.get("cgroup", {})
        limit = f", cgroup {group['limit'] / GB:.2f} GB" if "limit" in group else ", no cgroup: does not count"
        lines.append(f"gpt2-large at max_memory.cpu=1GiB, {name}: " + (
            f"{r['tokens_per_s']:.2f} tokens/s end to end (load {r['load_s']:.1f} s), disk "
            f"{r.get('disk_bytes', 0) / GB:.2f} GB per step{limit}" if "tokens_per_s" in r else r.get("error", "?")))
    f, i, a = (sides[k].get("tokens_per_s") for k in ("fp32", "int8", "accelerate"))
    if f and i:
        d = sides["int8"]["disk_bytes"] / max(sides["fp32"]["disk_bytes"], 1)
        lines.append("  " + verdict(d <= 0.3, f"disk bytes per decode step int8 / fp32 = {d:.2f}x (target <= 0.3x)"))
        lines.append("  " + verdict(i / f >= 2, f"tokens/s int8 / fp32 = {i / f:.2f}x (target >= 2x)"))
    if i and a:
        lines.append("  " + verdict(i / a >= 3, f"tokens/s int8 / Accelerate = {i / a:.2f}x (target >= 3x)"))
    return lines


# -- 3. quality: perplexity of int8 and int4 against fp32 -------------------------------------------------------

def smollm2_fp32_folder(root: Path) -> Path:
    """SmolLM2's weights as fp32 safetensors with its tokenizer, written once by transformers from the GGUF."""
    folder = root / "smollm2-fp32"
    if (folder / "model.safetensors").is_file():
        return folder
    import transformers

    gguf = _default_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from safetensors.torch import save_file

    partial = root / "smollm2-fp32.partial"
    partial.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses a model loaded from a GGUF: its tensors, written as save_pretrained writes them (a
    # tied head stored once), and its config without the GGUF marker.
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (partial / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def quality_side(args: dict) -> dict:
    import torch

    from common import compose_config
    from runner.infer.engine import Engine
    from score_bench import make_texts

    torch.set_num_threads(args["threads"])
    engine = Engine(compose_config("hardware=cpu", "checkpoint=local", f"checkpoint.path={args['folder']}",
                                   "dtype=float32", "runtime.batch_size=16", "runtime.seq_len=256",
                                   *args["overrides"]), Path(args["work"]))
    texts = make_texts(engine.tokenizer, args["texts"], seed=0)
    scores = engine.score(texts)
    logprob, tokens = sum(s.logprob for s in scores), sum(s.tokens for s in scores)
    return {"perplexity": math.exp(-logprob / tokens), "tokens": tokens, "weights": engine.loaded.layout.total_bytes}


def quality(args: argparse.Namespace, out: dict) -> list[str]:
    import hf_checkpoint

    folder = smollm2_fp32_folder(hf_checkpoint.root())
    rows = {name: child("quality", {"folder": str(folder), "overrides": overrides, "texts": 128,
                                    "threads": args.threads, "work": str(args.work)})
            for name, overrides in {"fp32": [], "int8": ["quantize=int8"], "int4": ["quantize=int4"]}.items()}
    out["quality"] = rows
    base = rows["fp32"].get("perplexity")
    lines = [f"SmolLM2 fp32 safetensors, perplexity over {rows['fp32'].get('tokens')} tokens: " + ", ".join(
        f"{k} {v['perplexity']:.3f} ({v['weights'] / 2**20:.0f} MiB)" if "perplexity" in v else f"{k} {v.get('error')}"
        for k, v in rows.items())]
    for name, limit in (("int8", 0.01), ("int4", 0.05)):
        p = rows[name].get("perplexity")
        if base and p:
            lines.append("  " + verdict(abs(p / base - 1) <= limit, f"{name} perplexity / fp32 = {p / base:.4f} "
                                                                     f"(target within {limit:.0%})"))
    return lines


# -- processes --------------------------------------------------------------------------------------------------

def child(side: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", side, json.dumps(args)], capture_output=True,
                          text=True)
    return _result(proc)


def _result(proc: subprocess.CompletedProcess) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)[:400]}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llamacpp", default=os.environ.get("RUNNER_LLAMACPP_PYTHON"),
                        help="the Python of a venv with llama-cpp-python (../shared/peers/); default: "
                             "$RUNNER_LLAMACPP_PYTHON")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--offload", action="store_true", help="also part 2, gpt2-large offload (~15 min)")
    parser.add_argument("--quality", action="store_true", help="also part 3, perplexity (~3 min)")
    parser.add_argument("--cgroup-gb", type=float, help="part 2: every side's memory cgroup in GB (default: the "
                                                        "runner's max_memory.cpu + its reserves + 0.6 GB)")
    parser.add_argument("--only", choices=["offload", "quality"], help="run that part alone")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("RUNNER_CACHE", "/tmp")) / "quant-bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        quiet()
        side, job = args.child
        print("RESULT " + json.dumps({"runner": runner_side, "quality": quality_side}[side](json.loads(job))),
              flush=True)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    parts = [args.only] if args.only else ["smollm2", *(["offload"] if args.offload else []),
                                           *(["quality"] if args.quality else [])]
    for part in parts:
        for line in {"smollm2": smollm2, "offload": offload, "quality": quality}[part](args, out):
            print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
