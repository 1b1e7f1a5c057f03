#!/usr/bin/env python
"""llama.cpp's side of ``quant_bench.py``, run by the Python of a virtual environment holding ``llama-cpp-python``
(``../shared/peers/``): no torch, no runner. Reads a JSON job on stdin, prints one ``RESULT {json}`` line.

The job: ``model`` (a .gguf), ``prompts`` (token ids, already chat-templated by the runner's tokenizer, so both
engines read the same tokens), ``new_tokens``, ``sequences`` (at once), ``threads``, ``context`` (per sequence).
Greedy decoding with end-of-sequence ignored: each step's argmax is fed back whatever it is. As llama.cpp's server
does, every sequence has its own KV stream (``kv_unified=False``) and a slot is refilled with the next prompt as soon
as its sequence has its tokens. Timed from the first prompt's prefill to the last token (load excluded).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> None:
    import llama_cpp as L

    job = json.loads(sys.stdin.read())
    prompts, new_tokens, slots = job["prompts"], job["new_tokens"], job["sequences"]
    L.llama_backend_init()
    model = L.llama_model_load_from_file(job["model"].encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    params.n_ctx = slots * job["context"]
    params.n_seq_max = slots
    params.n_batch = params.n_ubatch = max(512, slots)
    params.n_threads = params.n_threads_batch = job["threads"]
    params.kv_unified = False
    params.no_perf = True
    ctx = L.llama_init_from_model(model, params)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    memory = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(params.n_batch, 0, slots)

    def add(token: int, pos: int, seq: int, logits: bool) -> int:
        i = batch.n_tokens
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq
        batch.n_tokens += 1
        return i

    def decode() -> None:
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax())

    waiting = list(range(len(prompts)))
    active: dict[int, dict] = {}  # slot -> {prompt, pos, made, next}
    generated = 0
    outputs: dict[int, list[int]] = {}
    start = time.perf_counter()
    while waiting or active:
        for slot in range(slots):  # refill free slots: one prefill each (as the server, one prompt per decode)
            if slot in active or not waiting:
                continue
            p = waiting.pop(0)
            ids = prompts[p]
            L.llama_memory_seq_rm(memory, slot, -1, -1)
            batch.n_tokens = 0
            for pos, token in enumerate(ids):
                last = add(token, pos, slot, pos == len(ids) - 1)
            decode()
            first = argmax(last)
            active[slot] = {"prompt": p, "pos": len(ids), "made": 1, "next": first}
            outputs[p] = [first]
            generated += 1
        batch.n_tokens = 0
        rows = {}
        for slot, s in active.items():
            if s["made"] < new_tokens:
                rows[slot] = add(s["next"], s["pos"], slot, True)
        if batch.n_tokens:
            decode()
        for slot in list(active):
            s = active[slot]
            if slot in rows:
                s["next"] = argmax(rows[slot])
                s["pos"] += 1
                s["made"] += 1
                outputs[s["prompt"]].append(s["next"])
                generated += 1
            if s["made"] >= new_tokens:
                del active[slot]
    elapsed = time.perf_counter() - start
    L.llama_batch_free(batch)
    print("RESULT " + json.dumps({"tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed,
                                  "first": [outputs[p][:8] for p in sorted(outputs)[:2]]}), flush=True)


if __name__ == "__main__":
    main()
