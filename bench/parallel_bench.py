"""Several processes against one, measured in the same run: data parallel and pipeline parallel via torchrun.

Every process is pinned to one thread (OMP_NUM_THREADS=1), so two ranks use two cores, against one process with
one thread. Each figure is the job's output tokens over its generation time (loading excluded): for a
data-parallel job the slowest rank's time, as the job ends when it does.

  python bench/parallel_bench.py                 # both targets
  python bench/parallel_bench.py --only data     # data parallel: SmolLM2-135M, 64 prompts x 32 tokens
  python bench/parallel_bench.py --only pipeline --micro-batches 8   # gpt2-large (synthetic), 16 x 16
  python bench/parallel_bench.py --only pipeline --checkpoint hf-gpt2  # gpt2-large as transformers wrote it

Targets: data parallel on 2 ranks >= 1.8x one process; pipeline on 2 ranks (>= 4 micro-batches) >= 1.6x.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT

TARGETS = {"data": 1.8, "pipeline": 1.6}
TOPICS = ["rivers", "bread", "the moon", "glass", "volcanoes", "bees", "maps", "clocks", "salt", "tides",
          "bridges", "paper", "owls", "copper", "rain", "chess"]


def prompts(n: int) -> list[str]:
    return [f"Write two sentences about {TOPICS[i % len(TOPICS)]} (note {i})." for i in range(n)]


def tokenizer(work: Path) -> Path:
    """A small byte-level BPE ``tokenizer.json`` (its ids all lie in GPT-2's vocabulary) for a checkpoint that
    ships none."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([" ".join(TOPICS) * 20, *prompts(64)], vocab_size=600, show_progress=False)
    path = work / "tokenizer.json"
    tok.save(str(path))
    return path


def run(cmd: list[str], run_dir: Path, cache: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RUNNER_CACHE": str(cache)}
    proc = subprocess.run([*cmd, f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "report.json").read_text())


def rate(report: dict, task: str = "generate") -> float:
    """Output tokens per second of generation (the slowest rank's time, for a data-parallel job)."""
    if "parallel" in report:
        return report["job"]["tokens"]["output"] / report["parallel"]["seconds"]
    return report["job"]["tokens"]["output"] / report["timings"][task]


def compare(name: str, overrides: list[str], ranks: int, work: Path, cache: Path) -> dict:
    single = run([sys.executable, "-m", "runner", *overrides], work / f"{name}-1", cache)
    many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
                "runner", f"parallel.mode={name}", *overrides], work / f"{name}-{ranks}", cache)
    same = (work / f"{name}-1" / "predictions.jsonl").read_bytes() == (work / f"{name}-{ranks}" /
                                                                        "predictions.jsonl").read_bytes()
    one, both = rate(single), rate(many)
    ratio = both / one
    print(f"{name:<9} 1 process {one:8.1f} tok/s   {ranks} ranks {both:8.1f} tok/s   {ratio:.2f}x "
          f"(target >= {TARGETS[name]}x: {'met' if ratio >= TARGETS[name] else 'MISSED'}); outputs "
          f"{'byte-identical' if same else 'DIFFER'}")
    return {"one": one, "many": both, "ratio": ratio, "identical": same, "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["data", "pipeline"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=16, help="pipeline: micro-batches in flight (>= 4)")
    parser.add_argument("--checkpoint", choices=["synthetic", "hf-gpt2"], default="synthetic",
                        help="pipeline: gpt2-large's synthetic weights, or a checkpoint transformers wrote")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("RUNNER_CACHE", "~/.cache/runner")))
    parser.add_argument("--quick", action="store_true",
                        help="bench/all.py's size: data 32 prompts x 16 tokens, pipeline 8 new tokens")
    parser.add_argument("--json", type=Path, help="also write each job's figures here")
    args = parser.parse_args()
    prompts_n, data_tokens, pipe_tokens = (32, 16, 8) if args.quick else (64, 32, 16)
    raw = {}
    with tempfile.TemporaryDirectory(prefix="parallel-bench-") as tmp:
        work = Path(tmp)
        if args.only in (None, "data"):
            data = work / "prompts.jsonl"
            data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(prompts_n)))
            raw["data"] = compare("data", ["data=jsonl", f"data.path={data}", f"task.max_new_tokens={data_tokens}",
                                           "runtime.batch_size=8"], args.ranks, work, args.cache.expanduser())
        if args.only in (None, "pipeline"):
            rows = 16
            batch = max(rows // args.micro_batches, 1)
            listed = "[" + ",".join(f"Tell me about {TOPICS[i % len(TOPICS)]} number {i}" for i in range(rows)) + "]"
            weights = []
            if args.checkpoint == "hf-gpt2":  # as transformers wrote it, with a byte-level BPE for the prompts
                from hf_checkpoint import ensure, runner_overrides
                weights = [*runner_overrides("hf-gpt2", ensure("hf-gpt2"))[1:], f"tokenizer.path={tokenizer(work)}"]
            raw["pipeline"] = compare("pipeline", ["model=gpt2large", *weights, f"task.max_new_tokens={pipe_tokens}",
                                                   f"data.prompts={listed}", f"runtime.batch_size={batch}",
                                                   f"runtime.micro_batches={args.micro_batches}"],
                                      args.ranks, work, args.cache.expanduser())
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
