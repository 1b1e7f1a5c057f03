#!/usr/bin/env python
"""Scoring benchmark: the runner's ``Engine.score`` against transformers' forward + log_softmax + gather, the way
lm-evaluation-harness' ``HFLM`` computes log-likelihoods.

SmolLM2-135M-Instruct (the default model), on the CPU, fp32, in one process, ``torch.set_num_threads(--threads)``
for both sides. ``--texts`` (512) English texts of 20-200 tokens: sentences of ``generate_prompts.py`` strung
together in a seeded order and cut to a seeded length in words. Each is a ``text_request`` (every token after the
first is scored); both sides get the same batches, ``runtime.batch_size`` (16) texts at a time sorted by length
(``length_batches``, as ``Engine.score`` and task=score batch them):

- ``runner``: ``Engine.score(texts)``, texts in, ``Score`` objects out: tokenizing, batching, and per batch one
  forward of the zoo model right-padded without a mask, then each row's scored positions normalized in float32
  (log-sum-exp), gathered and compared with their argmax;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(<package folder>, gguf_file=..., dtype=float32)`` on the
  same GGUF (``--reference state-dict``: ``LlamaForCausalLM`` built from the runner's tensors), run as ``HFLM`` runs it:
  each row's tokens but the last, right-padded, ``model(ids).logits`` without a mask, ``log_softmax`` over the
  whole batch in float32, then per row the scored positions gathered and compared with their argmax.

A first, untimed pass of each side is the warm-up and the check: the largest |difference| of a text's log-likelihood
and of one token's, and how many greedy flags agree. Then ``--rounds`` (3) rounds run both sides, the first side
alternating; tokens/s is the texts' tokens over the pass's wall time. Reported: each side's best round, the ratio of
the bests (runner / transformers) and each round's ratio; and, from the warm-up, how each side's time splits between
the model's forward and the scoring arithmetic after it.

Run ``python bench/score_bench.py`` (~35 min at 1 thread: 8 passes of ~4 min); ``--texts 64 --rounds 1`` for a
smoke run (~3 min); ``--help``. The exit code is 0 whatever the verdict.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (which puts this checkout's runner first)
from common import package_version, quiet  # noqa: E402
from generate_bench import load_reference, verdict  # noqa: E402
from generate_prompts import PROMPTS  # noqa: E402

TARGET = 1.0  # runner tokens/s over transformers'
SHORTEST, LONGEST = 20, 200


def make_texts(tokenizer, n: int, seed: int = 0) -> list[str]:
    """``n`` texts of SHORTEST-LONGEST tokens: the prompts' sentences strung together, cut after a whole word."""
    rng = random.Random(seed)
    texts = []
    while len(texts) < n:
        target = rng.randint(SHORTEST, LONGEST)
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words))) < target:
            words += rng.choice(PROMPTS).split()
        lo, hi = 1, len(words)  # the most words within the target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(tokenizer.encode(" ".join(words[:mid]), add_special_tokens=True)) <= target \
                else (lo, mid - 1)
        text = " ".join(words[:lo])
        if len(tokenizer.encode(text, add_special_tokens=True)) >= SHORTEST:
            texts.append(text)
    return texts


class Timed:
    """A callable with the seconds spent in it, to split a side's time into the forward and the rest."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0
        self.block_size = getattr(fn, "block_size", None)

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def run_runner(engine, texts: list[str], forward: Timed | None = None) -> list[tuple[float, bool, list[float]]]:
    if forward is None:
        scores = engine.score(texts)
    else:  # the warm-up: the same batches through ``score`` itself, its forwards timed
        from runner.infer.batches import length_batches
        from runner.infer.score import score, text_request
        requests = [text_request(engine.tokenizer, i, t) for i, t in enumerate(texts)]
        got = {}
        for batch in length_batches(requests, engine.config.runtime.batch_size, length=lambda r: len(r.tokens)):
            got.update((r.index, s) for r, s in zip(batch, score(forward, batch, pad_id=engine.tokenizer.pad_id or 0)))
        scores = [got[i] for i in range(len(texts))]
    return [(s.logprob, s.greedy, list(s.token_logprobs)) for s in scores]


def run_transformers(model, batches: list[list[int]], ids: list[list[int]], pad_id: int,
                     forward: Timed | None = None) -> list[tuple[float, bool, list[float]]]:
    """lm-evaluation-harness' ``HFLM._loglikelihood_tokens`` for causal LMs, every token after the first scored."""
    import torch
    call = forward or (lambda x: model(x).logits)
    out: dict[int, tuple[float, bool, list[float]]] = {}
    with torch.inference_mode():
        for batch in batches:
            rows = [ids[i][:-1] for i in batch]  # the last token is never read
            x = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                x[r, :len(row)] = torch.tensor(row)
            logprobs = torch.log_softmax(call(x), dim=-1, dtype=torch.float32)
            for r, i in enumerate(batch):
                scored = logprobs[r, :len(rows[r])]  # position p predicts token p + 1
                targets = torch.tensor(ids[i][1:])
                per_token = scored.gather(-1, targets[:, None])[:, 0]
                out[i] = (float(per_token.sum()), bool((scored.argmax(-1) == targets).all()), per_token.tolist())
    return [out[i] for i in range(len(ids))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=512, help="how many texts (default 512)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of both sides (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward (default 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: on a shared 2-core box, two threads wait on "
                             "each other whenever another job holds a core)")
    parser.add_argument("--reference", choices=("gguf", "state-dict"), default="gguf",
                        help="transformers' model: from_pretrained on the GGUF, or built from the runner's tensors")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    quiet()
    import torch
    torch.set_num_threads(args.threads)
    from runner import Engine
    from runner.infer.batches import length_batches
    start = time.perf_counter()
    print(f"torch {package_version('torch')}, transformers {package_version('transformers')}; {os.cpu_count()} cpus, "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}", flush=True)

    engine = Engine.from_overrides(["hardware=cpu", "dtype=float32", f"runtime.batch_size={args.batch_size}",
                                    f"runtime.seq_len={LONGEST + 8}"])
    tok = engine.tokenizer
    texts = make_texts(tok, args.texts)
    ids = [tok.encode(t, add_special_tokens=True) for t in texts]
    batches = list(length_batches(list(range(len(ids))), args.batch_size, length=lambda i: len(ids[i])))
    tokens = sum(map(len, ids))
    model, _, weights = load_reference(args.reference, engine)
    pad_id = tok.pad_id or 0
    print(f"{len(texts)} texts, {min(map(len, ids))}-{max(map(len, ids))} tokens ({tokens} in all, "
          f"{sum(len(x) - 1 for x in ids)} scored), {len(batches)} batches; padding: "
          f"{sum(len(b) * (max(len(ids[i]) for i in b) - 1) for b in batches) - sum(len(x) - 1 for x in ids)} "
          f"positions; reference {args.reference}, weights vs the runner's: max |diff| {weights['max abs weight diff']}, "
          f"attention {weights['attn']}", flush=True)

    # Warm-up and check: one untimed pass of each side, the model's forward timed apart from the rest.
    forwards = {"runner": Timed(engine.lm), "transformers": Timed(lambda x: model(x).logits)}
    split, first = {}, {}
    for name, forward in forwards.items():
        t0 = time.perf_counter()
        first[name] = (run_runner(engine, texts, forward) if name == "runner" else
                       run_transformers(model, batches, ids, pad_id, forward))
        wall = time.perf_counter() - t0
        split[name] = {"wall": wall, "forward": forward.seconds, "rest": wall - forward.seconds}
        print(f"  warm-up {name}: {wall:.1f} s, of which forward {forward.seconds:.1f} s, scoring "
              f"{wall - forward.seconds:.2f} s", flush=True)
    ours, theirs = first["runner"], first["transformers"]
    check = {"max |text logprob diff|": max(abs(a[0] - b[0]) for a, b in zip(ours, theirs)),
             "max |token logprob diff|": max(abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a[2], b[2])),
             "greedy flags equal": sum(a[1] == b[1] for a, b in zip(ours, theirs)),
             "greedy texts": sum(a[1] for a in ours)}

    sides = {"runner": lambda: run_runner(engine, texts),
             "transformers": lambda: run_transformers(model, batches, ids, pad_id)}
    names, rounds = list(sides), []
    for r in range(args.rounds):
        row = {}
        for name in names[r % 2:] + names[:r % 2]:
            t0, c0 = time.perf_counter(), time.process_time()
            out = sides[name]()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            row[name] = {"wall": wall, "cpu": cpu, "tps": tokens / wall, "same_as_warmup": out == first[name]}
        rounds.append(row)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {row[n]['tps']:.1f} tok/s ({row[n]['wall']:.1f} s, busy {row[n]['cpu'] / args.threads / row[n]['wall']:.2f})"
            for n in names) + f"; ratio {row['runner']['tps'] / row['transformers']['tps']:.3f}", flush=True)

    best = {n: max(r[n]["tps"] for r in rounds) for n in names}
    ratio = best["runner"] / best["transformers"]
    per_round = [r["runner"]["tps"] / r["transformers"]["tps"] for r in rounds]
    print(f"\n== SmolLM2-135M, {len(texts)} texts x {min(map(len, ids))}-{max(map(len, ids))} tokens, batches of "
          f"{args.batch_size} sorted by length, fp32, {args.threads} thread(s), best of {len(rounds)} interleaved rounds ==")
    print(f"{'side':13} {'best tok/s':>10} {'median':>8}  warm-up: forward s / scoring s")
    for n in names:
        print(f"{n:13} {best[n]:10.1f} {statistics.median(r[n]['tps'] for r in rounds):8.1f}  "
              f"{split[n]['forward']:.1f} / {split[n]['rest']:.2f}")
    print(f"check: {check}; every round repeated its warm-up results: "
          f"{all(r[n]['same_as_warmup'] for r in rounds for n in names)}")
    print("  " + verdict(ratio >= TARGET, f"runner / transformers: {ratio:.3f}x >= {TARGET} (best of rounds; "
                                          f"per round {', '.join(f'{x:.3f}' for x in per_round)})"))
    print("  " + verdict(check["max |token logprob diff|"] <= 1e-4 and check["greedy flags equal"] == len(texts),
                         f"same numbers: token logprobs within 1e-4 ({check['max |token logprob diff|']:.2e}), "
                         f"greedy flags {check['greedy flags equal']}/{len(texts)}"))
    if args.json:
        args.json.write_text(json.dumps({"texts": len(texts), "tokens": tokens, "rounds": rounds, "split": split,
                                         "check": check, "weights": weights}, indent=1, default=str))
    print(f"\n(bench wall time {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
