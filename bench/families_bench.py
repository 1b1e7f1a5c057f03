#!/usr/bin/env python
"""Model families benchmark: the runner's Qwen3 and Qwen3-MoE against transformers' ``generate`` on the same checkpoint.

Two checkpoints that transformers writes itself (``Qwen3ForCausalLM(config).save_pretrained``, random weights,
fp32, a byte-level ``tokenizer.json`` beside them), cached under ``$RUNNER_CACHE/families-bench`` (else
``/tmp/families-bench``) in a folder named by a hash of the config, so a re-run does not write them again:

- ``qwen3``: Qwen3-0.6B's shape with 24 layers instead of 28 (0.53B parameters, tied embeddings);
- ``qwen3moe``: Qwen3-MoE, 20 layers of 16 experts, top-2 (1.07B parameters in all, ~0.3B active per token).

Each model gets 16 prompts of random token ids (seeded, of different lengths, so the batch is left-padded) and
one batch of 16, greedy, no end-of-sequence stop, the same number of new tokens on every side:

- ``runner``: ``Engine.from_overrides(["model=auto", "checkpoint=local", "checkpoint.path=<folder>", ...])``, its
  default zoo path (``runner.zoo.families``); token ids in through ``Engine.complete``;
- ``runner-hf`` (Qwen3 only): the same with ``model.fast_path=false``, the runner driving transformers'
  ``Qwen3ForCausalLM`` it builds itself;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(<folder>, dtype=float32).generate(do_sample=False)`` on
  the same left-padded batch and attention mask.

Every side runs in its own process (``--worker``), started once per model: it loads, runs an untimed warm-up
(every prompt's last 8 ids, 2 new tokens), then runs a timed pass whenever the bench asks, one side at a time.
``--rounds`` rounds ask every side once each, the order rotating. Decode tokens/s is rows x decode steps over the
decode seconds, the prefill left out: the runner's ``GenerationStats`` (``decode_s`` starts once the prefill's
logits are out), and for transformers the time from the first call of a ``LogitsProcessor`` (which ``generate``
makes right after each forward) to the end of ``generate``. A ratio is the median over rounds of the ratio within
a round (other jobs on the machine hit a round's sides alike). Token agreement: how many of the 16 rows' greedy
ids equal transformers', in the last round.

Run ``python bench/families_bench.py`` (~13 min on 2 idle cores, plus ~1 min once to write the checkpoints);
``--quick`` (~2 min); ``--only qwen3``; ``--threads N`` (default 1, for every side); ``--json FILE``.
The exit code is 0 whatever the verdict.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (which puts this checkout's runner first)
from common import ROOT, package_version, quiet, status_bytes  # noqa: E402

BATCH = 16
SPECIAL = ("<|endoftext|>", "<|im_end|>")  # ids 256 and 257, after the 256 byte tokens
SPECIAL_ID = (256, 257)
# The shapes. Qwen3-0.6B is this with 28 layers; the MoE keeps every layer sparse (decoder_sparse_step 1).
MODELS: dict[str, dict[str, Any]] = {
    "qwen3": {"class": "Qwen3ForCausalLM", "config": "Qwen3Config", "zoo": "Qwen3",
              "arch": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=24,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                           rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)},
    "qwen3moe": {"class": "Qwen3MoeForCausalLM", "config": "Qwen3MoeConfig", "zoo": "Qwen3Moe",
                 "arch": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=20,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=128, num_experts=16,
                              num_experts_per_tok=2, moe_intermediate_size=640, norm_topk_prob=True,
                              max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                              tie_word_embeddings=False)},
}
TARGETS = {("qwen3", "runner"): 1.1, ("qwen3moe", "runner"): 1.0, ("qwen3", "runner-hf"): 0.95}
SIDES = {"qwen3": ("runner", "transformers", "runner-hf"), "qwen3moe": ("runner", "transformers")}
med = statistics.median


# -- the checkpoints --------------------------------------------------------------------------------------------------

def checkpoint(name: str, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The folder of model ``name`` as transformers writes it (and its ``bench.json``), written once per config."""
    spec = MODELS[name]
    key = hashlib.sha256(json.dumps([spec, package_version("transformers")], sort_keys=True).encode()).hexdigest()[:10]
    folder = cache / f"{name}-{key}"
    if (folder / "bench.json").is_file():
        return folder, json.loads((folder / "bench.json").read_text())
    import torch
    import transformers
    t0 = time.perf_counter()
    config = getattr(transformers, spec["config"])(**spec["arch"], bos_token_id=SPECIAL_ID[0],
                                                   eos_token_id=SPECIAL_ID[0], pad_token_id=SPECIAL_ID[0])
    torch.manual_seed(0)
    model = getattr(transformers, spec["class"])(config).float().eval()
    params = sum(p.numel() for p in model.parameters())  # tied parameters count once
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))  # renamed when whole: no half-written folder is used
    model.save_pretrained(work)
    write_tokenizer(work)
    info = {"params": params, "arch": spec["arch"], "class": spec["class"], "written_s": time.perf_counter() - t0,
            "transformers": package_version("transformers")}
    (work / "bench.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    print(f"wrote {folder} ({params / 1e9:.2f}B parameters) in {info['written_s']:.0f} s", flush=True)
    return folder, info


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE with no merges (ids 0-255 are bytes) and the two special tokens: the runner reads a real
    checkpoint's tokenizer, though the bench gives both sides token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": SPECIAL[0], "pad_token": SPECIAL[0], "model_max_length": 4096}, indent=1))


def make_prompts(lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """``BATCH`` prompts of random byte ids, lengths drawn in ``lengths`` (both ends in)."""
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(*lengths))] for _ in range(BATCH)]


# -- one side, in its own process -------------------------------------------------------------------------------------

def worker(job: dict[str, Any]) -> None:
    """``--worker``: load one side, say so on stdout, then run each pass stdin asks for, one JSON line per pass.

    Asks are ``{"new_tokens": N, "cut": K}`` (each prompt cut to its last K ids; 0: whole), one a line, until stdin
    closes. Whatever a library prints goes to stderr: stdout carries only the answers.
    """
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    quiet()
    import torch
    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    generate, built, model = (run_transformers if job["side"] == "transformers" else run_runner)(job)
    marks: list[tuple[float, float]] = []  # (wall, CPU) at the start of each forward of the whole model
    model.register_forward_pre_hook(lambda *_: marks.append((time.perf_counter(), time.process_time())))
    answers.write(json.dumps({"load_s": time.perf_counter() - t0, "built": built, "threads": torch.get_num_threads(),
                              "rss": status_bytes("VmRSS")["VmRSS"]}) + "\n")
    for line in sys.stdin:
        ask = json.loads(line)
        prompts = [p[-ask["cut"]:] for p in job["prompts"]] if ask["cut"] else job["prompts"]
        marks.clear()
        with torch.inference_mode():
            t0 = time.perf_counter()
            outputs, prefill_s, decode_s, steps = generate(prompts, ask["new_tokens"])
            wall, cpu_end = time.perf_counter() - t0, time.process_time()
        tokens = sum(map(len, outputs))
        # CPU seconds from the first decode forward on: the same clock on both sides, and less hit than wall time
        # by other jobs waiting for the same cores (with one thread a side)
        decode_cpu = cpu_end - marks[1][1] if len(marks) > 1 else float("nan")
        answers.write(json.dumps({"wall_s": wall, "prefill_s": prefill_s, "decode_s": decode_s, "steps": steps,
                                  "tokens": tokens, "decode_tps": len(outputs) * steps / decode_s,
                                  "decode_cpu_s": decode_cpu, "decode_cpu_tps": len(outputs) * steps / decode_cpu,
                                  "forwards": len(marks), "tps": tokens / wall, "outputs": outputs,
                                  "peak_rss": status_bytes("VmHWM")["VmHWM"]}) + "\n")


def run_runner(job: dict[str, Any]):
    """The runner's engine on the checkpoint (zoo path, or transformers' class with ``model.fast_path=false``)."""
    import copy

    from runner import Engine, SamplingParams
    from runner.infer.generate import Request
    longest = max(map(len, job["prompts"]))
    overrides = ["model=auto", "checkpoint=local", f"checkpoint.path={job['folder']}", "hardware=cpu",
                 "dtype=float32", f"runtime.batch_size={BATCH}", f"runtime.seq_len={longest + job['new_tokens']}"]
    if job["side"] == "runner-hf":
        overrides.append("model.fast_path=false")
    engine = Engine.from_overrides(overrides + job["overrides"], run_dir=Path(tempfile.mkdtemp(prefix="families-")))

    def generate(prompts: list[list[int]], new_tokens: int):
        requests = [Request(i, "", tuple(p)) for i, p in enumerate(prompts)]
        before = copy.copy(engine.stats)
        with engine.memory_checked():  # as Engine.generate runs it
            done = engine.complete(requests, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        s = engine.stats
        return ([list(c.output_tokens) for c in done], s.prefill_s - before.prefill_s, s.decode_s - before.decode_s,
                s.steps - before.steps)

    model = engine.model
    return generate, f"{type(model).__module__}.{type(model).__qualname__}", model


def run_transformers(job: dict[str, Any]):
    """transformers' own class from the folder, ``generate`` on the left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    from runner.infer.slots import left_pad
    model = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # random weights: run every row to max_new_tokens, as the runner does
    pad = SPECIAL_ID[0]

    class Clock(LogitsProcessor):
        """The time of each call: ``generate`` calls it once per forward, right after the forward."""
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def generate(prompts: list[list[int]], new_tokens: int):
        ids, mask = left_pad(prompts, pad)  # as the runner pads its batches
        clock = Clock()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad, logits_processor=LogitsProcessorList([clock]))
        end = time.perf_counter()
        # prefill: up to the first call; decode: the forwards after it, and the last token's choice
        return out[:, ids.shape[1]:].tolist(), clock.times[0] - start, end - clock.times[0], len(clock.times) - 1

    impl = getattr(model.config, "_experts_implementation", None)
    return generate, (f"{type(model).__module__}.{type(model).__qualname__} (attn "
                      f"{model.config._attn_implementation}" + (f", experts {impl})" if impl else ")")), model


class Side:
    """A ``--worker`` process for one side: started (and loaded) once, then asked for passes one at a time, so the
    sides take turns on the cores and each runs in its own process."""

    def __init__(self, job: dict[str, Any], timeout_s: int, folder: Path):
        self.name, self.timeout_s = job["side"], timeout_s
        spec = folder / f"{self.name}.json"
        spec.write_text(json.dumps(job))
        self.log = folder / f"{self.name}.log"
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec)], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"))
        self.loaded = self._answer()

    def ask(self, new_tokens: int, cut: int = 0) -> dict[str, Any]:
        if "error" in self.loaded:
            return self.loaded
        try:
            self.proc.stdin.write(json.dumps({"new_tokens": new_tokens, "cut": cut}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: _answer says why
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        self.close()
        tail = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()][-12:]
        why = "no answer in {} s".format(self.timeout_s) if not ready else f"exit code {self.proc.returncode}"
        return {"error": f"{why}: " + (tail[-1] if tail else "no output"), "tail": tail}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the comparison ---------------------------------------------------------------------------------------------------

def bench_model(name: str, args) -> dict[str, Any]:
    spec = MODELS[name]
    folder, info = checkpoint(name, args.cache)
    prompts = make_prompts(args.prompt_lengths, seed=len(name))
    names = [s for s in SIDES[name] if s in args.sides]
    job = {"folder": str(folder), "prompts": prompts, "new_tokens": args.new_tokens, "threads": args.threads,
           "overrides": args.override}
    print(f"\n== {name}: {info['class']}, {info['params'] / 1e9:.2f}B parameters, fp32, {folder} ==\n"
          f"{BATCH} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} random ids x {args.new_tokens} new "
          f"tokens, one batch, greedy; {args.threads} thread(s) a side; sides {', '.join(names)}", flush=True)
    rounds: list[dict[str, dict[str, Any]]] = []
    loads: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="families-bench-") as tmp:
        sides = {}
        for side in names:  # one at a time: loads do not overlap
            sides[side] = Side({**job, "side": side}, args.timeout, Path(tmp))
            loads[side] = sides[side].loaded
            if "error" in loads[side]:
                print(f"  {side}: FAILED to load: {loads[side]['error']}\n    " + "\n    ".join(loads[side]["tail"]),
                      flush=True)
                continue
            warm = sides[side].ask(2, cut=8)  # the warm-up: every prompt's last 8 ids, 2 new tokens
            load = loads[side]
            print(f"  {side:12} loaded in {load['load_s']:.1f} s (RSS {load['rss'] / 1e9:.2f} GB), warm-up "
                  f"{warm.get('wall_s', float('nan')):.1f} s: {load['built']}", flush=True)
            expected = {"runner": f"runner.zoo.families.{spec['zoo']}", "runner-hf": spec["class"]}.get(side)
            load["expected_path"] = expected is None or expected in load["built"]
            if not load["expected_path"]:
                print(f"  WARNING: {side} built {load['built']}, not {expected}: it is not the path it measures",
                      flush=True)
        for r in range(args.rounds):
            row = {}
            for side in names[r % len(names):] + names[:r % len(names)]:
                row[side] = res = sides[side].ask(args.new_tokens)
                if "error" in res:
                    print(f"  round {r + 1} {side}: FAILED {res['error']}", flush=True)
                else:
                    print(f"  round {r + 1} {side:12} decode {res['decode_tps']:7.2f} tok/s ({res['steps']} steps in "
                          f"{res['decode_s']:.1f} s; {res['decode_cpu_tps']:.2f} per CPU s), prefill "
                          f"{res['prefill_s']:.1f} s, end to end {res['tps']:.2f} tok/s, peak RSS "
                          f"{res['peak_rss'] / 1e9:.2f} GB", flush=True)
            rounds.append(row)
        for side in sides.values():
            side.close()
    ratios, identical = {}, {}
    for side in names:
        both = [r for r in rounds if "error" not in r[side] and "error" not in r.get("transformers", {"error": 1})]
        if side == "transformers" or not both:
            continue
        per = [r[side]["decode_tps"] / r["transformers"]["decode_tps"] for r in both]
        cpu = [r[side]["decode_cpu_tps"] / r["transformers"]["decode_cpu_tps"] for r in both]
        ratios[side] = {"median": med(per), "rounds": per, "cpu_median": med(cpu), "cpu_rounds": cpu}
        identical[side] = sum(a == b for a, b in zip(both[-1][side]["outputs"], both[-1]["transformers"]["outputs"]))
    errors = {s: r[s]["error"] for r in rounds for s in names if "error" in r[s]}
    for r in rounds:
        for res in r.values():
            res.pop("tail", None)
    return {"folder": str(folder), "params": info["params"], "arch": info["arch"], "sides": names, "loads": loads,
            "prompt_lengths": [len(p) for p in prompts], "new_tokens": args.new_tokens, "rounds": rounds,
            "ratios": ratios, "identical": identical, "errors": errors}


def report(results: dict[str, dict[str, Any]]) -> None:
    print("\n== decode tokens/s, batch 16 (median over rounds) ==")
    print(f"{'model':9} {'side':13} {'decode tok/s':>12} {'per CPU s':>9} {'end to end':>10} {'prefill s':>9} "
          f"{'load s':>6}  vs transformers: decode tok/s (per CPU s)")
    for name, res in results.items():
        for side in res["sides"]:
            ok = [r[side] for r in res["rounds"] if "error" not in r[side]]
            if not ok:
                print(f"{name:9} {side:13} FAILED: {res['errors'].get(side) or res['loads'][side].get('error', '?')}")
                continue
            ratio = res["ratios"].get(side)
            print(f"{name:9} {side:13} {med([x['decode_tps'] for x in ok]):12.2f} "
                  f"{med([x['decode_cpu_tps'] for x in ok]):9.2f} {med([x['tps'] for x in ok]):10.2f} "
                  f"{med([x['prefill_s'] for x in ok]):9.2f} {res['loads'][side]['load_s']:6.1f}  "
                  + (f"{ratio['median']:.3f}x ({ratio['cpu_median']:.3f}x); rounds "
                     f"{', '.join(f'{x:.2f} ({y:.2f})' for x, y in zip(ratio['rounds'], ratio['cpu_rounds']))}; "
                     f"identical rows {res['identical'][side]}/{BATCH}" if ratio else ""))
    print("\nTargets (decode tokens/s, median of the per-round ratios):")
    for (name, side), target in TARGETS.items():
        res = results.get(name)
        if res is None or side not in res["sides"]:
            continue
        ratio = res["ratios"].get(side)
        why = res["errors"].get(side) or res["errors"].get("transformers") or res["loads"][side].get("error")
        text = (f"{name} {side} / transformers: {ratio['median']:.3f}x >= {target} (per CPU second "
                f"{ratio['cpu_median']:.3f}x); identical rows {res['identical'][side]}/{BATCH}" if ratio
                else f"{name} {side}: not measured ({why})")
        print(f"  [{'n/a' if not ratio else 'PASS' if ratio['median'] >= target else 'MISS'}] {text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: prompts of 24-40 ids, 16 new tokens, 1 round")
    parser.add_argument("--only", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to run")
    parser.add_argument("--sides", nargs="+", choices=("runner", "transformers", "runner-hf"),
                        default=["runner", "transformers", "runner-hf"], help="sides to run (transformers is the "
                                                                              "reference every ratio needs)")
    parser.add_argument("--rounds", type=int, help="rounds of every side, each in a fresh process (default 3; quick 1)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per row (default 64; quick 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every side (default 1: on a shared 2-core box, two threads wait "
                             "on each other whenever another job holds a core)")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra overrides for both runner sides")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one side may take")
    parser.add_argument("--cache", type=Path, help="where the checkpoints go (default: $RUNNER_CACHE/families-bench, "
                                                   "else /tmp/families-bench)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one side, its job in this file
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker.read_text()))
        return 0
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.prompt_lengths = (24, 40) if args.quick else (48, 80)
    env = os.environ.get("RUNNER_CACHE")
    args.cache = (args.cache or (Path(env) / "families-bench" if env else Path("/tmp/families-bench"))).expanduser()
    args.cache.mkdir(parents=True, exist_ok=True)
    quiet()
    start = time.perf_counter()
    print(f"torch {package_version('torch')}, transformers {package_version('transformers')}; {os.cpu_count()} cpus, "
          f"{args.threads} torch thread(s) a side; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {name: bench_model(name, args) for name in args.only}
    report(results)
    if args.json:
        args.json.write_text(json.dumps({"models": results, "threads": args.threads}, indent=1, default=str))
    print(f"\n(bench wall time {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
